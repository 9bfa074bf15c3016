"""Gated Linear Attention (Yang, Wang, Shen, Panda, Kim, "Gated Linear Attention Transformers with Hardware-Efficient
Training", ICML 2024, arXiv 2312.06635; catalog ``linear_families.md`` Sec. 3.2) on the ``gated_linear``
core.

Per head, with a data-dependent decay per key channel ``alpha_t in (0, 1]^{d_k}``:

    S_t = Diag(alpha_t) S_{t-1} + k_t v_t^T,     o_t = S_t^T q_t,     q scaled by d_k^-1/2
    log alpha_t = logsigmoid(u_t W_1 W_2 + b) / 16       (low rank 16, W_2 with bias; u = heads_flat(q, k, v))
    y = swish(u_v W_g) * RMSNorm_head(O)                  (u_v = heads_flat(v))

as fla's ``layers/gla.py`` (``gate_logit_normalizer`` 16, ``gate_low_rank_dim`` 16, optional ``clamp_min`` on
log alpha, fused RMSNorm + swish gate per head with an affine weight, eps 1e-5, no short conv, no feature map).
Init as fla's models: the gate and output-gate weights N(0, 0.02), the gate bias 0, the norm weight 1, so alpha
starts near sigmoid(0)^(1/16) = 0.958.

Departures (catalog Sec. 2.7): the gate and the output gate read ``heads_flat(q, k, v)`` and ``heads_flat(v)``
(the block's projections) instead of the hidden state x; d_k = d_v = the block's D (fla: d_k = d_v / 2).
``causal=False`` has no form in the paper: refused unless ``bidirectional="sum"`` (forward plus reversed scan,
catalog Sec. 2.9, the diagonal counted twice). ``dropout_rate`` is accepted for the common interface and unused.
``attend`` takes an ``initial_state [batch, heads, d, d]`` and returns ``(out, state)`` with ``return_state``;
decoding (``init_cache``, ``cache``/``positions``; ``recurrent.decode``) keeps that state alone (no short conv).

``impl="pallas"``: the chunked linear-attention kernel with per-channel decays (``kernels/linear_attention.py``,
16-row sub-blocks, through ``kernels.dispatch`` op "linear") runs the chunked form, both scans of
``bidirectional="sum"`` included; the parallel and recurrent forms stay XLA.
"""

import jax
import jax.numpy as jnp
from flax import linen as nn

from effjax.attention import gated_linear as core
from effjax.attention import recurrent
from effjax.attention._capabilities import Capabilities
from effjax.attention.common import check_qkv
from effjax.kernels.backend import check_impl

NAME = "gla"
CAPABILITIES = Capabilities(
    causal=True, mask=True, segments=True, cross=False, dropout=False, pallas=True,
    decode=True, extend=True,
    notes="causal=False only with bidirectional='sum' (forward plus reversed scan); forms: chunked (default), "
          "parallel, recurrent; initial_state / return_state carry the state; impl='pallas' (the chunked "
          "linear-attention kernel with per-channel decays) runs the chunked form only; decoding keeps the state "
          "(d x d per head).")
DEFAULT_CHUNK_SIZE = 64  # fla's chunk_gla
NORM_EPS = 1e-5  # fla's norm_eps


def log_forget(q, k, v, params, *, gate_logit_normalizer=16.0, clamp_min=None):
    """``logsigmoid(heads_flat(q, k, v) W_1 W_2 + b) / normalizer`` (then ``max(., clamp_min)``), float32
    ``[batch, length, heads, d]``, every value <= 0."""
    u = recurrent.heads_flat(q, k, v)
    logits = u @ params["gate_down"].astype(jnp.float32) @ params["gate_up"].astype(jnp.float32)
    log_alpha = jax.nn.log_sigmoid(logits + params["gate_bias"].astype(jnp.float32)) / gate_logit_normalizer
    if clamp_min is not None:
        log_alpha = jnp.maximum(log_alpha, clamp_min)
    return log_alpha.reshape(q.shape)


