"""The chunked (gated) delta rule as a Triton Pallas kernel, forward and backward.

Per batch row and head, with the float32 state ``S [d_k, d_v]``, a write strength ``beta_t`` and a scalar decay
``exp(g_t)`` (``g_t <= 0``; no ``log_decay``: DeltaNet, Yang et al., NeurIPS 2024, "Parallelizing Linear
Transformers with the Delta Rule over Sequence Length"; with it: Gated DeltaNet, Yang, Kautz and Hatamizadeh,
ICLR 2025):

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,    o_t = S_t^T q_t.

``chunked_delta_rule`` equals ``effjax.attention.delta_rule.delta_rule(form="chunked")`` (the XLA core; this
package cannot import it, the tests compare the two). It computes the WY/UT chunk form (catalog
``linear_families.md`` Sec. 2.3) with the chunk-local inclusive cumulative log-decay b and
``Gamma_ij = exp(b_i - b_j)`` (j <= i, same run):

* in XLA, for all chunks at once (nothing here needs the state; fla splits its kernels the same way, Sec. 2.6):
  ``A = I + StrictLower(Diag(beta) K K^T o Gamma)``, ``U = A^-1 Diag(beta) V``, ``W = A^-1 Diag(beta) (K o e^b)``
  (one unit-lower-triangular solve in float32), and per token the state-read factor ``e^{b_i}``, the state-write
  factor ``e^{b_C - b_j}`` and the carry ``e^{b_C}`` with the four segment masks of Sec. 2.8 folded in (``ChunkTerms``);
* in the kernel, the sequential part: one program per (batch, head, block of value columns) walks the chunks in
  order with ``S [d_k, block_v]`` in registers:
  ``V_new = U - W S``, ``O = (Q o read) S + (Q K^T o Gamma) V_new``, ``S' = carry S + (K o write)^T V_new``.

The value columns of the state never mix (every update acts on the key side), so value blocks are exact.

Backward (``jax.custom_vjp`` around the kernel only): the forward also stores the state entering every chunk
(``[b, h, chunks * d_k, d_v]`` float32, as fla stores its h; no recomputation), and one kernel walks the chunks in
reverse carrying ``dS``, producing the gradients of q, k, W, U, the initial state, b (through Gamma) and the three
factors. The gradients of the XLA-side pieces (the solve, the factors, from k, v, beta and log_decay) come from JAX
autodiff of that XLA code. Every exponent is masked before ``exp`` and is <= 0, so strong decays give zeros, never
inf or NaN.

Padding: the caller zeroes padded tokens' q, k, v, beta and log_decay (``recurrent.zero_padded``, as the core does
with ``mask``), so there is no mask argument: such a token leaves the state unchanged and its output is 0.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from effjax.kernels import sharding
from effjax.kernels.backend import interpret_default
from effjax.kernels.linear_attention import next_power_of_2, pad_axis

NAME = "chunked_delta_rule"
DTYPES = (jnp.float32, jnp.bfloat16)  # float16 would round the state into its operand range (catalog Sec. 2.4)
MIN_CHUNK = 16  # Triton's smallest dot operand dim
MAX_CHUNK = 128  # a chunk's [C, C] scores live in registers
MAX_DIM = 256  # padded d_k and value block: the [d_k, block_v] float32 state lives in registers
DEFAULT_BLOCK_V = 64
HIGHEST = lax.Precision.HIGHEST
f32 = jnp.float32


# --- the XLA side: what does not need the state, shared with tpu_delta ------------------------------------------

class ChunkTerms(NamedTuple):
    """Head-major inputs of the sequential kernel, the length padded to whole chunks (``n``).

    ``q, k, w [b, h, n, d_k]`` and ``u [b, h, n, d_v]`` in the compute dtype; ``b`` (chunk-local inclusive cumsum of
    g), ``read``, ``write`` and ``carry`` (the carry factor on each chunk's last row, 0 elsewhere) ``[b, h, n]``
    float32; ``runs [b, n]`` int32; ``state [b, h, d_k, d_v]`` float32 (the initial state).
    """

    q: jax.Array
    k: jax.Array
    w: jax.Array
    u: jax.Array
    b: jax.Array
    read: jax.Array
    write: jax.Array
    carry: jax.Array
    runs: jax.Array
    state: jax.Array


def masked_exp(log_gap, allowed):
    """``exp(log_gap)`` where ``allowed``, else 0, masked before ``exp`` (no inf, no NaN gradient)."""
    return jnp.exp(jnp.where(allowed, log_gap, -jnp.inf))


def run_ids(segment_ids, batch: int, length: int):
    """int32 ``[b, len]``: the index of each token's run of equal ids (A-B-A is three runs), 0 without segments."""
    if segment_ids is None:
        return jnp.zeros((batch, length), jnp.int32)
    ids = jnp.asarray(segment_ids)
    starts = jnp.concatenate([jnp.zeros((batch, 1), bool), ids[:, 1:] != ids[:, :-1]], axis=1)
    return jnp.cumsum(starts.astype(jnp.int32), axis=1)


def chunk_terms(k, v, beta, log_decay, runs, chunk: int):
    """``(w, u, b, read, write, carry)`` head-major for ``k [b, n, h, d_k]``, ``v [b, n, h, d_v]``, ``beta`` and
    ``log_decay [b, n, h]`` (float32, n a multiple of ``chunk``) and ``runs [b, n]``; see ``ChunkTerms``.

    Segment masks (Sec. 2.8): A by [same run]; the state read and the rows of W by [run = run of the previous
    chunk's last token]; the state write by [run = run of this chunk's last token]; the carry by [this chunk's last
    run = the previous chunk's]. The initial state belongs to run 0.
    """
    batch, length, heads, d_v = v.shape
    count = length // chunk

    def split(x):  # [b, n, h, ...] -> [b, h, chunks, chunk, ...]
        return jnp.moveaxis(x.reshape(batch, count, chunk, *x.shape[2:]), 3, 1)

    k, v, beta, g = map(split, (k, v, beta, log_decay))
    r = runs.reshape(batch, 1, count, chunk)
    b = jnp.cumsum(g, axis=-1)
    previous = jnp.concatenate([jnp.zeros_like(r[:, :, :1, -1:]), r[:, :, :-1, -1:]], axis=2)
    last = r[..., -1:]
    position = jnp.arange(chunk)
    strict = (position[:, None] > position[None, :]) & (r[..., :, None] == r[..., None, :])
    gamma = masked_exp(b[..., :, None] - b[..., None, :], strict)
    a = jnp.eye(chunk) + beta[..., None] * jnp.einsum("...id,...jd->...ij", k, k, precision=HIGHEST) * gamma
    reads = r == previous
    read = masked_exp(b, reads)
    right = jnp.concatenate([beta[..., None] * v, (beta * read)[..., None] * k], axis=-1)
    solved = jax.scipy.linalg.solve_triangular(a, right, lower=True, unit_diagonal=True)
    u, w = solved[..., :d_v], jnp.where(reads[..., None], solved[..., d_v:], 0.0)
    write = masked_exp(b[..., -1:] - b, r == last)
    carry = jnp.where(position == chunk - 1, masked_exp(b[..., -1:], last == previous), 0.0)

    def merge(x):  # [b, h, chunks, chunk, ...] -> [b, h, n, ...]
        return x.reshape(batch, heads, length, *x.shape[4:])

    return tuple(map(merge, (w, u, b, read, write, carry)))


def prepare(q, k, v, beta, log_decay, segment_ids, initial_state, chunk: int) -> ChunkTerms:
    """The kernel's inputs: the length padded to whole chunks (zero tokens, the last run continued, so the pad
    neither cuts the carry nor adds to the state), the chunk terms in float32, q, k, W and U in the inputs'
    promoted dtype."""
    batch, length, heads, d_k = k.shape
    dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    pad = -length % chunk
    if log_decay is None:
        log_decay = jnp.zeros(beta.shape, f32)
    q, k, v, beta, log_decay = (pad_axis(x.astype(f32), 1, 0, pad) for x in (q, k, v, beta, log_decay))
    runs = jnp.pad(run_ids(segment_ids, batch, length), [(0, 0), (0, pad)], mode="edge")
    w, u, b, read, write, carry = chunk_terms(k, v, beta, log_decay, runs, chunk)
    if initial_state is None:
        initial_state = jnp.zeros((batch, heads, d_k, v.shape[-1]), f32)
    heads_major = lambda x: jnp.swapaxes(x, 1, 2).astype(dtype)
    return ChunkTerms(heads_major(q), heads_major(k), w.astype(dtype), u.astype(dtype), b, read, write, carry, runs,
                      initial_state.astype(f32))


def pad_dims(terms: ChunkTerms, d_k: int, d_v: int) -> ChunkTerms:
    """``terms`` with zero key / value channels up to ``d_k`` and ``d_v`` (exact: they never mix with the rest)."""
    keys = (pad_axis(x, 3, 0, d_k - x.shape[3]) for x in (terms.q, terms.k, terms.w))
    state = pad_axis(pad_axis(terms.state, 2, 0, d_k - terms.state.shape[2]), 3, 0, d_v - terms.state.shape[3])
    return terms._replace(**dict(zip("qkw", keys, strict=True)), u=pad_axis(terms.u, 3, 0, d_v - terms.u.shape[3]),
                          state=state)


def per_shard_core(core, terms: ChunkTerms, batch: int, heads: int):
    """``core(*terms)`` -> ``(out [b, h, n, d_v], state [b, h, d_k, d_v])`` per shard of the ambient mesh."""
    both = (sharding.BATCH, sharding.HEADS)
    dims = (both,) * 8 + ((sharding.BATCH,), both)
    return sharding.per_shard(lambda _, *arrays: core(*arrays), tuple(terms), dims, (both, both), batch=batch,
                              head_counts=(heads,))


# --- checks, shared with tpu_delta --------------------------------------------------------------------------------

def check_args(kernel: str, q, k, v, beta, log_decay, segment_ids, initial_state, dtypes=DTYPES) -> None:
    """One-line ValueErrors naming ``kernel`` for shapes and dtypes the kernels cannot take."""
    for label, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4 or x.dtype not in dtypes:
            raise ValueError(f"{kernel}: {label} must be a {' or '.join(jnp.dtype(d).name for d in dtypes)} array "
                             f"[batch, length, heads, dim], got {x.dtype} {tuple(x.shape)}.")
    if q.shape != k.shape or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"{kernel}: q and k must share [batch, length, heads, d_k] and v its first three axes, got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}.")
    for label, x in (("beta", beta), ("log_decay", log_decay)):
        if x is not None and (tuple(x.shape) != tuple(k.shape[:3]) or not jnp.issubdtype(x.dtype, jnp.floating)):
            raise ValueError(f"{kernel}: {label} must be a float array [batch, length, heads] = {tuple(k.shape[:3])}, "
                             f"got {x.dtype} {tuple(x.shape)}.")
    if segment_ids is not None and tuple(segment_ids.shape) != tuple(k.shape[:2]):
        raise ValueError(f"{kernel}: segment_ids must have shape [batch, length] = {tuple(k.shape[:2])}, got "
                         f"{tuple(segment_ids.shape)}.")
    state = (k.shape[0], k.shape[2], k.shape[3], v.shape[3])
    if initial_state is not None and (tuple(initial_state.shape) != state or initial_state.dtype != f32):
        raise ValueError(f"{kernel}: initial_state must be float32 [batch, heads, d_k, d_v] = {state}, got "
                         f"{initial_state.dtype} {tuple(initial_state.shape)}.")


