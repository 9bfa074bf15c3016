"""RetNet multi-scale retention (Sun et al. 2023, "Retentive Network: A Successor to Transformer for Large Language
Models", arXiv 2307.08621; catalog ``linear_families.md`` Sec. 3.1) on the ``gated_linear`` core.

Per head h, with a fixed decay ``gamma_h = 1 - 2^(-5-h)`` (not learned; the decays depend on the head count):

    S_t = gamma_h S_{t-1} + k_t v_t^T,    o_t = S_t^T q_t,    q, k rotated by position, q scaled by d_k^-1/2
    parallel: O = (Q K^T o D) V with D_ij = gamma^(i-j) for i >= j, else 0
    y = swish(u_v W_g) * RMSNorm_head(O)      (u_v = heads_flat(v), catalog Sec. 2.7)

``causal=False`` is the paper's symmetric decay ``D_ij = gamma^|i-j|``, computed exactly as the forward scan plus
the reversed scan minus the diagonal ``(q_i . k_i) v_i`` (counted by both).

Departures from the paper and the official code (torchscale ``multiscale_retention.py``, fla
``layers/multiscale_retention.py``):
  * rotary is fla's standard RoPE (half-split pairs, base 10000), not torchscale's xPos-like angles;
  * the retention is unnormalised (fla): torchscale's row normalisations of ``D`` and of ``QK^T o D`` are positive
    per-(token, head) factors that the per-head RMSNorm removes (eps aside);
  * the output norm is fla's fused RMSNorm with an affine weight per channel shared by the heads (torchscale has
    none), eps 1e-5; the swish gate comes from ``heads_flat(v)`` (a dense ``H*D -> H*D``, no bias) instead of the
    hidden state, with torchscale's init (xavier uniform, gain 2^-2.5);
  * the value head dim is the block's D (fla uses 2 d_k, torchscale about 1.69 d_k);
  * ``dropout_rate`` is accepted for the common interface and unused (retention has no attention dropout).

``attend`` takes an ``initial_state [batch, heads, d, d]`` and returns ``(out, state)`` with ``return_state``
(causal only); a continued call must pass ``position_offset`` (the tokens already seen, a number or one per
sequence) so that the rotation continues. Decoding (``init_cache``, ``cache``/``positions``; ``recurrent.decode``)
keeps that state; a step's ``position_offset`` is its ``positions``.

``impl="pallas"``: the chunked linear-attention kernel with per-head decays (``kernels/linear_attention.py``, through
``kernels.dispatch`` op "linear"; other backends and lists as the dispatch takes them) runs the chunked form, each
direction of ``causal=False`` included; the parallel and recurrent forms stay XLA.
"""

import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from effjax.attention import gated_linear as core
from effjax.attention import recurrent
from effjax.attention._capabilities import Capabilities
from effjax.attention.common import check_qkv
from effjax.kernels.backend import check_impl

NAME = "retnet"
CAPABILITIES = Capabilities(
    causal=True, mask=True, segments=True, cross=False, dropout=False, pallas=True,
    decode=True, extend=True,
    notes="causal=False is the paper's symmetric decay gamma^|i-j|; forms: chunked (default), parallel, recurrent; "
          "initial_state / return_state carry the retention state; impl='pallas' (the chunked linear-attention kernel "
          "with per-head decays) runs the chunked form only; decoding keeps the retention state (d x d per head), "
          "steps rotate q and k by each sequence's position.")
DEFAULT_CHUNK_SIZE = 64  # fla's chunk_retention
NORM_EPS = 1e-5  # fla's norm_eps
ROPE_BASE = 10_000.0


def log_gammas(heads: int):
    """``log(1 - 2^(-5-h))`` for ``h = 0..heads-1``, float32 (computed in float64: ``1 - 2^-30`` rounds to 1)."""
    return jnp.asarray(np.log1p(-(2.0 ** (-5.0 - np.arange(heads)))), jnp.float32)


