"""Shared pieces of the learned and score-based token methods (DynamicViT, IA-RED², STViT, HoT, DiT routing,
Token-Shuffle, LAT): choosing ``keep`` tokens by a score with the prefix tokens first, the straight-through
estimator, and a small multi-head cross-attention. Not a method (the leading underscore keeps it out of the
registry)."""

import jax
import jax.numpy as jnp
from flax import linen as nn

from effjax.tokens import state as state_lib

dense_init = nn.initializers.xavier_uniform()
LOWEST = -1e30  # below every real score; float32's min would overflow when scores are shifted


def prior_keep(tokens: state_lib.TokenState, prefix: int, n: int):
    """``[batch, n - prefix]`` bool: the non-prefix tokens a previous stage kept (its mask), all True without."""
    if tokens.mask is None:
        return jnp.ones((tokens.sizes.shape[0], n - prefix), bool)
    return tokens.mask[:, prefix:]


def with_prefix(values, prefix: int, fill):
    """``values [batch, m, ...]`` with ``prefix`` entries of ``fill`` in front."""
    head = jnp.full((values.shape[0], prefix) + values.shape[2:], fill, values.dtype)
    return jnp.concatenate([head, values], axis=1)


def straight_through(hard, soft):
    """``hard`` in the forward pass, the gradient of ``soft`` in the backward pass."""
    soft = soft.astype(jnp.float32)
    return hard.astype(jnp.float32) + soft - jax.lax.stop_gradient(soft)


def keep_fraction_gap(decisions, keep: int, prefix: int, tokens: state_lib.TokenState):
    """Batch mean of ``(sum(decisions) / P - (keep - prefix) / P)^2`` with ``P`` the original non-prefix count:
    DynamicViT's ratio loss term for one stage (tokens removed at earlier stages count as dropped)."""
    patches = tokens.source.shape[1] - prefix
    fraction = decisions.astype(jnp.float32).sum(axis=1) / patches
    return jnp.mean(jnp.square(fraction - (keep - prefix) / patches))


class CrossAttention(nn.Module):
    """Multi-head cross-attention ``[batch, m, d] x [batch, n, d] -> [batch, m, d]`` with separate q/k/v/out
    projections (biases) and a LayerNorm on the key/value input (and on the queries with ``norm_queries``).
    ``kv_mask [batch, n]`` hides keys. Returns the attention output only (the caller adds the residual)."""

    num_heads: int = 4
    norm_queries: bool = True

    @nn.compact
    def __call__(self, queries, inputs, kv_mask=None):
        width = inputs.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"{type(self).__name__}: width {width} is not divisible by num_heads "
                             f"{self.num_heads}; set the token method's num_heads to a divisor.")
        head_dim = width // self.num_heads
        if self.norm_queries:
            queries = nn.LayerNorm(name="norm_q")(queries)
        inputs = nn.LayerNorm(name="norm_kv")(inputs)
        project = lambda name: nn.DenseGeneral((self.num_heads, head_dim), kernel_init=dense_init,  # noqa: E731
                                               name=name)
        q, k, v = project("query")(queries), project("key")(inputs), project("value")(inputs)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(jnp.float32(head_dim))
        if kv_mask is not None:
            logits = jnp.where(kv_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        return nn.DenseGeneral(width, axis=(-2, -1), kernel_init=dense_init, name="out")(out)