def attend(q, k, v, params, *, mask=None, segment_ids=None, causal=False, bidirectional=None, form="chunked",
           chunk_size=DEFAULT_CHUNK_SIZE, initial_state=None, return_state=False, gate_logit_normalizer=16.0,
           clamp_min=None, impl="xla"):
    """GLA of ``q, k, v [batch, length, heads, d]`` with ``params``: ``gate_down [3 heads d, rank]``, ``gate_up
    [rank, heads d]``, ``gate_bias [heads d]``, ``output_gate [heads d, heads d]``, ``norm [d]``. Returns
    ``[batch, length, heads, d]`` in q's dtype (and the float32 state with ``return_state``); pads give 0.
    ``impl``: "xla" or a kernel backend for the chunked form (``gated_linear``)."""
    check_qkv(NAME, q, k, v)
    check_impl(NAME, impl)
    recurrent.check_self(NAME, q, k)
    recurrent.refuse_bidirectional(NAME, causal, bidirectional)
    recurrent.check_carry(NAME, causal, initial_state, return_state)
    if clamp_min is not None and not clamp_min <= 0:
        raise ValueError(f"{NAME}: clamp_min bounds log alpha <= 0 from below, so it must be <= 0, got {clamp_min}.")
    if not gate_logit_normalizer > 0:
        raise ValueError(f"{NAME}: gate_logit_normalizer must be > 0, got {gate_logit_normalizer}.")
    batch, length, _, dim = q.shape
    keep = recurrent.keep_mask(NAME, mask, batch, length)
    log_alpha = log_forget(q, k, v, params, gate_logit_normalizer=gate_logit_normalizer, clamp_min=clamp_min)
    o, state = core.forward_or_both(NAME, q.astype(jnp.float32) * dim ** -0.5, k, v, log_alpha, causal=causal,
                                    form=form, chunk_size=chunk_size, initial_state=initial_state,
                                    segment_ids=segment_ids, keep=keep, impl=impl)
    gate = recurrent.heads_flat(v) @ params["output_gate"].astype(jnp.float32)
    out = core.swish_gated_head_norm(o, gate.reshape(o.shape), params["norm"], NORM_EPS)
    out = core.zero_pads(out, keep).astype(q.dtype)
    return (out, state) if return_state else out


class Attention(nn.Module):
    """Linen wrapper owning the low-rank forget gate, the output gate and the norm weight (fla's init)."""

    gate_low_rank_dim: int = 16
    gate_logit_normalizer: float = 16.0
    clamp_min: float | None = None
    bidirectional: str | None = None  # "sum": causal=False as a forward plus a reversed scan
    form: str = "chunked"
    chunk_size: int = DEFAULT_CHUNK_SIZE
    dropout_rate: float = 0.0  # accepted, unused
    impl: str = "xla"  # "pallas": the chunked linear-attention kernel with per-channel decays (chunked form)

    def init_cache(self, batch, max_length, heads, head_dim, dtype):
        """The state ``[batch, heads, d, d]`` float32 (``recurrent.init_cache``; ``max_length`` unused)."""
        return recurrent.init_cache(batch, heads, head_dim, dtype)

    @nn.compact
    def __call__(self, q, k, v, *, mask=None, segment_ids=None, causal=False, deterministic=True, cache=None,
                 positions=None):
        """``cache``: a decoding call (prefill, or a step with ``positions``; ``recurrent.decode``), returns
        ``(out, cache)``."""
        check_qkv(NAME, q, k, v)
        recurrent.check_self(NAME, q, k)
        recurrent.refuse_bidirectional(NAME, causal, self.bidirectional)
        width, dim = q.shape[2] * q.shape[3], q.shape[3]
        normal = nn.initializers.normal(0.02)
        params = {
            "gate_down": self.param("gate_down", normal, (3 * width, self.gate_low_rank_dim), jnp.float32),
            "gate_up": self.param("gate_up", normal, (self.gate_low_rank_dim, width), jnp.float32),
            "gate_bias": self.param("gate_bias", nn.initializers.zeros, (width,), jnp.float32),
            "output_gate": self.param("output_gate", normal, (width, width), jnp.float32),
            "norm": self.param("norm", nn.initializers.ones, (dim,), jnp.float32),
        }
        call = dict(mask=mask, segment_ids=segment_ids, causal=causal, bidirectional=self.bidirectional,
                    form=self.form, chunk_size=self.chunk_size, gate_logit_normalizer=self.gate_logit_normalizer,
                    clamp_min=self.clamp_min, impl=self.impl)
        if cache is None:
            return attend(q, k, v, params, **call)
        return recurrent.decode(NAME, attend, q, k, v, params, cache, positions=positions, **call)
