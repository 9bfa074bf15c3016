"""The state token reduction carries along the residual stream, and the one mechanism every method reduces with.

A reduction at one layer is an ``assign [batch, n_in]`` int map: the output slot each input token goes to, or
-1 when it is pruned. Merging is many inputs to one slot (a size-weighted mean, ToMe Sec. 3.3's
``merge_wavg``), pruning is a slot per kept token, and the source map of the original tokens composes by a
gather, so ``recover`` undoes every reduction so far (ToMe's unmerge, for dense outputs and visualisation).
"""

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class TokenState:
    """``sizes [batch, n]`` float32: how many original tokens each current token stands for (0 on padding).
    ``source [batch, n0]`` int32: the current position of each original token, -1 once pruned.
    ``mask [batch, n]`` bool or None: real (kept) tokens, for key padding and fixed-capacity methods.
    ``count`` float32 scalar or None: how many tokens are real, as a differentiable (straight-through) count a
    learned-rate method sets (DiffRate's proxies), so a FLOPs loss can reach its rates; None: all ``n``."""

    sizes: jax.Array
    source: jax.Array
    mask: jax.Array | None = None
    count: jax.Array | None = None

    @classmethod
    def start(cls, batch: int, n: int, mask=None) -> "TokenState":
        """Every token stands for itself; padded tokens (``mask`` False) have size 0."""
        sizes = jnp.ones((batch, n), jnp.float32) if mask is None else mask.astype(jnp.float32)
        source = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (batch, n))
        return cls(sizes, source, None if mask is None else mask.astype(bool))

    def log_sizes(self):
        """Proportional attention's key bias ``log(sizes)`` [batch, n] (ToMe Eq. 1); padding gets a large
        negative value instead of -inf."""
        return jnp.log(jnp.maximum(self.sizes, jnp.finfo(jnp.float32).tiny))

    @property
    def length(self) -> int:
        return self.sizes.shape[1]

    def real_count(self):
        """The tokens the next layer computes on, for FLOPs: ``count`` (at most the length) or the length."""
        return self.length if self.count is None else jnp.minimum(self.count, self.length)


def scatter_sum(values, assign, n_out: int):
    """``out[b, j] = sum_i values[b, i] * [assign[b, i] == j]``; entries with ``assign`` -1 are dropped."""
    batch = values.shape[0]
    slots = jnp.where(assign < 0, n_out, assign)  # out of range: dropped by mode="drop"
    rows = jnp.arange(batch)[:, None]
    out = jnp.zeros((batch, n_out) + values.shape[2:], values.dtype)
    return out.at[rows, slots].add(values, mode="drop")


def compose_source(source, assign):
    """The source map after a reduction ``assign``: original token -> its slot now (or -1)."""
    where = jnp.take_along_axis(assign, jnp.maximum(source, 0), axis=1)
    return jnp.where(source < 0, -1, where).astype(jnp.int32)


def reduce(x, state: TokenState, assign, n_out: int, *, weights=None, size_weights=None, mask_out=None):
    """Applies ``assign [batch, n]`` to tokens ``x [batch, n, d]``: each slot gets the weighted mean of its
    inputs. ``weights`` (default: the sizes, ToMe's size-weighted average) weigh the features;
    ``size_weights`` (default 1) scale each input's size before the sizes are summed (DiffRate's
    similarity-weighted sizes). ``mask_out`` overrides the slots' mask (default: a slot is real when it
    received a real token, kept None when the state has no mask). Returns ``(x', state')``."""
    sizes = state.sizes
    w = sizes if weights is None else weights.astype(jnp.float32)
    total = scatter_sum(x.astype(jnp.float32) * w[..., None], assign, n_out)
    norm = scatter_sum(w, assign, n_out)
    merged = total / jnp.where(norm > 0, norm, 1.0)[..., None]
    new_sizes = scatter_sum(sizes if size_weights is None else sizes * size_weights, assign, n_out)
    if mask_out is None and state.mask is not None:
        mask_out = scatter_sum(state.mask.astype(jnp.float32), assign, n_out) > 0
    return merged.astype(x.dtype), TokenState(new_sizes, compose_source(state.source, assign), mask_out)


def gather(x, state: TokenState, keep_index, *, mask_out=None):
    """Pruning by index: keeps tokens ``keep_index [batch, n_out]`` (in that order) and drops the rest.

    The same result as ``reduce`` with a one-to-one ``assign``, by a gather (cheaper than a scatter)."""
    batch, n = state.sizes.shape
    n_out = keep_index.shape[1]
    rows = jnp.arange(batch)[:, None]
    assign = jnp.full((batch, n), -1, jnp.int32).at[rows, keep_index].set(
        jnp.broadcast_to(jnp.arange(n_out, dtype=jnp.int32), keep_index.shape))
    take = lambda a: jnp.take_along_axis(a, keep_index, axis=1)  # noqa: E731
    if mask_out is None and state.mask is not None:
        mask_out = take(state.mask)
    new_x = jnp.take_along_axis(x, keep_index[..., None], axis=1)
    return new_x, TokenState(take(state.sizes), compose_source(state.source, assign), mask_out)


def recover(x, source, fill=0.0):
    """Tokens ``x [batch, n, d]`` back at the original length ``[batch, n0, d]``: each original position gets the
    token that absorbed it (ToMe's unmerge, composed over every layer); pruned positions get ``fill``."""
    out = jnp.take_along_axis(x, jnp.maximum(source, 0)[..., None], axis=1)
    return jnp.where((source >= 0)[..., None], out, jnp.asarray(fill, x.dtype))
