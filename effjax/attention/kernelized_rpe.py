"""Kernelized attention with relative positional encoding via FFT (Luo et al., NeurIPS 2021, Sec. 2.3 and 3.2)."""

import jax
import jax.numpy as jnp
from flax import linen as nn

from effjax.attention import decoding, fftconv
from effjax.attention import kernel_attention as ka
from effjax.attention._capabilities import Capabilities
from effjax.attention.common import check_mask, check_qkv
from effjax.attention.performer import random_projection

NAME = "kernelized_rpe"
CAPABILITIES = Capabilities(causal=True, mask=True, segments=False, cross=True, dropout=False, pallas=False,
                            decode=True, extend=True,
                            notes="decoding keeps a key/value cache of max_length slots (it grows with max_length, "
                                  "as softmax's does): the RPE weight of every past key depends on its offset, so "
                                  "no fixed-size sum of phi(k) v^T serves every later query.")


def feature_map(x, projection, normalize=True):
    """Positive random features ``phi(x) = m^{-1/2} exp(w . x - |x|^2 / 2)``, so ``E[phi(q).phi(k)] = exp(q.k)``.

    With ``normalize`` (the paper's Sec. 3.3 remedy for unstable random-feature estimates) x is first scaled to
    unit norm, so every feature lies in a bounded range and no max-shift is needed; otherwise x is scaled by
    d^{-1/4} as in Performer, estimating ``exp(q.k / sqrt(d))``. Float32 ``[batch, length, heads, m]``.
    """
    x = x.astype(jnp.float32)
    if normalize:
        x = x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)
    else:
        x = x * x.shape[-1] ** -0.25
    projected = jnp.einsum("blhd,md->blhm", x, projection.astype(jnp.float32))
    return jnp.exp(projected - 0.5 * jnp.sum(x * x, axis=-1, keepdims=True)) / jnp.sqrt(projection.shape[0])


def offsets_for(rpe, q_len: int, kv_len: int, causal: bool):
    """The RPE logits ``b [heads, q_len + kv_len - 1]`` for offsets ``d = (i + kv_len - q_len) - j`` from
    ``1 - q_len`` to ``kv_len - 1`` (query i is end-aligned with the keys), ``-inf`` where ``d < 0`` if causal.

    ``rpe [heads, 2 * max_length - 1]`` holds one logit per offset ``-(max_length-1) .. max_length-1``.
    """
    max_length = (rpe.shape[-1] + 1) // 2
    if rpe.ndim != 2 or rpe.shape[-1] != 2 * max_length - 1:
        raise ValueError(f"{NAME}: rpe must have shape [heads, 2 * max_length - 1], got {rpe.shape}.")
    if max(q_len, kv_len) > max_length:
        raise ValueError(f"{NAME}: sequence lengths (q {q_len}, kv {kv_len}) exceed the max_length {max_length} "
                         "the relative positional encoding was built for.")
    centre = max_length - 1
    logits = rpe[:, centre + 1 - q_len:centre + kv_len].astype(jnp.float32)
    if causal:
        logits = jnp.where(jnp.arange(q_len + kv_len - 1) >= q_len - 1, logits, -jnp.inf)
    return logits


