"""Zero-TPrune: zero-shot token pruning with the attention graph (Wang, Dedhia, Jha, CVPR 2024, arXiv 2305.17328).

I-stage (importance): each head's attention matrix ``A_h`` (rows are queries and sum to 1) is the adjacency
matrix of a directed graph, and Weighted PageRank iterates the graph shift ``s <- A_h^T s`` from the uniform
``s = 1/N`` (a token is important when important tokens attend to it; ``A_h^T`` is column-stochastic, so ``s``
stays a distribution), a fixed ``iterations`` times (a ``lax.fori_loop``). Padded tokens start at 0 and, as
keys, receive no attention, so they stay near 0. The per-head scores are averaged over heads.

S-stage (similarity): the non-prefix tokens are sorted by importance and split into the less-important group
(the bottom ``group`` fraction, at least as many as are pruned) and the more-important rest; each less-important
token's redundancy is its largest cosine similarity (the block's keys averaged over heads) to a more-important
token, and the most redundant less-important tokens are pruned. Any removals beyond the less-important group's
size fall back to importance (the least important remaining tokens go). Pruned tokens are dropped (no merging,
sizes unchanged); the prefix tokens (CLS, distillation) are never scored or pruned and stay first; the kept
tokens keep their original order. Top-k with a static count (the paper also has a threshold mode, which is
data-dependent and not offered).

Unverified (tokens.md Sec. 4 and 18 item 2; no official code exists): the head aggregation, where the paper
uses "Emphasizing Informative Region" (EIR) and a "Variance-based Head Filter" (VHF), here a plain mean over
heads; the iteration count (the catalog recalls ~30 at the first pruning layer and fewer later with a warm start
from the previous layer's scores; here ``iterations`` at every layer from the uniform start); the S-stage
partition rule ("Seq" partition by importance into halves is this reading); which layers prune (the schedule's).
"""

import jax
import jax.numpy as jnp
from flax import linen as nn

from effjax.tokens import _ranking
from effjax.tokens._spec import Spec

SPEC = Spec(place="attention", merges=False, needs=("probabilities", "keys"), max_prefix=2,
            notes="I-stage weighted PageRank (mean over heads, no EIR/VHF), S-stage similarity pruning, top-k")


def pagerank(probabilities, iterations: int = 30, mask=None):
    """Weighted PageRank on each head's attention graph, averaged over heads: ``[batch, n]`` (sums to 1).

    ``probabilities [batch, heads, n, n]`` (rows are queries); ``s <- A_h^T s`` ``iterations`` times."""
    probabilities = jax.lax.stop_gradient(probabilities.astype(jnp.float32))
    batch, heads, n, _ = probabilities.shape
    start = jnp.ones((batch, n), jnp.float32) if mask is None else mask.astype(jnp.float32)
    start = start / jnp.maximum(jnp.sum(start, axis=1, keepdims=True), 1.0)
    s = jnp.broadcast_to(start[:, None], (batch, heads, n))
    s = jax.lax.fori_loop(0, iterations, lambda _, s: jnp.einsum("bhq,bhqk->bhk", s, probabilities), s)
    return jnp.mean(s, axis=1)


def prune_priority(importance, metric, removed: int, prefix: int = 1, group: float = 0.5, mask=None):
    """``[batch, n]``: the order in which tokens are pruned (highest first). The less-important group ranks above
    every other token by its redundancy, the rest by low importance; the prefix tokens rank last."""
    batch, n = importance.shape
    others = n - prefix
    size = min(others, max(removed, int(round(group * others))))
    is_prefix = _ranking.prefix_flags(n, prefix)
    real = jnp.ones((batch, n), bool) if mask is None else mask
    rank_key = jnp.where(is_prefix[None] | ~real, jnp.inf, importance)  # padding is never "more important"
    rank = jnp.argsort(jnp.argsort(rank_key, axis=1), axis=1)  # 0 = least important
    less = (rank < size) & ~is_prefix[None]
    more = ~less & ~is_prefix[None] & real
    sim = _ranking.cosine(metric, metric)
    redundancy = jnp.max(jnp.where(more[:, None, :], sim, -jnp.inf), axis=2)
    redundancy = jnp.where(jnp.isfinite(redundancy), redundancy, -1.0)
    scale = jnp.maximum(jnp.max(importance, axis=1, keepdims=True), 1e-30)
    return jnp.where(less, 4.0 + redundancy, -importance / scale)


def prune(x, tokens, probabilities, metric, keep: int, prefix: int = 1, iterations: int = 30,
          group: float = 0.5):
    """Zero-TPrune to ``keep`` tokens: PageRank importance, then similarity-based pruning of the less important."""
    n = x.shape[1]
    if keep >= n:
        return x, tokens
    importance = pagerank(probabilities, iterations, tokens.mask)
    priority = prune_priority(importance, jax.lax.stop_gradient(metric), n - keep, prefix, group, tokens.mask)
    return _ranking.keep_top(x, tokens, -priority, keep, prefix)


class Reducer(nn.Module):
    """Zero-TPrune after the block's attention, on its probabilities and head-averaged keys."""

    iterations: int = 30
    group: float = 0.5

    @nn.compact
    def __call__(self, x, tokens, stats, *, keep: int, prefix: int, deterministic: bool = True):
        return prune(x, tokens, stats.probabilities(), stats.keys(), keep, prefix, self.iterations, self.group)
