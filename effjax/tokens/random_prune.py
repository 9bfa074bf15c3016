"""Random token pruning: the trivial baseline every token-reduction comparison should include.

The catalog's benchmark protocol (tokens.md Sec. 17.1, after Haurum et al. 2023, "Which Tokens to Use?") asks for
random pruning beside Top-K: each reducing layer keeps its prefix tokens (CLS, distillation) and a uniformly
random subset of ``keep - prefix`` of the others, in their original order; the dropped tokens are gone (no
merging, sizes of the kept tokens unchanged). It sits where ToMe does (after the attention residual) so that it
compares with the other methods at the same place, and needs no attention statistics.

Randomness: in training (``deterministic=False``) the draw uses the ``'dropout'`` rng stream when the apply has
one, so every step draws afresh; otherwise (evaluation, or no such rng) a fixed key ``PRNGKey(seed)`` folded with
the input length, so evaluation is reproducible and the layers of one model (whose input lengths differ along a
schedule) draw different subsets. Every example of the batch draws its own subset. Padded tokens are dropped
before real ones.
"""

import jax
from flax import linen as nn

from effjax.tokens import _ranking
from effjax.tokens._spec import Spec

SPEC = Spec(place="attention", merges=False, needs=(), max_prefix=2,
            notes="uniform random subset of the non-prefix tokens; 'dropout' rng in training, a fixed key folded "
                  "with the input length otherwise")


def prune(x, tokens, key, keep: int, prefix: int = 1):
    """Keeps the ``prefix`` tokens and ``keep - prefix`` others drawn uniformly (per example) with ``key``."""
    if keep >= x.shape[1]:
        return x, tokens
    priority = jax.random.uniform(key, tokens.sizes.shape)
    return _ranking.keep_top(x, tokens, priority, keep, prefix)


def layer_key(seed: int, n: int):
    """The fixed key of a layer that sees ``n`` tokens."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), n)


class Reducer(nn.Module):
    """Random pruning to ``keep`` tokens (prefix kept)."""

    seed: int = 0

    @nn.compact
    def __call__(self, x, tokens, stats, *, keep: int, prefix: int, deterministic: bool = True):
        if not deterministic and self.has_rng("dropout"):
            key = self.make_rng("dropout")
        else:
            key = layer_key(self.seed, x.shape[1])
        return prune(x, tokens, key, keep, prefix)
