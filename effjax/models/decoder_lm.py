"""Decoder-only Transformer language model (Radford et al. 2018 style, pre-LN as in GPT-2)."""

import jax.numpy as jnp
from flax import linen as nn

from effjax.models.layers import Backbone, Trunk, dense_init, logical

TASK = "lm"  # the data this family trains on: a source with task == TASK


class Model(Backbone, kw_only=True):
    """Causal Transformer over token ids with an untied output projection to the vocabulary.

    Decoding (``effjax.generate``): ``init_cache(batch, max_length)`` is the empty cache of every layer; a call
    with ``cache`` is a prefill of right-padded prompts (``tokens [batch, P]``, 0 = padding), or with
    ``positions [batch]`` one step (``tokens [batch, 1]``, each token's index in its sequence; the token is run
    even when it is 0, as ``generate`` feeds its finished rows) or, where every layer's method declares
    ``extend``, a chunk continuing the cache (``tokens [batch, C]`` with C >= 2, right-padded with 0, from each
    row's ``positions``: a row that sits a chunk out gives it only 0s), and returns ``(logits, cache)``
    (``effjax.attention.decoding``).
    """

    vocab_size: int
    max_length: int = 512

    @nn.compact
    def __call__(self, tokens, *, deterministic=True, cache=None, positions=None):
        """tokens [batch, length] int (0 = padding) -> next-token logits [batch, length, vocab]."""
        mask = tokens != 0 if positions is None or tokens.shape[1] > 1 else None  # a step's token is real
        out = Trunk(**self.backbone_fields(), vocab_size=self.vocab_size, max_length=self.max_length,
                    name="trunk")(tokens, mask=mask, causal=True, deterministic=deterministic, cache=cache,
                                  positions=positions)
        logits = nn.Dense(self.vocab_size, kernel_init=logical(dense_init, ("embed", "vocab")),
                          bias_init=logical(nn.initializers.zeros, ("vocab",)), name="lm_head")(out[0])
        logits = logits.astype(jnp.float32)
        return logits if cache is None else (logits, out[2])
