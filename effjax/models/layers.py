"""Transformer building blocks shared by every model family, with logical axis names on params."""

from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from effjax import attention as attention_lib

Dtype = Any

dense_init = nn.initializers.xavier_uniform()
embed_init = nn.initializers.normal(stddev=0.02)


def logical(init, axes):
    """An initializer whose parameter carries logical axis names for sharding."""
    return nn.with_logical_partitioning(init, axes)


class MultiHeadAttention(nn.Module):
    """Q/K/V/O projections around a registered attention method.

    Projections are ``self.param`` tensors of shape (embed, heads, head_dim) contracted with einsum,
    because linen's DenseGeneral with logical partitioning fails under a mesh (API_NOTES 2).
    """

    num_heads: int
    head_dim: int
    attention: str = "softmax"
    attention_params: dict | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, mask=None, segment_ids=None, causal=False, deterministic=True):
        embed = x.shape[-1]
        shape_in = (embed, self.num_heads, self.head_dim)
        axes_in = ("embed", "heads", "head_dim")
        qkv = []
        for name in ("query", "key", "value"):
            w = self.param(name, logical(dense_init, axes_in), shape_in, jnp.float32)
            y = jnp.einsum("ble,ehd->blhd", x, w.astype(self.dtype))
            qkv.append(nn.with_logical_constraint(y, ("batch", "length", "heads", "head_dim")))
        method = attention_lib.make(self.attention, **(self.attention_params or {}))
        y = method(*qkv, mask=mask, segment_ids=segment_ids, causal=causal, deterministic=deterministic)
        w_out = self.param("out", logical(dense_init, ("heads", "head_dim", "embed")),
                           (self.num_heads, self.head_dim, embed), jnp.float32)
        y = jnp.einsum("blhd,hde->ble", y.astype(self.dtype), w_out.astype(self.dtype))
        return nn.with_logical_constraint(y, ("batch", "length", "embed"))


class Mlp(nn.Module):
    """Position-wise feed-forward block: Dense -> activation -> dropout -> Dense."""

    mlp_dim: int
    dropout_rate: float = 0.0
    activation: str = "gelu"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, deterministic=True):
        embed = x.shape[-1]
        act = getattr(nn, self.activation)
        h = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=logical(dense_init, ("embed", "mlp")),
                     bias_init=logical(nn.initializers.zeros, ("mlp",)), name="wi")(x)
        h = nn.with_logical_constraint(act(h), ("batch", "length", "mlp"))
        h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
        return nn.Dense(embed, dtype=self.dtype, kernel_init=logical(dense_init, ("mlp", "embed")),
                        bias_init=logical(nn.initializers.zeros, ("embed",)), name="wo")(h)


def layer_norm(dtype, name=None):
    """LayerNorm whose scale and bias are sharded along the embedding axis."""
    return nn.LayerNorm(dtype=dtype, name=name,
                        scale_init=logical(nn.initializers.ones, ("embed",)),
                        bias_init=logical(nn.initializers.zeros, ("embed",)))


class Block(nn.Module):
    """Pre-LN Transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    num_heads: int
    head_dim: int
    mlp_dim: int
    attention: str = "softmax"
    attention_params: dict | None = None
    dropout_rate: float = 0.0
    activation: str = "gelu"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, mask=None, segment_ids=None, causal=False, deterministic=True):
        h = layer_norm(self.dtype, "ln_attention")(x)
        h = MultiHeadAttention(self.num_heads, self.head_dim, self.attention, self.attention_params,
                               self.dtype, name="attention")(
            h, mask=mask, segment_ids=segment_ids, causal=causal, deterministic=deterministic)
        x = x + nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
        h = layer_norm(self.dtype, "ln_mlp")(x)
        h = Mlp(self.mlp_dim, self.dropout_rate, self.activation, self.dtype, name="mlp")(
            h, deterministic=deterministic)
        x = x + nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class Trunk(nn.Module):
    """Token + learned position embeddings, then ``num_layers`` blocks and a final LayerNorm.

    ``attention`` is one method name or a per-layer tuple of names; ``prefix_tokens`` learned
    vectors (e.g. a CLS token) are prepended before the blocks.
    """

    vocab_size: int
    max_length: int
    num_layers: int
    embed_dim: int
    num_heads: int
    mlp_dim: int
    attention: Any = "softmax"
    attention_params: dict | None = None
    attention_dropout_rate: float = 0.0
    dropout_rate: float = 0.0
    activation: str = "gelu"
    prefix_tokens: int = 0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens, *, mask=None, segment_ids=None, causal=False, deterministic=True):
        batch, length = tokens.shape
        if length > self.max_length:
            raise ValueError(
                f"Sequence length {length} exceeds the model's maximum {self.max_length} "
                "(config.model.max_length): raise it or shorten the data (config.data.max_length).")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"model.embed_dim {self.embed_dim} is not divisible by model.num_heads "
                             f"{self.num_heads}.")
        layer_methods = attention_lib.resolve_per_layer(self.attention, self.num_layers)
        x = nn.Embed(self.vocab_size, self.embed_dim, embedding_init=logical(embed_init, ("vocab", "embed")),
                     name="token_embed")(tokens)
        total = length + self.prefix_tokens
        pos = self.param("pos_embed", logical(embed_init, ("length", "embed")),
                         (self.max_length + self.prefix_tokens, self.embed_dim), jnp.float32)
        if self.prefix_tokens:
            prefix = self.param("prefix_embed", logical(embed_init, ("prefix", "embed")),
                                (self.prefix_tokens, self.embed_dim), jnp.float32)
            x = jnp.concatenate([jnp.broadcast_to(prefix, (batch, *prefix.shape)), x], axis=1)
            if mask is not None:
                mask = jnp.concatenate([jnp.ones((batch, self.prefix_tokens), bool), mask], axis=1)
        x = (x + pos[None, :total]).astype(self.dtype)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
        head_dim = self.embed_dim // self.num_heads
        for i, method in enumerate(layer_methods):
            params = attention_lib.params_for(method, self.attention_params)
            params.setdefault("dropout_rate", self.attention_dropout_rate)
            x = Block(self.num_heads, head_dim, self.mlp_dim, method, params, self.dropout_rate,
                      self.activation, self.dtype, name=f"block_{i}")(
                x, mask=mask, segment_ids=segment_ids, causal=causal, deterministic=deterministic)
        return layer_norm(self.dtype, "ln_final")(x)
