"""DynamicViT (Rao et al., NeurIPS 2021, "DynamicViT: Efficient Vision Transformers with Dynamic Token
Sparsification"), Sec. 3.

A prediction module (the reference's ``PredictorLG``, Sec. 3.2 Eq. 1-3) sits before blocks 3, 6 and 9 of a
DeiT (place 'block') and scores the non-prefix tokens: LayerNorm -> Linear(C, C) -> GELU gives per-token
features whose first C/2 channels are local and whose last C/2 channels are averaged over the currently kept
tokens (weighted by the keep decisions so far) into a global feature; ``[local, global]`` goes through an MLP
C -> C/2 -> C/4 -> 2 with GELUs and a log-softmax: the (keep, drop) log-probabilities ``pi``. Each stage keeps
``int(P rho^k)`` of the ``P`` original patches (the ``keep`` schedule: 0.7 at layers '3,6,9' gives 137, 96, 67
of 196, plus CLS); the CLS (and distillation) token is always kept and stays first.

Inference (``deterministic=True``), as the reference: argsort the keep log-probability, keep the top tokens
(in descending score order, as the reference's gather leaves them), and later blocks run on fewer tokens.

Training (``deterministic=False``) departs from the paper, whose interface keeps every token and masks the
attention (``softmax_with_policy``, Eq. 4-5), because a ``Reducer`` must return exactly ``keep`` tokens:
  * the decision ``D = GumbelSoftmax_hard(pi)[keep] * D_prev`` (Eq. 2-3, temperature ``tau``) is drawn with
    ``self.make_rng('dropout')`` (the model's dropout stream; the interface has no 'gumbel' stream);
  * the top-``keep`` tokens by the Gumbel-perturbed keep-minus-drop logit are gathered (tokens a previous
    stage dropped rank last), and each kept token is multiplied by its straight-through decision (1 or 0 in
    the forward pass, the gradient of the soft Gumbel probability backwards), so the predictor gets gradients
    through the features of the tokens it keeps rather than through the attention policy;
  * kept tokens whose hard decision is "drop" (the capacity is larger than the policy's keep count) are
    zeroed and masked out of attention via ``TokenState.mask``, as ``softmax_with_policy`` masks them (the
    paper keeps each token's self-loop; here a masked token attends to the others and no one attends to it).
The ratio loss (Eq. 11, ``(keep fraction - rho^k)^2`` averaged over the batch, the keep fraction taken over
the ``P`` original patches with tokens removed earlier counting as dropped) is sown per stage with
``self.sow('losses', 'dynamicvit_ratio', ratio_weight * value)``, and the train step adds every sown loss to
the task loss (``effjax.train.steps.AUX_LOSSES``). The paper adds 2.0 times the mean over its 3 stages, so the
default ``ratio_weight`` is 2.0 / 3 per stage.
Neither the teacher distillation terms (KL on logits, MSE on kept tokens) nor the 30-epoch recipe are here.
"""

import jax
import jax.numpy as jnp
from flax import linen as nn

from effjax.tokens import state as state_lib
from effjax.tokens._pruning import (
    LOWEST,
    dense_init,
    keep_fraction_gap,
    prior_keep,
    straight_through,
    with_prefix,
)
from effjax.tokens._ranking import top_index
from effjax.tokens._spec import Spec

SPEC = Spec(place="block", merges=False, needs=(), learned=True, min_prefix=0, max_prefix=2,
            notes="Training keeps the top-keep tokens by the Gumbel-perturbed score (static shapes) and multiplies "
                  "them by the straight-through decision, masking kept tokens the policy drops; the ratio loss is "
                  "sown ('losses', 'dynamicvit_ratio', weighted), which the train step adds; no distillation losses.")


def gelu(x):
    return nn.gelu(x, approximate=False)  # PyTorch's nn.GELU (erf form)


class Predictor(nn.Module):
    """DynamicViT's ``PredictorLG``: ``x [batch, n, C]`` and the keep policy so far ``[batch, n]`` ->
    (keep, drop) log-probabilities ``[batch, n, 2]``."""

    @nn.compact
    def __call__(self, x, policy):
        width = x.shape[-1]
        dense = lambda features, name: nn.Dense(features, kernel_init=dense_init, name=name)  # noqa: E731
        h = gelu(dense(width, "embed")(nn.LayerNorm(epsilon=1e-5, name="norm")(x)))
        half = width // 2
        local, pooled = h[..., :half], h[..., half:]
        policy = policy.astype(h.dtype)[..., None]
        total = jnp.maximum(policy.sum(axis=1, keepdims=True), 1e-6)
        pooled = (pooled * policy).sum(axis=1, keepdims=True) / total
        h = jnp.concatenate([local, jnp.broadcast_to(pooled, local.shape[:2] + pooled.shape[2:])], axis=-1)
        h = gelu(dense(width // 2, "mlp_0")(h))
        h = gelu(dense(max(width // 4, 1), "mlp_1")(h))
        return jax.nn.log_softmax(dense(2, "mlp_2")(h).astype(jnp.float32), axis=-1)


def prune(x, tokens: state_lib.TokenState, keep_logprob, keep: int, prefix: int = 1):
    """Inference pruning: keeps the prefix tokens and the ``keep - prefix`` tokens with the largest
    ``keep_logprob [batch, n - prefix]`` (in descending order, as the reference). Returns ``(x', tokens')``."""
    if keep >= x.shape[1]:
        return x, tokens
    scores = jnp.where(prior_keep(tokens, prefix, x.shape[1]), keep_logprob, LOWEST)
    return state_lib.gather(x, tokens, top_index(with_prefix(scores, prefix, 0.0), keep, prefix, by_position=False))


class Reducer(nn.Module):
    """DynamicViT before a block: the predictor's top-``keep`` tokens (Gumbel straight-through in training)."""

    tau: float = 1.0  # Gumbel-softmax temperature (the reference's default)
    ratio_weight: float = 2.0 / 3  # per stage: the paper's 2.0 times the mean over its 3 stages

    @nn.compact
    def __call__(self, x, tokens, stats, *, keep: int, prefix: int, deterministic: bool = True):
        n = x.shape[1]
        if keep >= n:
            return x, tokens
        prior = prior_keep(tokens, prefix, n)
        logprob = Predictor(name="predictor")(x[:, prefix:], prior)
        if deterministic:
            return prune(x, tokens, logprob[..., 0], keep, prefix)
        noise = jax.random.gumbel(self.make_rng("dropout"), logprob.shape, jnp.float32)
        logits = (logprob + noise) / self.tau
        hard = prior & (logits[..., 0] > logits[..., 1])
        decision = straight_through(hard, jax.nn.softmax(logits, axis=-1)[..., 0]) * prior
        self.sow("losses", "dynamicvit_ratio", self.ratio_weight * keep_fraction_gap(decision, keep, prefix, tokens))
        scores = jnp.where(prior, logits[..., 0] - logits[..., 1], LOWEST)
        index = top_index(with_prefix(scores, prefix, 0.0), keep, prefix, by_position=False)
        scale = with_prefix(decision, prefix, 1.0)
        mask = with_prefix(hard, prefix, True)
        x, tokens = state_lib.gather(x, tokens, index, mask_out=jnp.take_along_axis(mask, index, axis=1))
        return x * jnp.take_along_axis(scale, index, axis=1)[..., None].astype(x.dtype), tokens
