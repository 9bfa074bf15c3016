"""Shared pieces of attention methods: input checks and mask construction."""

import math

import jax
import jax.numpy as jnp


def check_qkv(method: str, q, k, v, *, grouped: bool = False) -> None:
    """Raises ValueError when q, k, v do not have the [batch, length, heads, head_dim] contract. ``grouped``: k and
    v may have fewer heads than q, a divisor of them (grouped-query attention)."""
    for label, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(
                f"{method}: {label} must have shape [batch, length, heads, head_dim], got shape {x.shape}."
            )
    if k.shape != v.shape:
        raise ValueError(f"{method}: k and v shapes differ: {k.shape} vs {v.shape}.")
    if grouped and q.shape[0] == k.shape[0] and q.shape[3] == k.shape[3] and q.shape[2] % k.shape[2] == 0:
        pass
    elif q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(
            f"{method}: q {q.shape} and k {k.shape} must agree in batch, heads and head_dim."
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{method}: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}.")


def allowed_pairs(q_len: int, kv_len: int, batch: int, *, mask=None, segment_ids=None, causal=False):
    """Boolean [batch, 1, q_len, kv_len] of query/key pairs that may attend, or None if all may.

    ``mask`` [batch, kv_len] is True on real keys; ``segment_ids`` [batch, len] (self-attention
    only) restricts attention to tokens of the same segment; ``causal`` forbids keys after the query.
    """
    allowed = None

    def conj(a, b):
        return b if a is None else a & b

    if mask is not None:
        if mask.shape != (batch, kv_len):
            raise ValueError(f"mask must have shape [batch, kv_len] = {(batch, kv_len)}, got {mask.shape}.")
        allowed = conj(allowed, mask.astype(bool)[:, None, None, :])
    if segment_ids is not None:
        if q_len != kv_len or segment_ids.shape != (batch, q_len):
            raise ValueError(
                f"segment_ids must have shape [batch, length] = {(batch, q_len)} for self-attention, "
                f"got {segment_ids.shape} with q_len {q_len}, kv_len {kv_len}."
            )
        allowed = conj(allowed, (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None])
    if causal:
        # Aligned to the end, so a query at position i sees keys up to i + (kv_len - q_len).
        offset = kv_len - q_len
        tri = jnp.arange(q_len)[:, None] + offset >= jnp.arange(kv_len)[None, :]
        allowed = conj(allowed, tri[None, None])
    return allowed


def dropout_kwargs(module, deterministic: bool) -> dict:
    """``dropout_rate`` and ``dropout_rng`` for a method's ``attend``; off when deterministic or rate 0."""
    if module.dropout_rate > 0.0 and not deterministic:
        return {"dropout_rate": module.dropout_rate, "dropout_rng": module.make_rng("dropout")}
    return {"dropout_rate": 0.0, "dropout_rng": None}


def refuse_causal(method: str, causal: bool, why: str) -> None:
    """Raises NotImplementedError naming ``method`` and ``why`` when ``causal`` is asked for."""
    if causal:
        raise NotImplementedError(f"{method}: causal=True is not supported: {why}")


def refuse_cross(method: str, q, k, why: str) -> None:
    """Raises NotImplementedError naming ``method`` and ``why`` when q and k lengths differ."""
    if q.shape[1] != k.shape[1]:
        raise NotImplementedError(
            f"{method}: cross attention (q_len {q.shape[1]} != kv_len {k.shape[1]}) is not supported: {why}")


def refuse_segments(method: str, segment_ids, why: str) -> None:
    """Raises NotImplementedError naming ``method`` and ``why`` when ``segment_ids`` are given."""
    if segment_ids is not None:
        raise NotImplementedError(f"{method}: segment_ids are not supported: {why}")


def dropout(x, dropout_rate: float, dropout_rng, keep=None):
    """Inverted dropout of attention weights (or any array): off when the rate is 0 or no key is given.

    ``keep`` (bool, broadcastable to x) replaces the random draw: the Pallas kernels' counter-based mask, for
    their references.
    """
    if dropout_rate <= 0.0 or (dropout_rng is None and keep is None):
        return x
    if keep is None:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, x.shape)
    return jnp.where(keep, x / (1.0 - dropout_rate), jnp.zeros((), x.dtype))


def l2_normalize(x, axis=-1, eps: float = 1e-12):
    """``x / max(|x|, eps)`` along ``axis`` (torch's F.normalize), with a finite (zero) gradient at x = 0."""
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), eps * eps))


def torch_uniform(fan_in: int):
    """PyTorch's default Linear/Conv init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), for weights and biases alike."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def check_mask(method: str, mask, batch: int, kv_len: int):
    """The key-padding mask as bool [batch, kv_len], or None; raises ValueError naming ``method``."""
    if mask is None:
        return None
    if mask.shape != (batch, kv_len):
        raise ValueError(f"{method}: mask must have shape [batch, kv_len] = {(batch, kv_len)}, got {mask.shape}.")
    return jnp.asarray(mask).astype(bool)