def rpe_attention(phi_q, phi_k, v, rpe_logits, *, mask=None, causal=False, eps=ka.EPS):
    """``z_i = phi_q_i^T [sum_j c_ij phi_k_j v_j^T] / (phi_q_i^T [sum_j c_ij phi_k_j] + eps)``, float32.

    ``c_ij = exp(rpe_logits[:, i - j + kv_len - 1])`` is Toeplitz, so both bracketed sums are Toeplitz
    mat-vecs done by FFT in O(L log L) per column: ``phi_k (x) [v, 1]`` gives ``m * (d + 1)`` columns per head.
    Padded keys have ``phi_k`` and ``v`` zeroed before any product. The logits are shifted by their max per head,
    which cancels between numerator and denominator (up to eps). A query that sees no real key (``causal``:
    keys up to ``i + kv_len - q_len``) gets 0, as in ``kernel_attention``, not the FFT's rounding noise / eps.
    """
    batch, q_len = phi_q.shape[:2]
    kv_len = phi_k.shape[1]
    real = jnp.ones((batch, kv_len), bool)
    if mask is not None:
        real = check_mask(NAME, mask, batch, kv_len)
        phi_k = jnp.where(real[:, :, None, None], phi_k, 0.0)
        v = jnp.where(real[:, :, None, None], v, 0.0)
    seen = jnp.cumsum(real, axis=1)  # real keys at or before each position
    last = jnp.arange(q_len) + kv_len - q_len if causal else jnp.full((q_len,), kv_len - 1)
    sees_a_key = jnp.where(last >= 0, seen[:, jnp.clip(last, 0, kv_len - 1)], 0) > 0  # [batch, q_len]
    rpe_logits = rpe_logits - jax.lax.stop_gradient(jnp.max(rpe_logits, axis=-1, keepdims=True))
    kernel = jnp.exp(rpe_logits).T[:, :, None, None]  # [offsets, heads, 1, 1]
    v1 = jnp.concatenate([v.astype(jnp.float32), jnp.ones(v.shape[:3] + (1,), jnp.float32)], axis=-1)
    columns = phi_k[..., :, None] * v1[..., None, :]  # [b, kv_len, h, m, d + 1]
    sums = fftconv.toeplitz(columns, kernel, out_len=phi_q.shape[1])  # [b, q_len, h, m, d + 1]
    num_den = jnp.einsum("bqhm,bqhme->bqhe", phi_q, sums)
    return jnp.where(sees_a_key[:, :, None, None], num_den[..., :-1] / (num_den[..., -1:] + eps), 0.0)


def attend(q, k, v, projection, rpe, *, mask=None, segment_ids=None, causal=False, normalize=True):
    """Kernelized softmax with a learned bias per relative offset: ``softmax(q.k + b_{i-j}) v`` estimated by
    positive random features (``projection [m, head_dim]``) and computed exactly by FFT Toeplitz products.

    ``rpe [heads, 2 * max_length - 1]`` (see ``offsets_for``); ``causal`` zeroes ``c`` for keys after the
    query (lower-triangular Toeplitz, end-aligned for cross attention). ``segment_ids`` raise
    NotImplementedError: a segment mask would break the Toeplitz structure.
    """
    check_qkv(NAME, q, k, v)
    if segment_ids is not None:
        raise NotImplementedError(f"{NAME}: segment_ids are not supported: masking across segments breaks the "
                                  "Toeplitz structure of the RPE matrix that the FFT path relies on.")
    if projection.ndim != 2 or projection.shape[1] != q.shape[-1]:
        raise ValueError(f"{NAME}: projection must have shape [num_features, head_dim={q.shape[-1]}], "
                         f"got {projection.shape}.")
    if rpe.shape[0] != q.shape[2]:
        raise ValueError(f"{NAME}: rpe has {rpe.shape[0]} heads but q has {q.shape[2]}.")
    projection = jax.lax.stop_gradient(projection)
    logits = offsets_for(rpe, q.shape[1], k.shape[1], causal)
    out = rpe_attention(feature_map(q, projection, normalize), feature_map(k, projection, normalize), v, logits,
                        mask=mask, causal=causal)
    return out.astype(q.dtype)


def decode_step(q, k, v, projection, rpe, cache, positions, *, normalize=True, eps=ka.EPS):
    """One token per sequence at ``positions`` over the key/value cache (``decoding.kv_init``): the new key and
    value go in, then ``z_p = sum_j c_{p - j} phi_q . phi_k_j v_j / (sum_j c_{p - j} phi_q . phi_k_j + eps)`` over
    the cached keys ``j <= p`` (``rpe_attention``'s causal row p, read directly instead of by FFT).

    The RPE logits are shifted by their max over the offsets ``0 .. slots - 1``, as the forward pass over
    ``slots = max_length`` tokens shifts them (the shift cancels between numerator and denominator up to eps).
    """
    cache = decoding.kv_step(cache, k, v, positions)
    projection = jax.lax.stop_gradient(projection)
    slots = cache["key"].shape[1]
    logits = offsets_for(rpe, 1, slots, causal=False)  # [heads, offsets 0 .. slots - 1]
    logits = logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    allowed = decoding.kv_allowed(cache, positions)  # [b, slots]
    offset = jnp.clip(positions[:, None] - cache["position"], 0, slots - 1)  # [b, slots]
    c = jnp.where(allowed[:, None, :], jnp.exp(logits)[:, offset].transpose(1, 0, 2), 0.0)  # [b, h, slots]
    phi_q = feature_map(q, projection, normalize)[:, 0]  # [b, h, m]
    phi_k = feature_map(cache["key"], projection, normalize)  # [b, slots, h, m]
    weights = c * jnp.einsum("bhm,bkhm->bhk", phi_q, phi_k)
    num = jnp.einsum("bhk,bkhd->bhd", weights, cache["value"].astype(jnp.float32))
    out = num / (jnp.sum(weights, axis=-1)[..., None] + eps)
    return out[:, None].astype(q.dtype), cache