def check_chunk(kernel: str, chunk_size, largest: int) -> None:
    ok = isinstance(chunk_size, int) and not isinstance(chunk_size, bool) and MIN_CHUNK <= chunk_size <= largest
    if not ok or chunk_size & (chunk_size - 1):
        raise ValueError(f"{kernel}: chunk_size must be a power of two between {MIN_CHUNK} and {largest}, got "
                         f"{chunk_size!r}.")


def kernel_chunk(chunk_size: int, length: int) -> int:
    """The chunk used: ``chunk_size``, or one chunk of the length's next power of two (>= 16) when shorter."""
    return min(chunk_size, max(MIN_CHUNK, next_power_of_2(length)))


def call_reason(check, call: dict) -> str | None:
    """``check(**call)``'s one-line ValueError as a reason (without the kernel's name), or None; never raises."""
    try:
        check(**call)
    except ValueError as error:
        return str(error).split("\n")[0].split(": ", 1)[-1].rstrip(".")
    except (TypeError, KeyError, AttributeError) as error:
        return f"unreadable call ({type(error).__name__}: {error})"
    return None


# --- the Triton kernels -------------------------------------------------------------------------------------------

def _dot(a, b, dtype, *, trans_a=False, trans_b=False):
    """float32-accumulated product of ``a`` and ``b`` cast to ``dtype``; full float32 (no TF32) for float32."""
    return plgpu.dot(a.astype(dtype), b.astype(dtype), trans_a=trans_a, trans_b=trans_b,
                     allow_tf32=False if dtype == f32 else None)


