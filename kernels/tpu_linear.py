"""Chunked linear attention as a Mosaic TPU Pallas kernel (Katharopoulos et al. 2020; the chunkwise form of GLA,
Yang et al. 2024, Sec. 3), with the semantics of ``kernels.linear_attention.chunked_linear_attention``:

    num_i = sum_{j visible to i} w_ij (phi_q_i . phi_k_j) v_j,   den_i = sum_{j visible to i} w_ij phi_q_i . phi_k_j,
    out_i = num_i / den_i (``numerics.guarded_divide``; ``normalize=True``),   out_i = num_i (``normalize=False``),

"visible": every real key (bidirectional) or the real keys j <= i (causal, end aligned), and
``w_ij = prod_{t=j+1..i} decay_t`` (causal only; per head ``[h]``, per step ``[b, len, h]`` or per step and feature
channel ``[b, len, h, m]``, then inside the feature sum: ``sum_d phi_q_id phi_k_jd w_ijd``).

TPU design (one kernel, ``_kernel``, used five ways):
- Head-major ``[b, h, len, d]`` (transposed outside the kernel); feature and value dims padded to multiples of 128
  (the lane width), length to the chunk. Mosaic needs a block's last two dims to be multiples of (8, 128) or the
  whole array dim, so the chunk is a multiple of 128 or, for a single chunk, the (16-rounded) padded length.
- Grid (batch, heads, value blocks, chunks): the chunk axis is "arbitrary" and the running ``[m, block_v]`` float32
  state lives in a VMEM scratch accumulator, zeroed at the first chunk. A value block is the whole padded value dim
  up to 512 lanes (``value_block``), so ``phi_q phi_k^T`` is computed once per chunk for the usual head dims.
- The denominator rides in the numerator: with ``normalize`` a column of ones is appended to ``v`` (it usually
  fits in the lane padding), so ``num[..., dv]`` is ``den`` with exactly the same decay weights.
- The decay enters as the chunk-local cumulative log-decay ``g``, given twice (a ``[chunk, 1]`` column and a
  ``[1, chunk]`` row), so the in-chunk weights ``exp(g_i - g_j)`` need no in-kernel transpose. Every factor
  the kernel exponentiates is <= 0, so nothing overflows.
- Three modes: "causal" (chunks in order), "anticausal" (keys j >= i, chunks in reverse order through the
  index maps) and "bidirectional" (2 x chunks grid steps: first the state ``phi_k^T v`` is summed over all
  chunks, then every query chunk is multiplied by it).
- A per-channel decay ``g [chunk, m]`` runs ``_vector_kernel`` (causal or anticausal): the chunk in 16-row
  sub-blocks (``linear_attention.SUB``), pairs across sub-blocks as matmuls through a reference row at the
  sub-block's edge (both exponents <= 0), pairs inside one elementwise in float32 (a loop over the sub-block's
  16 columns of ``[16, m]`` products: 2-D only). The decay sits on the contracted channels (forward, ``d v``) or
  on the output's (``d phi_q``, ``d phi_k``: ``on_values``, the decay then split with the value blocks).

Backward (custom VJP), all in Pallas with the same kernel, for ``dn = d num`` and the same decay:
``d phi_q = causal(dn, v, phi_k)``, ``d phi_k = anticausal(v, dn, phi_q)``, ``d v = anticausal(phi_k, phi_q, dn)``
(bidirectional: all three bidirectional); with a per-channel decay ``d phi_q`` and ``d phi_k`` carry it on their
output channels. The decay's gradient is ``dG_t = phi_q_t . d phi_q_t - phi_k_t . d phi_k_t`` for the cumulative
log-decay G (Yang et al. 2024, Sec. 4.2; elementwise per channel), then a reverse cumulative sum, in plain JAX.
The key mask, causal end alignment, padding, the ones column and the final division are plain JAX around the
kernel, differentiated by JAX. float32 dots use ``Precision.HIGHEST``; bfloat16 operands multiply in bfloat16 on
the MXU with float32 accumulation.

Entry point: ``chunked_linear_attention``, op "linear" of ``kernels.dispatch``'s ``mosaic_tpu`` backend (``NAME``,
``PLATFORMS``, ``OPS``, ``supports`` below; ``tpu_attention`` and ``tpu_scan`` hold its other ops).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from effjax.kernels import linear_attention as la
from effjax.kernels import sharding
from effjax.kernels.backend import interpret_default
from effjax.kernels.linear_attention import pad_axis
from effjax.kernels.numerics import guarded_divide

KERNEL = "tpu_chunked_linear_attention"
DTYPES = (jnp.float32, jnp.bfloat16)  # Mosaic TPU has no float16 matmul
LANES = 128  # TPU vreg lanes: feature, value and multi-chunk lengths are padded to multiples of it
SUBLANES = 16  # a single chunk is padded to a multiple of this (bfloat16 packs 16 rows per vreg tile)
MAX_DIM = 2048  # largest padded feature / value dim: keeps the double-buffered blocks and state in VMEM
MAX_BLOCK_V = 512  # value lanes per program by default: d_v <= 511 (+ the ones column) takes one value block
CHUNK_AXIS = ("parallel", "parallel", "parallel", "arbitrary")


def round_up(n: int, multiple: int) -> int:
    return -(-int(n) // multiple) * multiple


def tpu_chunk(chunk_size, length: int) -> int:
    """The chunk the kernel uses: ``chunk_size`` rounded up to a multiple of 128, or one chunk of the length
    rounded up to 16 when that is no longer (Mosaic's block rule: multiples of 128 lanes or the whole dim)."""
    chunk = round_up(max(int(chunk_size or LANES), 1), LANES)
    return round_up(max(length, 1), SUBLANES) if length <= chunk else chunk


def value_block(dim: int, requested=None) -> int:
    """Value lanes per program: ``requested`` rounded up to 128 when that divides ``dim`` (a multiple of 128), else
    the largest multiple of 128 up to 512 that does. One block recomputes ``phi_q phi_k^T`` least often."""
    if requested and dim % round_up(requested, LANES) == 0:
        return round_up(requested, LANES)
    return max(b for b in range(LANES, min(dim, MAX_BLOCK_V) + 1, LANES) if dim % b == 0)


def interpret_params(interpret):
    """pallas_call's ``interpret``: TPU interpret mode (``pltpu.InterpretParams``) where interpreting, else False."""
    if isinstance(interpret, pltpu.InterpretParams):
        return interpret
    return pltpu.InterpretParams() if interpret_default(interpret) else False


def _mm(a, b, contract):
    """float32-accumulated 2-D product contracting ``contract = ((dims of a), (dims of b))``; mixed dtypes and
    float32 go through float32 at full precision (HIGHEST: no bfloat16 passes on the MXU)."""
    if a.dtype != b.dtype:
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
    return lax.dot_general(a, b, (contract, ((), ())), precision=precision, preferred_element_type=jnp.float32)


NT = ((1,), (1,))  # a @ b.T
NN = ((1,), (0,))  # a @ b
TN = ((0,), (0,))  # a.T @ b


def _kernel(*refs, mode, num_chunks, has_decay):
    q_ref, k_ref, v_ref = refs[:3]
    gc_ref, gr_ref = refs[3:5] if has_decay else (None, None)
    o_ref, s_ref = refs[3 + 2 * has_decay:]
    step = pl.program_id(3)

    @pl.when(step == 0)
    def _():
        s_ref[...] = jnp.zeros(s_ref.shape, jnp.float32)

    if mode == "bidirectional":
        @pl.when(step < num_chunks)
        def _():
            s_ref[...] += _mm(k_ref[...], v_ref[...], TN)

        @pl.when(step >= num_chunks)
        def _():
            q = q_ref[...]
            o_ref[...] = _mm(q, s_ref[...].astype(q.dtype), NN).astype(o_ref.dtype)
        return

    q, k, v = q_ref[...], k_ref[...], v_ref[...]
    chunk = q.shape[0]
    rows = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
    cols = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
    allowed = rows >= cols if mode == "causal" else rows <= cols
    scores = _mm(q, k, NT)
    state = s_ref[...]
    if has_decay:
        g_col, g_row = gc_ref[...], gr_ref[...]  # [chunk, 1], [1, chunk]: the chunk-local cumulative log-decay
        last = jnp.sum(jnp.where(cols[:1, :] == chunk - 1, g_row, 0.0), axis=1, keepdims=True)  # [1, 1]
        if mode == "causal":  # w_ij = exp(g_i - g_j), j <= i; the state enters with exp(g_i), leaves exp(last - g_j)
            w = jnp.exp(jnp.where(allowed, g_col - g_row, -jnp.inf))
            q_factor, k_factor = jnp.exp(g_col), jnp.exp(last - g_col)
        else:  # anticausal: w_ij = exp(g_j - g_i), j >= i; the state enters with exp(last - g_i), leaves exp(g_j)
            w = jnp.exp(jnp.where(allowed, g_row - g_col, -jnp.inf))
            q_factor, k_factor = jnp.exp(last - g_col), jnp.exp(g_col)
        scores = scores * w
        carried = q_factor * _mm(q, state.astype(q.dtype), NN)
        k = (k * k_factor).astype(k.dtype)
        state = state * jnp.exp(last)
    else:
        scores = jnp.where(allowed, scores, 0.0)
        carried = _mm(q, state.astype(q.dtype), NN)
    o_ref[...] = (_mm(scores.astype(v.dtype), v, NN) + carried).astype(o_ref.dtype)
    s_ref[...] = state + _mm(k, v, TN)


def _vector_kernel(a_ref, b_ref, c_ref, g_ref, o_ref, s_ref, *, causal, on_values):
    """One chunk of ``out_r = sum_{c seen by r} sum_d a_rd b_cd c_c w_rcd`` (decay on the contracted channels) or
    ``out_rd = sum_c (a_r . b_c) c_cd w_rcd`` (``on_values``: on the output's), ``w_rcd = exp(g_rd - g_cd)`` for
    c <= r (``causal``) or ``exp(g_cd - g_rd)`` for c >= r. The chunk is walked in ``la.SUB``-row sub-blocks:
    pairs across sub-blocks are matmuls through ``la.off_factors``, pairs inside one elementwise. The state is
    ``c^T b`` ``[block_v, m]`` (decaying along its lanes) or ``b^T c`` ``[m, block_v]`` (``on_values``)."""
    @pl.when(pl.program_id(3) == 0)
    def _():
        s_ref[...] = jnp.zeros(s_ref.shape, jnp.float32)

    b, c, g = b_ref[...], c_ref[...], g_ref[...]
    last = la.row_of(g, g.shape[0] - 1)
    state = s_ref[...]

    def sub_block(i, _):
        start = pl.multiple_of(i * la.SUB, la.SUB)
        rows = pl.ds(start, la.SUB)
        a_s, b_s, c_s, g_s = a_ref[rows, :], b_ref[rows, :], c_ref[rows, :], g_ref[rows, :]
        row_f, col_f = la.off_factors(g_s, g, start, causal)
        if on_values:
            off = row_f * _mm(_mm(a_s, b, NT), _like(c * col_f, c), NN)
            diag = la.diag_spread(_mm(a_s, b_s, NT), c_s, g_s, causal)
            carried = la.entering(g_s, last, causal) * _mm(a_s, state, NN)
        else:
            off = _mm(_mm(_like(a_s * row_f, a_s), _like(b * col_f, b), NT), c, NN)
            diag = _mm(la.diag_scores(a_s, b_s, g_s, causal), c_s, NN)
            carried = _mm(a_s * la.entering(g_s, last, causal), state, NT)
        o_ref[rows, :] = (off + diag + carried).astype(o_ref.dtype)
        return 0

    lax.fori_loop(0, g.shape[0] // la.SUB, sub_block, 0)
    gone = la.leaving(g, last, causal)
    if on_values:
        s_ref[...] = state * jnp.exp(last) + _mm(b, _like(c * gone, c), TN)
    else:
        s_ref[...] = state * jnp.exp(last) + _mm(c, _like(b * gone, b), TN)


def _like(x, ref):
    """``x`` in ``ref``'s dtype: a decayed bfloat16 operand stays bfloat16 for the MXU."""
    return x.astype(ref.dtype)


def _call(q, k, v, g, mode, chunk, interpret, block_v=None, on_values=False):
    """``_kernel`` over head-major ``q, k [b, h, n, m]``, ``v [b, h, n, dv]`` (n a multiple of ``chunk``; m, dv
    multiples of 128) and the chunk-local cumulative log-decay ``g [b, h, n]`` (or None): float32 ``[b, h, n, dv]``.
    A per-channel ``g [b, h, n, m or dv]`` runs ``_vector_kernel`` (causal or anticausal) with the decay on the
    features of q and k, or on those of v with ``on_values``."""
    batch, heads, length, m = q.shape
    dv = v.shape[-1]
    nc = length // chunk
    block_v = value_block(dv, block_v)
    has_decay = g is not None
    vector = has_decay and g.ndim == 4
    if mode == "bidirectional":
        steps = 2 * nc
        q_at = lambda c: jnp.maximum(c - nc, 0)  # noqa: E731 - second pass: the query chunks
        k_at = lambda c: jnp.minimum(c, nc - 1)  # noqa: E731 - first pass: the key chunks
    else:
        steps = nc
        q_at = k_at = (lambda c: c) if mode == "causal" else (lambda c: nc - 1 - c)
    in_specs = [
        pl.BlockSpec((None, None, chunk, m), lambda b, h, j, c: (b, h, q_at(c), 0)),
        pl.BlockSpec((None, None, chunk, m), lambda b, h, j, c: (b, h, k_at(c), 0)),
        pl.BlockSpec((None, None, chunk, block_v), lambda b, h, j, c: (b, h, k_at(c), j)),
    ]
    inputs = [q, k, v]
    kernel = functools.partial(_kernel, mode=mode, num_chunks=nc, has_decay=has_decay)
    state = (m, block_v)
    if vector:
        width = block_v if on_values else m
        in_specs.append(pl.BlockSpec((None, None, chunk, width),
                                     lambda b, h, j, c: (b, h, k_at(c), j if on_values else 0)))
        inputs.append(g)
        kernel = functools.partial(_vector_kernel, causal=mode == "causal", on_values=on_values)
        state = state if on_values else (block_v, m)
    elif has_decay:
        in_specs += [pl.BlockSpec((None, None, chunk, 1), lambda b, h, j, c: (b, h, k_at(c), 0)),
                     pl.BlockSpec((None, None, 1, chunk), lambda b, h, j, c: (b, h, 0, k_at(c)))]
        inputs += [g[..., None], g[:, :, None, :]]
    return pl.pallas_call(
        kernel,
        grid=(batch, heads, dv // block_v, steps),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, None, chunk, block_v), lambda b, h, j, c: (b, h, q_at(c), j)),
        out_shape=jax.ShapeDtypeStruct((batch, heads, length, dv), jnp.float32),
        scratch_shapes=[pltpu.VMEM(state, jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=CHUNK_AXIS),
        interpret=interpret_params(interpret), name=f"tpu_linear_attention_{mode}",
    )(*inputs)


def _local_cumsum(log_decay, chunk):
    """Cumulative log-decay restarted at every chunk: ``[b, h, n]`` or, per channel, ``[b, h, n, m]`` float32."""
    batch, heads, length = log_decay.shape[:3]
    pieces = log_decay.reshape(batch, heads, length // chunk, chunk, *log_decay.shape[3:])
    return jnp.cumsum(pieces, axis=3).reshape(log_decay.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _core(q, k, v, log_decay, causal, chunk, interpret, block_v):
    """Numerator ``[b, h, n, dv]`` (float32) of padded head-major inputs; ``log_decay [b, h, n]``, ``[b, h, n, m]``
    (per channel) or None."""
    g = None if log_decay is None else _local_cumsum(log_decay, chunk)
    return _call(q, k, v, g, "causal" if causal else "bidirectional", chunk, interpret, block_v)


def _core_fwd(q, k, v, log_decay, causal, chunk, interpret, block_v):
    return _core(q, k, v, log_decay, causal, chunk, interpret, block_v), (q, k, v, log_decay)


def _core_bwd(causal, chunk, interpret, block_v, residuals, dnum):
    q, k, v, log_decay = residuals
    g = None if log_decay is None else _local_cumsum(log_decay, chunk)
    forward, backward = ("causal", "anticausal") if causal else ("bidirectional", "bidirectional")
    dnum = dnum.astype(jnp.float32)
    vector = g is not None and g.ndim == 4  # then d phi_q and d phi_k carry the decay on their own channels
    dq = _call(dnum, v, k, g, forward, chunk, interpret, on_values=vector)
    dk = _call(v, dnum, q, g, backward, chunk, interpret, on_values=vector)
    dv = _call(k, q, dnum, g, backward, chunk, interpret, block_v)
    d_log_decay = None if log_decay is None else la.decay_gradient(q, k, dq, dk, vector, axis=2)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), d_log_decay


_core.defvjp(_core_fwd, _core_bwd)


def _check(phi_q, phi_k, v, causal, decay, chunk_size, mask):
    la.check_args(KERNEL, phi_q, phi_k, v, causal, decay, mask)
    for label, x in (("phi_q", phi_q), ("phi_k", phi_k), ("v", v)):
        if x.dtype not in DTYPES:
            raise ValueError(f"{KERNEL}: {label} must be float32 or bfloat16, got {x.dtype}.")
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"{KERNEL}: chunk_size must be a positive int, got {chunk_size!r}.")
    for label, size in (("feature dim", phi_q.shape[-1]), ("value dim", v.shape[-1] + 1)):
        if round_up(size, LANES) > MAX_DIM:
            raise ValueError(f"{KERNEL}: {label} {size} pads to more than {MAX_DIM} lanes (VMEM).")


def chunked_linear_attention(phi_q, phi_k, v, *, causal=False, decay=None, chunk_size=64, normalize=True, eps=1e-6,
                             mask=None, interpret=None, block_v=None, log_decay=None, segment_ids=None,
                             initial_state=None, return_state=False):
    """Mosaic TPU twin of ``kernels.linear_attention.chunked_linear_attention`` (same arguments and result):
    ``phi_q [b, q_len, h, m]``, ``phi_k [b, kv_len, h, m]``, ``v [b, kv_len, h, dv]`` -> ``[b, q_len, h, dv]`` in
    the inputs' promoted dtype.

    ``chunk_size`` is rounded up to a multiple of 128 (one chunk of the padded length when that is shorter); it
    changes the result only by rounding. ``block_v``: value lanes per program, used when its round-up to 128
    divides the padded value dim (default: the whole padded dim up to 512, see ``value_block``). ``decay`` /
    ``log_decay``: per head, per step or per step and feature channel ``[b, kv_len, h, m]``. ``segment_ids
    [b, len]`` (causal self-attention): the state resets at each segment start, folded into the per-step log-decay
    as ``linear_attention.segment_reset`` does. ``initial_state``/``return_state``: as
    ``linear_attention.chunked_linear_attention`` (the same XLA composition beside the kernel). ``interpret``
    None: TPU interpret mode on CPU; an ``InterpretParams`` is passed through. Forward and backward (custom VJP)
    are Pallas kernels; the decay's gradient is plain JAX from theirs.
    """
    if decay is not None and log_decay is not None:
        raise ValueError(f"{KERNEL}: give decay or log_decay, not both.")
    _check(phi_q, phi_k, v, causal, decay if log_decay is None else log_decay, chunk_size, mask)
    batch, q_len, heads, m = phi_q.shape
    kv_len, dv = phi_k.shape[1], v.shape[-1]
    phi_q, phi_k, v, log_decay, dtype = la.prepare(KERNEL, phi_q, phi_k, v, causal=causal, decay=decay,
                                                   log_decay=log_decay, mask=mask, segment_ids=segment_ids,
                                                   initial_state=initial_state, return_state=return_state)
    sequence = (phi_q, phi_k, v)
    if normalize:  # the denominator as one more value column: sum_j w_ij (phi_q_i . phi_k_j) * 1
        v = jnp.concatenate([v, jnp.ones(v.shape[:3] + (1,), dtype)], axis=-1)
    # Causal end alignment: dummy queries in front when kv_len > q_len, empty keys when q_len > kv_len.
    q_front = max(kv_len - q_len, 0) if causal else 0
    k_front = max(q_len - kv_len, 0) if causal else 0
    length = max(q_len + q_front, kv_len + k_front)
    chunk = tpu_chunk(chunk_size, length)
    padded = round_up(length, chunk)
    m_pad, dv_pad = round_up(m, LANES), round_up(v.shape[-1], LANES)
    phi_q = pad_axis(pad_axis(phi_q, 1, q_front, padded - q_len - q_front), 3, 0, m_pad - m)
    phi_k = pad_axis(pad_axis(phi_k, 1, k_front, padded - kv_len - k_front), 3, 0, m_pad - m)
    v = pad_axis(pad_axis(v, 1, k_front, padded - kv_len - k_front), 3, 0, dv_pad - v.shape[-1])
    cum = None if log_decay is None else jnp.cumsum(log_decay, axis=1)  # [b, len, h(, m)], before padding
    log_decay = la.pad_decay(log_decay, k_front, padded - kv_len - k_front, m_pad - m)
    interpret = interpret_params(interpret)

    def per_shard(_, q, k, vals, ld):
        heads_major = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731 - [b, n, h, ...] <-> [b, h, n, ...]
        ld = None if ld is None else jnp.swapaxes(ld, 1, 2)
        num = _core(heads_major(q), heads_major(k), heads_major(vals), ld, bool(causal), chunk, interpret, block_v)
        return heads_major(num)

    per_step = (sharding.BATCH, None, sharding.HEADS)  # [batch, length, heads, ...]
    num = sharding.per_shard(per_shard, (phi_q, phi_k, v, log_decay),
                             (per_step,) * 3 + (None if log_decay is None else per_step,), per_step,
                             batch=batch, head_counts=(heads,))
    num = num[:, q_front:q_front + q_len]
    num, den = num[..., :dv], (num[..., dv] if normalize else None)
    if initial_state is not None:
        num, den = la.with_initial_state(initial_state, sequence[0], cum, num, den)
    out = (guarded_divide(num, den, eps) if normalize else num).astype(dtype)
    return (out, la.final_state(initial_state, *sequence[1:], cum)) if return_state else out


# --- op "linear" of the mosaic_tpu backend (kernels.dispatch) ----------------------------------------------------

NAME = "mosaic_tpu"
PLATFORMS = ("tpu",)  # compiled there; on a CPU the kernels run in TPU interpret mode
OPS = {"linear": chunked_linear_attention}


def platform_reason(call: dict) -> str | None:
    """Why a compiled (not interpreted) Mosaic TPU kernel cannot run here, or None."""
    if not interpret_default(call.get("interpret")) and jax.default_backend() != "tpu":
        return f"compiled Mosaic TPU kernels on backend {jax.default_backend()!r} (a TPU, or interpret=True)"
    return None


def dtype_of(call: dict, key: str):
    value = call.get(key)
    return None if value is None or not hasattr(value, "dtype") else jnp.dtype(value.dtype)


def supports(op: str, call: dict) -> str | None:
    """None when ``chunked_linear_attention(**call)`` runs here, else a short reason naming the unsupported
    feature; ``call`` holds the entry point's keyword arguments (arrays or ``jax.ShapeDtypeStruct``). Never raises."""
    if op not in OPS:
        return f"op {op!r} (this module implements {', '.join(OPS)})"
    try:
        if (call.get("initial_state") is not None or call.get("return_state")) and not call.get("causal"):
            return "initial_state / return_state need causal=True"
        for key in ("phi_q", "phi_k", "v"):
            if dtype_of(call, key) is not None and dtype_of(call, key) not in [jnp.dtype(d) for d in DTYPES]:
                return f"dtype {dtype_of(call, key).name} (float32 and bfloat16 only: no float16 Mosaic TPU matmul)"
        if call.get("segment_ids") is not None and not call.get("causal"):
            return "segment_ids need causal=True (the state resets at each segment start)"
        features, values = call.get("phi_q"), call.get("v")
        if features is not None and round_up(features.shape[-1], LANES) > MAX_DIM:
            return f"feature dim {features.shape[-1]} > {MAX_DIM} (VMEM blocks)"
        if values is not None and round_up(values.shape[-1] + 1, LANES) > MAX_DIM:
            return f"value dim {values.shape[-1]} >= {MAX_DIM} (VMEM blocks)"
        return platform_reason(call)
    except Exception as error:  # noqa: BLE001 - a malformed call is the entry point's to reject, not ours
        return f"unreadable call ({type(error).__name__}: {error})"
