"""IA-RED² (Pan et al., NeurIPS 2021, "IA-RED²: Interpretability-Aware Redundancy Reduction for Vision
Transformers"), in a fixed-capacity form.

What is certain (project page and abstract): the ViT is split into groups of blocks; before each group a
multi-head interpreter (a small policy network) scores the patch tokens and uninformative patches are dropped,
hierarchically (a patch dropped before one group stays dropped) and input-dependently; the interpreters are
trained by reinforcement learning with a reward for accuracy and efficiency. No code was released.

This module implements the form the catalog recalls from memory ([mem], not verified against the paper):
  * interpreter (per group, place 'block'): LayerNorm, then per head ``h`` a query projection of the CLS token
    (the mean token without a prefix) and a key projection of each patch; the patch's keep probability is
    ``p_i = mean_h sigmoid(q_h . k_{h,i} / sqrt(d_h))`` [mem];
  * decision: keep patch ``i`` when ``p_i >= threshold`` (0.5) at test time [mem]; in training a Bernoulli(p_i)
    sample (drawn with ``self.make_rng('dropout')``, the model's dropout stream);
  * fixed capacity (the paper's count is input-dependent, shapes here are static): the ``keep - prefix``
    patches with the largest ``p`` are gathered (in their original order, previously dropped ones last), and
    the kept patches whose decision is "drop" are masked out of attention through ``TokenState.mask``. When
    more patches pass the threshold than the capacity holds, the capacity wins (the lowest ``p`` are removed).
Training departs from the paper: REINFORCE (the paper's optimiser; [mem] reward ``1 - (kept fraction)^2`` for a
correct prediction, a penalty otherwise) needs the reward of the whole prediction, which a Reducer does not see,
so it is out of scope. Instead the kept patches are multiplied by a straight-through decision (the sample in the
forward pass, the gradient of ``p`` backwards; masked patches are zeroed), which trains the interpreter with
the task loss. For a REINFORCE trainer the module sows the ingredients into 'intermediates':
``ia_red2_log_prob`` (the log-probability of the sampled decisions of the previously kept patches, [batch]) and
``ia_red2_kept_fraction`` ([batch], over the original patches). The per-group sequential training and the
backbone fine-tuning are not here. Prefix tokens (CLS, distillation) are always kept and stay first.
Called with ``keep == n`` the Reducer still masks by the threshold; the model's plan, though, only runs a
Reducer on layers whose count drops, so a keep ratio of 1.0 turns a group's interpreter off.
"""

import jax
import jax.numpy as jnp
from flax import linen as nn

from effjax.tokens import state as state_lib
from effjax.tokens._pruning import dense_init, prior_keep, straight_through, with_prefix
from effjax.tokens._ranking import top_index
from effjax.tokens._spec import Spec

SPEC = Spec(place="block", merges=False, needs=(), learned=True, min_prefix=0, max_prefix=2,
            notes="[mem] interpreter (CLS query x patch keys, sigmoid, head mean); fixed capacity keep plus a mask "
                  "for the 0.5 threshold; straight-through Bernoulli training instead of REINFORCE (log-probs "
                  "sown for a REINFORCE trainer).")


class Interpreter(nn.Module):
    """Multi-head interpreter: tokens ``[batch, n, C]`` -> keep probabilities of the non-prefix tokens
    ``[batch, n - prefix]`` (mean over heads of sigmoid(CLS query . patch key / sqrt(d)))."""

    num_heads: int = 4

    @nn.compact
    def __call__(self, x, prefix: int):
        width = x.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"ia_red2: width {width} is not divisible by num_heads {self.num_heads} "
                             "(model.tokens.params.num_heads).")
        head_dim = width // self.num_heads
        h = nn.LayerNorm(name="norm")(x)
        anchor = h[:, :1] if prefix else h.mean(axis=1, keepdims=True)
        project = lambda name: nn.DenseGeneral((self.num_heads, head_dim), kernel_init=dense_init,  # noqa: E731
                                               name=name)
        q = project("query")(anchor)
        k = project("key")(h[:, prefix:])
        logits = jnp.einsum("bqhd,bkhd->bhk", q, k).astype(jnp.float32) / jnp.sqrt(jnp.float32(head_dim))
        return jax.nn.sigmoid(logits).mean(axis=1)


def select(x, tokens: state_lib.TokenState, probability, decision, keep: int, prefix: int = 1):
    """Keeps the prefix and the ``keep - prefix`` patches of largest ``probability [batch, n - prefix]`` (in
    position order; patches an earlier group dropped rank last) and masks the kept patches whose ``decision``
    is False. Returns ``(x', tokens')`` with ``tokens'.mask`` set."""
    prior = prior_keep(tokens, prefix, x.shape[1])
    scores = jnp.where(prior, probability, -1.0)
    index = top_index(with_prefix(scores, prefix, 0.0), keep, prefix, by_position=True)
    mask = with_prefix(decision & prior, prefix, True)
    return state_lib.gather(x, tokens, index, mask_out=jnp.take_along_axis(mask, index, axis=1))


class Reducer(nn.Module):
    """IA-RED² before a group of blocks: interpreter scores, fixed capacity ``keep``, threshold as a mask."""

    num_heads: int = 4
    threshold: float = 0.5

    @nn.compact
    def __call__(self, x, tokens, stats, *, keep: int, prefix: int, deterministic: bool = True):
        n = x.shape[1]
        probability = Interpreter(self.num_heads, name="interpreter")(x, prefix)
        if deterministic:
            return select(x, tokens, probability, probability >= self.threshold, keep, prefix)
        prior = prior_keep(tokens, prefix, n)
        sample = jax.random.bernoulli(self.make_rng("dropout"), probability)
        chosen = sample & prior
        p = jnp.clip(probability, 1e-6, 1.0 - 1e-6)
        log_prob = jnp.where(sample, jnp.log(p), jnp.log1p(-p))
        self.sow("intermediates", "ia_red2_log_prob", jnp.sum(jnp.where(prior, log_prob, 0.0), axis=1))
        self.sow("intermediates", "ia_red2_kept_fraction",
                 chosen.sum(axis=1) / (tokens.source.shape[1] - prefix))
        scale = with_prefix(straight_through(chosen, probability) * prior, prefix, 1.0)
        x = x * scale[..., None].astype(x.dtype)
        return select(x, tokens, probability, sample, keep, prefix)
