"""Chunked selective scan in Pallas: Mamba's S6 recurrence (Gu & Dao 2023, Sec. 3.2 Alg. 2; selective_scan_ref).

    h_t = exp(delta_t A) h_{t-1} + delta_t B_t x_t,    y_t = C_t . h_t + D x_t,    A = -exp(a_log)

per channel ``(head, p)`` and state ``n``, with the argument layout of ``effjax.attention.mamba.selective_scan``
(``x, delta [b, l, h, p]``, ``b, c [b, l, h, n]``, ``a_log [h, p, n]``, ``d_skip [h, p]``, ``keep``/``reset``
``[b, l]``), so the mamba mixer calls either one.

Forward kernel: one program per (batch, head, block of channels) keeps the ``[block_p, n]`` state in
registers and walks the steps in order; every ``chunk_size`` steps it writes the state as a checkpoint
(``[b, chunks, h, p, n]`` float32). Backward kernel: chunks in reverse; each chunk's states are recomputed
from its checkpoint into a per-program scratch buffer ``[chunk, block_p, n]``, then the adjoint
``dh_t = exp(delta_{t+1} A) dh_{t+1} + C_t dy_t`` runs backwards through the chunk, giving d x, d delta,
d A, d B, d C (Mamba's CUDA backward does the same with shared memory). ``keep`` is folded into delta
(delta 0 is an identity step) and ``D x`` is added in plain JAX.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from effjax.kernels import sharding
from effjax.kernels.backend import interpret_default
from effjax.kernels.linear_attention import check_dtype, next_power_of_2, pad_axis

NAME = "selective_scan"
DEFAULT_CHUNK_SIZE = 64
DEFAULT_BLOCK_P = 64
MAX_STATE = 256  # largest padded d_state


def _load_step(refs, t):
    x_ref, dt_ref, a_ref, b_ref, c_ref, r_ref = refs
    dt = dt_ref[t, :]
    decay = jnp.exp(dt[:, None] * a_ref[...]) * (1.0 - r_ref[t])  # reset: a = 0
    return x_ref[t, :], dt, decay, b_ref[t, :], c_ref[t, :]


def _fwd_kernel(x_ref, dt_ref, a_ref, b_ref, c_ref, r_ref, y_ref, ckpt_ref, *, chunk, num_chunks):
    refs = (x_ref, dt_ref, a_ref, b_ref, c_ref, r_ref)

    def chunk_body(ci, h):
        ckpt_ref[ci] = h  # the state before the chunk's first step

        def step(t, h):
            pos = ci * chunk + t
            x, dt, decay, b, c = _load_step(refs, pos)
            h = decay * h + (dt * x)[:, None] * b[None, :]
            y_ref[pos, :] = jnp.sum(h * c[None, :], axis=1)
            return h

        return lax.fori_loop(0, chunk, step, h)

    lax.fori_loop(0, num_chunks, chunk_body, jnp.zeros(a_ref.shape, jnp.float32))


def _bwd_kernel(x_ref, dt_ref, a_ref, b_ref, c_ref, r_ref, ckpt_ref, dy_ref,
                dx_ref, ddt_ref, db_ref, dc_ref, da_ref, states_ref, *, chunk, num_chunks, interpret):
    refs = (x_ref, dt_ref, a_ref, b_ref, c_ref, r_ref)
    a = a_ref[...]

    def barrier():  # the scratch states are written and read by different threads of the program
        if not interpret:
            plgpu.debug_barrier()

    def chunk_body(i, carry):
        ci = num_chunks - 1 - i
        start = ci * chunk
        h0 = ckpt_ref[ci]

        def recompute(t, h):
            x, dt, decay, b, _ = _load_step(refs, start + t)
            h = decay * h + (dt * x)[:, None] * b[None, :]
            states_ref[t] = h
            return h

        lax.fori_loop(0, chunk, recompute, h0)
        barrier()

        def adjoint(s, carry):
            g, da = carry  # g: cotangent of h_t arriving through h_{t+1}
            t = chunk - 1 - s
            pos = start + t
            x, dt, decay, b, c = _load_step(refs, pos)
            h = states_ref[t]
            h_prev = jnp.where(t > 0, states_ref[jnp.maximum(t - 1, 0)], h0)
            dy = dy_ref[pos, :]
            dh = g + dy[:, None] * c[None, :]
            dc_ref[pos, :] = jnp.sum(dy[:, None] * h, axis=0)
            d_log = dh * h_prev * decay  # cotangent of (delta_t A) through the decay
            dh_b = jnp.sum(dh * b[None, :], axis=1)
            ddt_ref[pos, :] = jnp.sum(d_log * a, axis=1) + dh_b * x
            dx_ref[pos, :] = dh_b * dt
            db_ref[pos, :] = jnp.sum(dh * (dt * x)[:, None], axis=0)
            return dh * decay, da + d_log * dt[:, None]

        carry = lax.fori_loop(0, chunk, adjoint, carry)
        barrier()  # the next chunk overwrites the scratch states
        return carry

    zeros = jnp.zeros(a.shape, jnp.float32)
    _, da = lax.fori_loop(0, num_chunks, chunk_body, (zeros, zeros))
    da_ref[...] = da


def _grid_specs(length, block_p, n):
    chan = pl.BlockSpec((None, length, None, block_p), lambda b, h, j: (b, 0, h, j))
    state = pl.BlockSpec((None, length, None, n), lambda b, h, j: (b, 0, h, 0))
    a = pl.BlockSpec((None, block_p, n), lambda b, h, j: (h, j, 0))
    row = pl.BlockSpec((None, length), lambda b, h, j: (b, 0))
    return chan, state, a, row


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _core(x, dt, a, b, c, reset, chunk, block_p, interpret):
    """The scan part ``C_t . h_t`` (float32 [b, l, h, p]) of padded float32 inputs."""
    return _forward(x, dt, a, b, c, reset, chunk, block_p, interpret)[0]


def _forward(x, dt, a, b, c, reset, chunk, block_p, interpret):
    batch, length, heads, p = x.shape
    n = b.shape[-1]
    num_chunks = length // chunk
    chan, state, a_spec, row = _grid_specs(length, block_p, n)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, chunk=chunk, num_chunks=num_chunks),
        grid=(batch, heads, p // block_p),
        in_specs=[chan, chan, a_spec, state, state, row],
        out_specs=[chan, pl.BlockSpec((None, num_chunks, None, block_p, n), lambda i, h, j: (i, 0, h, j, 0))],
        out_shape=[jax.ShapeDtypeStruct(x.shape, jnp.float32),
                   jax.ShapeDtypeStruct((batch, num_chunks, heads, p, n), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1), interpret=interpret,
        name="selective_scan_fwd",
    )(x, dt, a, b, c, reset)


def _core_fwd(x, dt, a, b, c, reset, chunk, block_p, interpret):
    y, checkpoints = _forward(x, dt, a, b, c, reset, chunk, block_p, interpret)
    return y, (x, dt, a, b, c, reset, checkpoints)


def _core_bwd(chunk, block_p, interpret, residuals, dy):
    x, dt, a, b, c, reset, checkpoints = residuals
    batch, length, heads, p = x.shape
    n = b.shape[-1]
    num_chunks, num_blocks = length // chunk, p // block_p
    chan, state, a_spec, row = _grid_specs(length, block_p, n)
    part = pl.BlockSpec((None, None, length, None, n), lambda i, h, j: (j, i, 0, h, 0))
    f32 = jnp.float32
    dx, ddt, db, dc, da, _ = pl.pallas_call(
        functools.partial(_bwd_kernel, chunk=chunk, num_chunks=num_chunks, interpret=interpret),
        grid=(batch, heads, num_blocks),
        in_specs=[chan, chan, a_spec, state, state, row,
                  pl.BlockSpec((None, num_chunks, None, block_p, n), lambda i, h, j: (i, 0, h, j, 0)), chan],
        out_specs=[chan, chan, part, part, pl.BlockSpec((None, None, block_p, n), lambda i, h, j: (i, h, j, 0)),
                   pl.BlockSpec((None, None, None, chunk, block_p, n), lambda i, h, j: (i, h, j, 0, 0, 0))],
        out_shape=[jax.ShapeDtypeStruct(x.shape, f32)] * 2
        + [jax.ShapeDtypeStruct((num_blocks, batch, length, heads, n), f32)] * 2
        + [jax.ShapeDtypeStruct((batch, heads, p, n), f32),
           jax.ShapeDtypeStruct((batch, heads, num_blocks, chunk, block_p, n), f32)],  # scratch states
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1), interpret=interpret,
        name="selective_scan_bwd",
    )(x, dt, a, b, c, reset, checkpoints, dy.astype(f32))
    return dx, ddt, da.sum(0), db.sum(0), dc.sum(0), jnp.zeros_like(reset)


_core.defvjp(_core_fwd, _core_bwd)


def check_args(kernel: str, x, delta, a_log, b, c, d_skip, keep, reset) -> int:
    """The scan's argument shapes and dtypes (one-line ValueErrors naming ``kernel``); returns d_state."""
    if x.ndim != 4 or delta.shape != x.shape:
        raise ValueError(f"{kernel}: x and delta must both have shape [batch, length, heads, head_dim], "
                         f"got {x.shape} and {delta.shape}.")
    batch, length, heads, p = x.shape
    if b.ndim != 4 or b.shape[:3] != (batch, length, heads) or c.shape != b.shape:
        raise ValueError(f"{kernel}: b and c must have shape [batch, length, heads, d_state] = "
                         f"{(batch, length, heads, 'd_state')}, got {b.shape} and {c.shape}.")
    n = b.shape[-1]
    if a_log.shape != (heads, p, n) or d_skip.shape != (heads, p):
        raise ValueError(f"{kernel}: a_log must have shape {(heads, p, n)} and d_skip {(heads, p)}, "
                         f"got {a_log.shape} and {d_skip.shape}.")
    for label, t in (("x", x), ("delta", delta), ("a_log", a_log), ("b", b), ("c", c), ("d_skip", d_skip)):
        check_dtype(kernel, label, t)
    for label, t in (("keep", keep), ("reset", reset)):
        if t is not None and t.shape != (batch, length):
            raise ValueError(f"{kernel}: {label} must have shape [batch, length] = {(batch, length)}, got {t.shape}.")
    return n


