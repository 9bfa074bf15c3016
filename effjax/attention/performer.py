"""Performer FAVOR+ (Choromanski et al., ICLR 2021, Lemma 1): positive random features for exp(q.k/sqrt(d))."""

import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from effjax.attention import decoding
from effjax.attention import kernel_attention as ka
from effjax.attention._capabilities import Capabilities
from effjax.attention.common import check_qkv

NAME = "performer"
CAPABILITIES = Capabilities(causal=True, mask=True, segments=False, cross=True, dropout=False, pallas=True,
                            decode=True, extend=True,
                            notes="decoding keeps the running sums sum phi(k) v^T [heads, num_features, head_dim], "
                                  "sum phi(k) [heads, num_features] and the running key max [heads] in float32, "
                                  "constant in the context length; it uses the stored projection (redraw=True "
                                  "decodes only with deterministic=True).")
FEATURE_EPS = 1e-6  # the reference's numerical_stabilizer, added to the query features


def random_projection(rng, num_features: int, head_dim: int, orthogonal: bool = True, method: str = NAME):
    """The [num_features, head_dim] Gaussian projection of FAVOR+, in float32.

    ``orthogonal=True`` follows the reference's GaussianOrthogonalRandomMatrix with scaling 0: stacked
    blocks of head_dim orthonormal rows (QR of a Gaussian block, the last block truncated), each row then
    rescaled to the norm of an independent Gaussian head_dim-vector (chi-distributed), so every row is
    marginally Gaussian. ``orthogonal=False`` draws i.i.d. Gaussian rows.
    """
    if not isinstance(num_features, int) or num_features < 1:
        raise ValueError(f"{method}: num_features must be a positive int, got {num_features!r}.")
    block_key, norm_key = jax.random.split(rng)
    if not orthogonal:
        return jax.random.normal(block_key, (num_features, head_dim), jnp.float32)
    num_blocks = -(-num_features // head_dim)
    gaussian = jax.random.normal(block_key, (num_blocks, head_dim, head_dim), jnp.float32)
    basis, _ = jnp.linalg.qr(gaussian)  # columns orthonormal
    rows = jnp.swapaxes(basis, 1, 2).reshape(num_blocks * head_dim, head_dim)[:num_features]
    norms = jnp.linalg.norm(jax.random.normal(norm_key, (num_features, head_dim), jnp.float32), axis=1)
    return rows * norms[:, None]


def project(x, projection, normalize: bool = True):
    """``w . x~`` for every row w of ``projection`` [m, head_dim], with ``x~ = x d^{-1/4}`` when ``normalize``
    (else ``x~ = x``); float32 [b, l, h, m]."""
    x = x.astype(jnp.float32)
    if normalize:
        x = x * x.shape[-1] ** -0.25
    return jnp.einsum("blhd,md->blhm", x, projection.astype(jnp.float32))


def check_projection(method: str, projection, head_dim: int):
    """The projection with no gradient; ValueError naming ``method`` unless it is [num_features, head_dim]."""
    if projection.ndim != 2 or projection.shape[1] != head_dim:
        raise ValueError(f"{method}: projection must have shape [num_features, head_dim={head_dim}], "
                         f"got {projection.shape}.")
    return jax.lax.stop_gradient(projection)


def projection_variable(module, head_dim: int, deterministic: bool, method: str = NAME):
    """The projection a FAVOR module uses: its ``frozen_projection`` param, or a fresh draw from the ``random``
    stream when ``module.redraw`` and not ``deterministic``. ``module`` has num_features, orthogonal, redraw."""
    def draw(rng):
        return random_projection(rng, module.num_features, head_dim, module.orthogonal, method)

    projection = module.param("frozen_projection", draw)
    if module.redraw and not deterministic:
        projection = draw(module.make_rng("random"))
    return projection


def log_features(x, projection):
    """log of the unnormalized positive features: w . x~ - |x~|^2 / 2 with x~ = x d^{-1/4}; [b, l, h, m]."""
    x_scaled = x.astype(jnp.float32) * x.shape[-1] ** -0.25
    return project(x, projection) - 0.5 * jnp.sum(x_scaled * x_scaled, axis=-1, keepdims=True)


def attend(q, k, v, projection, *, mask=None, segment_ids=None, causal=False, chunk_size=ka.DEFAULT_CHUNK_SIZE,
           impl="xla"):
    """FAVOR+ estimate of softmax(q k^T / sqrt(d)) v with the given ``projection`` [m, head_dim].

    Features: ``phi(x) = m^{-1/2} exp(w . x~ - |x~|^2/2)`` with ``x~ = x d^{-1/4}``, so that
    ``E[phi(q).phi(k)] = exp(q.k/sqrt(d))``. Stabilization: each query's log-features are shifted by their
    max over features (the reference shifts by the max of ``w . x~`` alone, without ``-|x~|^2/2``: a different
    per-query constant, which cancels in the ratio) and get 1e-6 added, as in the reference; keys carry their
    own max over features as a log-scale to ``kernel_attention``, which rescales by the largest real key the
    query may see (all keys, or a running max when causal). That equals the reference's shift by the max over
    all keys without its dependence on future keys. The denominator, 1e-3 to 1e-5 in these units, is guarded
    as the reference guards it (``2e-6`` added only where it is at most 1e-6), never biased by a flat eps.
    The projection gets no gradient (``stop_gradient``).
    ``segment_ids`` raise NotImplementedError.
    """
    check_qkv(NAME, q, k, v)
    ka.refuse_segments(NAME, segment_ids)
    phi_q, phi_k, key_top = features(q, k, projection)
    out = ka.normalized_attention(phi_q, phi_k, v, mask=mask, causal=causal, key_log_scale=key_top,
                                  chunk_size=chunk_size, method=NAME, impl=impl)
    return out.astype(q.dtype)


def features(q, k, projection):
    """``attend``'s stabilised features: ``phi_q``, ``phi_k`` (each float32 ``[b, l, h, m]``) and the keys'
    log-scales ``key_top [b, l, h]`` (their max log-feature), all per token."""
    projection = check_projection(NAME, projection, q.shape[-1])
    ratio = 1.0 / math.sqrt(projection.shape[0])
    log_q = log_features(q, projection)
    phi_q = ratio * (jnp.exp(log_q - jax.lax.stop_gradient(jnp.max(log_q, axis=-1, keepdims=True))) + FEATURE_EPS)
    log_k = log_features(k, projection)
    key_top = jax.lax.stop_gradient(jnp.max(log_k, axis=-1))  # [b, l, h]
    phi_k = ratio * jnp.exp(log_k - key_top[..., None])
    return phi_q, phi_k, key_top


def check_decoding(method: str, module, deterministic: bool) -> None:
    """ValueError naming ``method`` for decoding a FAVOR module that would redraw its projection: the prefill and
    every step must use the same features (the stored ``frozen_projection``)."""
    if module.redraw and not deterministic:
        raise ValueError(f"{method}: decoding uses the stored projection for the prefill and every step; with "
                         "redraw=True call it with deterministic=True (a training call draws a new projection).")


class Attention(nn.Module):
    """Linen wrapper of ``attend`` owning the random projection.

    The projection ``[num_features, head_dim]`` (shared by all heads, as in the reference) is drawn at
    init from the ``params`` RNG stream and stored as the param ``frozen_projection`` so checkpoints and
    eval reproduce it; it is **not trained**: every use is wrapped in ``jax.lax.stop_gradient``, and the
    trainer's train step keeps every ``frozen_*`` param as it was (no update, no weight decay).
    ``redraw=True`` draws a fresh projection from the ``random`` RNG stream on every call with
    ``deterministic=False`` (training); ``deterministic=True`` always uses the stored one. The reference
    redraws by default, seeded from the query values; here redraw is opt-in and never seeded from data.
    ``dropout_rate`` is accepted for the common interface but does not apply: the attention weights are
    never materialized. Decoding (``init_cache``, ``cache``/``positions``) keeps the running sums of
    ``kernel_attention`` (with the running key max as their log-scale) and uses the stored projection.
    """

    num_features: int = 256
    orthogonal: bool = True
    redraw: bool = False
    chunk_size: int = ka.DEFAULT_CHUNK_SIZE
    impl: str = "xla"  # "pallas": kernels.linear_attention
    dropout_rate: float = 0.0

    def init_cache(self, batch, max_length, heads, head_dim, dtype):
        """The running sums ``kernel_attention.state_init`` (float32, whatever ``dtype``; ``max_length`` unused)."""
        return ka.state_init(batch, heads, self.num_features, head_dim)

    @nn.compact
    def __call__(self, q, k, v, *, mask=None, segment_ids=None, causal=False, deterministic=True, cache=None,
                 positions=None):
        """``cache``: a decoding call (prefill, or a step with ``positions``; ``decoding``), returns
        ``(out, cache)``."""
        check_qkv(NAME, q, k, v)
        if cache is not None:
            decoding.check_call(NAME, q, causal=causal, segment_ids=segment_ids, positions=positions)
            ka.check_self_attention(NAME, q, k)
            check_decoding(NAME, self, deterministic)
        projection = projection_variable(self, q.shape[-1], deterministic)

        def forward():
            return attend(q, k, v, projection, mask=mask, segment_ids=segment_ids, causal=causal,
                          chunk_size=self.chunk_size, impl=self.impl)

        if cache is None:
            return forward()
        phi_q, phi_k, key_top = features(q, k, projection)
        out, cache = ka.decode(NAME, cache, phi_q, phi_k, v, positions, mask, forward=forward,
                               key_log_scale=key_top)
        return out.astype(q.dtype), cache
