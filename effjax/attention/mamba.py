"""Mamba selective state-space scan (Gu & Dao 2023, Sec. 3.2 Alg. 2; state-spaces/mamba) adapted to q, k, v."""

import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from effjax.attention import decoding, fftconv, scan
from effjax.attention._capabilities import Capabilities
from effjax.attention.common import check_mask, check_qkv, refuse_cross, torch_uniform
from effjax.kernels import dispatch
from effjax.kernels.backend import check_impl

NAME = "mamba"
CAPABILITIES = Capabilities(causal=True, mask=True, segments=True, cross=False, dropout=False, pallas=True,
                            decode=True, extend=True,
                            notes="decoding keeps the SSM state [heads, head_dim, d_state] in float32 and the short "
                                  "conv's last d_conv - 1 inputs v: constant in the context length.")
DEFAULT_CHUNK_SIZE = 64


def selective_scan(x, delta, a_log, b, c, d_skip, *, keep=None, reset=None, chunk_size=DEFAULT_CHUNK_SIZE,
                   final=False, initial=None):
    """Mamba's ``selective_scan_ref`` per channel ``e = (head, head_dim)`` and state ``n``, in float32:
    ``h_t = exp(delta_t A) h_{t-1} + delta_t B_t x_t`` (ZOH for A, Euler for B) and
    ``y_t = C_t . h_t + D x_t`` with ``A = -exp(a_log)``.

    ``x, delta [batch, length, heads, head_dim]``; ``b, c [batch, length, heads, d_state]`` are shared by the
    head's channels (the reference's grouped B/C with one group per head); ``a_log [heads, head_dim, d_state]``;
    ``d_skip [heads, head_dim]``. ``keep [batch, length]`` False leaves the state untouched (``a = 1, b = 0``),
    so padded steps change nothing; ``reset`` True restarts the state there (``a = 0``), ahead of ``keep``.
    ``chunk_size`` bounds the ``[batch, chunk, heads, head_dim, d_state]`` states held at once (``scan.chunked``).
    ``final=True`` returns ``(y, h)`` with the last state ``h [batch, heads, head_dim, d_state]`` too;
    ``initial`` (that shape) is the state before the first token (a decoding cache's).
    """
    x, delta, b, c = (t.astype(jnp.float32) for t in (x, delta, b, c))
    a = -jnp.exp(a_log.astype(jnp.float32))
    flags = jnp.stack([jnp.ones(x.shape[:2], bool) if keep is None else jnp.asarray(keep, bool),
                       jnp.zeros(x.shape[:2], bool) if reset is None else jnp.asarray(reset, bool)], axis=-1)

    def coefficients(chunk):
        xc, dc, bc, _, fc = chunk
        keep_c, reset_c = fc[..., 0, None, None, None], fc[..., 1, None, None, None]
        decay = jnp.where(keep_c, jnp.exp(dc[..., None] * a), 1.0)
        decay = jnp.where(reset_c, 0.0, decay)
        drive = jnp.where(keep_c, (dc * xc)[..., None] * bc[:, :, :, None, :], 0.0)
        return decay, drive

    def readout(h, chunk):
        return jnp.einsum("blhdn,blhn->blhd", h, chunk[3])

    y = scan.chunked(coefficients, readout, (x, delta, b, c, flags), chunk_size=chunk_size, final=final,
                     initial=initial)
    if final:
        y, h = y
        return y + d_skip.astype(jnp.float32) * x, h
    return y + d_skip.astype(jnp.float32) * x


def segment_starts(segment_ids):
    """True where a token's segment differs from the previous token's (never at position 0)."""
    ids = jnp.asarray(segment_ids)
    return jnp.pad(ids[:, 1:] != ids[:, :-1], [(0, 0), (1, 0)])


