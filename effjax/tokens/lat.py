"""Latency Adjustable Transformer encoder (Kachuee & Sharifkhani, 2022, arXiv:2201.03327; earlier "TiltedBERT"),
attention-based word-vector elimination for NLP encoders.

During fine-tuning each encoder layer detects the less important word vectors with an "Attention Context
Contribution" (ACC) metric and eliminates them; an analytical speed-up model picks the elimination rate for a
target latency, and after fine-tuning the rate can be changed without retraining [abs]. No code exists; the
details below are recalled, not verified ([mem]):
  * ACC of token ``j`` = the column sum of the layer's attention probabilities, ``sum_i A[h, i, j]`` (the
    context it provides to the other tokens), here averaged over heads and summed over the real queries only;
  * each layer keeps the tokens of largest ACC, in their original order; the [CLS] token (and any prefix
    token) is always kept and stays first; padding has no ACC and goes first;
  * the kept count decays geometrically with depth under one rate: ``tokens=dict(method='lat', keep=0.9)``
    keeps ``int(P 0.9^l)`` of the ``P`` non-prefix tokens after layer ``l`` (``effjax.tokens.schedule``); the
    latency is adjusted offline by changing ``keep`` (the analytical speed-up model is not here).
It sits between the attention residual and the MLP of a block (place 'attention') and reads that layer's
softmax probabilities, so the reduced layers must use ``softmax`` attention. Decoder (GPT-2) use is not
supported: the model refuses token reduction in causal stacks. Training-free as a function (no params); the
paper fine-tunes the encoder with elimination on.
"""

import jax.numpy as jnp
from flax import linen as nn

from effjax.tokens import state as state_lib
from effjax.tokens._pruning import LOWEST
from effjax.tokens._ranking import top_index
from effjax.tokens._spec import Spec

SPEC = Spec(place="attention", merges=False, needs=("probabilities",), learned=False, min_prefix=0, max_prefix=2,
            notes="[mem] ACC = column sums of the attention probabilities (real queries, mean over heads); keeps the "
                  "top-ACC tokens in order with [CLS] kept; geometric schedule from one keep ratio.")


def attention_context_contribution(probabilities, mask=None):
    """ACC ``[batch, n]`` of attention probabilities ``[batch, heads, n, n]``: each key's column sum over the
    (real, ``mask [batch, n]``) queries, averaged over heads."""
    p = probabilities.astype(jnp.float32)
    if mask is not None:
        p = p * mask[:, None, :, None].astype(p.dtype)
    return p.sum(axis=2).mean(axis=1)


def eliminate(x, tokens: state_lib.TokenState, probabilities, keep: int, prefix: int = 1):
    """Keeps the prefix tokens and the ``keep - prefix`` others with the largest ACC, in their original order."""
    if keep >= x.shape[1]:
        return x, tokens
    acc = attention_context_contribution(probabilities, tokens.mask)
    if tokens.mask is not None:
        acc = jnp.where(tokens.mask, acc, LOWEST)
    return state_lib.gather(x, tokens, top_index(acc, keep, prefix, by_position=True))


class Reducer(nn.Module):
    """LAT between attention and MLP: eliminates the lowest-ACC tokens of the block's attention."""

    @nn.compact
    def __call__(self, x, tokens, stats, *, keep: int, prefix: int, deterministic: bool = True):
        if keep >= x.shape[1]:
            return x, tokens
        return eliminate(x, tokens, stats.probabilities(), keep, prefix)