def _gamma(b, runs):
    """``[C, C]``: ``exp(b_i - b_j)`` for j <= i in the same run, else 0."""
    chunk = b.shape[0]
    rows = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
    cols = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
    return masked_exp(b[:, None] - b[None, :], (rows >= cols) & (runs[:, None] == runs[None, :]))


def _last(x):
    """The last entry of a chunk's ``[C]`` vector, as a scalar (a masked sum: no dynamic register indexing)."""
    return jnp.sum(jnp.where(jnp.arange(x.shape[0]) == x.shape[0] - 1, x, 0.0))


def _fwd_kernel(q_ref, k_ref, w_ref, u_ref, b_ref, read_ref, write_ref, carry_ref, run_ref, s0_ref, o_ref, s_ref,
                *states_ref, chunk, num_chunks):
    dtype, d_k = q_ref.dtype, q_ref.shape[-1]

    def body(c, state):
        rows = pl.ds(c * chunk, chunk)
        if states_ref:  # the state entering chunk c, for the backward
            states_ref[0][pl.ds(c * d_k, d_k), :] = state
        q, k = q_ref[rows, :], k_ref[rows, :]
        v_new = u_ref[rows, :].astype(f32) - _dot(w_ref[rows, :], state, dtype)
        scores = _dot(q, k, dtype, trans_b=True) * _gamma(b_ref[rows], run_ref[rows])
        o_ref[rows, :] = read_ref[rows][:, None] * _dot(q, state, dtype) + _dot(scores, v_new, dtype)
        k_write = k.astype(f32) * write_ref[rows][:, None]
        return _last(carry_ref[rows]) * state + _dot(k_write, v_new, dtype, trans_a=True)

    s_ref[...] = lax.fori_loop(0, num_chunks, body, s0_ref[...])


