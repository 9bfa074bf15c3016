"""Chunked linear attention in Pallas (Katharopoulos et al. 2020; chunkwise form of GLA, Yang et al. 2024, Sec. 3).

``chunked_linear_attention(phi_q, phi_k, v)`` takes feature-mapped queries and keys (elu+1, ReLU/SLAB,
cosFormer's reweighting, Performer features all fit) and computes, per head,

    num_i = sum_{j visible to i} w_ij (phi_q_i . phi_k_j) v_j,   den_i = sum_{j visible to i} w_ij phi_q_i . phi_k_j,
    out_i = num_i / den_i, den_i + 2 eps where |den_i| <= eps   (``normalize=True``; ``numerics.guarded_divide``)
    out_i = num_i                   (``normalize=False``),

where "visible" is every real key (bidirectional: ``phi_k^T v`` first, then ``phi_q`` times it) or the real
keys j <= i (causal: a masked quadratic product inside each chunk of ``chunk_size`` positions plus the state
``S = sum phi_k^T v`` carried from chunk to chunk), and ``w_ij = prod_{t=j+1..i} decay_t`` (1 without decay).
``decay`` (causal only, values in (0, 1]) is one factor per head ``[heads]`` (RetNet), per step
``[batch, kv_len, heads]`` (gated linear attention with a scalar gate per head) or per step and feature channel
``[batch, kv_len, heads, m]`` (GLA, HGRN2: ``S_t = Diag(decay_t) S_{t-1} + phi_k_t v_t^T``), where the weight
moves inside the feature sum: ``sum_d phi_q_id phi_k_jd w_ijd``.

Kernels: one program per (batch, head, block of value columns) walks the chunks in order with the state in
registers; the backward kernel walks them forward for ``d phi_q`` and backward for ``d phi_k, d v``. A
per-channel decay walks each chunk in 16-row sub-blocks (``SUB``; secondary chunking, Yang et al. 2024, Sec.
4.2): pairs across sub-blocks as matmuls through a reference row at the sub-block's edge, so that every exponent
is <= 0, pairs inside one elementwise in float32. The decay's gradient uses the identity ``dG_t = phi_q_t .
dphi_q_t - phi_k_t . dphi_k_t`` for the cumulative log-decay G (elementwise, per channel, for a per-channel
decay), so the kernels themselves never differentiate the decay.
Padding (length to the chunk, feature and value dims to powers of two >= 16), the key mask, causal end
alignment (query i sees keys j <= i + kv_len - q_len) and the final division are plain JAX around the
kernels, differentiated by JAX.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from effjax.kernels import sharding
from effjax.kernels.backend import interpret_default
from effjax.kernels.numerics import guarded_divide

NAME = "chunked_linear_attention"
DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
MAX_DIM = 256  # largest padded feature / value-block dim: the m x block_v float32 state lives in registers
MIN_DIM = 16  # Triton's smallest dot operand dim
FLOOR = float(np.finfo(np.float32).tiny)  # the smallest decay: 0 would give log 0 = -inf and inf - inf in the weights


def next_power_of_2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def pad_axis(x, axis: int, before: int, after: int, value=0.0):
    """``x`` padded along ``axis`` with ``value``; a no-op when nothing is added."""
    if before == 0 and after == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (before, after)
    return jnp.pad(x, widths, constant_values=value)


def check_dtype(kernel: str, label: str, x) -> None:
    if x.dtype not in DTYPES:
        raise ValueError(f"{kernel}: {label} must be float32, bfloat16 or float16, got {x.dtype}.")


def _dot(a, b, *, trans_a=False, trans_b=False):
    """float32-accumulated 2-D product; full float32 precision (no TF32) when an operand is float32."""
    exact = a.dtype == jnp.float32 or b.dtype == jnp.float32
    return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b, allow_tf32=False if exact else None)


def _chunk_weights(g, chunk):
    """Intra-chunk pair weights ``exp(g_i - g_j)`` (0 above the diagonal), query and key factors, total.

    ``g`` is the chunk-local cumulative log-decay [chunk] (None: no decay).
    """
    rows = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
    cols = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
    lower = rows >= cols
    if g is None:
        return lower.astype(jnp.float32), None, None, None
    last = jnp.sum(jnp.where(jnp.arange(chunk) == chunk - 1, g, 0.0))  # g of the chunk's last step
    w = jnp.exp(jnp.where(lower, g[:, None] - g[None, :], -jnp.inf))
    return w, jnp.exp(g), jnp.exp(last - g), jnp.exp(last)


def _scaled(x, factor):
    return x if factor is None else x * factor[:, None]


# --- per-channel decays: shared with tpu_linear ----------------------------------------------------------------
# With a decay per feature channel the pair weight exp(g_id - g_jd) sits inside the sum over d, so a chunk's
# scores are no single matmul. Each chunk is walked in sub-blocks of SUB rows: pairs across sub-blocks are
# matmuls through a reference position n at the sub-block's edge, (x_i e^{g_i - g_n}) . (y_j e^{g_n - g_j})
# with both exponents <= 0; pairs inside a sub-block are summed elementwise in float32 with the exponent masked
# before exp. "causal": rows r see columns c <= r with exp(g_r - g_c); "anticausal": c >= r with exp(g_c - g_r).
# Every function takes and returns 2-D values (no transposes, no dynamic register indexing), so Triton and
# Mosaic both lower them.

SUB = 16  # rows per sub-block: Triton's smallest dot operand dim, two bfloat16 sublane tiles on TPU


def row_of(x, j):
    """Row ``j`` (static or traced) of a 2-D ``x`` as ``[1, d]``: a masked sum over the rows."""
    rows = lax.broadcasted_iota(jnp.int32, x.shape, 0)
    return jnp.sum(jnp.where(rows == j, x, 0.0), axis=0, keepdims=True)


def col_of(x, j):
    """Column ``j`` of a 2-D ``x`` as ``[r, 1]``."""
    cols = lax.broadcasted_iota(jnp.int32, x.shape, 1)
    return jnp.sum(jnp.where(cols == j, x, 0.0), axis=1, keepdims=True)


def _pair_decay(g, j, causal):
    """``[s, d]``: the weights between every row r of a sub-block and its row ``j``, 0 where r does not see j."""
    rows = lax.broadcasted_iota(jnp.int32, g.shape, 0)
    g_j = row_of(g, j)
    if causal:
        return jnp.exp(jnp.where(rows >= j, g - g_j, -jnp.inf))
    return jnp.exp(jnp.where(rows <= j, g_j - g, -jnp.inf))


def diag_scores(x, y, g, causal):
    """``[s, s]``: ``p_rc = sum_d x_rd y_cd w_rcd`` inside one sub-block (``x, y, g [s, d]``), float32."""
    s = x.shape[0]
    x, y = x.astype(jnp.float32), y.astype(jnp.float32)
    cols = lax.broadcasted_iota(jnp.int32, (s, s), 1)

    def column(j, p):
        return jnp.where(cols == j, jnp.sum(x * row_of(y, j) * _pair_decay(g, j, causal), axis=1, keepdims=True), p)

    return lax.fori_loop(0, s, column, jnp.zeros((s, s), jnp.float32))


def diag_spread(p, y, g, causal):
    """``[s, d]``: ``sum_c p_rc y_cd w_rcd`` inside one sub-block (``p [s, s]``; ``y, g [s, d]``), float32."""
    y = y.astype(jnp.float32)

    def add(j, acc):
        return acc + col_of(p, j) * row_of(y, j) * _pair_decay(g, j, causal)

    return lax.fori_loop(0, p.shape[0], add, jnp.zeros(y.shape, jnp.float32))


def off_factors(g_sub, g, start, causal):
    """Row factors ``[s, d]`` of the sub-block at row ``start`` of the chunk and column factors ``[chunk, d]`` of
    the chunk's other rows it sees (earlier ones if causal, later ones if not; 0 for the rest), through the
    reference row n at the sub-block's edge (its first row if causal, its last if not)."""
    pos = lax.broadcasted_iota(jnp.int32, g.shape, 0)
    s = g_sub.shape[0]
    if causal:
        g_n = row_of(g_sub, 0)
        return jnp.exp(g_sub - g_n), jnp.exp(jnp.where(pos < start, g_n - g, -jnp.inf))
    g_n = row_of(g_sub, s - 1)
    return jnp.exp(g_n - g_sub), jnp.exp(jnp.where(pos >= start + s, g - g_n, -jnp.inf))