def one_direction(q, k, v, params, *, keep=None, segment_ids=None, chunk_size=DEFAULT_CHUNK_SIZE, impl="xla",
                  final=False):
    """The adapted Mamba mixer left to right: x = SiLU(causal conv(v)), Delta from x, B from k, C from q.

    ``params``: ``conv_taps [d_conv, heads, head_dim]``, ``conv_bias [heads, head_dim]``, ``dt_down
    [heads * head_dim, dt_rank]``, ``dt_up [dt_rank, heads * head_dim]``, ``dt_bias [heads * head_dim]``,
    ``w_b, w_c [heads, head_dim, d_state]``, ``a_log [heads, head_dim, d_state]``, ``d_skip [heads, head_dim]``.
    Other ``impl`` (``kernels.dispatch``, op "scan"), e.g. "pallas": ``kernels.selective_scan.selective_scan``
    (same arguments). ``final=True`` returns ``(y, h)`` with the last state (``selective_scan``); the kernels keep
    no state, so on other ``impl`` the XLA scan computes it beside the kernel's outputs.
    """
    x = jax.nn.silu(fftconv.short_causal(v, params["conv_taps"], params["conv_bias"], segment_ids))
    delta, b, c = _drive(x, q, k, params)
    reset = None if segment_ids is None else segment_starts(segment_ids)
    call = dict(x=x, delta=delta, a_log=params["a_log"], b=b, c=c, d_skip=params["d_skip"],
                keep=keep, reset=reset, chunk_size=chunk_size)
    if impl == "xla":
        return selective_scan(**call, final=final)
    y = dispatch.run("scan", impl, call, xla=lambda: selective_scan(**call), where=NAME)
    return (y, selective_scan(**call, final=True)[1]) if final else y


def _drive(x, q, k, params):
    """Delta (from x through the low-rank dt projections), B (from k) and C (from q), float32."""
    batch, length, heads, head_dim = x.shape
    low_rank = x.reshape(batch, length, heads * head_dim) @ params["dt_down"].astype(jnp.float32)
    delta = jax.nn.softplus(low_rank @ params["dt_up"].astype(jnp.float32) + params["dt_bias"].astype(jnp.float32))
    b = jnp.einsum("blhd,hdn->blhn", k.astype(jnp.float32), params["w_b"].astype(jnp.float32))
    c = jnp.einsum("blhd,hdn->blhn", q.astype(jnp.float32), params["w_c"].astype(jnp.float32))
    return delta.reshape(x.shape), b, c


def decode_step(q, k, v, params, cache):
    """One token per sequence (``[batch, 1, heads, head_dim]``) through the short conv's history and the SSM state
    ``cache = {"state": h [batch, heads, head_dim, d_state], "conv": the last d_conv - 1 inputs v}``: the
    recurrence of ``selective_scan`` for one step. Returns float32 ``(y [batch, 1, heads, head_dim], cache)``."""
    conv, history = decoding.conv_step(cache["conv"], v.astype(jnp.float32),
                                       lambda w: fftconv.short_causal(w, params["conv_taps"], params["conv_bias"]))
    x = jax.nn.silu(conv)
    delta, b, c = (t[:, 0] for t in _drive(x, q, k, params))  # [b, h, d], [b, h, n], [b, h, n]
    x = x[:, 0]
    a = -jnp.exp(params["a_log"].astype(jnp.float32))
    h = jnp.exp(delta[..., None] * a) * cache["state"] + (delta * x)[..., None] * b[:, :, None, :]
    y = jnp.einsum("bhdn,bhn->bhd", h, c) + params["d_skip"].astype(jnp.float32) * x
    return y[:, None], {"state": h, "conv": history}


def extend(q, k, v, params, cache, mask=None, chunk_size=DEFAULT_CHUNK_SIZE):
    """A chunk ``[batch, C, heads, head_dim]`` (right-padded by ``mask``) continuing the cache of ``decode_step``:
    the short conv over the cached inputs and the chunk's, then the selective scan from the cached state, pads
    leaving both alone. Equal to ``decode_step`` over the chunk's tokens, chunk-parallel. Returns float32
    ``(y, cache)``."""
    keep = decoding.real_tokens(mask, *q.shape[:2])
    q, k, v = (jnp.where(keep[:, :, None, None], t.astype(jnp.float32), 0.0) for t in (q, k, v))
    conv, history = decoding.conv_step(cache["conv"], v, lambda w: fftconv.short_causal(
        w, params["conv_taps"], params["conv_bias"]), mask)
    x = jax.nn.silu(conv)
    delta, b, c = _drive(x, q, k, params)
    y, h = selective_scan(x, delta, params["a_log"], b, c, params["d_skip"], keep=keep, chunk_size=chunk_size,
                          final=True, initial=cache["state"])
    return y, {"state": h, "conv": history}


