"""Transformer encoder classifier in the Long Range Arena style (Tay et al. 2021, Sec. 3)."""

from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from effjax.models.layers import Trunk, dense_init, logical


class Model(nn.Module):
    """Embeddings, pre-LN encoder blocks, CLS or mean pooling, and a linear head."""

    vocab_size: int
    num_classes: int
    max_length: int = 2000
    num_layers: int = 4
    embed_dim: int = 512
    num_heads: int = 8
    mlp_dim: int = 1024
    attention: Any = "softmax"
    attention_params: dict | None = None
    attention_dropout_rate: float = 0.1
    dropout_rate: float = 0.1
    activation: str = "gelu"
    pooling: str = "cls"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens, *, deterministic=True):
        """tokens [batch, length] int (0 = padding) -> logits [batch, num_classes] float32."""
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"model.pooling must be 'cls' or 'mean', got {self.pooling!r}.")
        mask = tokens != 0
        use_cls = self.pooling == "cls"
        x = Trunk(self.vocab_size, self.max_length, self.num_layers, self.embed_dim, self.num_heads,
                  self.mlp_dim, self.attention, self.attention_params, self.attention_dropout_rate,
                  self.dropout_rate, self.activation, prefix_tokens=int(use_cls), dtype=self.dtype,
                  name="trunk")(tokens, mask=mask, deterministic=deterministic)
        if use_cls:
            pooled = x[:, 0]
        else:
            weights = mask.astype(x.dtype)[..., None]
            pooled = (x * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)
        logits = nn.Dense(self.num_classes, kernel_init=logical(dense_init, ("embed", "classes")),
                          bias_init=logical(nn.initializers.zeros, ("classes",)), name="head")(pooled)
        return logits.astype(jnp.float32)
