"""Token Transforming (Zeng, Yu, Kong, Tang 2025, "Token Transforming: A Unified and Training-Free Token
Compression Framework for Vision Transformer Acceleration", arXiv 2506.05709).

The paper writes every token reduction as ``X' = T X`` with ``T [N', N]``: pruning has one-hot rows, merging
has disjoint groups, and Token Transforming is many-to-many: an original token may contribute to several output
tokens, which keeps more of its information and makes the reduction usable without training.

The construction of ``T`` implemented here (tokens.md Sec. 2, marked [mem]: **unverified**; no official code
exists; the anchor rule, the similarity, the temperature and the normalisation below are this reading, not
checked against the paper):
  1. anchors: the prefix tokens (CLS, distillation) and the ``keep - prefix`` tokens the CLS token attends to
     most (this block's CLS attention averaged over heads), in their original order; they are the ``keep``
     output tokens;
  2. an anchor passes to its own output whole (a one-hot column of ``T``); every other token spreads over the
     non-prefix anchors with ``T[k, j] = softmax_k(cos(m_j, m_k) / temperature)``, ``m`` the block's keys
     averaged over heads (ToMe's metric), so each column of ``T`` sums to 1; prefix tokens receive nothing;
  3. sizes ``s' = T s`` (so they sum to the original count) and features ``x'_k = sum_j T_kj s_j x_j / s'_k``
     (the size-weighted mean, ToMe's merge generalised to soft assignments).
Source map: ``TokenState`` holds one slot per original token, so an original token is mapped to the output of
its largest ``T`` column entry (its anchor, for an anchor); ``recover`` then gives each position that token.
Padded tokens (mask False) have size 0 and contribute nothing. ``temperature`` 0.1 is our default.
"""

import jax
import jax.numpy as jnp
from flax import linen as nn

from effjax.tokens import _ranking
from effjax.tokens import state as state_lib
from effjax.tokens._spec import Spec

SPEC = Spec(place="attention", needs=("cls_attention", "keys"), min_prefix=1, max_prefix=2,
            notes="many-to-many T from a temperature softmax of key similarity to CLS-attention anchors "
                  "(construction unverified); source map by each token's largest T entry")


def transform_matrix(importance, metric, keep: int, prefix: int = 1, temperature: float = 0.1, mask=None):
    """``(T [batch, keep, n], anchors [batch, keep])``: the many-to-many matrix and the anchors' positions."""
    batch, n = importance.shape
    anchors = _ranking.top_index(importance, keep, prefix, mask)
    sim = _ranking.cosine(jnp.take_along_axis(metric, anchors[..., None], axis=1), metric)  # [batch, keep, n]
    out_is_prefix = jnp.arange(keep) < prefix
    logits = sim / temperature
    if mask is not None:  # padded anchors (only when fewer real tokens than keep) receive nothing
        real = jnp.take_along_axis(mask, anchors, axis=1)
        logits = jnp.where(real[..., None], logits, jnp.finfo(jnp.float32).min / 2)
    logits = jnp.where(out_is_prefix[None, :, None], -jnp.inf, logits)
    soft = jax.nn.softmax(logits, axis=1)
    rows = jnp.arange(batch)[:, None]
    is_anchor = jnp.zeros((batch, n), bool).at[rows, anchors].set(True)
    own = jax.nn.one_hot(anchors, n, dtype=jnp.float32)  # [batch, keep, n]: anchor k -> column anchors[k]
    t = jnp.where(is_anchor[:, None, :], own, soft)
    return jax.lax.stop_gradient(t), anchors


def transform(x, tokens, importance, metric, keep: int, prefix: int = 1, temperature: float = 0.1):
    """Token Transforming to ``keep`` tokens: ``X' = diag(T s)^-1 T diag(s) X``, ``s' = T s``."""
    n = x.shape[1]
    if keep >= n:
        return x, tokens
    t, anchors = transform_matrix(importance, jax.lax.stop_gradient(metric), keep, prefix, temperature,
                                  tokens.mask)
    weighted = t * tokens.sizes[:, None, :]
    sizes = jnp.sum(weighted, axis=2)
    merged = jnp.einsum("bkn,bnd->bkd", weighted, x.astype(jnp.float32))
    merged = merged / jnp.where(sizes > 0, sizes, 1.0)[..., None]
    assign = jnp.argmax(t, axis=1).astype(jnp.int32)  # each original token's largest T entry
    mask = None if tokens.mask is None else jnp.take_along_axis(tokens.mask, anchors, axis=1)
    return merged.astype(x.dtype), state_lib.TokenState(sizes, state_lib.compose_source(tokens.source, assign),
                                                        mask)


class Reducer(nn.Module):
    """Token Transforming after the block's attention: ``keep`` anchors absorb every token softly."""

    temperature: float = 0.1

    @nn.compact
    def __call__(self, x, tokens, stats, *, keep: int, prefix: int, deterministic: bool = True):
        return transform(x, tokens, _ranking.cls_importance(stats), stats.keys(), keep, prefix, self.temperature)