def _refuse_cross(q, k):
    refuse_cross(NAME, q, k, "C comes from the query at the same position as the state it reads")


def attend(q, k, v, forward, backward=None, *, mask=None, segment_ids=None, causal=False,
           chunk_size=DEFAULT_CHUNK_SIZE, impl="xla", final=False):
    """The selective scan over q, k, v: causal with ``forward`` params; with ``causal=False`` a second scan
    right to left with ``backward`` params is added (bidirectional, as MobileMamba's SS2D ``bidi`` scan sums
    its directions). Inputs at padded positions are zeroed and their steps skipped (state carried unchanged);
    ``segment_ids`` restart the state and cut the short conv at every segment start, so segments are
    isolated in both directions. Cross attention is refused. ``impl``: "xla" (``scan.chunked``) or "pallas"
    (``kernels.selective_scan``). ``final=True`` (causal only) returns ``(out, h)`` with the state after the last
    real token (padded steps leave it unchanged): a decoding prefill's.
    """
    check_qkv(NAME, q, k, v)
    check_impl(NAME, impl)
    _refuse_cross(q, k)
    if not causal and backward is None:
        raise ValueError(f"{NAME}: causal=False needs the backward direction's params.")
    dtype, keep = q.dtype, None
    if mask is not None:
        keep = check_mask(NAME, mask, *v.shape[:2])
        q, k, v = (jnp.where(keep[:, :, None, None], t.astype(jnp.float32), 0.0) for t in (q, k, v))
    if final:
        if not causal:
            raise ValueError(f"{NAME}: the final state (final=True) is that of the causal scan: use causal=True.")
        out, h = one_direction(q, k, v, forward, keep=keep, segment_ids=segment_ids, chunk_size=chunk_size,
                               impl=impl, final=True)
        return out.astype(dtype), h
    out = one_direction(q, k, v, forward, keep=keep, segment_ids=segment_ids, chunk_size=chunk_size, impl=impl)
    if not causal:
        def flip(t):
            return None if t is None else jnp.flip(t, axis=1)
        out = out + flip(one_direction(flip(q), flip(k), flip(v), backward, keep=flip(keep),
                                       segment_ids=flip(segment_ids), chunk_size=chunk_size, impl=impl))
    return out.astype(dtype)


def inverse_softplus(y):
    return y + jnp.log(-jnp.expm1(-y))


class DirectionParams(nn.Module):
    """One scan direction's parameters with the reference's init (``mamba_simple.Mamba.__init__``)."""

    heads: int
    head_dim: int
    d_state: int = 16
    d_conv: int = 4
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    dt_init_floor: float = 1e-4

    @nn.compact
    def __call__(self):
        channels = self.heads * self.head_dim
        dt_rank = math.ceil(channels / 16)  # "auto", with the block width taken as heads * head_dim

        def dt_bias_init(key, shape, dtype=jnp.float32):
            log_dt = jax.random.uniform(key, shape, dtype, math.log(self.dt_min), math.log(self.dt_max))
            return inverse_softplus(jnp.maximum(jnp.exp(log_dt), self.dt_init_floor))

        def a_log_init(key, shape, dtype=jnp.float32):  # S4D-real: A = -(1, 2, ..., d_state) in every channel
            return jnp.broadcast_to(jnp.log(jnp.arange(1, self.d_state + 1, dtype=dtype)), shape)

        conv_init = torch_uniform(self.d_conv)
        per_head = (self.heads, self.head_dim)
        return {
            "conv_taps": self.param("conv_taps", conv_init, (self.d_conv, *per_head), jnp.float32),
            "conv_bias": self.param("conv_bias", conv_init, per_head, jnp.float32),
            "dt_down": self.param("dt_down", torch_uniform(channels), (channels, dt_rank), jnp.float32),
            "dt_up": self.param("dt_up", torch_uniform(dt_rank), (dt_rank, channels), jnp.float32),
            "dt_bias": self.param("dt_bias", dt_bias_init, (channels,), jnp.float32),
            "w_b": self.param("w_b", torch_uniform(self.head_dim), (*per_head, self.d_state), jnp.float32),
            "w_c": self.param("w_c", torch_uniform(self.head_dim), (*per_head, self.d_state), jnp.float32),
            "a_log": self.param("a_log", a_log_init, (*per_head, self.d_state), jnp.float32),
            "d_skip": self.param("d_skip", nn.initializers.ones, per_head, jnp.float32),
        }


