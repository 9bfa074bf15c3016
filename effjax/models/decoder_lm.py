"""Decoder-only Transformer language model (Radford et al. 2018 style, pre-LN as in GPT-2)."""

from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from effjax.models.layers import Trunk, dense_init, logical


class Model(nn.Module):
    """Causal Transformer over token ids with an untied output projection to the vocabulary."""

    vocab_size: int
    max_length: int = 512
    num_layers: int = 4
    embed_dim: int = 256
    num_heads: int = 4
    mlp_dim: int = 1024
    attention: Any = "softmax"
    attention_params: dict | None = None
    attention_dropout_rate: float = 0.0
    dropout_rate: float = 0.1
    activation: str = "gelu"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens, *, deterministic=True):
        """tokens [batch, length] int (0 = padding) -> next-token logits [batch, length, vocab]."""
        x = Trunk(self.vocab_size, self.max_length, self.num_layers, self.embed_dim, self.num_heads,
                  self.mlp_dim, self.attention, self.attention_params, self.attention_dropout_rate,
                  self.dropout_rate, self.activation, dtype=self.dtype, name="trunk")(
            tokens, mask=tokens != 0, causal=True, deterministic=deterministic)
        logits = nn.Dense(self.vocab_size, kernel_init=logical(dense_init, ("embed", "vocab")),
                          bias_init=logical(nn.initializers.zeros, ("vocab",)), name="lm_head")(x)
        return logits.astype(jnp.float32)
