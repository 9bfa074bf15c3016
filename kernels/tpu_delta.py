"""The chunked (gated) delta rule as a Mosaic TPU Pallas kernel, forward and backward: the TPU twin of
``kernels.delta_rule.chunked_delta_rule`` (same arguments and results; DeltaNet, Yang et al., NeurIPS 2024, the
WY/UT chunk form; Gated DeltaNet, Yang, Kautz and Hatamizadeh, ICLR 2025).

The split is ``delta_rule``'s: ``delta_rule.prepare`` computes in XLA, for all chunks at once, the pseudo-values U,
the rows W (one triangular solve per chunk), the chunk-local cumulative log-decay b and the per-token read, write
and carry factors with the segment masks folded in; the kernel runs the sequential part
``V_new = U - W S``, ``O = (Q o read) S + (Q K^T o Gamma) V_new``, ``S' = carry S + (K o write)^T V_new``.

TPU design:
- Head-major ``[b, h, n, d]``; d_k and d_v padded to multiples of 128 lanes, the length to whole chunks.
- Grid (batch, heads, value blocks, chunks), the chunk axis "arbitrary": the ``[d_k, block_v]`` float32 state lives
  in a VMEM scratch, set from the initial state at the first chunk; the final state is written at the last.
  A value block is the whole padded d_v up to 512 lanes (``tpu_linear.value_block``).
- Blocks keep Mosaic's rule (last two dims multiples of (8, 128) or whole): q, k, W ``[C, d_k]``, U ``[C, block_v]``
  with C a power of two >= 16; per-token vectors as ``[C, 1]`` columns of ``[b, h, n, 1]`` arrays; b and the run ids
  also as ``[1, C]`` rows of ``[b, h, chunks, 1, C]`` arrays (whole last two dims), so ``Gamma`` needs no in-kernel
  transpose and the chunk need not be a multiple of 128.
- Backward: the forward stores the state entering each chunk (``[b, h, chunks * d_k, d_v]`` float32); one kernel walks
  the chunks in reverse (index maps ``chunks - 1 - c``) carrying ``dS`` in VMEM and writes the gradients of q, k, W, U,
  b and the factors (partial sums per value block, added in XLA) and of the initial state. The column sums of the
  ``[C, C]`` log-gap gradient come out as a column through a transposed-LHS matmul with ones.
- float32 dots use ``Precision.HIGHEST``; bfloat16 operands multiply in bfloat16 on the MXU, accumulating in float32.

Entry point ``chunked_delta_rule``: op "delta" of ``kernels.dispatch``'s ``mosaic_tpu`` backend.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from effjax.kernels import delta_rule as kd
from effjax.kernels.tpu_linear import LANES, interpret_params, platform_reason, round_up, value_block

KERNEL = "tpu_chunked_delta_rule"
MAX_CHUNK = 256
MAX_KEY_DIM = 512  # padded d_k: the [d_k, block_v] state, its stored copy and the [C, d_k] blocks stay in VMEM
CHUNK_AXIS = ("parallel", "parallel", "parallel", "arbitrary")
f32 = jnp.float32
NT = ((1,), (1,))  # a @ b.T
NN = ((1,), (0,))  # a @ b
TN = ((0,), (0,))  # a.T @ b


def _mm(a, b, contract, dtype):
    """float32-accumulated product of ``a`` and ``b`` cast to ``dtype``; float32 at full precision (HIGHEST)."""
    precision = lax.Precision.HIGHEST if dtype == f32 else lax.Precision.DEFAULT
    return lax.dot_general(a.astype(dtype), b.astype(dtype), (contract, ((), ())), precision=precision,
                           preferred_element_type=f32)


def _gamma(b_col, b_row, r_col, r_row):
    """``[C, C]``: ``exp(b_i - b_j)`` for j <= i in the same run, else 0 (exponent masked before exp)."""
    chunk = b_col.shape[0]
    rows = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
    cols = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
    return kd.masked_exp(b_col - b_row, (rows >= cols) & (r_col == r_row))


def _last(col):
    """``[1, 1]``: the last entry of a ``[C, 1]`` column."""
    rows = lax.broadcasted_iota(jnp.int32, col.shape, 0)
    return jnp.sum(jnp.where(rows == col.shape[0] - 1, col, 0.0), axis=0, keepdims=True)


def _fwd_kernel(q_ref, k_ref, w_ref, u_ref, bc_ref, br_ref, rc_ref, rr_ref, read_ref, write_ref, carry_ref, s0_ref,
                o_ref, final_ref, *rest):
    *states_ref, s_ref = rest
    dtype = q_ref.dtype
    step = pl.program_id(3)

    @pl.when(step == 0)
    def _():
        s_ref[...] = s0_ref[...]

    state = s_ref[...]
    if states_ref:  # the state entering this chunk, for the backward
        states_ref[0][...] = state
    q, k = q_ref[...], k_ref[...]
    v_new = u_ref[...].astype(f32) - _mm(w_ref[...], state, NN, dtype)
    scores = _mm(q, k, NT, dtype) * _gamma(bc_ref[...], br_ref[...], rc_ref[...], rr_ref[...])
    o_ref[...] = read_ref[...] * _mm(q, state, NN, dtype) + _mm(scores, v_new, NN, dtype)
    state = _last(carry_ref[...]) * state + _mm(k.astype(f32) * write_ref[...], v_new, TN, dtype)
    s_ref[...] = state

    @pl.when(step == pl.num_programs(3) - 1)
    def _():
        final_ref[...] = state


def _bwd_kernel(q_ref, k_ref, w_ref, u_ref, bc_ref, br_ref, rc_ref, rr_ref, read_ref, write_ref, carry_ref,
                states_ref, do_ref, dfinal_ref, dq_ref, dk_ref, dw_ref, du_ref, db_ref, dread_ref, dwrite_ref,
                dcarry_ref, ds0_ref, d_ref):
    """One chunk, the chunks in reverse: ``d_ref`` holds the cotangent of the state leaving this chunk."""
    dtype = q_ref.dtype
    step = pl.program_id(3)

    @pl.when(step == 0)
    def _():
        d_ref[...] = dfinal_ref[...]

    dstate, state = d_ref[...], states_ref[...]
    q, k, w, do = q_ref[...], k_ref[...], w_ref[...], do_ref[...]
    read, write = read_ref[...], write_ref[...]
    gamma = _gamma(bc_ref[...], br_ref[...], rc_ref[...], rr_ref[...])
    scores = _mm(q, k, NT, dtype) * gamma
    v_new = u_ref[...].astype(f32) - _mm(w, state, NN, dtype)
    dv_new = _mm(scores, do, TN, dtype) + _mm(k.astype(f32) * write, dstate, NN, dtype)
    dp = _mm(do, v_new, NT, dtype)  # d(scores)
    pair = dp * scores  # d Gamma o Gamma: the log-gaps' gradient
    dscores = dp * gamma
    dq_ref[...] = _mm(dscores, k, NN, dtype) + read * _mm(do, state, NT, dtype)
    dk_ref[...] = _mm(dscores, q, TN, dtype) + write * _mm(v_new, dstate, NT, dtype)
    dw_ref[...] = -_mm(dv_new, state, NT, dtype)
    du_ref[...] = dv_new
    column_sums = _mm(pair, jnp.ones((pair.shape[0], 1), f32), TN, f32)
    db_ref[...] = jnp.sum(pair, axis=1, keepdims=True) - column_sums
    dread_ref[...] = jnp.sum(do * _mm(q, state, NN, dtype), axis=1, keepdims=True)
    dwrite_ref[...] = jnp.sum(_mm(k, dstate, NN, dtype) * v_new, axis=1, keepdims=True)
    total = jnp.sum(jnp.sum(state * dstate, axis=1, keepdims=True), axis=0, keepdims=True)
    rows = lax.broadcasted_iota(jnp.int32, read.shape, 0)
    dcarry_ref[...] = jnp.where(rows == read.shape[0] - 1, total, 0.0)
    dstate = (_last(carry_ref[...]) * dstate + _mm(q.astype(f32) * read, do, TN, dtype)
              - _mm(w, dv_new, TN, dtype))
    d_ref[...] = dstate

    @pl.when(step == pl.num_programs(3) - 1)
    def _():
        ds0_ref[...] = dstate


def _inputs(terms, chunk):
    """The kernel's operands: q, k, w, u, b (column and row), runs (column and row), read, write, carry (columns)."""
    batch, heads, length = terms.b.shape
    column = lambda x: x[..., None]
    row = lambda x: x.reshape(batch, -1, length // chunk, 1, chunk)
    runs = jnp.broadcast_to(terms.runs[:, None], (batch, heads, length))
    return (terms.q, terms.k, terms.w, terms.u, column(terms.b), row(terms.b), column(runs), row(runs),
            column(terms.read), column(terms.write), column(terms.carry))


def _specs(chunk, d_k, block_v, at):
    """BlockSpecs over grid (batch, heads, value block, step) for ``_inputs``; ``at(step)`` is the chunk."""
    keys = pl.BlockSpec((None, None, chunk, d_k), lambda b, h, j, c: (b, h, at(c), 0))
    values = pl.BlockSpec((None, None, chunk, block_v), lambda b, h, j, c: (b, h, at(c), j))
    column = pl.BlockSpec((None, None, chunk, 1), lambda b, h, j, c: (b, h, at(c), 0))
    row = pl.BlockSpec((None, None, None, 1, chunk), lambda b, h, j, c: (b, h, at(c), 0, 0))
    return [keys] * 3 + [values, column, row, column, row] + [column] * 3


def _state_spec(d_k, block_v, at=lambda c: 0):
    return pl.BlockSpec((None, None, d_k, block_v), lambda b, h, j, c: (b, h, at(c), j))


def _forward(terms, chunk, interpret, store):
    batch, heads, length, d_k = terms.q.shape
    d_v = terms.u.shape[-1]
    block_v = value_block(d_v)
    count = length // chunk
    ahead = lambda c: c
    out_shape = [jax.ShapeDtypeStruct((batch, heads, length, d_v), f32), jax.ShapeDtypeStruct(terms.state.shape, f32)]
    out_specs = [pl.BlockSpec((None, None, chunk, block_v), lambda b, h, j, c: (b, h, c, j)),
                 _state_spec(d_k, block_v)]
    if store:
        out_shape.append(jax.ShapeDtypeStruct((batch, heads, count * d_k, d_v), f32))
        out_specs.append(_state_spec(d_k, block_v, ahead))
    return pl.pallas_call(
        _fwd_kernel, grid=(batch, heads, d_v // block_v, count),
        in_specs=_specs(chunk, d_k, block_v, ahead) + [_state_spec(d_k, block_v)], out_specs=out_specs,
        out_shape=out_shape, scratch_shapes=[pltpu.VMEM((d_k, block_v), f32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=CHUNK_AXIS),
        interpret=interpret_params(interpret), name="tpu_delta_rule_fwd",
    )(*_inputs(terms, chunk), terms.state)


@functools.partial(jax.custom_vjp, nondiff_argnums=(10, 11))
def _core(q, k, w, u, b, read, write, carry, runs, state, chunk, interpret):
    """``(out [b, h, n, d_v], final state [b, h, d_k, d_v])``, float32, of padded head-major ``ChunkTerms``."""
    terms = kd.ChunkTerms(q, k, w, u, b, read, write, carry, runs, state)
    return tuple(_forward(terms, chunk, interpret, False))


def _core_fwd(*args):
    *arrays, chunk, interpret = args
    terms = kd.ChunkTerms(*arrays)
    out, final, states = _forward(terms, chunk, interpret, True)
    return (out, final), (terms, states)


def _core_bwd(chunk, interpret, residuals, cotangents):
    terms, states = residuals
    batch, heads, length, d_k = terms.q.shape
    d_v = terms.u.shape[-1]
    block_v = value_block(d_v)
    blocks, count = d_v // block_v, length // chunk
    back = lambda c: count - 1 - c
    dout, dfinal = (x.astype(f32) for x in cotangents)
    keys = pl.BlockSpec((None, None, None, chunk, d_k), lambda b, h, j, c: (j, b, h, back(c), 0))
    column = pl.BlockSpec((None, None, None, chunk, 1), lambda b, h, j, c: (j, b, h, back(c), 0))
    values = pl.BlockSpec((None, None, chunk, block_v), lambda b, h, j, c: (b, h, back(c), j))
    partial_keys = jax.ShapeDtypeStruct((blocks, batch, heads, length, d_k), f32)
    partial_column = jax.ShapeDtypeStruct((blocks, batch, heads, length, 1), f32)
    dq, dk, dw, du, db, dread, dwrite, dcarry, dstate = pl.pallas_call(
        _bwd_kernel, grid=(batch, heads, blocks, count),
        in_specs=_specs(chunk, d_k, block_v, back) + [_state_spec(d_k, block_v, back), values,
                                                      _state_spec(d_k, block_v)],
        out_specs=[keys] * 3 + [values] + [column] * 4 + [_state_spec(d_k, block_v)],
        out_shape=[partial_keys] * 3 + [jax.ShapeDtypeStruct(terms.u.shape, f32)] + [partial_column] * 4
        + [jax.ShapeDtypeStruct(dfinal.shape, f32)],
        scratch_shapes=[pltpu.VMEM((d_k, block_v), f32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=CHUNK_AXIS),
        interpret=interpret_params(interpret), name="tpu_delta_rule_bwd",
    )(*_inputs(terms, chunk), states, dout, dfinal)
    grads = [x.sum(0) for x in (dq, dk, dw)] + [du] + [x.sum(0)[..., 0] for x in (db, dread, dwrite, dcarry)]
    grads = [g.astype(t.dtype) for g, t in zip(grads, terms[:8], strict=True)]
    return (*grads, None, dstate)


_core.defvjp(_core_fwd, _core_bwd)


def check(q, k, v, beta, log_decay=None, *, chunk_size=64, segment_ids=None, initial_state=None, return_state=False,
          interpret=None, block_v=None):
    """The Mosaic kernel's input checks (one-line ValueErrors naming ``KERNEL``); its signature is the entry point's."""
    kd.check_args(KERNEL, q, k, v, beta, log_decay, segment_ids, initial_state)
    kd.check_chunk(KERNEL, chunk_size, MAX_CHUNK)
    if round_up(k.shape[-1], LANES) > MAX_KEY_DIM:
        raise ValueError(f"{KERNEL}: d_k {k.shape[-1]} pads to more than {MAX_KEY_DIM} lanes (VMEM).")


def chunked_delta_rule(q, k, v, beta, log_decay=None, *, chunk_size=64, segment_ids=None, initial_state=None,
                       return_state=False, interpret=None, block_v=None):
    """Mosaic TPU twin of ``kernels.delta_rule.chunked_delta_rule`` (same arguments and results; ``block_v`` is
    accepted and ignored: the value block is the padded d_v up to 512 lanes). ``chunk_size``: a power of two in
    [16, 256]. ``interpret`` None: TPU interpret mode on a CPU; an ``InterpretParams`` is passed through."""
    del block_v
    check(q, k, v, beta, log_decay, chunk_size=chunk_size, segment_ids=segment_ids, initial_state=initial_state)
    batch, length, heads, d_k = k.shape
    d_v = v.shape[-1]
    chunk = kd.kernel_chunk(chunk_size, length)
    terms = kd.prepare(q, k, v, beta, log_decay, segment_ids, initial_state, chunk)
    terms = kd.pad_dims(terms, round_up(d_k, LANES), round_up(d_v, LANES))
    interpret = interpret_params(interpret)
    out, state = kd.per_shard_core(lambda *t: _core(*t, chunk, interpret), terms, batch, heads)
    out = jnp.swapaxes(out[:, :, :length, :d_v], 1, 2)
    return (out, state[:, :, :d_k, :d_v]) if return_state else out


# --- op "delta" of the mosaic_tpu backend (kernels.dispatch) -----------------------------------------------------

NAME = "mosaic_tpu"
PLATFORMS = ("tpu",)  # compiled there; on a CPU the kernels run in TPU interpret mode
OPS = {"delta": chunked_delta_rule}


def supports(op: str, call: dict) -> str | None:
    """None when ``chunked_delta_rule(**call)`` runs here, else a one-line reason; never raises."""
    if op not in OPS:
        return f"op {op!r} (this module implements {', '.join(OPS)})"
    return kd.call_reason(check, call) or platform_reason(call)