def entering(g, last, causal):
    """The carried state's weight at each row: the decays from the chunk's start (causal) or to its end."""
    return jnp.exp(g) if causal else jnp.exp(last - g)


def leaving(g, last, causal):
    """Each row's weight in the state passed on: the decays to the chunk's end (causal) or from its start."""
    return jnp.exp(last - g) if causal else jnp.exp(g)


def _fwd_kernel(*refs, chunk, num_chunks, causal, has_decay, normalize, vector=False):
    q_ref, k_ref, v_ref = refs[:3]
    g_ref = refs[3] if has_decay else None
    num_ref, den_ref = refs[3 + has_decay:]
    if vector:
        _fwd_vector(q_ref, k_ref, v_ref, g_ref, num_ref, den_ref, chunk=chunk, num_chunks=num_chunks,
                    normalize=normalize)
        return
    m, block_v = q_ref.shape[-1], v_ref.shape[-1]
    state = jnp.zeros((m, block_v), jnp.float32)
    zsum = jnp.zeros((m,), jnp.float32)

    def load(c):
        rows = pl.ds(c * chunk, chunk)
        g = g_ref[rows] if has_decay else None
        return rows, q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], g

    def absorb(state, zsum, k, v, kd, total):
        k_w = _scaled(k.astype(jnp.float32), kd)
        if total is not None:
            state, zsum = state * total, zsum * total
        return state + _dot(k_w.astype(v.dtype), v, trans_a=True), zsum + jnp.sum(k_w, axis=0)

    def store(rows, num, den):
        num_ref[rows, :] = num.astype(num_ref.dtype)
        if normalize:
            den_ref[rows] = den

    if causal:
        def body(c, carry):
            state, zsum = carry
            rows, q, k, v, g = load(c)
            w, qd, kd, total = _chunk_weights(g, chunk)
            scores = _dot(q, k, trans_b=True) * w
            num = _dot(scores.astype(v.dtype), v) + _scaled(_dot(q, state.astype(q.dtype)), qd)
            den = jnp.sum(scores, axis=1) + _factor(jnp.sum(q.astype(jnp.float32) * zsum[None, :], axis=1), qd)
            store(rows, num, den)
            return absorb(state, zsum, k, v, kd, total)

        lax.fori_loop(0, num_chunks, body, (state, zsum))
        return

    def accumulate(c, carry):
        _, _, k, v, _ = load(c)
        return absorb(*carry, k, v, None, None)

    state, zsum = lax.fori_loop(0, num_chunks, accumulate, (state, zsum))

    def emit(c, _):
        rows, q, _, _, _ = load(c)
        store(rows, _dot(q, state.astype(q.dtype)), jnp.sum(q.astype(jnp.float32) * zsum[None, :], axis=1))
        return 0

    lax.fori_loop(0, num_chunks, emit, 0)


