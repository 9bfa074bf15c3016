"""Decoder-only Transformer language model (Radford et al. 2018 style, pre-LN as in GPT-2)."""

import jax.numpy as jnp
from flax import linen as nn

from effjax.models.layers import Backbone, Trunk, dense_init, logical

TASK = "lm"  # the data this family trains on: a source with task == TASK


class Model(Backbone, kw_only=True):
    """Causal Transformer over token ids with an untied output projection to the vocabulary."""

    vocab_size: int
    max_length: int = 512

    @nn.compact
    def __call__(self, tokens, *, deterministic=True):
        """tokens [batch, length] int (0 = padding) -> next-token logits [batch, length, vocab]."""
        x, _ = Trunk(**self.backbone_fields(), vocab_size=self.vocab_size, max_length=self.max_length,
                  name="trunk")(tokens, mask=tokens != 0, causal=True, deterministic=deterministic)
        logits = nn.Dense(self.vocab_size, kernel_init=logical(dense_init, ("embed", "vocab")),
                          bias_init=logical(nn.initializers.zeros, ("vocab",)), name="lm_head")(x)
        return logits.astype(jnp.float32)
