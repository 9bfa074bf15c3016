"""Top-K pruning by CLS attention: the EViT-style baseline (Liang et al., ICLR 2022, "Not All Patches are What
You Need"; Haurum et al. 2023 found it a surprisingly strong baseline, tokens.md Sec. 17.1).

Each reducing layer scores every token by the CLS token's attention to it in this block, averaged over heads
(EViT's attentiveness), keeps the prefix tokens (CLS, distillation) and the ``keep - prefix`` highest-scoring
others in their original order, and drops the rest (sizes of the kept tokens unchanged). It sits after the
attention residual, so the block's own attention gives the scores (EViT also reads the attention of the block
that prunes).

``fuse=True`` is EViT's inattentive-token fusion: the ``keep - prefix - 1`` highest-scoring tokens are kept
and every dropped token is folded into one extra token appended last, their mean weighted by the CLS attention
(EViT Eq. 4); its size is the sum of theirs, so sizes still sum to the original count. The default
(``fuse=False``) is the plain Top-K pruning the catalog asks for as a baseline.
"""

import jax.numpy as jnp
from flax import linen as nn

from effjax.tokens import _ranking
from effjax.tokens import state as state_lib
from effjax.tokens._spec import Spec

SPEC = Spec(place="attention", needs=("cls_attention",), min_prefix=1, max_prefix=2,
            notes="CLS attention averaged over heads; fuse=True adds EViT's attention-weighted fused token")


def prune(x, tokens, scores, keep: int, prefix: int = 1, fuse: bool = False):
    """Keeps the prefix tokens and the top ``scores [batch, n]`` others (``keep`` tokens in all); with ``fuse``
    the last slot is the CLS-attention-weighted mean of the dropped tokens."""
    n = x.shape[1]
    if keep >= n:
        return x, tokens
    if not fuse:
        return _ranking.keep_top(x, tokens, scores, keep, prefix)
    if keep < prefix + 2:
        raise ValueError(f"topk with fuse=True needs room for a kept token and the fused token: keep={keep} with "
                         f"{prefix} prefix token(s).")
    index = _ranking.top_index(scores, keep - 1, prefix, tokens.mask)
    batch = x.shape[0]
    rows = jnp.arange(batch)[:, None]
    assign = jnp.full((batch, n), keep - 1, jnp.int32).at[rows, index].set(
        jnp.broadcast_to(jnp.arange(keep - 1, dtype=jnp.int32), index.shape))
    kept = assign < keep - 1
    weights = jnp.where(kept, 1.0, scores)  # kept tokens are alone in their slot; EViT weighs by attention only
    mask_out = None
    if tokens.mask is not None:
        fused_real = jnp.any(jnp.logical_and(tokens.mask, ~kept), axis=1, keepdims=True)
        mask_out = jnp.concatenate([jnp.take_along_axis(tokens.mask, index, axis=1), fused_real], axis=1)
    return state_lib.reduce(x, tokens, assign, keep, weights=weights, mask_out=mask_out)


class Reducer(nn.Module):
    """Top-K by the block's CLS attention to ``keep`` tokens (prefix kept)."""

    fuse: bool = False

    @nn.compact
    def __call__(self, x, tokens, stats, *, keep: int, prefix: int, deterministic: bool = True):
        return prune(x, tokens, _ranking.cls_importance(stats), keep, prefix, self.fuse)
