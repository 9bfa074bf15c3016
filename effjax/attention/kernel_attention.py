"""Normalized kernel (linear) attention shared by the linear methods (Katharopoulos et al. 2020, Sec. 3.2).

Given feature-mapped queries ``phi_q [batch, q_len, heads, m]`` and keys ``phi_k [batch, kv_len, heads, m]``,
computes ``out_i = sum_j phi_q_i . phi_k_j v_j / sum_j phi_q_i . phi_k_j`` over the keys j that query i
may see: all real keys (bidirectional, ``phi_k^T v`` first), real keys j <= i (causal, chunked prefix sums), or
real keys of i's segment (segmented, bidirectional: one ``phi_k^T v`` state per segment by ``segment_sum``).
``linear_attention`` is the same without the denominator (ESSA, RALA's RoPE numerator).

Conventions, shared by every method built on this module:
  * eps: Performer's guard, ``den + 2 eps`` only where ``|den| <= eps = 1e-6``
    (``effjax.kernels.numerics.guarded_divide``, shared with the Pallas kernel). fast-transformers (Linear
    Transformer), SLAB, ScatterFormer and RALA add eps to every denominator and cosFormer clamps
    ``max(den, eps)``; those differ from the guard by a relative 1e-6 / den, nothing at their O(1) and larger
    denominators. Always adding eps is not harmless in stabilised units: Performer's denominators (features
    scaled by the largest key) are 1e-3 to 1e-5, where ``den + 1e-6`` moved outputs by up to 1e-2.
  * padding: ``phi_k`` and ``v`` are zeroed at padded keys before any reduction, so padded keys cannot
    change an output. A query with no visible real key gets ``0 / (0 + 2 eps) = 0``.
  * causal with ``q_len != kv_len`` is aligned to the end like ``common.allowed_pairs``: query i sees
    keys j <= i + (kv_len - q_len).
  * ``key_log_scale`` (optional, ``[batch, kv_len, heads]``, no gradient) says the true key features are
    ``phi_k_j * exp(key_log_scale_j)``. Numerator and denominator of query i are then computed in units
    of ``exp(-max of key_log_scale over the keys i may see)`` (a running max when causal), so features
    whose logarithms exceed float32's range stay finite and a causal output never depends on a future
    key, not even through eps. Performer uses it for its exp features; without it all scales are 1.
  * segments (``segment_ids [batch, length]``, self-attention, bidirectional only): ids are compared for
    equality only. Each id is relabelled by the position of its first occurrence in the sorted row, a label in
    [0, length), so the number of segments is bounded by the static length and no maximum needs to be given.
    The per-token outer products ``phi_k_j v_j^T`` are summed per label with ``jax.ops.segment_sum`` and
    gathered back per query: O(length * m * v_dim) memory, like the causal form without chunks.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from effjax.attention import common, decoding
from effjax.attention.common import check_mask
from effjax.kernels import dispatch
from effjax.kernels.backend import check_impl
from effjax.kernels.numerics import guarded_divide

NAME = "kernel_attention"
EPS = 1e-6
DEFAULT_CHUNK_SIZE = 64
LOG_SCALE_FLOOR = -1e30  # log-scale given to padded keys: exp(LOG_SCALE_FLOOR - anything real) == 0.


def check_chunk_size(method: str, chunk_size) -> None:
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"{method}: chunk_size must be a positive int, got {chunk_size!r}.")


def segment_labels(method: str, segment_ids, batch: int, q_len: int, kv_len: int):
    """Dense int32 labels [batch, length] in [0, length), equal exactly where the ids are equal; or None.

    A label is the position of the id's first occurrence in the sorted row (``searchsorted``).
    """
    if segment_ids is None:
        return None
    if q_len != kv_len or segment_ids.shape != (batch, q_len):
        raise ValueError(f"{method}: segment_ids must have shape [batch, length] = {(batch, q_len)} for "
                         f"self-attention, got {segment_ids.shape} with q_len {q_len}, kv_len {kv_len}.")
    segment_ids = jnp.asarray(segment_ids)
    return jax.vmap(jnp.searchsorted)(jnp.sort(segment_ids, axis=1), segment_ids).astype(jnp.int32)


def refuse_segments(method: str, segment_ids) -> None:
    """For kernel methods that keep one key state per query row and do not use the segmented form."""
    common.refuse_segments(method, segment_ids, "this method keeps one key sum phi(k)^T v for the whole row; use "
                           "scattered_linear (per-segment ReLU kernel) or a softmax method for packed sequences.")


def normalized_attention(phi_q, phi_k, v, *, mask=None, causal=False, key_log_scale=None, segment_ids=None,
                         chunk_size=DEFAULT_CHUNK_SIZE, eps=EPS, method=NAME, impl="xla"):
    """Normalized kernel attention in float32; returns float32 ``[batch, q_len, heads, v_dim]``.

    ``causal=True`` runs a ``lax.scan`` over chunks of ``chunk_size`` positions: a masked quadratic
    product inside the chunk plus the carried state ``sum phi_k^T v`` (m x v_dim) and ``sum phi_k`` of
    earlier chunks. Lengths that are not a multiple of the chunk are padded internally; the chunk size
    changes the result only by float rounding. ``segment_ids`` (bidirectional self-attention only)
    restrict each query to the keys of its own segment; with a ``key_log_scale`` the units are then the
    largest real key of the segment.

    Other ``impl`` (``kernels.dispatch``, op "linear"), e.g. "pallas", runs ``kernels.linear_attention`` (no
    kernel takes segment_ids: NotImplementedError without XLA to fall back to); its chunk is ``chunk_size``
    rounded up to a power of two >= 16. A ``key_log_scale`` is folded in exactly: scaled by the
    largest real key when bidirectional; when causal, keys are scaled by the running max M and the state by the
    per-step decay exp(M_{t-1} - M_t) (clipped at exp(-60) where a real key follows an empty state).
    """
    check_impl(method, impl)
    phi_q, phi_k, v, mask, labels = _prepare(phi_q, phi_k, v, mask, segment_ids, causal, method)
    batch, _, heads, _ = phi_q.shape
    kv_len = phi_k.shape[1]
    if key_log_scale is not None and key_log_scale.shape != (batch, kv_len, heads):
        raise ValueError(f"{method}: key_log_scale must have shape {(batch, kv_len, heads)}, "
                         f"got {key_log_scale.shape}.")
    check_chunk_size(method, chunk_size)
    if key_log_scale is None:
        scale = jnp.zeros((batch, kv_len, heads), jnp.float32)
    else:
        scale = lax.stop_gradient(key_log_scale.astype(jnp.float32))
    if mask is not None:
        scale = jnp.where(mask[:, :, None], scale, LOG_SCALE_FLOOR)
    if causal:
        xla = functools.partial(_causal, phi_q, phi_k, v, scale, chunk_size, eps)
    else:
        xla = functools.partial(_bidirectional, phi_q, phi_k, v, scale, labels, eps)
    if impl == "xla":
        return xla()
    call = _kernel_call(phi_q, phi_k, v, mask, scale if key_log_scale is not None else None, causal, chunk_size, eps)
    return dispatch.run("linear", impl, call, xla=xla, where=method, refuse=_segments_refusal(labels))


def _kernel_call(phi_q, phi_k, v, mask, scale, causal, chunk_size, eps) -> dict:
    """``normalized_attention`` as the "linear" op's arguments, ``scale`` (log key scales, or None) folded in."""
    from effjax.kernels.linear_attention import next_power_of_2

    chunk = max(16, next_power_of_2(chunk_size))  # the kernels' tiles
    log_decay = None
    if scale is not None and not causal:
        phi_k = phi_k * jnp.exp(scale - jnp.max(scale, axis=1, keepdims=True))[..., None]
    elif scale is not None:
        top = lax.cummax(scale, axis=1)  # running max M_t over the real keys so far (LOG_SCALE_FLOOR before any)
        phi_k = phi_k * jnp.exp(scale - top)[..., None]
        step = top - jnp.concatenate([top[:, :1], top[:, :-1]], axis=1)  # M_t - M_{t-1} >= 0
        log_decay = -jnp.minimum(step, 60.0)
    return dict(phi_q=phi_q, phi_k=phi_k, v=v, causal=causal, chunk_size=chunk, eps=eps, mask=mask,
                log_decay=log_decay)


