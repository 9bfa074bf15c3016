"""Mamba2 / SSD (Dao & Gu, "Transformers are SSMs: Generalized Models and Efficient Algorithms Through Structured
State Space Duality", arXiv 2405.21060; catalog ``linear_families.md`` Sec. 3.5) on the
``gated_linear`` core.

The block's q, k, v play C, B and x. Per head h (state N x P = D x D):

    x, B, C = SiLU(conv4(v, k, q))                      (depthwise causal conv of 4 taps with bias)
    dt_t = softplus(u_t W_dt + dt_bias)                 (u = heads_flat(q, k, v): the raw, pre-conv inputs)
    S_t = exp(dt_t A_h) S_{t-1} + B_t (dt_t x_t)^T,     y_t = S_t^T C_t + D_h x_t,     A_h = -exp(A_log_h)
    out = RMSNorm_group(y * silu(z)) * weight,          z = heads_flat(v) W_z

that is decayed linear attention with q = C, k = B, v = dt x, a scalar log-decay ``dt A`` per head and scale 1,
plus the D skip; the gated norm is mamba's ``RMSNormGated(norm_before_gate=False)`` over ``ngroups`` groups of the
H*D channels (1: all heads together), eps 1e-5. Init as ``mamba_ssm/modules/mamba2.py``: A ~ U(1, 16),
dt_bias = softplus^-1(dt) with dt log-uniform in [1e-3, 0.1] floored at 1e-4, D = 1, conv taps and bias and the
dense maps PyTorch's default U(+-1/sqrt(fan_in)), norm weight 1; chunk 256. Inputs at padded positions are
zeroed before the conv (as fla); the conv does not read across packed runs.

Departures (catalog Sec. 2.7): N = P = D; B and C are per head (ngroups = H for B/C), not shared by all heads
(averaging q/k over heads would change the function); dt and z read ``heads_flat(q, k, v)`` / ``heads_flat(v)``
instead of the hidden state; ``dt_limit`` is (0, inf) (the default) and A_log, dt_bias get weight decay unless the
optimiser excludes them. ``causal=False`` has no form in the paper: refused unless ``bidirectional="sum"``
(catalog Sec. 2.9: each direction convolves causally in its own direction and adds its D skip, the two scans are
summed before the gated norm). ``dropout_rate`` is accepted for the common interface and unused.

State: ``Mamba2State(ssm [batch, heads, d, d], conv [batch, d_conv - 1, 3, heads, d])``, the SSM state and the
raw (v, k, q) inputs of the last ``d_conv - 1`` positions of the last run (zeros before the first token; padded
positions as the zeros the conv reads), so that a call continued from the returned state equals the whole.
Decoding (``init_cache``, ``cache``/``positions``; ``recurrent.decode``) keeps the same two: the SSM state and the
raw (v, k, q) of each sequence's last ``d_conv - 1`` real tokens; a step continues from them (``decode_attend``).

``impl="pallas"``: the chunked linear-attention kernel with per-head decays (``kernels/linear_attention.py``,
through ``kernels.dispatch`` op "linear") runs the SSD scan's chunked form, both scans of ``bidirectional="sum"``
included; the conv, dt, D skip and gated norm stay XLA, as do the parallel and recurrent forms.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from effjax.attention import fftconv, recurrent
from effjax.attention import gated_linear as core
from effjax.attention._capabilities import Capabilities
from effjax.attention.common import check_qkv, torch_uniform
from effjax.kernels.backend import check_impl

NAME = "mamba2"
CAPABILITIES = Capabilities(
    causal=True, mask=True, segments=True, cross=False, dropout=False, pallas=True, decode=True, extend=True,
    notes="causal=False only with bidirectional='sum' (forward plus reversed scan); forms: chunked (default), "
          "parallel, recurrent; initial_state / return_state carry the SSM state and the conv inputs; impl='pallas' "
          "(the chunked linear-attention kernel with per-head decays) runs the chunked form only; decoding keeps the "
          "SSM state (d x d per head) and the conv's last d_conv - 1 raw (v, k, q) inputs.")
DEFAULT_CHUNK_SIZE = 256  # mamba_ssm's Mamba2
NORM_EPS = 1e-5  # mamba_ssm's RMSNormGated


class Mamba2State(NamedTuple):
    """What a continued call needs: the SSM state and the last ``d_conv - 1`` raw conv inputs (v, k, q)."""

    ssm: jax.Array  # [batch, heads, d, d] float32
    conv: jax.Array  # [batch, d_conv - 1, 3, heads, d] float32


def check_initial_state(state, batch: int, d_conv: int, heads: int, dim: int) -> None:
    if state is None:
        return
    if not isinstance(state, Mamba2State):
        raise ValueError(f"{NAME}: initial_state must be a Mamba2State(ssm, conv) (the state a call with "
                         f"return_state=True returns), got {type(state).__name__}.")
    recurrent.check_state(NAME, state.ssm, (batch, heads, dim, dim))
    want = (batch, d_conv - 1, 3, heads, dim)
    if tuple(state.conv.shape) != want or state.conv.dtype != jnp.float32:
        raise ValueError(f"{NAME}: initial_state.conv must be float32 of shape [batch, d_conv - 1, 3, heads, d] = "
                         f"{want}, got {state.conv.dtype} {tuple(state.conv.shape)}.")


def convolved(xbc, taps, bias, runs, tail):
    """SiLU of the causal depthwise conv of ``xbc [batch, length, 3, heads, d]`` continued from ``tail`` (the raw
    inputs before it, taken as the first token's run); taps do not reach across ``runs``. Returns the conv output
    and the new tail (the last ``len(tail)`` inputs, zeroed outside the last run)."""
    width = tail.shape[1]
    full = jnp.concatenate([tail, xbc], axis=1)
    full_runs = jnp.concatenate([jnp.repeat(runs[:, :1], width, axis=1), runs], axis=1)
    y = jax.nn.silu(fftconv.short_causal(full, taps, bias, full_runs)[:, width:])
    last = (full_runs[:, -width:] == full_runs[:, -1:]) if width else full_runs[:, :0]
    return y, recurrent.zero_padded(last, full[:, full.shape[1] - width:])[0]


def ssd(q, k, v, dt, log_decay, params, *, segment_ids=None, keep=None, form, chunk_size, state=None, impl="xla"):
    """One direction: conv + SiLU over (v, k, q), the SSD scan on the core, the D skip. ``(y, Mamba2State)``."""
    batch, length, heads, dim = q.shape
    taps = params["conv_taps"]
    tail = jnp.zeros((batch, taps.shape[0] - 1, 3, heads, dim), jnp.float32) if state is None else state.conv
    runs = recurrent.run_ids(recurrent.run_starts(NAME, segment_ids, batch, length), batch, length)
    xbc, tail = convolved(jnp.stack([v, k, q], axis=2), taps, params["conv_bias"], runs, tail)
    x, b, c = xbc[:, :, 0], xbc[:, :, 1], xbc[:, :, 2]
    y, ssm = core.gated_linear(c, b, x * dt[..., None], log_decay, form=form, chunk_size=chunk_size,
                               initial_state=None if state is None else state.ssm, segment_ids=segment_ids,
                               mask=keep, method=NAME, impl=impl)
    return y + params["d_skip"].astype(jnp.float32)[:, None] * x, Mamba2State(ssm, tail)


def attend(q, k, v, params, *, mask=None, segment_ids=None, causal=False, bidirectional=None, form="chunked",
           chunk_size=DEFAULT_CHUNK_SIZE, initial_state=None, return_state=False, ngroups=1, impl="xla"):
    """Mamba2 of ``q, k, v [batch, length, heads, d]`` (C, B, x) with ``params``: ``conv_taps [d_conv, 3, heads, d]``,
    ``conv_bias [3, heads, d]``, ``dt_proj [3 heads d, heads]``, ``dt_bias, a_log, d_skip [heads]``, ``gate
    [heads d, heads d]``, ``norm [heads d]``. Returns ``[batch, length, heads, d]`` in q's dtype (and a
    ``Mamba2State`` with ``return_state``); padded positions give 0. ``impl``: "xla" or a kernel backend for the
    SSD scan's chunked form (``gated_linear``)."""
    check_qkv(NAME, q, k, v)
    check_impl(NAME, impl)
    recurrent.check_self(NAME, q, k)
    recurrent.refuse_bidirectional(NAME, causal, bidirectional)
    recurrent.check_carry(NAME, causal, initial_state, return_state)
    batch, length, heads, dim = q.shape
    width = heads * dim
    if not (isinstance(ngroups, int) and ngroups >= 1 and width % ngroups == 0):
        raise ValueError(f"{NAME}: ngroups must be a positive divisor of heads * head_dim = {width}, got {ngroups!r}.")
    check_initial_state(initial_state, batch, params["conv_taps"].shape[0], heads, dim)
    keep = recurrent.keep_mask(NAME, mask, batch, length)
    dtype = q.dtype
    q, k, v = recurrent.zero_padded(keep, *(x.astype(jnp.float32) for x in (q, k, v)))
    u = recurrent.heads_flat(q, k, v)
    dt = jax.nn.softplus(u @ params["dt_proj"].astype(jnp.float32) + params["dt_bias"].astype(jnp.float32))
    log_decay = dt * -jnp.exp(params["a_log"].astype(jnp.float32))
    call = dict(form=form, chunk_size=chunk_size, impl=impl)
    if causal:
        y, state = ssd(q, k, v, dt, log_decay, params, segment_ids=segment_ids, keep=keep, state=initial_state,
                       **call)
    else:
        def one_direction(q, k, v, dt, log_decay, *, segment_ids=None, keep=None):
            return ssd(q, k, v, dt, log_decay, params, segment_ids=segment_ids, keep=keep, **call)[0]
        y, state = recurrent.both_directions(one_direction, (q, k, v, dt, log_decay), segment_ids=segment_ids,
                                             keep=keep), None
    z = recurrent.heads_flat(v) @ params["gate"].astype(jnp.float32)
    gated = (y.reshape(batch, length, width) * jax.nn.silu(z)).reshape(batch, length, ngroups, width // ngroups)
    out = recurrent.rms_norm(gated, eps=NORM_EPS).reshape(batch, length, width) * params["norm"].astype(jnp.float32)
    out = core.zero_pads(out.reshape(y.shape), keep).astype(dtype)
    return (out, state) if return_state else out


def decode_attend(q, k, v, params, *, initial_state=None, history=None, **call):
    """``attend`` on a decoding cache's pieces (``recurrent.decode``): ``initial_state`` (the SSM state) and
    ``history`` (the conv's raw inputs, None: ``d_conv`` 1) make a ``Mamba2State``, so a step continues the conv
    with this module's own tail mechanism (``convolved``); returns ``(out, SSM state)``."""
    if initial_state is not None:
        if history is None:
            history = jnp.zeros((q.shape[0], 0, 3, *q.shape[2:]), jnp.float32)
        initial_state = Mamba2State(initial_state, history.astype(jnp.float32))
    out, state = attend(q, k, v, params, initial_state=initial_state, **call)
    return out, state.ssm


def inverse_softplus(y):
    return y + jnp.log(-jnp.expm1(-y))


class Attention(nn.Module):
    """Linen wrapper owning the conv, dt, A, D, gate and norm parameters with mamba_ssm's Mamba2 init."""

    d_conv: int = 4
    ngroups: int = 1
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    dt_init_floor: float = 1e-4
    a_init_range: tuple = (1.0, 16.0)
    bidirectional: str | None = None  # "sum": causal=False as a forward plus a reversed scan
    form: str = "chunked"
    chunk_size: int = DEFAULT_CHUNK_SIZE
    dropout_rate: float = 0.0  # accepted, unused
    impl: str = "xla"  # "pallas": the chunked linear-attention kernel with per-head decays (chunked form)

    def init_cache(self, batch, max_length, heads, head_dim, dtype):
        """The SSM state ``[batch, heads, d, d]`` float32 and the conv's last ``d_conv - 1`` raw inputs ``[batch,
        d_conv - 1, 3, heads, d]`` (v, k, q) in ``dtype`` (``recurrent.init_cache``; ``max_length`` unused)."""
        return recurrent.init_cache(batch, heads, head_dim, dtype, history=self.d_conv - 1)

    @nn.compact
    def __call__(self, q, k, v, *, mask=None, segment_ids=None, causal=False, deterministic=True, cache=None,
                 positions=None):
        """``cache``: a decoding call (prefill, or a step with ``positions``; ``recurrent.decode``), returns
        ``(out, cache)``."""
        check_qkv(NAME, q, k, v)
        recurrent.check_self(NAME, q, k)
        recurrent.refuse_bidirectional(NAME, causal, self.bidirectional)
        heads, dim = q.shape[2:]
        width = heads * dim

        def dt_bias_init(key, shape, dtype=jnp.float32):
            log_dt = jax.random.uniform(key, shape, dtype, math.log(self.dt_min), math.log(self.dt_max))
            return inverse_softplus(jnp.maximum(jnp.exp(log_dt), self.dt_init_floor))

        def a_log_init(key, shape, dtype=jnp.float32):
            return jnp.log(jax.random.uniform(key, shape, dtype, *self.a_init_range))

        conv_init = torch_uniform(self.d_conv)  # depthwise: fan_in = taps
        params = {
            "conv_taps": self.param("conv_taps", conv_init, (self.d_conv, 3, heads, dim), jnp.float32),
            "conv_bias": self.param("conv_bias", conv_init, (3, heads, dim), jnp.float32),
            "dt_proj": self.param("dt_proj", torch_uniform(3 * width), (3 * width, heads), jnp.float32),
            "dt_bias": self.param("dt_bias", dt_bias_init, (heads,), jnp.float32),
            "a_log": self.param("a_log", a_log_init, (heads,), jnp.float32),
            "d_skip": self.param("d_skip", nn.initializers.ones, (heads,), jnp.float32),
            "gate": self.param("gate", torch_uniform(width), (width, width), jnp.float32),
            "norm": self.param("norm", nn.initializers.ones, (width,), jnp.float32),
        }
        call = dict(mask=mask, segment_ids=segment_ids, causal=causal, bidirectional=self.bidirectional,
                    form=self.form, chunk_size=self.chunk_size, ngroups=self.ngroups, impl=self.impl)
        if cache is None:
            return attend(q, k, v, params, **call)
        return recurrent.decode(NAME, decode_attend, q, k, v, params, cache, positions=positions,
                                streams=jnp.stack([v, k, q], axis=2), **call)