def _factor(x, factor):
    return x if factor is None else x * factor


def _cast(x, like):
    return x.astype(like.dtype)


def _chunk_last(g):
    """The chunk's total log-decay per channel ``[1, m]`` and its factor ``[m]`` (for the state's rows)."""
    last = row_of(g, g.shape[0] - 1)
    return last, jnp.sum(jnp.exp(last), axis=0)


def _absorb_channels(state, zsum, k, v, g):
    """The state ``[m, block_v]`` and key sum ``[m]`` after a chunk: decayed per channel across it, plus its keys
    decayed to its end."""
    last, total = _chunk_last(g)
    k_w = k.astype(jnp.float32) * leaving(g, last, True)
    return state * total[:, None] + _dot(_cast(k_w, v), v, trans_a=True), zsum * total + jnp.sum(k_w, axis=0)


def _fwd_vector(q_ref, k_ref, v_ref, g_ref, num_ref, den_ref, *, chunk, num_chunks, normalize):
    """Causal forward with a decay per channel (``g_ref [len, m]``): each chunk in sub-blocks of ``SUB`` rows."""
    m, block_v = q_ref.shape[-1], v_ref.shape[-1]
    f32 = jnp.float32

    def body(c, carry):
        state, zsum = carry
        rows = pl.ds(c * chunk, chunk)
        k, v, g = k_ref[rows, :], v_ref[rows, :], g_ref[rows, :]

        def sub_block(a, _):
            start = a * SUB
            sub = pl.ds(c * chunk + start, SUB)
            q_s, g_s = q_ref[sub, :], g_ref[sub, :]
            row_f, col_f = off_factors(g_s, g, start, True)
            scores = _dot(_cast(q_s * row_f, q_s), _cast(k * col_f, k), trans_b=True)  # earlier sub-blocks
            diag = diag_scores(q_s, k_ref[sub, :], g_s, True)
            q_in = q_s.astype(f32) * jnp.exp(g_s)
            num = _dot(_cast(scores, v), v) + _dot(_cast(diag, v), v_ref[sub, :]) + _dot(
                _cast(q_in, q_s), _cast(state, q_s))
            num_ref[sub, :] = num.astype(num_ref.dtype)
            if normalize:
                den_ref[sub] = jnp.sum(scores, axis=1) + jnp.sum(diag, axis=1) + jnp.sum(q_in * zsum[None, :], axis=1)
            return 0

        lax.fori_loop(0, chunk // SUB, sub_block, 0)
        return _absorb_channels(state, zsum, k, v, g)

    lax.fori_loop(0, num_chunks, body, (jnp.zeros((m, block_v), f32), jnp.zeros((m,), f32)))


def _bwd_kernel(*refs, chunk, num_chunks, causal, has_decay, normalize, vector=False):
    q_ref, k_ref, v_ref = refs[:3]
    at = 3
    g_ref = refs[at] if has_decay else None
    at += has_decay
    dnum_ref = refs[at]
    dden_ref = refs[at + 1] if normalize else None
    dq_ref, dk_ref, dv_ref = refs[at + 1 + normalize:]
    m, block_v = q_ref.shape[-1], v_ref.shape[-1]
    # The denominator's cotangent enters d phi_q and d phi_k once: in the first value block only.
    first = (pl.program_id(2) == 0).astype(jnp.float32)
    if vector:
        _bwd_vector(q_ref, k_ref, v_ref, g_ref, dnum_ref, dden_ref, dq_ref, dk_ref, dv_ref, first=first,
                    chunk=chunk, num_chunks=num_chunks)
        return

    def load(c):
        rows = pl.ds(c * chunk, chunk)
        g = g_ref[rows] if has_decay else None
        dden = dden_ref[rows] * first if normalize else jnp.zeros((chunk,), jnp.float32)
        return rows, q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], dnum_ref[rows, :], dden, g

    zeros_state = jnp.zeros((m, block_v), jnp.float32)
    zeros_z = jnp.zeros((m,), jnp.float32)
    f32 = jnp.float32

    if not causal:
        def accumulate(c, carry):
            state, zsum, dstate, dz = carry
            _, q, k, v, dnum, dden, _ = load(c)
            state = state + _dot(k, v, trans_a=True)
            zsum = zsum + jnp.sum(k.astype(f32), axis=0)
            dstate = dstate + _dot(q, dnum.astype(q.dtype), trans_a=True)
            dz = dz + jnp.sum(q.astype(f32) * dden[:, None], axis=0)
            return state, zsum, dstate, dz

        state, zsum, dstate, dz = lax.fori_loop(0, num_chunks, accumulate,
                                                (zeros_state, zeros_z, zeros_state, zeros_z))

        def emit(c, _):
            rows, q, k, v, dnum, dden, _ = load(c)
            dq_ref[rows, :] = _dot(dnum, state, trans_b=True) + dden[:, None] * zsum[None, :]
            dk_ref[rows, :] = _dot(v.astype(f32), dstate, trans_b=True) + dz[None, :]
            dv_ref[rows, :] = _dot(k.astype(f32), dstate)
            return 0

        lax.fori_loop(0, num_chunks, emit, 0)
        return

    def forward(c, carry):  # d phi_q, chunks in order
        state, zsum = carry
        rows, q, k, v, dnum, dden, g = load(c)
        w, qd, kd, total = _chunk_weights(g, chunk)
        dscores = (_dot(dnum.astype(v.dtype), v, trans_b=True) + dden[:, None]) * w
        carried = _dot(dnum, state, trans_b=True) + dden[:, None] * zsum[None, :]
        dq_ref[rows, :] = _dot(dscores.astype(k.dtype), k) + _scaled(carried, qd)
        k_w = _scaled(k.astype(f32), kd)
        if total is not None:
            state, zsum = state * total, zsum * total
        return state + _dot(k_w.astype(v.dtype), v, trans_a=True), zsum + jnp.sum(k_w, axis=0)

    lax.fori_loop(0, num_chunks, forward, (zeros_state, zeros_z))

    def backward(i, carry):  # d phi_k, d v, chunks in reverse; dstate, dz: cotangents of the state after c
        dstate, dz = carry
        rows, q, k, v, dnum, dden, g = load(num_chunks - 1 - i)
        w, qd, kd, total = _chunk_weights(g, chunk)
        scores = _dot(q, k, trans_b=True) * w
        dscores = (_dot(dnum.astype(v.dtype), v, trans_b=True) + dden[:, None]) * w
        carried = _dot(v.astype(f32), dstate, trans_b=True) + dz[None, :]
        dk_ref[rows, :] = _dot(dscores.astype(q.dtype), q, trans_a=True) + _scaled(carried, kd)
        dv_ref[rows, :] = _dot(scores.astype(dnum.dtype), dnum, trans_a=True) + _scaled(
            _dot(k.astype(f32), dstate), kd)
        q_w = _scaled(q.astype(f32), qd)
        if total is not None:
            dstate, dz = dstate * total, dz * total
        return dstate + _dot(q_w, dnum, trans_a=True), dz + jnp.sum(q_w * dden[:, None], axis=0)

    lax.fori_loop(0, num_chunks, backward, (zeros_state, zeros_z))