class Attention(nn.Module):
    """Linen wrapper owning each direction's parameters (``backward`` only once used with ``causal=False``).

    Adapter, not the paper's block: x is v (Mamba's in_proj x-half is the block's value projection), B and C
    are per-head maps of k and q to ``d_state`` (the block's key/query projections playing x_proj's B/C part),
    Delta comes from x through the rank-``ceil(heads * head_dim / 16)`` dt projections; the SiLU(z) output gate
    and out_proj are left to the block. ``dropout_rate`` is accepted for the common interface but does not
    apply (the reference has no dropout in the mixer).

    Decoding (``init_cache``, ``cache``/``positions``), as the reference's ``step``: the cache holds the SSM state
    ``[batch, heads, head_dim, d_state]`` (float32) and the short conv's last ``d_conv - 1`` inputs; a prefill is
    the causal scan over the prompts (its last state after each prompt's last real token), a step one recurrence
    step.
    """

    d_state: int = 16
    d_conv: int = 4
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    chunk_size: int | None = DEFAULT_CHUNK_SIZE
    dropout_rate: float = 0.0
    impl: str = "xla"  # "pallas": kernels.selective_scan

    def init_cache(self, batch, max_length, heads, head_dim, dtype):
        """``{"state": zeros [batch, heads, head_dim, d_state] float32, "conv": zeros [batch, d_conv - 1, heads,
        head_dim] of dtype}`` (``max_length`` unused: the state does not grow)."""
        return {"state": decoding.boxed_zeros((batch, heads, head_dim, self.d_state), jnp.float32,
                                              ("batch", "heads", "head_dim", None)),
                "conv": decoding.boxed_zeros((batch, self.d_conv - 1, heads, head_dim), dtype,
                                             ("batch", None, "heads", "head_dim"))}

    @nn.compact
    def __call__(self, q, k, v, *, mask=None, segment_ids=None, causal=False, deterministic=True, cache=None,
                 positions=None):
        """``cache``: a decoding call (prefill, or a step with ``positions``; ``decoding``), returns
        ``(out, cache)``."""
        check_qkv(NAME, q, k, v)
        _refuse_cross(q, k)
        if cache is not None:
            decoding.check_call(NAME, q, causal=causal, segment_ids=segment_ids, positions=positions)
        dims = dict(heads=q.shape[2], head_dim=q.shape[3], d_state=self.d_state, d_conv=self.d_conv,
                    dt_min=self.dt_min, dt_max=self.dt_max)
        forward = DirectionParams(**dims, name="forward")()
        backward = None if causal else DirectionParams(**dims, name="backward")()
        if cache is None:
            return attend(q, k, v, forward, backward, mask=mask, segment_ids=segment_ids, causal=causal,
                          chunk_size=self.chunk_size, impl=self.impl)
        if decoding.is_extend(q, mask, positions):
            out, cache = extend(q, k, v, forward, cache, mask, self.chunk_size)
            return out.astype(q.dtype), cache
        if positions is not None:
            out, cache = decode_step(q, k, v, forward, cache)
            return out.astype(q.dtype), cache
        out, state = attend(q, k, v, forward, mask=mask, causal=True, chunk_size=self.chunk_size, impl=self.impl,
                            final=True)
        history = decoding.conv_history(v, mask, self.d_conv - 1).astype(cache["conv"].dtype)
        return out, {"state": state, "conv": history}