def rotate(x, offset=0):
    """RoPE with half-split pairs (channel ``i`` with ``i + d/2``), angle ``(offset + t) base^(-2i/d)``; float32.
    ``offset``: a number, or one per batch row ``[batch]`` (decoding steps at each sequence's position)."""
    length, dim = x.shape[1], x.shape[-1]
    theta = ROPE_BASE ** (-jnp.arange(dim // 2, dtype=jnp.float32) * 2 / dim)
    offset = jnp.asarray(offset, jnp.float32)
    positions = offset[..., None] + jnp.arange(length, dtype=jnp.float32)  # [length] or [batch, length]
    angles = positions[..., None, None] * theta  # [(batch,) length, 1, d/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([first * cos - second * sin, first * sin + second * cos], axis=-1)


def attend(q, k, v, params, *, mask=None, segment_ids=None, causal=False, rotary=True, form="chunked",
           chunk_size=DEFAULT_CHUNK_SIZE, initial_state=None, return_state=False, position_offset=0, impl="xla"):
    """Multi-scale retention of ``q, k, v [batch, length, heads, d]`` with ``params``: ``gate [heads * d, heads * d]``
    and ``norm [d]``. Returns ``[batch, length, heads, d]`` in q's dtype (and the float32 state
    ``[batch, heads, d, d]`` with ``return_state``); padded positions give 0. ``impl``: "xla" or a kernel
    backend for the chunked form (``gated_linear``)."""
    check_qkv(NAME, q, k, v)
    check_impl(NAME, impl)
    recurrent.check_self(NAME, q, k)
    recurrent.check_carry(NAME, causal, initial_state, return_state)
    batch, length, heads, dim = q.shape
    dtype = q.dtype
    if rotary and dim % 2:
        raise ValueError(f"{NAME}: rotary rotates channel pairs, so the head dim must be even, got {dim}.")
    keep = recurrent.keep_mask(NAME, mask, batch, length)
    if rotary:
        q, k = rotate(q, position_offset), rotate(k, position_offset)
    q = q.astype(jnp.float32) * dim ** -0.5
    log_decay = jnp.broadcast_to(log_gammas(heads), (batch, length, heads))
    o, state = core.forward_or_both(NAME, q, k, v, log_decay, causal=causal, form=form, chunk_size=chunk_size,
                                    initial_state=initial_state, segment_ids=segment_ids, keep=keep, impl=impl)
    if not causal:
        o = o - diagonal(*recurrent.zero_padded(keep, q, k, v.astype(jnp.float32)))
    gate = recurrent.heads_flat(v) @ params["gate"].astype(jnp.float32)
    out = core.swish_gated_head_norm(o, gate.reshape(o.shape), params["norm"], NORM_EPS)
    out = core.zero_pads(out, keep).astype(dtype)
    return (out, state) if return_state else out


def diagonal(q, k, v):
    """``(q_i . k_i) v_i``: the i = j term, which the forward and the reversed scans both count."""
    return jnp.sum(q * k, axis=-1, keepdims=True) * v


class Attention(nn.Module):
    """Linen wrapper owning the output gate and norm weights (torchscale's gate init, fla's norm init)."""

    rotary: bool = True
    form: str = "chunked"
    chunk_size: int = DEFAULT_CHUNK_SIZE
    dropout_rate: float = 0.0  # accepted, unused
    impl: str = "xla"  # "pallas": the chunked linear-attention kernel with per-head decays (chunked form)

    def init_cache(self, batch, max_length, heads, head_dim, dtype):
        """The retention state ``[batch, heads, d, d]`` float32 (``recurrent.init_cache``; ``max_length`` unused)."""
        return recurrent.init_cache(batch, heads, head_dim, dtype)

    @nn.compact
    def __call__(self, q, k, v, *, mask=None, segment_ids=None, causal=False, deterministic=True, cache=None,
                 positions=None):
        """``cache``: a decoding call (prefill, or a step with ``positions``; ``recurrent.decode``), returns
        ``(out, cache)``; a step rotates q and k by ``positions``."""
        check_qkv(NAME, q, k, v)
        recurrent.check_self(NAME, q, k)
        width, dim = q.shape[2] * q.shape[3], q.shape[3]
        gate_init = nn.initializers.variance_scaling(2.0 ** -5, "fan_avg", "uniform")  # xavier, gain 2^-2.5
        params = {"gate": self.param("gate", gate_init, (width, width), jnp.float32),
                  "norm": self.param("norm", nn.initializers.ones, (dim,), jnp.float32)}
        call = dict(mask=mask, segment_ids=segment_ids, causal=causal, rotary=self.rotary, form=self.form,
                    chunk_size=self.chunk_size, impl=self.impl)
        if cache is None:
            return attend(q, k, v, params, **call)
        return recurrent.decode(NAME, attend, q, k, v, params, cache, positions=positions,
                                position_offset=0 if positions is None else positions, **call)