def _bwd_vector(q_ref, k_ref, v_ref, g_ref, dnum_ref, dden_ref, dq_ref, dk_ref, dv_ref, *, first, chunk,
                num_chunks):
    """Causal backward with a decay per channel: d phi_q with the chunks in order, then d phi_k and d v in reverse,
    each chunk in sub-blocks of ``SUB`` rows (queries for d phi_q, keys for d phi_k and d v)."""
    m, block_v = q_ref.shape[-1], v_ref.shape[-1]
    f32 = jnp.float32

    def dden_of(rows, size):
        return dden_ref[rows] * first if dden_ref is not None else jnp.zeros((size,), f32)

    def forward(c, carry):  # d phi_q; state, zsum: the forward's, entering chunk c
        state, zsum = carry
        rows = pl.ds(c * chunk, chunk)
        k, v, g = k_ref[rows, :], v_ref[rows, :], g_ref[rows, :]

        def sub_block(a, _):
            start = a * SUB
            sub = pl.ds(c * chunk + start, SUB)
            dnum, dden, g_s = dnum_ref[sub, :], dden_of(sub, SUB), g_ref[sub, :]
            row_f, col_f = off_factors(g_s, g, start, True)
            dscores = _dot(_cast(dnum, v), v, trans_b=True) + dden[:, None]
            ddiag = _dot(_cast(dnum, v), v_ref[sub, :], trans_b=True) + dden[:, None]
            carried = _dot(dnum, state, trans_b=True) + dden[:, None] * zsum[None, :]
            dq_ref[sub, :] = (row_f * _dot(_cast(dscores, k), _cast(k * col_f, k)) + diag_spread(
                ddiag, k_ref[sub, :], g_s, True) + jnp.exp(g_s) * carried)
            return 0

        lax.fori_loop(0, chunk // SUB, sub_block, 0)
        return _absorb_channels(state, zsum, k, v, g)

    lax.fori_loop(0, num_chunks, forward, (jnp.zeros((m, block_v), f32), jnp.zeros((m,), f32)))

    def backward(i, carry):  # d phi_k, d v; dstate, dz: cotangents of the state leaving chunk c
        dstate, dz = carry
        c = num_chunks - 1 - i
        rows = pl.ds(c * chunk, chunk)
        q, dnum, dden, g = q_ref[rows, :], dnum_ref[rows, :], dden_of(rows, chunk), g_ref[rows, :]
        last, total = _chunk_last(g)

        def sub_block(a, _):
            start = a * SUB
            sub = pl.ds(c * chunk + start, SUB)
            k_s, v_s, g_s = k_ref[sub, :], v_ref[sub, :], g_ref[sub, :]
            q_s, dnum_s, dden_s = q_ref[sub, :], dnum_ref[sub, :], dden_of(sub, SUB)
            row_f, col_f = off_factors(g_s, g, start, False)  # rows: these keys; columns: the later queries
            q_w = _cast(q * col_f, q)
            dscores_t = _dot(v_s, _cast(dnum, v_s), trans_b=True) + dden[None, :]  # [SUB, chunk]: d scores^T
            ddiag_t = _dot(v_s, _cast(dnum_s, v_s), trans_b=True) + dden_s[None, :]
            gone = leaving(g_s, last, True)  # these keys' weights in the state leaving the chunk
            dk_ref[sub, :] = (row_f * _dot(_cast(dscores_t, q), q_w) + diag_spread(ddiag_t, q_s, g_s, False)
                              + gone * (_dot(v_s.astype(f32), dstate, trans_b=True) + dz[None, :]))
            scores_t = _dot(_cast(k_s * row_f, k_s), q_w, trans_b=True)
            diag_t = diag_scores(k_s, q_s, g_s, False)
            dv_ref[sub, :] = (_dot(_cast(scores_t, dnum), dnum) + _dot(_cast(diag_t, dnum), dnum_s)
                              + _dot(k_s.astype(f32) * gone, dstate))
            return 0

        lax.fori_loop(0, chunk // SUB, sub_block, 0)
        q_in = q.astype(f32) * entering(g, last, True)
        return (dstate * total[:, None] + _dot(q_in, dnum, trans_a=True),
                dz * total + jnp.sum(q_in * dden[:, None], axis=0))

    lax.fori_loop(0, num_chunks, backward, (jnp.zeros((m, block_v), f32), jnp.zeros((m,), f32)))


def _specs(batch, length, heads, m, block_v, has_decay, extra_v_like=0, extra_row=0, vector=False):
    """BlockSpecs over grid (batch, heads, value block) for q, k, v [, g] and cotangent inputs."""
    feat = pl.BlockSpec((None, length, None, m), lambda b, h, j: (b, 0, h, 0))
    vals = pl.BlockSpec((None, length, None, block_v), lambda b, h, j: (b, 0, h, j))
    row = pl.BlockSpec((None, length, None), lambda b, h, j: (b, 0, h))
    return [feat, feat, vals] + [feat if vector else row] * has_decay + [vals] * extra_v_like + [row] * extra_row


def _compiler_params(m, block_v):
    return plgpu.CompilerParams(num_warps=4 if max(m, block_v) <= 64 else 8, num_stages=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _core(q, k, v, log_decay, causal, normalize, chunk, block_v, interpret):
    """Unnormalized numerator [b, n, h, dv] (float32) and denominator [b, n, h] (or None) of padded inputs;
    ``log_decay`` [b, n, h] or [b, n, h, m] (per channel) or None."""
    return _forward(q, k, v, log_decay, causal, normalize, chunk, block_v, interpret)


def _local_cumsum(log_decay, chunk):
    """Cumulative log-decay restarted at every chunk: [b, n, h] or [b, n, h, m] float32."""
    batch, length = log_decay.shape[:2]
    g = jnp.cumsum(log_decay.reshape(batch, length // chunk, chunk, *log_decay.shape[2:]), axis=2)
    return g.reshape(log_decay.shape)


def _forward(q, k, v, log_decay, causal, normalize, chunk, block_v, interpret):
    batch, length, heads, m = q.shape
    dv = v.shape[-1]
    has_decay = log_decay is not None
    vector = has_decay and log_decay.ndim == 4
    num_blocks = dv // block_v
    inputs = (q, k, v) + ((_local_cumsum(log_decay, chunk),) if has_decay else ())
    kernel = functools.partial(_fwd_kernel, chunk=chunk, num_chunks=length // chunk, causal=causal,
                               has_decay=has_decay, normalize=normalize, vector=vector)
    out_shape = [jax.ShapeDtypeStruct((batch, length, heads, dv), jnp.float32)]
    out_specs = [pl.BlockSpec((None, length, None, block_v), lambda b, h, j: (b, 0, h, j))]
    if normalize:  # one denominator copy per value block; block 0's is used
        out_shape.append(jax.ShapeDtypeStruct((num_blocks, batch, length, heads), jnp.float32))
        out_specs.append(pl.BlockSpec((None, None, length, None), lambda b, h, j: (j, b, 0, h)))
    outs = pl.pallas_call(
        kernel if normalize else _drop_den(kernel), grid=(batch, heads, num_blocks),
        in_specs=_specs(batch, length, heads, m, block_v, has_decay, vector=vector), out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=_compiler_params(m, block_v), interpret=interpret, name="linear_attention_fwd",
    )(*inputs)
    return outs[0], (outs[1][0] if normalize else None)


def _drop_den(kernel):
    """The forward kernel with no denominator output."""
    def wrapped(*refs):
        return kernel(*refs, None)
    return wrapped


def _core_fwd(q, k, v, log_decay, causal, normalize, chunk, block_v, interpret):
    out = _forward(q, k, v, log_decay, causal, normalize, chunk, block_v, interpret)
    return out, (q, k, v, log_decay)


def _core_bwd(causal, normalize, chunk, block_v, interpret, residuals, cotangents):
    q, k, v, log_decay = residuals
    dnum, dden = cotangents
    batch, length, heads, m = q.shape
    dv = v.shape[-1]
    has_decay = log_decay is not None
    vector = has_decay and log_decay.ndim == 4
    num_blocks = dv // block_v
    inputs = (q, k, v) + ((_local_cumsum(log_decay, chunk),) if has_decay else ()) + (dnum.astype(jnp.float32),)
    if normalize:
        inputs += (dden.astype(jnp.float32),)
    kernel = functools.partial(_bwd_kernel, chunk=chunk, num_chunks=length // chunk, causal=causal,
                               has_decay=has_decay, normalize=normalize, vector=vector)
    part = pl.BlockSpec((None, None, length, None, m), lambda b, h, j: (j, b, 0, h, 0))
    dq, dk, dvals = pl.pallas_call(
        kernel, grid=(batch, heads, num_blocks),
        in_specs=_specs(batch, length, heads, m, block_v, has_decay, extra_v_like=1, extra_row=int(normalize),
                        vector=vector),
        out_specs=[part, part, pl.BlockSpec((None, length, None, block_v), lambda b, h, j: (b, 0, h, j))],
        out_shape=[jax.ShapeDtypeStruct((num_blocks, batch, length, heads, m), jnp.float32)] * 2
        + [jax.ShapeDtypeStruct((batch, length, heads, dv), jnp.float32)],
        compiler_params=_compiler_params(m, block_v), interpret=interpret, name="linear_attention_bwd",
    )(*inputs)
    dq, dk = dq.sum(0), dk.sum(0)
    d_log_decay = None if log_decay is None else decay_gradient(q, k, dq, dk, vector, axis=1)
    return dq.astype(q.dtype), dk.astype(k.dtype), dvals.astype(v.dtype), d_log_decay


_core.defvjp(_core_fwd, _core_bwd)


def decay_gradient(q, k, dq, dk, vector, axis):
    """The per-step log-decay's gradient from the features' (Yang et al. 2024, Sec. 4.2): ``dG_t = q_t dq_t -
    k_t dk_t`` for the cumulative log-decay G, per channel (``vector``) or summed over them; ``d a_s = sum_{t >= s}
    dG_t`` along the sequence ``axis``."""
    dg = q.astype(jnp.float32) * dq - k.astype(jnp.float32) * dk
    dg = dg if vector else jnp.sum(dg, axis=-1)
    return jnp.flip(jnp.cumsum(jnp.flip(dg, axis=axis), axis=axis), axis=axis)


def check_args(kernel: str, phi_q, phi_k, v, causal, decay, mask) -> None:
    """Shapes and dtypes of the linear-attention arguments (one-line ValueErrors naming ``kernel``)."""
    for label, x in (("phi_q", phi_q), ("phi_k", phi_k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{kernel}: {label} must have shape [batch, length, heads, dim], got {x.shape}.")
        check_dtype(kernel, label, x)
    batch, _, heads, m = phi_q.shape
    kv_len = phi_k.shape[1]
    if phi_k.shape != (batch, kv_len, heads, m) or v.shape[:3] != (batch, kv_len, heads):
        raise ValueError(f"{kernel}: phi_q {phi_q.shape}, phi_k {phi_k.shape} and v {v.shape} do not agree.")
    if mask is not None and mask.shape != (batch, kv_len):
        raise ValueError(f"{kernel}: mask must have shape [batch, kv_len] = {(batch, kv_len)}, got {mask.shape}.")
    if decay is not None:
        if not causal:
            raise ValueError(f"{kernel}: decay needs causal=True (a decay orders the keys).")
        if decay.shape not in ((heads,), (batch, kv_len, heads), (batch, kv_len, heads, m)):
            raise ValueError(f"{kernel}: decay must have shape [heads] = {(heads,)}, [batch, kv_len, heads] = "
                             f"{(batch, kv_len, heads)} or [batch, kv_len, heads, m] = {(batch, kv_len, heads, m)} "
                             f"(per channel), got {decay.shape}.")


def _check(phi_q, phi_k, v, causal, decay, chunk_size, mask, block_v):
    check_args(NAME, phi_q, phi_k, v, causal, decay, mask)
    m = phi_q.shape[-1]
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < MIN_DIM or (
            chunk_size & (chunk_size - 1)):
        raise ValueError(f"{NAME}: chunk_size must be a power of two >= {MIN_DIM} (Triton tiles), got {chunk_size!r}.")
    if block_v is not None and (not isinstance(block_v, int) or block_v < MIN_DIM or block_v & (block_v - 1)):
        raise ValueError(f"{NAME}: block_v must be a power of two >= {MIN_DIM}, got {block_v!r}.")
    for label, size in (("feature dim", m), ("value dim", v.shape[-1])):
        if next_power_of_2(size) > MAX_DIM and not (label == "value dim" and block_v):
            raise ValueError(f"{NAME}: {label} {size} pads to {next_power_of_2(size)} > {MAX_DIM}, more state "
                             "than one program keeps in registers; use fewer features (or block_v for values).")


def chunked_linear_attention(phi_q, phi_k, v, *, causal=False, decay=None, chunk_size=64, normalize=True, eps=1e-6,
                             mask=None, interpret=None, block_v=None, log_decay=None, segment_ids=None,
                             initial_state=None, return_state=False):
    """Linear attention of feature-mapped ``phi_q [b, q_len, h, m]``, ``phi_k [b, kv_len, h, m]``, ``v [b, kv_len,
    h, dv]``; returns ``[b, q_len, h, dv]`` in the inputs' promoted dtype (float32 accumulation inside).

    ``mask [b, kv_len]`` False drops a key (its features and value are zeroed); a query with no visible real key
    gets 0. ``decay`` (causal only): factors in (0, 1], ``[h]``, ``[b, kv_len, h]`` or per feature channel
    ``[b, kv_len, h, m]`` (the state's row d decays by ``decay[..., d]``; a ``[b, kv_len, h]`` decay equals its
    broadcast), applied at every position (padded keys too); it gets a gradient. ``log_decay`` (same shapes,
    values <= 0) gives log(decay) directly instead, for gates computed in log space. ``segment_ids [b, len]``
    (causal self-attention): packed sequences; the state resets at each segment start, folded into the per-step
    decay as a factor of float32's smallest normal (log -87.3, so a key of an earlier segment keeps a weight below
    1e-38 of its own: zero in float32). ``chunk_size``: power of two >= 16 (shorter inputs use one chunk of the
    next power of two; a per-channel decay walks each chunk in 16-row sub-blocks). ``block_v``: value columns per
    program (default all, up to 256). ``initial_state`` (a ``LinearState``: the
    ``[b, h, m, dv]`` sum of ``phi_k v^T`` and ``[b, h, m]`` sum of ``phi_k`` of the keys before this call) and
    ``return_state`` (then ``(out, LinearState)`` with the state after the last key), causal self-attention only,
    continue a sequence across calls (decoding, context-parallel chunks): the state enters every query decayed
    by the decays up to it and leaves decayed from each key to the end (per channel with a per-channel decay),
    computed beside the kernel in XLA (exact; one ``O(len * m * dv)`` einsum each).
    ``interpret`` None: interpret mode on CPU (``kernels.backend.interpret_default``).
    """
    if decay is not None and log_decay is not None:
        raise ValueError(f"{NAME}: give decay or log_decay, not both.")
    _check(phi_q, phi_k, v, causal, decay if log_decay is None else log_decay, chunk_size, mask, block_v)
    batch, q_len, heads, m = phi_q.shape
    kv_len, dv = phi_k.shape[1], v.shape[-1]
    phi_q, phi_k, v, log_decay, dtype = prepare(NAME, phi_q, phi_k, v, causal=causal, decay=decay,
                                                log_decay=log_decay, mask=mask, segment_ids=segment_ids,
                                                initial_state=initial_state, return_state=return_state)
    sequence = (phi_q, phi_k, v)
    # Causal end alignment (as kernel_attention): dummy queries in front when kv_len > q_len, empty keys when
    # q_len > kv_len, so that query i pairs with key i.
    q_front = max(kv_len - q_len, 0) if causal else 0
    k_front = max(q_len - kv_len, 0) if causal else 0
    length = max(q_len + q_front, kv_len + k_front)
    chunk = min(chunk_size, max(MIN_DIM, next_power_of_2(length)))
    padded = -(-length // chunk) * chunk
    m_pad, dv_pad = max(MIN_DIM, next_power_of_2(m)), max(MIN_DIM, next_power_of_2(dv))
    block = min(block_v or dv_pad, dv_pad)
    phi_q = pad_axis(pad_axis(phi_q, 1, q_front, padded - q_len - q_front), 3, 0, m_pad - m)
    phi_k = pad_axis(pad_axis(phi_k, 1, k_front, padded - kv_len - k_front), 3, 0, m_pad - m)
    v = pad_axis(pad_axis(v, 1, k_front, padded - kv_len - k_front), 3, 0, dv_pad - dv)
    cum = None if log_decay is None else jnp.cumsum(log_decay, axis=1)  # [b, len, h(, m)], before padding
    log_decay = pad_decay(log_decay, k_front, padded - kv_len - k_front, m_pad - m)
    static = (bool(causal), bool(normalize), chunk, block, interpret_default(interpret))
    per_step = (sharding.BATCH, None, sharding.HEADS)  # [batch, length, heads, ...]
    num, den = sharding.per_shard(lambda _, *arrays: _core(*arrays, *static), (phi_q, phi_k, v, log_decay),
                                  (per_step,) * 3 + (None if log_decay is None else per_step,), (per_step, per_step),
                                  batch=batch, head_counts=(heads,))
    num = num[:, q_front:q_front + q_len, :, :dv]
    den = None if den is None else den[:, q_front:q_front + q_len]
    if initial_state is not None:
        num, den = with_initial_state(initial_state, sequence[0], cum, num, den)
    out = (guarded_divide(num, den, eps) if normalize else num).astype(dtype)
    return (out, final_state(initial_state, *sequence[1:], cum)) if return_state else out


class LinearState(NamedTuple):
    """The recurrent state of causal linear attention after some keys: ``kv [b, h, m, dv]`` (sum of decayed
    ``phi_k v^T``) and ``k_sum [b, h, m]`` (sum of decayed ``phi_k``, the normaliser's)."""

    kv: jax.Array
    k_sum: jax.Array


def prepare(kernel: str, phi_q, phi_k, v, *, causal, decay, log_decay, mask, segment_ids, initial_state,
            return_state):
    """The linear kernels' shared input preparation: ``(phi_q, phi_k, v, log_decay, dtype)`` with the inputs in
    their promoted dtype, padded keys' features and values zeroed, and the per-step log decay ``[b, kv_len, h]``
    or, per channel, ``[b, kv_len, h, m]`` (or None) holding ``decay``/``log_decay`` and the segment resets; the
    carried state's conditions checked."""
    batch, q_len, heads, m = phi_q.shape
    kv_len = phi_k.shape[1]
    dtype = jnp.result_type(phi_q.dtype, phi_k.dtype, v.dtype)
    phi_q, phi_k, v = (x.astype(dtype) for x in (phi_q, phi_k, v))
    if mask is not None:
        keep = jnp.asarray(mask, bool)[:, :, None, None]
        phi_k, v = jnp.where(keep, phi_k, 0), jnp.where(keep, v, 0)
    check_carry(kernel, initial_state, return_state, causal, q_len, kv_len)
    if decay is not None:
        log_decay = jnp.log(jnp.maximum(decay.astype(jnp.float32), FLOOR))
    if log_decay is not None:
        channels = (m,) if log_decay.ndim == 4 else ()
        log_decay = jnp.broadcast_to(log_decay.astype(jnp.float32), (batch, kv_len, heads, *channels))
    if segment_ids is not None:
        reset = segment_reset(kernel, segment_ids, causal, batch, q_len, kv_len)
        if log_decay is None:
            log_decay = jnp.broadcast_to(reset, (batch, kv_len, heads))
        else:
            log_decay = log_decay + (reset[..., None] if log_decay.ndim == 4 else reset)
    return phi_q, phi_k, v, log_decay, dtype


def pad_decay(log_decay, front: int, back: int, channels: int):
    """The per-step log decay padded along the length (``front``, ``back`` steps of no decay) and, per channel,
    along the features (``channels`` more of no decay); None stays None."""
    if log_decay is None:
        return None
    log_decay = pad_axis(log_decay, 1, front, back)
    return pad_axis(log_decay, 3, 0, channels) if log_decay.ndim == 4 else log_decay


def _per_feature(weight, cum):
    """A weight over [b, (len,) h] or, per channel, [b, (len,) h, m] made to multiply features [..., m]."""
    return weight if cum.ndim == 4 else weight[..., None]


def check_carry(kernel: str, initial_state, return_state: bool, causal: bool, q_len: int, kv_len: int) -> None:
    if (initial_state is not None or return_state) and (not causal or q_len != kv_len):
        raise ValueError(f"{kernel}: initial_state and return_state need causal self-attention (a state sums the "
                         f"keys before a position), got causal={causal}, q_len {q_len}, kv_len {kv_len}.")


def with_initial_state(state: LinearState, phi_q, cum, num, den):
    """num + w_i phi_q_i . kv and den + w_i phi_q_i . k_sum, w_i = exp(cum_i): the decays up to query i (per
    head, or per channel when ``cum`` is ``[b, len, h, m]``)."""
    q = phi_q.astype(jnp.float32) if cum is None else phi_q.astype(jnp.float32) * _per_feature(jnp.exp(cum), cum)
    hi = lax.Precision.HIGHEST
    num = num + jnp.einsum("blhm,bhmd->blhd", q, state.kv.astype(jnp.float32), precision=hi)
    if den is not None:
        den = den + jnp.einsum("blhm,bhm->blh", q, state.k_sum.astype(jnp.float32), precision=hi)
    return num, den


def final_state(state: LinearState | None, phi_k, v, cum) -> LinearState:
    """The state after the last key: each key decayed to the end (exp(cum_last - cum_j)), plus the initial state
    decayed by every step (exp(cum_last)); per channel too, the rows of ``kv`` decaying with their channel."""
    k = phi_k.astype(jnp.float32)
    if cum is not None:
        k = k * _per_feature(jnp.exp(cum[:, -1:] - cum), cum)
    hi = lax.Precision.HIGHEST
    kv = jnp.einsum("blhm,blhd->bhmd", k, v.astype(jnp.float32), precision=hi)
    k_sum = jnp.sum(k, axis=1)
    if state is not None:
        through = jnp.ones(()) if cum is None else _per_feature(jnp.exp(cum[:, -1]), cum)  # [b, h, m] or 1
        kv = kv + through[..., None] * state.kv.astype(jnp.float32)
        k_sum = k_sum + through * state.k_sum.astype(jnp.float32)
    return LinearState(kv, k_sum)


def segment_reset(kernel: str, segment_ids, causal: bool, batch: int, q_len: int, kv_len: int):
    """[batch, kv_len, 1] log decay: log(FLOOR) at each segment start after the first position, else 0."""
    if not causal or q_len != kv_len or np.shape(segment_ids) != (batch, kv_len):
        raise ValueError(f"{kernel}: segment_ids [batch, length] = {(batch, kv_len)} need causal self-attention (the "
                         f"state resets at each segment start), got shape {np.shape(segment_ids)}, causal={causal}, "
                         f"q_len {q_len}, kv_len {kv_len}.")
    ids = jnp.asarray(segment_ids)
    starts = jnp.concatenate([jnp.zeros((batch, 1), bool), ids[:, 1:] != ids[:, :-1]], axis=1)
    return jnp.where(starts, jnp.log(FLOOR), 0.0)[:, :, None]


def reference(phi_q, phi_k, v, *, causal=False, decay=None, normalize=True, eps=1e-6, mask=None, segment_ids=None,
              log_decay=None):
    """Materialized float32 reference of ``chunked_linear_attention`` (O(q_len * kv_len) memory; a per-channel
    decay ``[b, kv_len, h, m]`` materialises the ``[q_len, kv_len, m]`` weights), for tests; ``segment_ids``
    restrict each query to the keys of its own segment; ``log_decay`` instead of ``decay`` as in the kernel."""
    batch, q_len, heads, m = phi_q.shape
    kv_len = phi_k.shape[1]
    phi_q, phi_k, v = (x.astype(jnp.float32) for x in (phi_q, phi_k, v))
    hi = lax.Precision.HIGHEST
    allowed = jnp.ones((batch, 1, q_len, kv_len), bool)
    if mask is not None:
        allowed &= jnp.asarray(mask, bool)[:, None, None, :]
    rows = jnp.arange(q_len)[:, None] + (kv_len - q_len)
    if causal:
        allowed &= rows >= jnp.arange(kv_len)[None, :]
    if segment_ids is not None:
        ids = jnp.asarray(segment_ids)
        allowed &= (ids[:, :, None] == ids[:, None, :])[:, None]
    if decay is not None:
        log_decay = jnp.log(decay.astype(jnp.float32))
    vector = log_decay is not None and log_decay.ndim == 4
    scores = None if vector else jnp.einsum("bqhm,bkhm->bhqk", phi_q, phi_k, precision=hi)
    if log_decay is not None:
        log_decay = log_decay.astype(jnp.float32)
        log_decay = log_decay if vector else jnp.broadcast_to(log_decay, (batch, kv_len, heads))[..., None]
        cum = jnp.moveaxis(jnp.cumsum(log_decay, axis=1), 2, 1)  # [b, h, kv_len, m or 1]
        cum_q = jnp.take(cum, jnp.clip(rows[:, 0], 0, kv_len - 1), axis=2)
        weights = jnp.exp(jnp.where(allowed[..., None], cum_q[:, :, :, None] - cum[:, :, None], -jnp.inf))
        if vector:
            scores = jnp.einsum("bqhm,bkhm,bhqkm->bhqk", phi_q, phi_k, weights, precision=hi)
        else:
            scores = scores * weights[..., 0]
    scores = jnp.where(allowed, scores, 0.0)
    num = jnp.einsum("bhqk,bkhd->bqhd", scores, v, precision=hi)
    if not normalize:
        return num
    return guarded_divide(num, jnp.moveaxis(scores.sum(-1), 1, 2), eps)
