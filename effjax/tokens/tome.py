"""ToMe: Token Merging (Bolya et al., ICLR 2023, "Token Merging: Your ViT but Faster"), Sec. 3.

Bipartite soft matching (Sec. 3.2): tokens alternate into sets A (even positions) and B (odd positions); each A
token's most cosine-similar B token under the metric (the block's keys averaged over heads) is its edge; the
``r`` A tokens with the most similar edges merge into their B partners by a size-weighted mean (Sec. 3.3,
``merge_wavg``), and sizes add. The merge sits between the attention residual and the MLP, and the next
attention adds ``log(size)`` to every key's logit (proportional attention, Eq. 1). The CLS token (position 0,
in A) is never a source and the distillation token (position 1, in B) never a destination, so both stay at
positions 0 and 1. Output order as the reference: the unmerged A tokens (ascending with a CLS token, else by
rank), then B. ``r`` per layer is capped at half the non-prefix tokens, as the paper does.
"""

import jax
import jax.numpy as jnp
from flax import linen as nn

from effjax.tokens import state as state_lib
from effjax.tokens._spec import Spec

SPEC = Spec(place="attention", needs=("keys",), max_prefix=2, cap=lambda n, prefix: (n - prefix) // 2)


def bipartite_soft_matching(metric, r: int, prefix: int = 1):
    """``assign [batch, n]`` (output slot of each token) and the output length ``n - r`` for ``metric
    [batch, n, c]``; ``prefix`` is 0, 1 (CLS) or 2 (CLS and distillation token)."""
    batch, n, _ = metric.shape
    r = min(r, (n - prefix) // 2)
    if r <= 0:
        return jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (batch, n)), n
    metric = jax.lax.stop_gradient(metric.astype(jnp.float32))
    metric = metric / jnp.linalg.norm(metric, axis=-1, keepdims=True)
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = jnp.einsum("bic,bjc->bij", a, b)
    if prefix >= 1:
        scores = scores.at[:, 0, :].set(-jnp.inf)
    if prefix >= 2:
        scores = scores.at[:, :, 0].set(-jnp.inf)
    node_max, node_idx = scores.max(-1), scores.argmax(-1)
    edge_idx = jnp.argsort(-node_max, axis=-1)  # most similar first; the -inf CLS row sorts last
    unm_idx, src_idx = edge_idx[:, r:], edge_idx[:, :r]
    if prefix >= 1:
        unm_idx = jnp.sort(unm_idx, axis=-1)
    n_a, n_b = a.shape[1], b.shape[1]
    n_unm = n_a - r
    dst_idx = jnp.take_along_axis(node_idx, src_idx, axis=-1)
    rank = jnp.arange(n_unm, dtype=jnp.int32)
    b_slot = n_unm + jnp.arange(n_b, dtype=jnp.int32)
    if prefix >= 2:  # [unm_0, dst_0, unm_1:, dst_1:] keeps CLS and the distillation token first
        rank = jnp.where(rank == 0, 0, rank + 1)
        b_slot = b_slot.at[0].set(1)
    rows = jnp.arange(batch)[:, None]
    a_slot = jnp.zeros((batch, n_a), jnp.int32)
    a_slot = a_slot.at[rows, unm_idx].set(jnp.broadcast_to(rank, unm_idx.shape))
    a_slot = a_slot.at[rows, src_idx].set(b_slot[dst_idx])
    assign = jnp.zeros((batch, n), jnp.int32).at[:, ::2].set(a_slot).at[:, 1::2].set(
        jnp.broadcast_to(b_slot, (batch, n_b)))
    return assign, n - r


def merge(x, tokens: state_lib.TokenState, metric, r: int, prefix: int = 1):
    """One ToMe step: ``(x', tokens')`` with ``x [batch, n, d]`` merged to ``n - r`` tokens (size-weighted)."""
    assign, n_out = bipartite_soft_matching(metric, r, prefix)
    if n_out == x.shape[1]:
        return x, tokens
    return state_lib.reduce(x, tokens, assign, n_out)


class Reducer(nn.Module):
    """ToMe between attention and MLP: merges to ``keep`` tokens by the block's head-averaged keys."""

    @nn.compact
    def __call__(self, x, tokens, stats, *, keep: int, prefix: int, deterministic: bool = True):
        return merge(x, tokens, stats.keys(), x.shape[1] - keep, prefix)
