"""The (gated) delta rule in three forms: what ``deltanet`` and ``gated_deltanet`` share (catalog Sec. 2.3, 3.3, 3.4).

Per batch row and head, with the state ``S [d_k, d_v]`` (float32), a write strength ``beta_t`` and a scalar
decay ``a_t = exp(g_t)`` (``g_t <= 0``; ``g = 0``: DeltaNet):

    S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,    o_t = S_t^T q_t

(Schlag et al. 2021; Yang et al. 2024, arXiv 2406.06484; gated: Yang et al. 2025, arXiv 2412.06464). q is
already scaled by the caller. The forms (``recurrent.FORMS``):

  * ``recurrent``: the token recurrence above, a ``lax.scan`` over tokens;
  * ``chunked``: the WY/UT form of Sec. 2.3 per chunk of C tokens, with b the chunk-local inclusive cumsum of g
    and Gamma_ij = exp(b_i - b_j) (j <= i):
        A = I + StrictLower(Diag(beta) K K^T o Gamma),  [U | W] = A^-1 [Diag(beta) V | Diag(beta) (K o exp(b))],
        V_new = U - W S,  O = (Q o exp(b)) S + (Q K^T o Gamma o M_incl) V_new,
        S' = exp(b_C) S + (K o exp(b_C - b))^T V_new;
    everything but the last three lines is computed for all chunks at once, and a ``lax.scan`` over chunks carries
    S through those three; A^-1 is one unit-lower-triangular solve (``solve_triangular``) in float32;
  * ``parallel``: the same formulas with one chunk of the whole length (C = L): materialised and quadratic, the
    reference.

Packing (``segment_ids``, as runs, ``recurrent.run_starts``) is masked in the four places of Sec. 2.8 in the
chunked form: A and Q K^T by [same run]; the state read (Q o exp(b)) S and the rows of W by [run = run of the
previous chunk's last token]; the chunk-state contributions by [run = run of this chunk's last token]; the carry
exp(b_C) S by [this chunk's last run = the previous chunk's last run]. Padding (``mask`` False) zeroes q, k, v,
beta and g there: the state passes unchanged and the output is 0.
"""

import functools

import jax
import jax.numpy as jnp

from effjax.attention import recurrent
from effjax.kernels import dispatch
from effjax.kernels.backend import check_impl

NAME = "delta_rule"
DEFAULT_CHUNK_SIZE = 64
QK_NORM_EPS = 1e-6  # fla's l2norm: x / sqrt(sum x^2 + eps)
# float32 products at full precision: TF32/bf16 passes would make the three forms disagree on accelerators.
einsum = functools.partial(jnp.einsum, precision=jax.lax.Precision.HIGHEST)


