"""ATS: Adaptive Token Sampling (Fayyaz et al., ECCV 2022, "Adaptive Token Sampler for Efficient Vision
Transformers", arXiv 2111.15667), Sec. 3, as in the released code (tokens.md Sec. 3).

Significance (Sec. 3.2, Eq. 4): ``S_j = (sum_h A_h[0, j]) * ||v_j||`` for every non-prefix token j, with ``A`` the
block's attention probabilities and ``v_j`` the token's value vector with the heads concatenated; normalised
to sum 1 over the non-prefix tokens. Inverse transform sampling (Sec. 3.2): sort S ascending, cumulative sum,
min-max normalise to [0, 1]; ``T`` evenly spaced targets from the smallest non-zero CDF value up to 1; each
target picks the token whose CDF value is nearest (the first on a tie). Duplicates are removed, so a token is
kept at most once and the number kept is data-dependent: high-score tokens span wide CDF intervals and are hit
by several targets, low-score tokens are hit rarely or never.

Static shapes: the output has exactly ``keep`` slots (the schedule's count is ATS's K, an upper bound): the
prefix tokens (CLS, distillation; never scored, always kept) first, then the sampled tokens in their original
order, then empty slots (zero features, size 0, ``TokenState.mask`` False, source -1 for the tokens that were
not sampled), where the released code re-packs the batch to its largest kept count. ``T`` is the released
code's ``n_ref - 1`` (the model's original token count less CLS: ``n0 - prefix`` here, read off the source
map) unless ``targets`` sets it; ``targets=0`` uses the capacity ``keep - prefix``, the paper's "sample K
tokens" reading. When more distinct tokens are hit than the capacity holds, the highest-scoring are kept (the
released code's DeiT-S config has K = n_ref, where this cannot happen).

Place: ATS keeps only the selected query rows of the block's own attention (keys and values still cover every
token), then the residual and MLP run on the selected tokens. Attention rows are independent per query, so
selecting the rows of the attention residual's output after the attention, where this interface reduces, is
the same computation. No size tracking and no proportional attention in the paper (sizes pass through; each
kept token keeps its size).
"""

import jax
import jax.numpy as jnp
from flax import linen as nn

from effjax.tokens import _ranking
from effjax.tokens import state as state_lib
from effjax.tokens._spec import Spec

SPEC = Spec(place="attention", merges=False, needs=("cls_attention", "values"), min_prefix=1, max_prefix=2,
            notes="fixed capacity keep with a mask: the sampled count is data-dependent and <= keep")


def significance(cls_attention, values, prefix: int = 1, mask=None):
    """``[batch, n]``: CLS attention summed over heads times the value norm (heads concatenated), zero on the
    prefix and padded tokens, normalised to sum 1 (Eq. 4). ``cls_attention [batch, heads, n]``, ``values
    [batch, n, heads, head_dim]``."""
    n = values.shape[1]
    norm = jnp.sqrt(jnp.sum(jnp.square(values.astype(jnp.float32)), axis=(2, 3)))
    score = jnp.sum(cls_attention.astype(jnp.float32), axis=1) * norm
    score = jnp.where(_ranking.prefix_flags(n, prefix), 0.0, score)
    if mask is not None:
        score = jnp.where(mask, score, 0.0)
    score = jax.lax.stop_gradient(score)
    return score / jnp.maximum(jnp.sum(score, axis=1, keepdims=True), jnp.finfo(jnp.float32).tiny)


def sample(scores, targets: int):
    """Inverse transform sampling with deduplication: ``[batch, n]`` bool, True on the tokens some target hit."""
    batch, n = scores.shape
    order = jnp.argsort(scores, axis=1)  # ascending, stable
    cdf = jnp.cumsum(jnp.take_along_axis(scores, order, axis=1), axis=1)
    low, high = cdf[:, :1], cdf[:, -1:]
    cdf = (cdf - low) / jnp.maximum(high - low, jnp.finfo(jnp.float32).tiny)
    start = jnp.min(jnp.where(cdf > 0, cdf, 1.0), axis=1, keepdims=True)
    steps = jnp.arange(targets, dtype=jnp.float32) / max(targets - 1, 1)
    ys = start + (1.0 - start) * steps[None, :]
    nearest = jnp.argmin(jnp.abs(ys[:, :, None] - cdf[:, None, :]), axis=2)  # [batch, targets] sorted positions
    picked = jnp.take_along_axis(order, nearest, axis=1)
    rows = jnp.arange(batch)[:, None]
    return jnp.zeros((batch, n), bool).at[rows, picked].set(True)


def select(scores, keep: int, prefix: int = 1, targets: int | None = None, mask=None):
    """``(index [batch, keep], valid [batch, keep])``: the prefix tokens, then the sampled tokens (at most
    ``keep - prefix``, the highest-scoring when more were hit) in their original order, then unused slots
    (``valid`` False). ``targets`` defaults to the capacity ``keep - prefix``."""
    n = scores.shape[1]
    targets = keep - prefix if not targets else targets
    hit = sample(scores, targets) & (scores > 0)
    if mask is not None:
        hit &= mask
    is_prefix = _ranking.prefix_flags(n, prefix)
    index = _ranking.top_index(jnp.where(hit, scores, -jnp.inf), keep, prefix)
    valid = jnp.take_along_axis(hit | is_prefix[None], index, axis=1)
    order = jnp.argsort(jnp.where(valid, index, index + n), axis=1)  # used slots first, each part ascending
    return jnp.take_along_axis(index, order, axis=1), jnp.take_along_axis(valid, order, axis=1)


def reduce(x, tokens, scores, keep: int, prefix: int = 1, targets: int | None = None):
    """ATS to a capacity of ``keep`` slots; slots no sampled token fills are masked (size 0, zero features)."""
    n = scores.shape[1]
    if keep >= n:
        return x, tokens
    index, valid = select(scores, keep, prefix, targets, tokens.mask)
    out, new = state_lib.gather(x, tokens, index, mask_out=valid)
    slot_used = jnp.take_along_axis(valid, jnp.maximum(new.source, 0), axis=1)
    source = jnp.where((new.source >= 0) & slot_used, new.source, -1)
    out = jnp.where(valid[..., None], out, jnp.zeros((), out.dtype))
    return out, state_lib.TokenState(jnp.where(valid, new.sizes, 0.0), source, valid)


class Reducer(nn.Module):
    """ATS after the block's attention: samples at most ``keep`` tokens (prefix kept), the rest masked.

    ``targets``: the number of CDF targets; None is the released code's ``n_ref - 1`` (the original token count
    less the prefix), 0 the capacity ``keep - prefix``."""

    targets: int | None = None

    @nn.compact
    def __call__(self, x, tokens, stats, *, keep: int, prefix: int, deterministic: bool = True):
        scores = significance(stats.cls_attention(), stats.values(), prefix, tokens.mask)
        targets = tokens.source.shape[1] - prefix if self.targets is None else self.targets
        return reduce(x, tokens, scores, keep, prefix, targets)