def _bwd_kernel(q_ref, k_ref, w_ref, u_ref, b_ref, read_ref, write_ref, carry_ref, run_ref, states_ref, do_ref,
                ds_ref, dq_ref, dk_ref, dw_ref, du_ref, db_ref, dread_ref, dwrite_ref, dcarry_ref, ds0_ref, *, chunk,
                num_chunks):
    """Chunks in reverse, ``dstate`` the cotangent of the state leaving chunk c; per-value-block partial sums of
    the gradients of q, k, W, b and the factors (added in XLA), whole ones of U and the initial state."""
    dtype, d_k = q_ref.dtype, q_ref.shape[-1]
    last_row = jnp.arange(chunk) == chunk - 1

    def body(i, dstate):
        c = num_chunks - 1 - i
        rows = pl.ds(c * chunk, chunk)
        state = states_ref[pl.ds(c * d_k, d_k), :]
        q, k, w, do = q_ref[rows, :], k_ref[rows, :], w_ref[rows, :], do_ref[rows, :]
        read, write = read_ref[rows], write_ref[rows]
        gamma = _gamma(b_ref[rows], run_ref[rows])
        scores = _dot(q, k, dtype, trans_b=True) * gamma
        v_new = u_ref[rows, :].astype(f32) - _dot(w, state, dtype)
        dv_new = _dot(scores, do, dtype, trans_a=True) + _dot(k.astype(f32) * write[:, None], dstate, dtype)
        dp = _dot(do, v_new, dtype, trans_b=True)  # d(scores)
        pair = dp * scores  # d Gamma o Gamma: the log-gaps' gradient
        dscores = dp * gamma
        dq_ref[rows, :] = _dot(dscores, k, dtype) + read[:, None] * _dot(do, state, dtype, trans_b=True)
        dk_ref[rows, :] = _dot(dscores, q, dtype, trans_a=True) + write[:, None] * _dot(v_new, dstate, dtype,
                                                                                          trans_b=True)
        dw_ref[rows, :] = -_dot(dv_new, state, dtype, trans_b=True)
        du_ref[rows, :] = dv_new
        db_ref[rows] = jnp.sum(pair, axis=1) - jnp.sum(pair, axis=0)
        dread_ref[rows] = jnp.sum(do * _dot(q, state, dtype), axis=1)
        dwrite_ref[rows] = jnp.sum(_dot(k, dstate, dtype) * v_new, axis=1)
        dcarry_ref[rows] = jnp.where(last_row, jnp.sum(jnp.sum(state * dstate, axis=1)), 0.0)  # one axis per reduce
        q_read = q.astype(f32) * read[:, None]
        return (_last(carry_ref[rows]) * dstate + _dot(q_read, do, dtype, trans_a=True)
                - _dot(w, dv_new, dtype, trans_a=True))

    ds0_ref[...] = lax.fori_loop(0, num_chunks, body, ds_ref[...])


