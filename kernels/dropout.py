"""Counter-based attention dropout for the Pallas kernels: a keep bit per (batch, head, query, key) from a hash.

A kernel tile cannot draw from a ``jax.random`` key, so the keep mask is a pure function of a 64-bit seed and
the element's coordinates: two rounds of the murmur3 32-bit finalizer over ``q_pos * kv_len + k_pos`` keyed by
(seed, batch * heads + head). The forward and backward kernels recompute the same bits tile by tile, and
``keep_mask`` materialises them for the plain-JAX reference. The distribution is that of
``effjax.attention.common.dropout`` (each weight kept with probability 1 - rate, scaled by 1 / (1 - rate), to
within 2^-32 in the rate); the draws differ from ``jax.random.bernoulli``'s.
"""

import jax
import jax.numpy as jnp
import numpy as np

_GOLDEN = 0x9E3779B9


def _u32(x):
    return jnp.asarray(x).astype(jnp.uint32)


def fmix32(x):
    """murmur3's 32-bit finalizer: a bijection on uint32 with full avalanche."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def seed_from_key(key):
    """The uint32 [2] seed of one dropout draw, from a ``jax.random`` key."""
    return jax.random.bits(key, (2,), jnp.uint32)


def threshold(rate: float) -> int:
    """Keep an element iff its hash >= this: P(keep) = 1 - rate to within 2^-32."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {rate}.")
    return min(int(round(rate * 2.0**32)), 2**32 - 1)


def stream_key(seed, batch_head):
    """The per-(batch, head) key (uint32 scalar) mixed from the seed [2] and ``batch * heads + head``."""
    return fmix32(seed[0] ^ fmix32(_u32(batch_head) * jnp.uint32(_GOLDEN) + seed[1]))


def keep_bits(key, q_pos, k_pos, kv_len: int, keep_from: int):
    """Boolean keep mask of the positions ``q_pos`` x ``k_pos`` (broadcasting uint32/int32 arrays)."""
    index = _u32(q_pos) * jnp.uint32(kv_len) + _u32(k_pos)
    h = fmix32(fmix32(index ^ key) + key * jnp.uint32(_GOLDEN))
    return h >= jnp.uint32(keep_from)


def keep_mask(seed, batch: int, heads: int, q_len: int, kv_len: int, rate: float):
    """The whole keep mask [batch, heads, q_len, kv_len] the kernels apply (for references and tests)."""
    bh = np.arange(batch * heads, dtype=np.uint32).reshape(batch, heads, 1, 1)
    keys = stream_key(seed, bh)
    q_pos = jnp.arange(q_len, dtype=jnp.uint32)[:, None]
    k_pos = jnp.arange(kv_len, dtype=jnp.uint32)[None, :]
    return keep_bits(keys, q_pos, k_pos, kv_len, threshold(rate))