def qk_l2_norm(x, eps: float = QK_NORM_EPS):
    """``x * rsqrt(sum(x^2) + eps)`` over the last axis in float32 (fla's ``l2norm``, used in its delta kernels)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def delta_rule(q, k, v, beta, log_decay=None, *, form="chunked", chunk_size=DEFAULT_CHUNK_SIZE, initial_state=None,
               segment_ids=None, mask=None, method=NAME, impl="xla"):
    """``(out [batch, length, heads, d_v], final_state [batch, heads, d_k, d_v])``, both float32.

    ``q, k [batch, length, heads, d_k]``, ``v [batch, length, heads, d_v]``; ``beta [batch, length, heads]``;
    ``log_decay [batch, length, heads]`` (g <= 0; None: no decay, DeltaNet); ``initial_state`` float32
    ``[batch, heads, d_k, d_v]`` (None: zeros), which belongs to the first run of ``segment_ids``; ``mask``
    ``[batch, length]`` True on real tokens. Errors name ``method``.

    ``impl`` (``kernels.dispatch``, op "delta"; e.g. "pallas"): the chunked form on the chunked delta-rule kernel
    (``kernels/delta_rule.py``, ``kernels/tpu_delta.py``), falling back to this chunked form where ``impl`` lists
    xla; the parallel and recurrent forms always run here.
    """
    check_impl(method, impl)
    _check_inputs(method, q, k, v, beta, log_decay, form, chunk_size, initial_state)
    batch, length, heads, d_k = k.shape
    keep = recurrent.keep_mask(method, mask, batch, length)
    starts = recurrent.run_starts(method, segment_ids, batch, length)
    if log_decay is None:
        log_decay = jnp.zeros((batch, length, heads), jnp.float32)
    per_token = (x.astype(jnp.float32) for x in (q, k, v, beta, log_decay))
    q, k, v, beta, log_decay = recurrent.zero_padded(keep, *per_token)
    state = jnp.zeros((batch, heads, d_k, v.shape[-1]), jnp.float32) if initial_state is None else initial_state
    if form == "recurrent":
        return _token_scan(q, k, v, beta, log_decay, starts, state)
    runs = recurrent.run_ids(starts, batch, length)
    chunk = length if form == "parallel" else chunk_size
    xla = functools.partial(_chunk_scan, q, k, v, beta, log_decay, runs, state, chunk)
    if impl == "xla" or form == "parallel":
        return xla()
    call = dict(q=q, k=k, v=v, beta=beta, log_decay=log_decay, chunk_size=chunk_size, segment_ids=runs,
                initial_state=state, return_state=True)
    return dispatch.run("delta", impl, call, xla=xla, where=method)


def _check_inputs(method, q, k, v, beta, log_decay, form, chunk_size, initial_state):
    recurrent.check_form(method, form)
    recurrent.check_chunk_size(method, chunk_size)
    for label, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4 or not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{method}: {label} must be a float array [batch, length, heads, dim], "
                             f"got {x.dtype} {tuple(x.shape)}.")
    if q.shape != k.shape or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"{method}: q and k must share [batch, length, heads, d_k] and v its first three axes, "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}.")
    for label, x in (("beta", beta), ("log_decay", log_decay)):
        if x is not None and (tuple(x.shape) != tuple(k.shape[:3]) or not jnp.issubdtype(x.dtype, jnp.floating)):
            raise ValueError(f"{method}: {label} must be a float array [batch, length, heads] = "
                             f"{tuple(k.shape[:3])}, got {x.dtype} {tuple(x.shape)}.")
    recurrent.check_log_decay(method, log_decay)
    recurrent.check_state(method, initial_state, (*k.shape[:1], k.shape[2], k.shape[3], v.shape[3]))


def _token_scan(q, k, v, beta, log_decay, starts, state):
    """The recurrence, one token at a time; the state restarts from 0 at every run start."""
    if starts is None:
        starts = jnp.zeros(k.shape[:2], bool)

    def step(s, token):
        q_t, k_t, v_t, beta_t, g_t, start = token
        s = jnp.where(start[:, None, None, None], 0.0, s)
        recalled = einsum("bhk,bhkv->bhv", k_t, s)
        s = s - beta_t[..., None, None] * k_t[..., :, None] * recalled[..., None, :]
        s = jnp.exp(g_t)[..., None, None] * s + beta_t[..., None, None] * k_t[..., :, None] * v_t[..., None, :]
        return s, einsum("bhk,bhkv->bhv", q_t, s)

    tokens = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, beta, log_decay, starts))
    state, out = jax.lax.scan(step, state, tokens)
    return jnp.moveaxis(out, 0, 1), state


def _chunk_scan(q, k, v, beta, log_decay, runs, state, chunk):
    """Sec. 2.3 per chunk of ``chunk`` tokens (the length padded with zero k, v, beta and g), a scan over chunks."""
    batch, length, heads, _ = k.shape
    pad = -length % chunk
    count = (length + pad) // chunk

    def split(x):  # [batch, length, heads, ...] -> [batch, heads, chunks, chunk, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(batch, count, chunk, *x.shape[2:]), 3, 1)

    # The pad continues the last run, so it neither cuts the carry nor adds to the state.
    runs = jnp.pad(runs, [(0, 0), (0, pad)], mode="edge").reshape(batch, 1, count, chunk)
    terms = _chunk_terms(*map(split, (q, k, v, beta, log_decay)), runs)
    state, out = jax.lax.scan(_carry, state, tuple(jnp.moveaxis(t, 2, 0) for t in terms))
    out = jnp.moveaxis(out, 0, 2).reshape(batch, heads, count * chunk, -1)
    return jnp.moveaxis(out, 1, 2)[:, :length], state


def _chunk_terms(q, k, v, beta, log_decay, runs):
    """Everything of Sec. 2.3 that does not need the incoming state, for all chunks at once.

    Inputs ``[batch, heads, chunks, chunk, ...]``, ``runs [batch, 1, chunks, chunk]``. Returns the pseudo-values
    U, the rows W, the decayed queries that read the incoming state, the intra-chunk matrix, the decayed keys that
    write the outgoing state, and the carry factor ``[batch, heads, chunks]``.
    """
    chunk = k.shape[3]
    b = jnp.cumsum(log_decay, axis=-1)  # chunk-local, inclusive
    previous_last = jnp.concatenate([jnp.zeros_like(runs[:, :, :1, -1:]), runs[:, :, :-1, -1:]], axis=2)
    last = runs[..., -1:]
    position = jnp.arange(chunk)
    same_run = runs[..., :, None] == runs[..., None, :]  # (1) A and Q K^T
    gamma = recurrent.masked_exp(b[..., :, None] - b[..., None, :],
                                 (position[:, None] >= position[None, :]) & same_run)
    strict = position[:, None] > position[None, :]
    a = jnp.eye(chunk) + jnp.where(strict, beta[..., :, None] * einsum("...id,...jd->...ij", k, k) * gamma, 0.0)
    reads = runs == previous_last  # (2) the state read and the rows of W
    read_decay = recurrent.masked_exp(b, reads)[..., None]
    right = jnp.concatenate([beta[..., None] * v, beta[..., None] * k * read_decay], axis=-1)
    solved = jax.scipy.linalg.solve_triangular(a, right, lower=True, unit_diagonal=True)
    u, w = solved[..., :v.shape[-1]], jnp.where(reads[..., None], solved[..., v.shape[-1]:], 0.0)
    intra = einsum("...id,...jd->...ij", q, k) * gamma
    writes = runs == last  # (3) the chunk-state contributions
    write_decay = recurrent.masked_exp(b[..., -1:] - b, writes)[..., None]
    carry = recurrent.masked_exp(b[..., -1], (last == previous_last)[..., 0])  # (4) the carry
    return u, w, q * read_decay, intra, k * write_decay, carry


def _carry(state, terms):
    """One chunk given its incoming state: V_new = U - W S, its outputs and its outgoing state."""
    u, w, q_read, intra, k_write, carry = terms
    v_new = u - einsum("bhck,bhkv->bhcv", w, state)
    out = einsum("bhck,bhkv->bhcv", q_read, state) + einsum("bhij,bhjv->bhiv", intra, v_new)
    state = carry[..., None, None] * state + einsum("bhck,bhcv->bhkv", k_write, v_new)
    return state, out