class Attention(nn.Module):
    """Linen wrapper owning the random projection and the RPE logits.

    ``frozen_projection [num_features, head_dim]`` is drawn at init from the ``params`` stream (orthogonal
    Gaussian, shared by heads) and never trained, as in ``performer``. ``rpe [heads, 2 * max_length - 1]`` is
    one learned logit per head and relative offset, initialised to 0 (c = 1: plain kernelized attention).
    ``max_length=None`` sizes it from the longer of q_len and kv_len at init (the paper's 2N - 1 values), so
    the module then only applies at that length; give ``max_length`` to apply one set of parameters to every
    length up to it. ``dropout_rate`` is accepted for the common interface but does not apply: the attention
    weights are never materialized.

    Decoding (``init_cache``, ``cache``/``positions``) keeps a key/value cache of ``max_length`` slots
    (``decoding.kv_init``): ``c_{i-j}`` is a free logit per offset, so the sums ``sum_j c_{i-j} phi_k_j v_j^T``
    differ for every query and no constant-size state reproduces them (they would be a recurrence only for
    exponentially decaying c). A prefill is the FFT forward over the prompts; a step reads the query's row of the
    Toeplitz product directly from the cached keys and values (``decode_step``), O(max_length) per token. With
    ``max_length=None`` a decoding call sizes ``rpe`` from the cache's ``max_length`` (which must then be the
    length the module was initialised with).
    """

    num_features: int = 256
    max_length: int | None = None
    normalize: bool = True
    orthogonal: bool = True
    dropout_rate: float = 0.0

    def init_cache(self, batch, max_length, heads, head_dim, dtype):
        """The key/value cache of ``max_length`` slots (``effjax.attention.decoding``)."""
        if self.max_length is not None and self.max_length < max_length:
            raise ValueError(f"{NAME}: the cache's max_length {max_length} exceeds the max_length {self.max_length} "
                             "the relative positional encoding was built for.")
        return decoding.kv_init(batch, max_length, heads, head_dim, dtype)

    @nn.compact
    def __call__(self, q, k, v, *, mask=None, segment_ids=None, causal=False, deterministic=True, cache=None,
                 positions=None):
        """``cache``: a decoding call (prefill, or a step with ``positions``; ``decoding``), returns
        ``(out, cache)``."""
        check_qkv(NAME, q, k, v)
        if cache is not None:
            decoding.check_call(NAME, q, causal=causal, segment_ids=segment_ids, positions=positions)
            ka.check_self_attention(NAME, q, k)
            if self.max_length is None:
                decoding.check_length_fixed_at_init(NAME, self, ("rpe",), lambda shape: (shape[-1] + 1) // 2,
                                                    cache["key"].shape[1], "relative position logits")
        max_length = self.max_length or (max(q.shape[1], k.shape[1]) if cache is None else cache["key"].shape[1])
        projection = self.param(
            "frozen_projection",
            lambda rng: random_projection(rng, self.num_features, q.shape[-1], self.orthogonal, method=NAME))
        rpe = self.param("rpe", nn.initializers.zeros, (q.shape[2], 2 * max_length - 1), jnp.float32)

        def forward():
            return attend(q, k, v, projection, rpe, mask=mask, segment_ids=segment_ids, causal=causal,
                          normalize=self.normalize)

        if cache is None:
            return forward()
        if positions is not None:
            return decoding.stepped(lambda q, k, v, c, p: decode_step(q, k, v, projection, rpe, c, p,
                                                                      normalize=self.normalize),
                                    q, k, v, cache, positions, mask)
        return forward(), decoding.kv_prefill(NAME, cache, k, v, mask)