def _segments_refusal(labels) -> str | None:
    return None if labels is None else "segment_ids (the linear kernels keep one state per row)"


def linear_attention(phi_q, phi_k, v, *, mask=None, segment_ids=None, method=NAME, impl="xla"):
    """Unnormalized bidirectional ``phi_q_i . sum_j phi_k_j v_j^T`` over the real keys j (of i's segment).

    Float32 ``[batch, q_len, heads, v_dim]``; padded keys' features and values are zeroed first.
    Other ``impl`` (``kernels.dispatch``): the "linear" op with ``normalize=False`` (no segment_ids).
    """
    check_impl(method, impl)
    phi_q, phi_k, v, mask, labels = _prepare(phi_q, phi_k, v, mask, segment_ids, False, method)
    xla = functools.partial(_contract, phi_q, phi_k, v, labels)
    if impl == "xla":
        return xla()
    call = dict(phi_q=phi_q, phi_k=phi_k, v=v, normalize=False, mask=mask)
    return dispatch.run("linear", impl, call, xla=xla, where=method, refuse=_segments_refusal(labels))


def _prepare(phi_q, phi_k, v, mask, segment_ids, causal, method):
    """Checks shapes; float32 features and values with padded keys zeroed, the bool mask, segment labels."""
    for label, x in (("phi_q", phi_q), ("phi_k", phi_k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{method}: {label} must have shape [batch, length, heads, dim], got {x.shape}.")
    batch, q_len, heads, m = phi_q.shape
    kv_len = phi_k.shape[1]
    if phi_k.shape != (batch, kv_len, heads, m) or v.shape[:3] != (batch, kv_len, heads):
        raise ValueError(f"{method}: phi_q {phi_q.shape}, phi_k {phi_k.shape} and v {v.shape} do not agree.")
    mask = check_mask(method, mask, batch, kv_len)
    labels = segment_labels(method, segment_ids, batch, q_len, kv_len)
    if labels is not None and causal:
        raise NotImplementedError(f"{method}: segment_ids with causal=True are not supported: the segmented "
                                  "form sums whole segments; a segmented prefix scan is not implemented.")
    phi_q, phi_k, v = (x.astype(jnp.float32) for x in (phi_q, phi_k, v))
    if mask is not None:
        phi_k = jnp.where(mask[:, :, None, None], phi_k, 0.0)
        v = jnp.where(mask[:, :, None, None], v, 0.0)
    return phi_q, phi_k, v, mask, labels


def _per_segment(fn, x, labels):
    """``fn(x [b*n, ...], flat labels, num_segments)`` per batch row, with labels offset per row."""
    batch, length = labels.shape
    flat = (labels + length * jnp.arange(batch, dtype=labels.dtype)[:, None]).reshape(-1)
    return fn(x.reshape(batch * length, *x.shape[2:]), flat, num_segments=batch * length), flat


def _contract(phi_q, phi_k, v, labels):
    """``phi_q_i . sum_j phi_k_j v_j^T`` over all keys j (labels None) or the keys of i's segment."""
    if labels is None:
        return jnp.einsum("bqhm,bhmd->bqhd", phi_q, jnp.einsum("bkhm,bkhd->bhmd", phi_k, v))
    outer = jnp.einsum("bkhm,bkhd->bkhmd", phi_k, v)
    state, flat = _per_segment(jax.ops.segment_sum, outer, labels)  # [b * n, h, m, d]
    return jnp.einsum("bqhm,bqhmd->bqhd", phi_q, state[flat].reshape(outer.shape))


def _bidirectional(phi_q, phi_k, v, scale, labels, eps):
    if labels is None:
        top = jnp.max(scale, axis=1, keepdims=True)  # [b, 1, h]: the largest real key scale
    else:
        seg_top, flat = _per_segment(jax.ops.segment_max, scale, labels)  # largest real key of each segment
        top = seg_top[flat].reshape(scale.shape)
    phi_k = phi_k * jnp.exp(scale - top)[..., None]
    ones = jnp.ones((*v.shape[:3], 1), v.dtype)
    out = _contract(phi_q, phi_k, jnp.concatenate([v, ones], axis=-1), labels)  # numerator | denominator
    return guarded_divide(out[..., :-1], out[..., -1], eps)


def _pad(x, before, after, value=0.0):
    if before == 0 and after == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (before, after)
    return jnp.pad(x, widths, constant_values=value)


def _causal(phi_q, phi_k, v, scale, chunk_size, eps):
    batch, q_len, heads, m = phi_q.shape
    kv_len = phi_k.shape[1]
    # End alignment: prepend dummy queries (kv_len > q_len) or empty keys (q_len > kv_len) so that
    # query i pairs with key i, then drop the dummy outputs.
    q_front, k_front = max(kv_len - q_len, 0), max(q_len - kv_len, 0)
    length = max(q_len, kv_len)
    chunk = min(chunk_size, length)
    num_chunks = -(-length // chunk)
    tail = num_chunks * chunk - length
    phi_q = _pad(phi_q, q_front, tail)
    phi_k, v = _pad(phi_k, k_front, tail), _pad(v, k_front, tail)
    scale = _pad(scale, k_front, tail, LOG_SCALE_FLOOR)

    def chunked(x):  # [b, n, h, ...] -> [chunks, b, h, chunk, ...]
        x = x.reshape(batch, num_chunks, chunk, heads, *x.shape[3:])
        return jnp.moveaxis(jnp.moveaxis(x, 1, 0), 3, 2)

    xs = tuple(chunked(x) for x in (phi_q, phi_k, v, scale))
    tri = jnp.tril(jnp.ones((chunk, chunk), bool))

    def step(carry, inputs):
        kv, z, prev = carry  # [b, h, m, d], [b, h, m], [b, h]: state in units of exp(-prev)
        pq, pk, vc, sc = inputs  # [b, h, c, m], [b, h, c, m], [b, h, c, d], [b, h, c]
        top = jnp.maximum(prev[..., None], lax.cummax(sc, axis=sc.ndim - 1))  # running max per query
        log_w = jnp.where(tri, sc[..., None, :] - top[..., :, None], -jnp.inf)
        scores = jnp.einsum("bhim,bhjm->bhij", pq, pk) * jnp.exp(log_w)
        carried = jnp.exp(prev[..., None] - top)  # [b, h, c]
        num = jnp.einsum("bhij,bhjd->bhid", scores, vc)
        num = num + jnp.einsum("bhim,bhmd->bhid", pq, kv) * carried[..., None]
        den = jnp.sum(scores, axis=-1) + jnp.einsum("bhim,bhm->bhi", pq, z) * carried
        end = top[..., -1]
        pk = pk * jnp.exp(sc - end[..., None])[..., None]
        decay = jnp.exp(prev - end)
        kv = kv * decay[..., None, None] + jnp.einsum("bhjm,bhjd->bhmd", pk, vc)
        z = z * decay[..., None] + jnp.sum(pk, axis=2)
        return (kv, z, end), guarded_divide(num, den, eps)

    init = (jnp.zeros((batch, heads, m, v.shape[-1]), jnp.float32), jnp.zeros((batch, heads, m), jnp.float32),
            jnp.full((batch, heads), LOG_SCALE_FLOOR, jnp.float32))
    _, out = lax.scan(step, init, xs)  # [chunks, b, h, c, d]
    out = jnp.moveaxis(jnp.moveaxis(out, 2, 3), 0, 1).reshape(batch, num_chunks * chunk, heads, -1)
    return out[:, q_front:q_front + q_len]


# ---- decoding: the running sums -------------------------------------------------------------------------------
# A causal kernel method decodes with the carry of ``_causal``: S = sum_j w_j phi_k_j v_j^T [batch, heads, m, v_dim],
# z = sum_j w_j phi_k_j [batch, heads, m] and top [batch, heads], the largest key log-scale so far, with
# w_j = exp(key_log_scale_j - top) (all scales 0, so top 0 and w 1, without a key_log_scale). Float32, constant in
# the context length. A prefill is the method's own causal forward plus these sums over each prompt's real keys; a
# step adds the new key and reads the query out of the sums, the same arithmetic as a query of ``_causal``.

STATE_AXES = {"kv": ("batch", "heads", None, "head_dim"), "z": ("batch", "heads", None), "top": ("batch", "heads")}


def state_init(batch: int, heads: int, features: int, v_dim: int) -> dict:
    """Empty running sums (boxed leaves, ``effjax.attention.decoding``): ``kv [batch, heads, features, v_dim]``,
    ``z [batch, heads, features]`` zeros, ``top [batch, heads]`` at LOG_SCALE_FLOOR (no key yet); float32."""
    return {"kv": decoding.boxed_zeros((batch, heads, features, v_dim), jnp.float32, STATE_AXES["kv"]),
            "z": decoding.boxed_zeros((batch, heads, features), jnp.float32, STATE_AXES["z"]),
            "top": decoding.boxed_full((batch, heads), LOG_SCALE_FLOOR, jnp.float32, STATE_AXES["top"])}


def _check_state(method, state, phi_k, v):
    want = (phi_k.shape[0], phi_k.shape[2], phi_k.shape[3], v.shape[-1])
    if tuple(state["kv"].shape) != want:
        raise ValueError(f"{method}: the cache's running sums were made for [batch, heads, features, v_dim] = "
                         f"{tuple(state['kv'].shape)}, got keys with features {tuple(phi_k.shape)} and values "
                         f"{tuple(v.shape)} (init_cache with this batch, heads and head_dim).")


def _log_scale(key_log_scale, shape):
    if key_log_scale is None:
        return jnp.zeros(shape, jnp.float32)
    return jax.lax.stop_gradient(key_log_scale.astype(jnp.float32))


def state_prefill(method: str, state: dict, phi_k, v, mask=None, key_log_scale=None) -> dict:
    """The running sums (``state``, empty) after each right-padded prompt's last real key: ``phi_k [batch, P,
    heads, m]``, ``v [batch, P, heads, v_dim]``, ``mask [batch, P]`` True on real tokens, ``key_log_scale`` as in
    ``normalized_attention``. Padded keys are left out."""
    _check_state(method, state, phi_k, v)
    _, phi_k, v, mask, _ = _prepare(phi_k, phi_k, v, mask, None, True, method)
    scale = _log_scale(key_log_scale, phi_k.shape[:3])
    if mask is not None:
        scale = jnp.where(mask[:, :, None], scale, LOG_SCALE_FLOOR)
    top = jnp.max(scale, axis=1)  # [b, h]; LOG_SCALE_FLOOR where a prompt has no real key
    phi_k = phi_k * jnp.exp(scale - top[:, None])[..., None]
    return {"kv": jnp.einsum("blhm,blhd->bhmd", phi_k, v), "z": jnp.sum(phi_k, axis=1), "top": top}


def state_step(method: str, state: dict, phi_k, v, key_log_scale=None) -> dict:
    """The running sums after one more key: ``phi_k [batch, 1, heads, m]``, ``v [batch, 1, heads, v_dim]``,
    ``key_log_scale [batch, 1, heads]`` (or None). The sums are rescaled to the new running max first."""
    _check_state(method, state, phi_k, v)
    scale = _log_scale(key_log_scale, phi_k.shape[:3])[:, 0]  # [b, h]
    phi_k, v = phi_k[:, 0].astype(jnp.float32), v[:, 0].astype(jnp.float32)  # [b, h, m], [b, h, d]
    top = jnp.maximum(state["top"], scale)
    decay, weight = jnp.exp(state["top"] - top), jnp.exp(scale - top)
    phi_k = phi_k * weight[..., None]
    return {"kv": state["kv"] * decay[..., None, None] + phi_k[..., :, None] * v[..., None, :],
            "z": state["z"] * decay[..., None] + phi_k, "top": top}


def state_read(state: dict, phi_q, eps=EPS):
    """``phi_q [batch, 1, heads, m]`` read out of the running sums: ``phi_q . S / phi_q . z`` (guarded as in the
    forward), float32 ``[batch, 1, heads, v_dim]``."""
    phi_q = phi_q[:, 0].astype(jnp.float32)
    num = jnp.einsum("bhm,bhmd->bhd", phi_q, state["kv"])
    den = jnp.einsum("bhm,bhm->bh", phi_q, state["z"])
    return guarded_divide(num, den, eps)[:, None]


def state_extend(method: str, state: dict, phi_q, phi_k, v, mask=None, key_log_scale=None, eps=EPS):
    """An extend (``effjax.attention.decoding``) of the running sums by a right-padded chunk: query ``i`` reads the
    sums before the chunk plus the chunk's real keys ``j <= i``, all weighted to its own running max (the largest
    key log-scale up to it, as a step's), so it equals ``state_step`` then ``state_read`` token by token; then the
    sums gain the chunk's real keys. ``phi_q, phi_k [batch, C, heads, m]``, ``v [batch, C, heads, v_dim]``,
    ``mask [batch, C]``. Returns ``(float32 [batch, C, heads, v_dim], state)``."""
    _check_state(method, state, phi_k, v)
    phi_q, phi_k, v, mask, _ = _prepare(phi_q, phi_k, v, mask, None, True, method)
    batch, length, heads, _ = phi_k.shape
    real = decoding.real_tokens(mask, batch, length)
    scale = jnp.where(real[:, :, None], _log_scale(key_log_scale, phi_k.shape[:3]), LOG_SCALE_FLOOR)  # [b, c, h]
    top = jnp.maximum(state["top"][:, None], jax.lax.cummax(scale, axis=1))  # each query's running max
    sees = jnp.tril(jnp.ones((length, length), bool))[None, :, :, None] & real[:, None, :, None]  # [b, i, j, 1]
    weight = jnp.where(sees, jnp.exp(scale[:, None, :, :] - top[:, :, None, :]), 0.0)  # [b, i, j, h]
    old = jnp.exp(state["top"][:, None] - top)  # [b, i, h]: the cached sums rescaled to query i's max
    scores = jnp.einsum("bihm,bjhm->bijh", phi_q, phi_k) * weight
    num = (jnp.einsum("bihm,bhmd->bihd", phi_q, state["kv"]) * old[..., None]
           + jnp.einsum("bijh,bjhd->bihd", scores, v))
    den = jnp.einsum("bihm,bhm->bih", phi_q, state["z"]) * old + scores.sum(axis=2)
    end = top[:, -1]  # [b, h]: the running max after the chunk
    keep = jnp.where(real[:, :, None], jnp.exp(scale - end[:, None]), 0.0)[..., None] * phi_k
    decay = jnp.exp(state["top"] - end)
    return guarded_divide(num, den, eps), {
        "kv": state["kv"] * decay[..., None, None] + jnp.einsum("bjhm,bjhd->bhmd", keep, v),
        "z": state["z"] * decay[..., None] + keep.sum(axis=1), "top": end}


def check_self_attention(method: str, q, k) -> None:
    """ValueError naming ``method`` for a decoding call whose keys are not the queries' tokens."""
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"{method}: decoding is self-attention: q and k must have the same length, got q_len "
                         f"{q.shape[1]} and kv_len {k.shape[1]}.")


def decode(method: str, state: dict, phi_q, phi_k, v, positions, mask, *, forward, key_log_scale=None, eps=EPS):
    """One decoding call (prefill or step) of a causal kernel method over its running sums.

    Prefill (``positions`` None): ``forward()`` (the method's own causal pass over the prompts) and
    ``state_prefill``. Step: ``state_step`` with the new key, then ``state_read`` of the query (float32). Extend:
    ``state_extend``. Returns ``(out, state)``.
    """
    if positions is None:
        return forward(), state_prefill(method, state, phi_k, v, mask, key_log_scale)
    if decoding.is_extend(phi_q, mask, positions):
        return state_extend(method, state, phi_q, phi_k, v, mask, key_log_scale, eps)
    state = state_step(method, state, phi_k, v, key_log_scale)
    return state_read(state, phi_q, eps), state