def _specs(length, d_k, block_v):
    """BlockSpecs over grid (batch, heads, value block) for q, k, w, u, b, read, write, carry, runs."""
    keys = pl.BlockSpec((None, None, length, d_k), lambda b, h, j: (b, h, 0, 0))
    values = pl.BlockSpec((None, None, length, block_v), lambda b, h, j: (b, h, 0, j))
    row = pl.BlockSpec((None, None, length), lambda b, h, j: (b, h, 0))
    return [keys] * 3 + [values] + [row] * 4 + [pl.BlockSpec((None, length), lambda b, h, j: (b, 0))]


def _state_spec(rows, block_v):
    return pl.BlockSpec((None, None, rows, block_v), lambda b, h, j: (b, h, 0, j))


def _params(chunk, d_k, block_v):
    return plgpu.CompilerParams(num_warps=4 if max(chunk, d_k, block_v) <= 64 else 8, num_stages=1)


def _forward(terms, chunk, block_v, interpret, store):
    q, u, state = terms[0], terms[3], terms[-1]
    batch, heads, length, d_k = q.shape
    d_v = u.shape[-1]
    count = length // chunk
    out_shape = [jax.ShapeDtypeStruct((batch, heads, length, d_v), f32), jax.ShapeDtypeStruct(state.shape, f32)]
    out_specs = [pl.BlockSpec((None, None, length, block_v), lambda b, h, j: (b, h, 0, j)), _state_spec(d_k, block_v)]
    if store:
        out_shape.append(jax.ShapeDtypeStruct((batch, heads, count * d_k, d_v), f32))
        out_specs.append(_state_spec(count * d_k, block_v))
    return pl.pallas_call(
        functools.partial(_fwd_kernel, chunk=chunk, num_chunks=count), grid=(batch, heads, d_v // block_v),
        in_specs=_specs(length, d_k, block_v) + [_state_spec(d_k, block_v)], out_specs=out_specs,
        out_shape=out_shape, compiler_params=_params(chunk, d_k, block_v), interpret=interpret,
        name="delta_rule_fwd",
    )(*terms)


@functools.partial(jax.custom_vjp, nondiff_argnums=(10, 11, 12))
def _core(q, k, w, u, b, read, write, carry, runs, state, chunk, block_v, interpret):
    """``(out [b, h, n, d_v], final state [b, h, d_k, d_v])``, float32, of padded head-major ``ChunkTerms``."""
    return tuple(_forward((q, k, w, u, b, read, write, carry, runs, state), chunk, block_v, interpret, False))


def _core_fwd(*args):
    *terms, chunk, block_v, interpret = args
    out, final, states = _forward(terms, chunk, block_v, interpret, True)
    return (out, final), (*terms[:-1], states)


def _core_bwd(chunk, block_v, interpret, residuals, cotangents):
    *terms, states = residuals
    q, u = terms[0], terms[3]
    batch, heads, length, d_k = q.shape
    d_v = u.shape[-1]
    blocks = d_v // block_v
    dout, dfinal = (x.astype(f32) for x in cotangents)
    keys = pl.BlockSpec((None, None, None, length, d_k), lambda b, h, j: (j, b, h, 0, 0))
    row = pl.BlockSpec((None, None, None, length), lambda b, h, j: (j, b, h, 0))
    partial_keys = jax.ShapeDtypeStruct((blocks, batch, heads, length, d_k), f32)
    partial_rows = jax.ShapeDtypeStruct((blocks, batch, heads, length), f32)
    values = pl.BlockSpec((None, None, length, block_v), lambda b, h, j: (b, h, 0, j))
    dq, dk, dw, du, db, dread, dwrite, dcarry, dstate = pl.pallas_call(
        functools.partial(_bwd_kernel, chunk=chunk, num_chunks=length // chunk), grid=(batch, heads, blocks),
        in_specs=_specs(length, d_k, block_v) + [_state_spec(states.shape[2], block_v), values,
                                                 _state_spec(d_k, block_v)],
        out_specs=[keys] * 3 + [values] + [row] * 4 + [_state_spec(d_k, block_v)],
        out_shape=[partial_keys] * 3 + [jax.ShapeDtypeStruct(u.shape, f32)] + [partial_rows] * 4
        + [jax.ShapeDtypeStruct(dfinal.shape, f32)],
        compiler_params=_params(chunk, d_k, block_v), interpret=interpret, name="delta_rule_bwd",
    )(*terms, states, dout, dfinal)
    grads = [x.sum(0) for x in (dq, dk, dw)] + [du] + [x.sum(0) for x in (db, dread, dwrite, dcarry)]
    grads = [g.astype(t.dtype) for g, t in zip(grads, terms[:8], strict=True)]
    return (*grads, None, dstate)


_core.defvjp(_core_fwd, _core_bwd)


# --- the entry point ----------------------------------------------------------------------------------------------

def check(q, k, v, beta, log_decay=None, *, chunk_size=64, segment_ids=None, initial_state=None, return_state=False,
          interpret=None, block_v=None):
    """The Triton kernel's input checks (one-line ValueErrors naming ``NAME``); its signature is the entry point's."""
    check_args(NAME, q, k, v, beta, log_decay, segment_ids, initial_state)
    check_chunk(NAME, chunk_size, MAX_CHUNK)
    if block_v is not None and (not isinstance(block_v, int) or block_v < MIN_CHUNK or block_v & (block_v - 1)):
        raise ValueError(f"{NAME}: block_v must be a power of two >= {MIN_CHUNK}, got {block_v!r}.")
    for label, size in (("d_k", k.shape[-1]), ("value block", min(block_v or DEFAULT_BLOCK_V, v.shape[-1]))):
        if next_power_of_2(size) > MAX_DIM:
            raise ValueError(f"{NAME}: {label} {size} pads to {next_power_of_2(size)} > {MAX_DIM}, more state than "
                             "one program keeps in registers.")


def chunked_delta_rule(q, k, v, beta, log_decay=None, *, chunk_size=64, segment_ids=None, initial_state=None,
                       return_state=False, interpret=None, block_v=None):
    """The chunked (gated) delta rule on Triton: ``out [b, len, h, d_v]`` float32 (and with ``return_state`` the
    final state ``[b, h, d_k, d_v]`` float32), equal to ``effjax.attention.delta_rule.delta_rule(form="chunked")``.

    ``q, k [b, len, h, d_k]`` (q already scaled), ``v [b, len, h, d_v]``, float32 or bfloat16 (bfloat16 operands
    multiply in bfloat16 with float32 accumulation; the state stays float32); ``beta [b, len, h]``; ``log_decay
    [b, len, h]`` (g <= 0) or None (DeltaNet); ``segment_ids [b, len]``: packed sequences, the state restarts at
    every run of equal ids; ``initial_state`` float32 ``[b, h, d_k, d_v]`` (zeros if None), belonging to the
    first run. Padded tokens must come with q, k, v, beta and log_decay zeroed (there is no mask argument).
    ``chunk_size``: a power of two in [16, 128] (shorter inputs: one chunk of the length's next power of two).
    ``block_v``: value columns per program (default 64), a power of two. Differentiable in every float input.
    ``interpret`` None: interpret mode on a CPU.
    """
    check(q, k, v, beta, log_decay, chunk_size=chunk_size, segment_ids=segment_ids, initial_state=initial_state,
          block_v=block_v)
    batch, length, heads, d_k = k.shape
    d_v = v.shape[-1]
    chunk = kernel_chunk(chunk_size, length)
    terms = prepare(q, k, v, beta, log_decay, segment_ids, initial_state, chunk)
    k_pad, v_pad = max(MIN_CHUNK, next_power_of_2(d_k)), max(MIN_CHUNK, next_power_of_2(d_v))
    terms = pad_dims(terms, k_pad, v_pad)
    static = (chunk, min(block_v or DEFAULT_BLOCK_V, v_pad), interpret_default(interpret))
    out, state = per_shard_core(lambda *t: _core(*t, *static), terms, batch, heads)
    out = jnp.swapaxes(out[:, :, :length, :d_v], 1, 2)
    return (out, state[:, :, :d_k, :d_v]) if return_state else out

