"""Decayed linear attention, the core of ``retnet``, ``gla``, ``hgrn2`` and ``mamba2`` (catalog
``linear_families.md`` Sec. 2.1-2.2, 2.8).

Per batch row and head, with a state ``S [d_k, d_v]`` and a log-decay ``g_t <= 0``:

    S_t = Diag(exp(g_t)) S_{t-1} + k_t v_t^T,        o_t = S_t^T q_t      (q already scaled by the caller)

``log_decay`` is a scalar per head, ``[batch, length, heads]`` (RetNet's fixed gamma, Mamba2's dt A: the same
factor on every key channel), or a vector per key channel, ``[batch, length, heads, d_k]`` (GLA, HGRN2).

Three forms (``recurrent.FORMS``) that agree, each taking an ``initial_state`` and returning the final state:
  * ``parallel``: the materialised quadratic form, ``o_i = sum_{j <= i} (sum_d q_id k_jd exp(b_id - b_jd)) v_j``
    with ``b`` the cumulative sum of ``g`` over the whole sequence, used only as differences with ``i >= j``
    under a mask. It holds ``[L, L]`` (scalar) or ``[L, L, d_k]`` (vector) weights per head: a reference for
    short inputs, not for training.
  * ``chunked`` (Sec. 2.2): chunks of ``chunk_size`` tokens, ``b`` the cumulative sum inside each chunk;
    intra-chunk ``P_ij = sum_d q_id k_jd exp(b_id - b_jd)`` (``j <= i``) times ``V``; inter-chunk
    ``(Q o exp(b)) S_c``; state ``S_{c+1} = Diag(exp(b_C)) S_c + (K o exp(b_C - b))^T V`` carried by a
    ``lax.scan`` over chunks (no loop over tokens). A scalar decay makes ``P`` one masked matmul per chunk. A
    vector decay puts the decay inside the sum over ``d``: chunks larger than ``SUB_CHUNK`` (16) use fla's
    secondary chunking (``sub_chunked_scores``: 16-token diagonal blocks as masked ``[16, 16, d_k]`` float32
    exponent differences, the blocks below them as matmuls through each sub-chunk's first position); chunks of
    16 or less contract the chunk's ``[C, C, d_k]`` masked exponent differences directly.
  * ``recurrent``: a ``lax.scan`` over tokens with the explicit state (decoding).

Padding and packing (Sec. 2.8): a ``mask`` False token has its q, k, v and log-decay zeroed (state unchanged,
output 0); ``segment_ids`` become runs (``recurrent.run_starts``); the state restarts at every run start after
position 0 and the ``initial_state`` belongs to the first run. The chunked form masks the four places of Sec. 2.8
explicitly (intra-chunk pairs by same run; the inter-chunk read by the run of the previous chunk's last token;
state contributions by the run of the chunk's last token; the carry by equal runs at consecutive chunk ends):
no ``-inf`` log-decay shortcut. Exponents are masked before ``exp`` (``recurrent.masked_exp``) and every
decay is ``exp`` of a difference ``b_i - b_j`` with ``i >= j`` (never ``exp(b_i) * exp(-b_j)``). Float32 inside.

Kernel path (``impl``, ``kernels.dispatch`` op "linear"): the chunked form can run on the chunked linear-attention
kernel (``kernels/linear_attention.py``, its Mosaic TPU twin ``kernels/tpu_linear.py``) with per-head or
per-channel decays: q, k, v as ``phi_q, phi_k, v``, ``normalize=False``, the state as ``LinearState(S, 0)``. The
kernel decays at every key it is given, so pads get zero k, v and log-decay before it (no mask is passed) and
zero outputs after it, as here; segment starts become the kernel's resets (a log-decay of -87, exp of which is 0
in float32). The parallel and recurrent forms stay XLA whatever ``impl`` says.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from effjax.attention import recurrent
from effjax.kernels import dispatch
from effjax.kernels.backend import check_impl

NAME = "gated_linear"
FLOATS = (jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64)
SUB_CHUNK = 16  # fla's secondary chunk of vector decays (BC)
KERNEL_MIN_CHUNK = 16  # the linear kernels' smallest chunk (Triton's smallest dot operand dim)


def gated_linear(q, k, v, log_decay, *, form="chunked", chunk_size=64, initial_state=None, segment_ids=None,
                 mask=None, method=NAME, impl="xla"):
    """Decayed linear attention ``S_t = Diag(exp(g_t)) S_{t-1} + k_t v_t^T``, ``o_t = S_t^T q_t``.

    ``q, k [batch, length, heads, d_k]``, ``v [batch, length, heads, d_v]``, ``log_decay`` ``[batch, length,
    heads]`` (scalar per head) or ``[batch, length, heads, d_k]`` (per key channel), finite and ``<= 0`` (checked
    on concrete values; a traced one is the caller's to guarantee). ``form``: "chunked", "parallel" or
    "recurrent"; ``chunk_size``: a power of two (chunked form; a shorter input is one chunk); ``initial_state
    [batch, heads, d_k, d_v]`` float32 (None: zeros); ``mask [batch, length]`` True on real tokens;
    ``segment_ids [batch, length]``. ``method`` names the caller in errors. ``impl`` (``kernels.dispatch``):
    "xla", or e.g. "pallas" for the chunked linear-attention kernel with per-head/per-channel decays (chunked
    form only, its chunk ``chunk_size`` rounded up to 16; the other forms stay XLA); a backend that cannot take
    the call falls back along ``impl`` as the dispatch does.

    Returns ``(out float32 [batch, length, heads, d_v], final_state float32 [batch, heads, d_k, d_v])``.
    """
    check_inputs(method, q, k, v, log_decay)
    check_impl(method, impl)
    recurrent.check_form(method, form)
    recurrent.check_chunk_size(method, chunk_size)
    batch, length, heads, d_k = q.shape
    d_v = v.shape[-1]
    recurrent.check_state(method, initial_state, (batch, heads, d_k, d_v))
    keep = recurrent.keep_mask(method, mask, batch, length)
    starts = recurrent.run_starts(method, segment_ids, batch, length)
    q, k, v, log_decay = recurrent.zero_padded(keep, *(x.astype(jnp.float32) for x in (q, k, v, log_decay)))
    state = jnp.zeros((batch, heads, d_k, d_v), jnp.float32) if initial_state is None else initial_state
    if form == "recurrent":
        starts = jnp.zeros((batch, length), bool) if starts is None else starts
        return _recurrent(q, k, v, log_decay, state, starts)
    runs = recurrent.run_ids(starts, batch, length)
    if form == "parallel":
        return _parallel(q, k, v, log_decay, state, runs)
    xla = functools.partial(_chunked, q, k, v, log_decay, state, runs, chunk_size)
    if impl == "xla":
        return xla()
    call = kernel_call(q, k, v, log_decay, state, None if starts is None else runs, chunk_size)
    return _from_kernel(dispatch.run("linear", impl, call, xla=lambda: _as_kernel_result(xla()), where=method), keep)


def kernel_call(q, k, v, log_decay, state, runs, chunk_size) -> dict:
    """The chunked form as the "linear" op's arguments: ``q, k, v, log_decay`` float32 with pads already zeroed
    (so no mask: the kernel would still decay at a masked key), ``runs`` the run ids (None: one run) whose
    changes the kernel turns into state resets, ``state`` the initial ``S`` (its key sum unused: 0)."""
    from effjax.kernels.linear_attention import LinearState, next_power_of_2

    batch, _, heads, d_k = q.shape
    initial = LinearState(state, jnp.zeros((batch, heads, d_k), jnp.float32))
    return dict(phi_q=q, phi_k=k, v=v, causal=True, normalize=False, log_decay=log_decay, segment_ids=runs,
                initial_state=initial, return_state=True,
                chunk_size=max(KERNEL_MIN_CHUNK, next_power_of_2(chunk_size)))


def _as_kernel_result(result):
    """The XLA fallback's ``(out, S)`` shaped as the kernel's ``(out, LinearState)`` (no key sum)."""
    from effjax.kernels.linear_attention import LinearState

    out, final = result
    return out, LinearState(final, None)


def _from_kernel(result, keep):
    """``(out, S)`` from the kernel's ``(out, LinearState)``: float32, padded positions' outputs 0."""
    out, final = result
    return recurrent.zero_padded(keep, out.astype(jnp.float32))[0], final.kv.astype(jnp.float32)


def check_inputs(method, q, k, v, log_decay) -> None:
    """One-line ValueErrors naming ``method`` for shapes, dtypes and log-decays out of range."""
    for label, x in (("q", q), ("k", k), ("v", v), ("log_decay", log_decay)):
        if jnp.dtype(x.dtype) not in FLOATS:
            raise ValueError(f"{method}: {label} must be a float array, got {x.dtype}.")
    if q.ndim != 4 or q.shape != k.shape:
        raise ValueError(f"{method}: q and k must have the same shape [batch, length, heads, d_k], "
                         f"got {tuple(q.shape)} and {tuple(k.shape)}.")
    if v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"{method}: v must have shape [batch, length, heads, d_v] = {tuple(q.shape[:3])} + (d_v,), "
                         f"got {tuple(v.shape)}.")
    if tuple(log_decay.shape) not in (tuple(q.shape[:3]), tuple(q.shape)):
        raise ValueError(f"{method}: log_decay must have shape [batch, length, heads] = {tuple(q.shape[:3])} or "
                         f"[batch, length, heads, d_k] = {tuple(q.shape)}, got {tuple(log_decay.shape)}.")
    recurrent.check_log_decay(method, log_decay)


def _per_key(decay, vector: bool):
    """A ``[..., heads]`` (scalar) or ``[..., heads, d_k]`` (vector) factor broadcast against ``[..., heads, d_k]``."""
    return decay if vector else decay[..., None]


def _by_token(allowed, vector: bool):
    """A ``[batch, ..., length]`` token mask broadcast against ``[batch, ..., length, heads(, d_k)]``."""
    return allowed[..., None, None] if vector else allowed[..., None]


def _recurrent(q, k, v, log_decay, state, starts):
    vector = log_decay.ndim == 4

    def step(s, token):
        q_t, k_t, v_t, g_t, start_t = token
        s = jnp.where(start_t[:, None, None, None], 0.0, s)
        s = _per_key(jnp.exp(g_t), vector)[..., None] * s + k_t[..., :, None] * v_t[..., None, :]
        return s, jnp.einsum("bhk,bhkv->bhv", q_t, s)

    tokens = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, log_decay, starts))
    final, out = lax.scan(step, state, tokens)
    return jnp.moveaxis(out, 0, 1), final


def _pair_weights(b, allowed, vector: bool):
    """``exp(b_i - b_j)`` on ``allowed [batch, ..., L, L]`` pairs, 0 elsewhere, from cumulative log-decays
    ``b [batch, ..., L, heads(, d_k)]``: ``[batch, ..., heads, L, L(, d_k)]``."""
    b = jnp.moveaxis(b, -2 if vector else -1, -3 if vector else -2)  # heads before the length
    if vector:
        return recurrent.masked_exp(b[..., :, None, :] - b[..., None, :, :], allowed[..., None, :, :, None])
    return recurrent.masked_exp(b[..., :, None] - b[..., None, :], allowed[..., None, :, :])


def _scores(q, k, weights, vector: bool):
    """``P_ij = sum_d q_id k_jd w_ij(d)`` of ``q, k [batch, ..., L, heads, d_k]``: ``[batch, ..., heads, L, L]``."""
    if vector:
        return jnp.einsum("...ihd,...jhd,...hijd->...hij", q, k, weights)
    return jnp.einsum("...ihd,...jhd->...hij", q, k) * weights


def sub_chunked_scores(q, k, b, allowed, sub: int):
    """The intra-chunk ``P_ij = sum_d q_id k_jd exp(b_id - b_jd)`` of a vector decay by secondary chunking (catalog
    Sec. 2.2, fla's 16-token sub-blocks): ``q, k, b [batch, n, chunk, heads, d_k]``, ``allowed [batch, n, chunk,
    chunk]`` -> ``[batch, n, heads, chunk, chunk]``, 0 where not allowed.

    Diagonal ``sub x sub`` blocks: the masked exponent differences, elementwise (``[sub, sub, d_k]`` per block).
    A block of sub-chunk I after sub-chunk J < I: one matmul of ``q_i exp(b_i - b_r)`` and ``k_j exp(b_r - b_j)``
    with r the first position of I, both exponents <= 0 (b is non-increasing and j < r <= i), so no factor
    overflows and their product is ``exp(b_i - b_j)``.
    """
    batch, n, chunk, heads, d_k = q.shape
    m = chunk // sub

    def split(x):
        return x.reshape(batch, n, m, sub, *x.shape[3:])

    qs, ks, bs = split(q), split(k), split(b)  # [batch, n, m, sub, heads, d_k]
    blocks = allowed.reshape(batch, n, m, sub, m, sub)
    on_diagonal = jnp.moveaxis(jnp.diagonal(blocks, axis1=2, axis2=4), -1, 2)  # [batch, n, m, sub, sub]
    diagonal = _scores(qs, ks, _pair_weights(bs, on_diagonal, True), True)  # [batch, n, m, heads, sub, sub]
    first = bs[:, :, :, :1]  # b at each sub-chunk's first position r
    q_side = qs * jnp.exp(bs - first)
    earlier = jnp.tril(jnp.ones((m, m), bool), -1)[:, :, None, None, None]  # J < I
    k_side = ks[:, :, None] * recurrent.masked_exp(first[:, :, :, None] - bs[:, :, None], earlier)
    off = jnp.einsum("bnIihd,bnIJjhd->bnhIiJj", q_side, k_side)  # 0 unless J < I
    eye = jnp.eye(m, dtype=q.dtype)[:, None, :, None]
    full = off + jnp.moveaxis(diagonal, 3, 2)[..., :, :, None, :] * eye
    return jnp.where(allowed[:, :, None], full.reshape(batch, n, heads, chunk, chunk), 0.0)


def _parallel(q, k, v, log_decay, state, runs):
    vector = log_decay.ndim == 4
    length = q.shape[1]
    b = jnp.cumsum(log_decay, axis=1)  # global: only differences b_i - b_j with i >= j of one run are used
    causal = jnp.tril(jnp.ones((length, length), bool))
    allowed = causal & (runs[:, :, None] == runs[:, None, :])
    scores = _scores(q, k, _pair_weights(b, allowed, vector), vector)
    out = jnp.einsum("bhij,bjhv->bihv", scores, v)
    # The initial state reaches the first run only, decayed from the start: exp(b_i), b_i <= 0.
    from_start = recurrent.masked_exp(b, _by_token(runs == 0, vector))
    out = out + jnp.einsum("blhk,bhkv->blhv", q * _per_key(from_start, vector), state)
    last_run = runs[:, -1:]
    to_end = recurrent.masked_exp(b[:, -1:] - b, _by_token(runs == last_run, vector))
    final = jnp.einsum("blhk,blhv->bhkv", k * _per_key(to_end, vector), v)
    carried = recurrent.masked_exp(b[:, -1], _by_token(last_run == 0, vector)[:, 0])
    return out, final + _per_key(carried, vector)[..., None] * state


def _in_chunks(x, chunk: int):
    """``[batch, length, ...]`` -> ``[batch, n_chunks, chunk, ...]`` (length a multiple of ``chunk``)."""
    return x.reshape(x.shape[0], x.shape[1] // chunk, chunk, *x.shape[2:])


def _chunked(q, k, v, log_decay, state, runs, chunk_size):
    vector = log_decay.ndim == 4
    batch, length, heads, _ = q.shape
    chunk = min(chunk_size, length)
    pad = -length % chunk
    # Padding tokens: zero q/k/v and log-decay, and the last run's id, so they neither read, write nor decay.
    q, k, v, log_decay = (jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) for x in (q, k, v, log_decay))
    runs = jnp.pad(runs, [(0, 0), (0, pad)], mode="edge")
    q, k, v, log_decay, runs = (_in_chunks(x, chunk) for x in (q, k, v, log_decay, runs))

    b = jnp.cumsum(log_decay, axis=2)  # chunk-local, inclusive
    b_end = b[:, :, -1]  # [batch, n, heads(, d_k)]
    run_end = runs[:, :, -1]  # [batch, n]
    run_before = jnp.pad(run_end[:, :-1], [(0, 0), (1, 0)])  # the previous chunk's (the initial state's: 0)

    # (1) intra-chunk pairs of one run.
    causal = jnp.tril(jnp.ones((chunk, chunk), bool))
    allowed = causal & (runs[:, :, :, None] == runs[:, :, None, :])
    if vector and chunk > SUB_CHUNK and chunk % SUB_CHUNK == 0:
        scores = sub_chunked_scores(q, k, b, allowed, SUB_CHUNK)
    else:
        scores = _scores(q, k, _pair_weights(b, allowed, vector), vector)
    intra = jnp.einsum("bnhij,bnjhv->bnihv", scores, v)

    # (3) what each chunk writes: keys of the chunk's last run, decayed to the chunk's end.
    to_end = recurrent.masked_exp(b_end[:, :, None] - b, _by_token(runs == run_end[:, :, None], vector))
    written = jnp.einsum("bnjhk,bnjhv->bnhkv", k * _per_key(to_end, vector), v)
    # (4) the carry survives a chunk only if no run starts inside it.
    carry = recurrent.masked_exp(b_end, _by_token(run_end == run_before, vector))

    def step(s, chunk_terms):
        carry_c, written_c = chunk_terms
        return _per_key(carry_c, vector)[..., None] * s + written_c, s

    final, entering = lax.scan(step, state, (jnp.moveaxis(carry, 1, 0), jnp.moveaxis(written, 1, 0)))
    entering = jnp.moveaxis(entering, 0, 1)  # [batch, n, heads, d_k, d_v]: the state before each chunk

    # (2) the entering state, read by the tokens still in the previous chunk's last run.
    from_start = recurrent.masked_exp(b, _by_token(runs == run_before[:, :, None], vector))
    inter = jnp.einsum("bnihk,bnhkv->bnihv", q * _per_key(from_start, vector), entering)
    out = (intra + inter).reshape(batch, -1, heads, v.shape[-1])[:, :length]
    return out, final


# --- what the methods built on this core share ---------------------------------------------------------------

def forward_or_both(method, q, k, v, log_decay, *, causal, form, chunk_size, initial_state=None, segment_ids=None,
                    keep=None, impl="xla"):
    """The core left to right (``causal``: ``(out, final_state)``), else the forward plus the reversed scan of
    catalog Sec. 2.9 (``recurrent.both_directions``; the diagonal counted in both): ``(out, None)``. ``impl``
    runs each direction's chunked form (``gated_linear``)."""
    call = dict(form=form, chunk_size=chunk_size, method=method, impl=impl)
    if causal:
        return gated_linear(q, k, v, log_decay, initial_state=initial_state, segment_ids=segment_ids, mask=keep,
                            **call)

    def one_direction(q, k, v, log_decay, *, segment_ids=None, keep=None):
        return gated_linear(q, k, v, log_decay, segment_ids=segment_ids, mask=keep, **call)[0]

    return recurrent.both_directions(one_direction, (q, k, v, log_decay), segment_ids=segment_ids, keep=keep), None


def swish_gated_head_norm(o, gate, weight, eps: float):
    """fla's ``FusedRMSNormGated`` (GLA, RetNet): ``RMSNorm_head(o) * weight * swish(gate)``; ``o, gate [batch,
    length, heads, d]``, ``weight [d]`` shared by the heads. Float32."""
    return recurrent.rms_norm(o, weight, eps) * jax.nn.silu(gate.astype(jnp.float32))


def zero_pads(out, keep):
    """``out [batch, length, ...]`` with padded positions (``keep`` False) set to 0."""
    return out if keep is None else recurrent.zero_padded(keep, out)[0]
