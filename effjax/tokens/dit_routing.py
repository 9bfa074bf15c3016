"""Dynamic token routing, simplified (after Ma, Fei & Huang, ICCV 2023, "DiT: Efficient Vision Transformers with
Dynamic Token Routing").

The paper (abstract and README; no code was released) gives every token a data-dependent path through a
layer x scale grid: at each step a token takes a Transformer block, a downsampling patch-embedding block to a
coarser scale, or the identity, chosen by differentiable routing gates under budget constraints, with early
stopping of feature extraction. [mem, unverified] The gates are light per-token MLPs with a soft, thresholded
activation and the budget is an expected-FLOPs penalty.

effjax keeps the dynamic-depth part within the token-reduction interface ("routing, simplified"):
  * a per-token gate ``g_i = sigmoid(MLP(LayerNorm(x_i)))`` (MLP C -> C/4 -> 1 with GELU) before a block
    (place 'block') decides which tokens take the following blocks and which take the identity path;
  * the identity path is taken for the rest of the network (early stopping per token): the ``keep - prefix``
    tokens with the largest gates continue, in their original order, and the others leave the sequence, so the
    remaining blocks compute only on routed tokens (static shapes; the paper's per-token count is
    data-dependent, here the capacity ``keep`` is fixed by the schedule);
  * training (``deterministic=False``): each routed token is multiplied by a straight-through gate (1 in the
    forward pass, the gradient of ``g`` backwards), so the gates learn from the task loss, and the budget term
    ``(sum_i g_i / P - (keep - prefix) / P)^2`` (the expected routed fraction of the ``P`` original tokens
    against the schedule's; tokens routed out earlier count as 0; the token fraction stands in for FLOPs, whose
    per-token cost is the same in every block of a plain ViT up to the attention's quadratic term) is sown with
    ``self.sow('losses', 'dit_routing_budget', budget_weight * value)``, which the train step adds to the loss.
Not implemented: the multi-scale (downsampling) paths, soft multi-path propagation, and re-entry of a token
after an identity step. Tokens that exit keep their last features only in the caller's hands (``recover``
fills their positions); prefix tokens always continue and stay first.
"""

import jax.numpy as jnp
from flax import linen as nn

from effjax.tokens import state as state_lib
from effjax.tokens._pruning import dense_init, keep_fraction_gap, prior_keep, straight_through, with_prefix
from effjax.tokens._ranking import top_index
from effjax.tokens._spec import Spec

SPEC = Spec(place="block", merges=False, needs=(), learned=True, min_prefix=0, max_prefix=2,
            notes="Routing, simplified: a per-token gate sends the top-keep tokens through the remaining blocks "
                  "and the rest on the identity path (early exit); straight-through gates and a sown budget loss "
                  "('losses', 'dit_routing_budget'); no multi-scale paths.")


class Gate(nn.Module):
    """Per-token routing gate: ``x [batch, n, C]`` -> ``sigmoid(MLP(LayerNorm(x)))`` ``[batch, n]``."""

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        h = nn.LayerNorm(name="norm")(x)
        h = nn.gelu(nn.Dense(max(width // 4, 1), kernel_init=dense_init, name="hidden")(h), approximate=False)
        return nn.sigmoid(nn.Dense(1, kernel_init=dense_init, name="out")(h)[..., 0].astype(jnp.float32))


def route(x, tokens: state_lib.TokenState, gates, keep: int, prefix: int = 1):
    """Keeps the prefix and the ``keep - prefix`` tokens with the largest ``gates [batch, n - prefix]`` in their
    original order; tokens the state masks rank last."""
    if keep >= x.shape[1]:
        return x, tokens
    scores = jnp.where(prior_keep(tokens, prefix, x.shape[1]), gates, -1.0)
    return state_lib.gather(x, tokens, top_index(with_prefix(scores, prefix, 0.0), keep, prefix, by_position=True))


class Reducer(nn.Module):
    """Routing gate before a block: the top-``keep`` gated tokens continue, the others exit."""

    budget_weight: float = 1.0  # weight of the sown budget loss (unpublished; no code was released)

    @nn.compact
    def __call__(self, x, tokens, stats, *, keep: int, prefix: int, deterministic: bool = True):
        if keep >= x.shape[1]:
            return x, tokens
        gates = Gate(name="gate")(x[:, prefix:])
        if not deterministic:
            prior = prior_keep(tokens, prefix, x.shape[1])
            budget = keep_fraction_gap(gates * prior, keep, prefix, tokens)
            self.sow("losses", "dit_routing_budget", self.budget_weight * budget)
            scale = with_prefix(straight_through(jnp.ones_like(gates), gates), prefix, 1.0)
            x = x * scale[..., None].astype(x.dtype)
        return route(x, tokens, gates, keep, prefix)