def _check(x, delta, a_log, b, c, d_skip, keep, reset, chunk_size, block_p):
    n = check_args(NAME, x, delta, a_log, b, c, d_skip, keep, reset)
    if next_power_of_2(n) > MAX_STATE:
        raise ValueError(f"{NAME}: d_state {n} pads to {next_power_of_2(n)} > {MAX_STATE}: too much state per program.")
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"{NAME}: chunk_size must be a positive int or None, got {chunk_size!r}.")
    if block_p is not None and (not isinstance(block_p, int) or block_p < 1 or block_p & (block_p - 1)):
        raise ValueError(f"{NAME}: block_p must be a power of two, got {block_p!r}.")


def selective_scan(x, delta, a_log, b, c, d_skip, *, keep=None, reset=None, chunk_size=DEFAULT_CHUNK_SIZE,
                   interpret=None, block_p=None):
    """Pallas twin of ``effjax.attention.mamba.selective_scan``: same arguments, float32 ``y [b, l, h, p]``.

    ``chunk_size`` is the checkpoint interval (None: 64); it changes the result only by float rounding, and
    the backward's scratch holds ``chunk_size x block_p x d_state`` floats per program. ``block_p``: channels
    per program (default min(64, head_dim padded to a power of two)). Gradients reach x, delta, a_log, b, c
    and d_skip; keep/reset get none.
    """
    _check(x, delta, a_log, b, c, d_skip, keep, reset, chunk_size, block_p)
    batch, length, heads, p = x.shape
    n = b.shape[-1]
    x, delta, b, c = (t.astype(jnp.float32) for t in (x, delta, b, c))
    if keep is not None:  # a skipped step: delta 0 gives exp(0) = 1 and no drive
        delta = jnp.where(jnp.asarray(keep, bool)[:, :, None, None], delta, 0.0)
    resets = jnp.zeros((batch, length), jnp.float32) if reset is None else jnp.asarray(reset, bool).astype(
        jnp.float32)
    chunk = min(chunk_size or DEFAULT_CHUNK_SIZE, length)
    padded = -(-length // chunk) * chunk
    p_pad, n_pad = next_power_of_2(p), next_power_of_2(n)
    block = min(block_p or DEFAULT_BLOCK_P, p_pad)
    a = -jnp.exp(a_log.astype(jnp.float32))
    a = pad_axis(pad_axis(a, 1, 0, p_pad - p), 2, 0, n_pad - n)
    xs, dts = (pad_axis(pad_axis(t, 1, 0, padded - length), 3, 0, p_pad - p) for t in (x, delta))
    bs, cs = (pad_axis(pad_axis(t, 1, 0, padded - length), 3, 0, n_pad - n) for t in (b, c))
    interpret = interpret_default(interpret)
    per_step = (sharding.BATCH, None, sharding.HEADS)  # [batch, length, heads, ...]
    y = sharding.per_shard(
        lambda _, *arrays: _core(*arrays, chunk, block, interpret),
        (xs, dts, a, bs, cs, pad_axis(resets, 1, 0, padded - length)),
        (per_step, per_step, (sharding.HEADS,), per_step, per_step, (sharding.BATCH,)), per_step,
        batch=batch, head_counts=(heads,))
    return y[:, :length, :, :p] + d_skip.astype(jnp.float32) * x


def reference(x, delta, a_log, b, c, d_skip, *, keep=None, reset=None):
    """Step-by-step float32 recurrence ``selective_scan`` accelerates (Mamba's ``selective_scan_ref``), for tests:
    ``h_t = exp(delta_t A) h_{t-1} + delta_t B_t x_t`` and ``y_t = C_t . h_t + D x_t`` with ``A = -exp(a_log)``;
    ``keep`` False leaves the state untouched, ``reset`` True zeroes it before the step."""
    x, delta, b, c = (t.astype(jnp.float32) for t in (x, delta, b, c))
    batch, length, heads, p = x.shape
    a = -jnp.exp(a_log.astype(jnp.float32))
    keeps = jnp.ones((batch, length), bool) if keep is None else jnp.asarray(keep, bool)
    resets = jnp.zeros((batch, length), bool) if reset is None else jnp.asarray(reset, bool)

    def step(h, inputs):
        xt, dt, bt, ct, kt, rt = inputs
        h = jnp.where(rt[:, None, None, None], 0.0, h)
        updated = jnp.exp(dt[..., None] * a) * h + (dt * xt)[..., None] * bt[:, :, None, :]
        h = jnp.where(kt[:, None, None, None], updated, h)
        return h, jnp.einsum("bhpn,bhn->bhp", h, ct)

    steps = tuple(jnp.moveaxis(t, 1, 0) for t in (x, delta, b, c, keeps, resets))
    _, y = lax.scan(step, jnp.zeros((batch, heads, p, a.shape[-1]), jnp.float32), steps)
    return jnp.moveaxis(y, 0, 1) + d_skip.astype(jnp.float32) * x
