"""Mamba's selective scan as a Mosaic TPU Pallas kernel (Gu & Dao 2023, Sec. 3.2 Alg. 2), with the semantics of
``kernels.selective_scan.selective_scan``: op "scan" of ``kernels.dispatch``'s ``mosaic_tpu`` backend.

    h_t = exp(delta_t A) h_{t-1} + delta_t B_t x_t,    y_t = C_t . h_t + D x_t,    A = -exp(a_log)

per channel ``(head, p)`` and state ``n``. TPU design:
- Head-major layouts, transposed outside the kernel: ``x, delta [b, h, len, P]`` (channels on the 128 lanes, P
  padded to a multiple of 128), ``A [h, N, P]`` and ``B^T, C^T [b, h, N, len]`` (d_state N on sublanes, padded to a
  multiple of 8), reset flags ``[b, 8, len]`` (broadcast over 8 sublanes, as splash attention does for segment ids).
  The state of a program is one ``[N, 128]`` float32 tile set.
- Grid (batch, heads, channel blocks of 128, chunks of 128 steps): the chunk axis is "arbitrary" and the state lives
  in VMEM scratch across it. Inside a chunk the steps run one at a time, 8 per loop iteration, so x, delta and y move
  as aligned ``[8, 128]`` slabs (``pl.ds(pl.multiple_of(8 s, 8), 8)``); the per-step B_t and C_t columns ``[N, 1]``
  come out of the lane-major ``[N, chunk]`` blocks by a dynamic lane rotation (``pltpu.roll``) and a static slice
  at lane 0, which avoids dynamic lane indexing.
- The forward writes the state at every chunk start (``[b, h, chunks, N, P]``) for the backward.
- Backward, in Pallas too (custom VJP): chunks in reverse order (index maps ``chunks - 1 - c``); each chunk's
  states are recomputed from its checkpoint into a ``[chunk + 1, N, 128]`` VMEM scratch, then the adjoint
  ``dh_t = exp(delta_{t+1} A) dh_{t+1} + C_t dy_t`` runs back through the chunk with its carry in VMEM scratch,
  giving d x, d delta (per step, as slabs), d B, d C (lane-major ``[N, chunk]`` blocks, one partial per channel
  block, summed outside) and d A (summed over the chunks in VMEM, over the batch outside).
``keep`` folds into delta = 0 (an identity step), ``reset`` zeroes the decay, ``D x`` is plain JAX.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from effjax.kernels import sharding, tpu_linear
from effjax.kernels.linear_attention import pad_axis
from effjax.kernels.selective_scan import check_args
from effjax.kernels.tpu_linear import CHUNK_AXIS, LANES, interpret_params, round_up

KERNEL = "tpu_selective_scan"
DEFAULT_CHUNK_SIZE = 128  # steps per grid step; a multiple of 128 (B^T and C^T blocks are lane-major in time)
GROUP = 8  # steps per loop iteration: one [8, 128] slab of x, delta and y
MAX_STATE = 64  # largest padded d_state: the backward keeps chunk + 1 states [d_state, 128] in VMEM (4 MiB at 64)


def _step_columns(bt, ct, rr, t, chunk):
    """B_t, C_t as ``[N, 1]`` columns and the reset flag as ``[1, 1]`` from the lane-major chunk blocks."""
    shift = lax.rem(chunk - t, chunk)  # jnp.roll semantics: element t lands at lane 0
    column = lambda block: pltpu.roll(block, shift, 1)[:, :1]  # noqa: E731
    return column(bt), column(ct), column(rr)[:1, :]


def _fwd_kernel(x_ref, dt_ref, a_ref, bt_ref, ct_ref, r_ref, y_ref, ckpt_ref, h_ref, *, chunk):
    @pl.when(pl.program_id(3) == 0)
    def _():
        h_ref[...] = jnp.zeros(h_ref.shape, jnp.float32)

    ckpt_ref[...] = h_ref[...]  # the state before the chunk's first step
    a, bt, ct, rr = a_ref[...], bt_ref[...], ct_ref[...], r_ref[...]
    slab_rows = lax.broadcasted_iota(jnp.int32, (GROUP, a.shape[1]), 0)

    def group(s, h):
        base = pl.multiple_of(s * GROUP, GROUP)
        x8, dt8 = x_ref[pl.ds(base, GROUP), :], dt_ref[pl.ds(base, GROUP), :]
        y8 = jnp.zeros(x8.shape, jnp.float32)
        for i in range(GROUP):
            b_col, c_col, reset = _step_columns(bt, ct, rr, base + i, chunk)
            dt, x = dt8[i:i + 1, :], x8[i:i + 1, :]
            h = jnp.exp(dt * a) * (1.0 - reset) * h + b_col * (dt * x)
            y8 = jnp.where(slab_rows == i, jnp.sum(c_col * h, axis=0, keepdims=True), y8)
        y_ref[pl.ds(base, GROUP), :] = y8
        return h

    h_ref[...] = lax.fori_loop(0, chunk // GROUP, group, h_ref[...])


def _bwd_kernel(x_ref, dt_ref, a_ref, bt_ref, ct_ref, r_ref, ckpt_ref, dy_ref,
                dx_ref, ddt_ref, dbt_ref, dct_ref, da_ref, g_ref, da_acc_ref, states_ref, *, chunk):
    @pl.when(pl.program_id(3) == 0)
    def _():
        g_ref[...] = jnp.zeros(g_ref.shape, jnp.float32)
        da_acc_ref[...] = jnp.zeros(da_acc_ref.shape, jnp.float32)

    a, bt, ct, rr = a_ref[...], bt_ref[...], ct_ref[...], r_ref[...]
    n, block_p = a.shape
    slab_rows = lax.broadcasted_iota(jnp.int32, (GROUP, block_p), 0)
    lanes = lax.broadcasted_iota(jnp.int32, (n, chunk), 1)
    states_ref[0] = ckpt_ref[...]  # states_ref[t + 1] = h_t, states_ref[0] = the state before the chunk

    def recompute(s, h):
        base = pl.multiple_of(s * GROUP, GROUP)
        x8, dt8 = x_ref[pl.ds(base, GROUP), :], dt_ref[pl.ds(base, GROUP), :]
        for i in range(GROUP):
            b_col, _, reset = _step_columns(bt, ct, rr, base + i, chunk)
            dt, x = dt8[i:i + 1, :], x8[i:i + 1, :]
            h = jnp.exp(dt * a) * (1.0 - reset) * h + b_col * (dt * x)
            states_ref[base + i + 1] = h
        return h

    lax.fori_loop(0, chunk // GROUP, recompute, states_ref[0])

    def adjoint(s, carry):
        g, da, dbt, dct = carry  # g: cotangent of h_t arriving through h_{t+1}
        base = pl.multiple_of((chunk // GROUP - 1 - s) * GROUP, GROUP)
        x8, dt8, dy8 = (ref[pl.ds(base, GROUP), :] for ref in (x_ref, dt_ref, dy_ref))
        dx8 = ddt8 = jnp.zeros(x8.shape, jnp.float32)
        for i in reversed(range(GROUP)):
            t = base + i
            b_col, c_col, reset = _step_columns(bt, ct, rr, t, chunk)
            dt, x, dy = dt8[i:i + 1, :], x8[i:i + 1, :], dy8[i:i + 1, :]
            decay = jnp.exp(dt * a) * (1.0 - reset)
            h, h_prev = states_ref[t + 1], states_ref[t]
            dh = g + c_col * dy
            d_log = dh * h_prev * decay  # cotangent of (delta_t A) through the decay
            dh_b = jnp.sum(dh * b_col, axis=0, keepdims=True)
            ddt8 = jnp.where(slab_rows == i, jnp.sum(d_log * a, axis=0, keepdims=True) + dh_b * x, ddt8)
            dx8 = jnp.where(slab_rows == i, dh_b * dt, dx8)
            dbt = jnp.where(lanes == t, jnp.sum(dh * (dt * x), axis=1, keepdims=True), dbt)
            dct = jnp.where(lanes == t, jnp.sum(dy * h, axis=1, keepdims=True), dct)
            g, da = dh * decay, da + d_log * dt
        dx_ref[pl.ds(base, GROUP), :] = dx8
        ddt_ref[pl.ds(base, GROUP), :] = ddt8
        return g, da, dbt, dct

    zeros = jnp.zeros((n, chunk), jnp.float32)
    g, da, dbt, dct = lax.fori_loop(0, chunk // GROUP, adjoint, (g_ref[...], da_acc_ref[...], zeros, zeros))
    g_ref[...] = g
    da_acc_ref[...] = da
    da_ref[...] = da  # the block stays resident over the chunk axis; the last chunk's sum is written back
    dbt_ref[...] = dbt
    dct_ref[...] = dct


def _specs(chunk, n, num_chunks, reverse):
    """BlockSpecs over grid (batch, heads, channel block, chunk) for x-like, A, B^T-like, reset and checkpoints."""
    at = (lambda c: num_chunks - 1 - c) if reverse else (lambda c: c)
    chan = pl.BlockSpec((None, None, chunk, LANES), lambda b, h, j, c: (b, h, at(c), j))
    a = pl.BlockSpec((None, n, LANES), lambda b, h, j, c: (h, 0, j))
    state_t = pl.BlockSpec((None, None, n, chunk), lambda b, h, j, c: (b, h, 0, at(c)))
    reset = pl.BlockSpec((None, 8, chunk), lambda b, h, j, c: (b, 0, at(c)))
    ckpt = pl.BlockSpec((None, None, None, n, LANES), lambda b, h, j, c: (b, h, at(c), 0, j))
    return chan, a, state_t, reset, ckpt


def _forward(x, dt, a, bt, ct, reset, chunk, interpret):
    batch, heads, length, p = x.shape
    n = a.shape[1]
    num_chunks = length // chunk
    chan, a_spec, state_t, reset_spec, ckpt = _specs(chunk, n, num_chunks, reverse=False)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, chunk=chunk),
        grid=(batch, heads, p // LANES, num_chunks),
        in_specs=[chan, chan, a_spec, state_t, state_t, reset_spec],
        out_specs=[chan, ckpt],
        out_shape=[jax.ShapeDtypeStruct(x.shape, jnp.float32),
                   jax.ShapeDtypeStruct((batch, heads, num_chunks, n, p), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((n, LANES), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=CHUNK_AXIS),
        interpret=interpret_params(interpret), name="tpu_selective_scan_fwd",
    )(x, dt, a, bt, ct, reset)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _core(x, dt, a, bt, ct, reset, chunk, interpret):
    """The scan part ``C_t . h_t`` (float32 ``[b, h, len, P]``) of padded head-major float32 inputs."""
    return _forward(x, dt, a, bt, ct, reset, chunk, interpret)[0]


def _core_fwd(x, dt, a, bt, ct, reset, chunk, interpret):
    y, checkpoints = _forward(x, dt, a, bt, ct, reset, chunk, interpret)
    return y, (x, dt, a, bt, ct, reset, checkpoints)


def _core_bwd(chunk, interpret, residuals, dy):
    x, dt, a, bt, ct, reset, checkpoints = residuals
    batch, heads, length, p = x.shape
    n = a.shape[1]
    num_chunks, num_blocks = length // chunk, p // LANES
    chan, a_spec, state_t, reset_spec, ckpt = _specs(chunk, n, num_chunks, reverse=True)
    part = pl.BlockSpec((None, None, None, n, chunk), lambda b, h, j, c: (j, b, h, 0, num_chunks - 1 - c))
    f32 = jnp.float32
    dx, ddt, dbt, dct, da = pl.pallas_call(
        functools.partial(_bwd_kernel, chunk=chunk),
        grid=(batch, heads, num_blocks, num_chunks),
        in_specs=[chan, chan, a_spec, state_t, state_t, reset_spec, ckpt, chan],
        out_specs=[chan, chan, part, part, pl.BlockSpec((None, None, n, LANES), lambda b, h, j, c: (b, h, 0, j))],
        out_shape=[jax.ShapeDtypeStruct(x.shape, f32)] * 2
        + [jax.ShapeDtypeStruct((num_blocks, batch, heads, n, length), f32)] * 2
        + [jax.ShapeDtypeStruct((batch, heads, n, p), f32)],
        scratch_shapes=[pltpu.VMEM((n, LANES), f32), pltpu.VMEM((n, LANES), f32),
                        pltpu.VMEM((chunk + 1, n, LANES), f32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=CHUNK_AXIS),
        interpret=interpret_params(interpret), name="tpu_selective_scan_bwd",
    )(x, dt, a, bt, ct, reset, checkpoints, dy.astype(f32))
    return dx, ddt, da.sum(0), dbt.sum(0), dct.sum(0), jnp.zeros_like(reset)


_core.defvjp(_core_fwd, _core_bwd)


def _check(x, delta, a_log, b, c, d_skip, keep, reset, chunk_size):
    n = check_args(KERNEL, x, delta, a_log, b, c, d_skip, keep, reset)
    if round_up(n, 8) > MAX_STATE:
        raise ValueError(f"{KERNEL}: d_state {n} pads to more than {MAX_STATE} (the backward's VMEM states).")
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"{KERNEL}: chunk_size must be a positive int or None, got {chunk_size!r}.")


def selective_scan(x, delta, a_log, b, c, d_skip, *, keep=None, reset=None, chunk_size=DEFAULT_CHUNK_SIZE,
                   interpret=None, block_p=None):
    """Mosaic TPU twin of ``kernels.selective_scan.selective_scan`` (same arguments): float32 ``y [b, l, h, p]``.

    ``chunk_size`` (None: 128) is rounded up to a multiple of 128 steps; it changes the result only by rounding.
    ``block_p`` (a Triton knob) is accepted and ignored: channel blocks are 128 lanes. Gradients reach x, delta,
    a_log, b, c and d_skip (Pallas forward and backward kernels); keep/reset get none.
    """
    del block_p
    _check(x, delta, a_log, b, c, d_skip, keep, reset, chunk_size)
    batch, length, heads, p = x.shape
    n = b.shape[-1]
    x, delta, b, c = (t.astype(jnp.float32) for t in (x, delta, b, c))
    if keep is not None:  # a skipped step: delta 0 gives exp(0) = 1 and no drive
        delta = jnp.where(jnp.asarray(keep, bool)[:, :, None, None], delta, 0.0)
    resets = jnp.zeros((batch, length), jnp.float32) if reset is None else jnp.asarray(reset, bool).astype(
        jnp.float32)
    chunk = round_up(chunk_size or DEFAULT_CHUNK_SIZE, LANES)
    chunk = min(chunk, round_up(length, LANES))
    padded = round_up(length, chunk)
    p_pad, n_pad = round_up(p, LANES), round_up(n, 8)
    a = jnp.swapaxes(-jnp.exp(a_log.astype(jnp.float32)), 1, 2)  # [h, n, p]
    a = pad_axis(pad_axis(a, 1, 0, n_pad - n), 2, 0, p_pad - p)
    xs, dts = (pad_axis(pad_axis(t, 1, 0, padded - length), 3, 0, p_pad - p) for t in (x, delta))
    bs, cs = (pad_axis(pad_axis(t, 1, 0, padded - length), 3, 0, n_pad - n) for t in (b, c))
    resets = pad_axis(resets, 1, 0, padded - length)
    interpret = interpret_params(interpret)

    def per_shard(_, xs, dts, a, bs, cs, resets):
        heads_major = lambda t: jnp.swapaxes(t, 1, 2)  # noqa: E731 - [b, l, h, d] -> [b, h, l, d]
        lane_major = lambda t: jnp.transpose(t, (0, 2, 3, 1))  # noqa: E731 - [b, l, h, n] -> [b, h, n, l]
        rows = jnp.broadcast_to(resets[:, None, :], (resets.shape[0], 8, resets.shape[1]))
        y = _core(heads_major(xs), heads_major(dts), a, lane_major(bs), lane_major(cs), rows, chunk, interpret)
        return heads_major(y)

    per_step = (sharding.BATCH, None, sharding.HEADS)  # [batch, length, heads, ...]
    y = sharding.per_shard(per_shard, (xs, dts, a, bs, cs, resets),
                           (per_step, per_step, (sharding.HEADS,), per_step, per_step, (sharding.BATCH,)), per_step,
                           batch=batch, head_counts=(heads,))
    return y[:, :length, :, :p] + d_skip.astype(jnp.float32) * x


# --- op "scan" of the mosaic_tpu backend (kernels.dispatch) -------------------------------------------------------

NAME = "mosaic_tpu"
PLATFORMS = ("tpu",)  # compiled there; on a CPU the kernels run in TPU interpret mode
OPS = {"scan": selective_scan}


def supports(op: str, call: dict) -> str | None:
    """None when ``selective_scan(**call)`` runs here, else a short reason naming the unsupported feature; ``call``
    holds the entry point's keyword arguments (arrays or ``jax.ShapeDtypeStruct``). Never raises."""
    if op not in OPS:
        return f"op {op!r} (this module implements {', '.join(OPS)})"
    try:
        states = call.get("b")
        if states is not None and round_up(states.shape[-1], 8) > MAX_STATE:
            return f"d_state {states.shape[-1]} > {MAX_STATE} (the backward's states in VMEM)"
        return tpu_linear.platform_reason(call)
    except Exception as error:  # noqa: BLE001 - a malformed call is the entry point's to reject, not ours
        return f"unreadable call ({type(error).__name__}: {error})"
