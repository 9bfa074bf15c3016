"""The generalized delta rule with a diagonal-plus-low-rank transition (DPLR): RWKV-7's recurrence.

Per batch row and head, with the state ``S [d_k, d_v]`` (catalog ``linear_families.md`` Sec. 3.6, in effjax's
layout):

    u_t = S_{t-1}^T a_t                              (the removal reads the state BEFORE this step's decay)
    S_t = Diag(w_t) S_{t-1} + b_t u_t^T + k_t v_t^T  =  (Diag(w_t) + b_t a_t^T) S_{t-1} + k_t v_t^T
    o_t = S_t^T r_t                                   (r already scaled by the caller; RWKV-7 uses scale 1)

with a per-channel decay ``w_t = exp(log_w_t)`` in (0, 1] and vectors ``a_t, b_t``. RWKV-7 (Peng et al. 2025,
arXiv 2503.14456; the official numpy reference keeps ``S [d_v, d_k]``: ``S_t = S_{t-1}(Diag(w_t) - kappa_t
(alpha_t * kappa_t)^T) + v_t k_t^T``) is ``a = -kappa``, ``b = alpha * kappa``; fla's ``dplr`` ops use the same
names.

Three forms (``recurrent.FORMS``):
  * ``recurrent``: ``lax.scan`` over tokens, the equations above.
  * ``chunked``: inside a chunk of C tokens, with the chunk-local inclusive cumulative log-decay ``G_t`` (so
    ``gamma_t = exp(G_t)``) and the incoming state ``S_0``, unrolling gives
        u_t = a~_t^T S_0 + sum_{s<t} (a~_t . b^_s) u_s + sum_{s<t} (a~_t . k^_s) v_s,  a~_t = a_t gamma_{t-1}
    (the decay is exclusive on the ``a`` side, ``^`` divides by ``gamma_s``), so the pseudo-values U of the chunk
    solve one unit-lower-triangular system ``(I - StrictLower(A~ B^^T)) U = A~ S_0 + StrictLower(A~ K^^T) V``;
    then ``O = (R gamma) S_0 + (R^ K^^T o M) V + (R^ B^^T o M) U`` (``M``: causal with the diagonal) and
    ``S_C = Diag(gamma_C) S_0 + (B gamma_C / gamma)^T U + (K gamma_C / gamma)^T V``. Everything but the carry
    is parallel over chunks; ``lax.scan`` carries S from chunk to chunk (no token loop). Lengths the chunk does
    not divide are padded with tokens that leave the state unchanged (zero r, k, v, a, b and log-decay).
  * ``parallel``: the same with one chunk of the whole length: the materialised reference (no mask form
    exists, the catalog notes); O(L^2 d_k) memory and an O(L^3) solve, for short sequences only.

Numerics (catalog Sec. 2.4). The catalog's factors ``b^_s = b_s / gamma_s`` and ``k^_s = k_s / gamma_s`` grow like
``exp(-sum log w)`` inside a chunk (with RWKV-7's bound ``log w >= -0.6065`` up to ``exp(9.7)`` at chunk 16,
``exp(38.8)`` at 64, and past float32 from about 146): kernels that factor them into matmuls (fla, the official
CUDA code) must cap the chunk. They are never formed here: each pair gets ``exp(G_t - G_s)`` (``s <= t``) or
``exp(G_{t-1} - G_s)`` (``s < t``) directly, masked before ``exp`` (``recurrent.masked_exp``), so every exponent
is <= 0 and no chunk size overflows. What grows with the chunk is the memory of those ``[C, C, d_k]`` decay
tiles (C d_k floats per token, against d_k d_v / C for the chunk states): the default chunk is the official
kernel's 16; 32 and 64 (fla's RWKV-7 layer) are fine numerically. Cumulative sums restart at every chunk,
everything is float32 with float32 matmuls (``Precision.HIGHEST``).

Padding (``mask`` False): r, k, v, a, b and the log-decay are zeroed there (the step is the identity) and the
output is 0. Packing (``segment_ids``): runs of equal ids (``recurrent.run_starts``); the state restarts from 0
at each run start after position 0 and ``initial_state`` belongs to the first run. The chunked form masks the
four places of catalog Sec. 2.8: the intra-chunk pair matrices by same run, the reads of the incoming state by
"same run as the previous chunk's end", the state contributions by "same run as this chunk's end", and the
carry by "this chunk ends in the run the previous one ended in".
"""

import jax
import jax.numpy as jnp

from effjax.attention import recurrent

NAME = "dplr"
DEFAULT_CHUNK_SIZE = 16  # the official RWKV-7 kernel's CHUNK_LEN
PRECISION = jax.lax.Precision.HIGHEST


def dplr(r, k, v, log_w, a, b, *, form="chunked", chunk_size=DEFAULT_CHUNK_SIZE, initial_state=None,
         segment_ids=None, mask=None, method=NAME):
    """The DPLR recurrence over ``[batch, length, heads, dim]`` inputs (module docstring).

    ``r, k, log_w, a, b [batch, length, heads, d_k]`` (``log_w <= 0``), ``v [batch, length, heads, d_v]``;
    ``initial_state`` float32 ``[batch, heads, d_k, d_v]`` (None: zeros); ``mask [batch, length]`` True on real
    tokens; ``segment_ids [batch, length]``. Returns ``(out float32 [batch, length, heads, d_v], final_state
    float32 [batch, heads, d_k, d_v])``. ``method`` names the caller in error messages.
    """
    recurrent.check_form(method, form)
    if form == "chunked":
        recurrent.check_chunk_size(method, chunk_size)
    _check_inputs(method, r, k, v, log_w, a, b)
    batch, length, heads, d_k = k.shape
    d_v = v.shape[-1]
    recurrent.check_state(method, initial_state, (batch, heads, d_k, d_v))
    keep = recurrent.keep_mask(method, mask, batch, length)
    starts = recurrent.run_starts(method, segment_ids, batch, length)
    inputs = recurrent.zero_padded(keep, *(x.astype(jnp.float32) for x in (r, k, v, log_w, a, b)))
    state = jnp.zeros((batch, heads, d_k, d_v), jnp.float32) if initial_state is None else initial_state
    if form == "recurrent":
        starts = jnp.zeros((batch, length), bool) if starts is None else starts
        out, final = _token_scan(*inputs, starts, state)
    else:
        runs = recurrent.run_ids(starts, batch, length)
        out, final = _chunk_scan(*inputs, runs, state, chunk_size if form == "chunked" else length)
    if keep is not None:
        out = jnp.where(keep[:, :, None, None], out, 0.0)
    return out, final


def _check_inputs(method, r, k, v, log_w, a, b):
    named = {"r": r, "k": k, "v": v, "log_w": log_w, "a": a, "b": b}
    for label, x in named.items():
        if x.ndim != 4 or not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{method}: {label} must be a floating array [batch, length, heads, dim], "
                             f"got {x.dtype} {tuple(x.shape)}.")
    for label in ("r", "log_w", "a", "b"):
        if named[label].shape != k.shape:
            raise ValueError(f"{method}: {label} must have k's shape [batch, length, heads, d_k] = {tuple(k.shape)}, "
                             f"got {tuple(named[label].shape)}.")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"{method}: v must have shape [batch, length, heads, d_v] with k's batch, length and heads "
                         f"{tuple(k.shape[:3])}, got {tuple(v.shape)}.")
    recurrent.check_log_decay(method, log_w, "log_w")


def _token_scan(r, k, v, log_w, a, b, starts, state):
    """The recurrent form: one token at a time."""
    def step(s, token):
        r_t, k_t, v_t, log_w_t, a_t, b_t, start = token
        s = jnp.where(start[:, None, None, None], 0.0, s)
        removed = jnp.einsum("bhk,bhkv->bhv", a_t, s, precision=PRECISION)
        s = (jnp.exp(log_w_t)[..., None] * s + b_t[..., None] * removed[..., None, :]
             + k_t[..., None] * v_t[..., None, :])
        return s, jnp.einsum("bhk,bhkv->bhv", r_t, s, precision=PRECISION)

    per_token = tuple(jnp.moveaxis(x, 1, 0) for x in (r, k, v, log_w, a, b, starts))
    final, out = jax.lax.scan(step, state, per_token)
    return jnp.moveaxis(out, 0, 1), final


def _to_chunks(x, chunk):
    """``[batch, length, heads, d]`` -> ``[batch, heads, chunks, chunk, d]``, the tail padded with zeros."""
    batch, length, heads, dim = x.shape
    padded = -(-length // chunk) * chunk
    x = jnp.pad(x, [(0, 0), (0, padded - length), (0, 0), (0, 0)])
    return x.transpose(0, 2, 1, 3).reshape(batch, heads, padded // chunk, chunk, dim)


def _chunk_scan(r, k, v, log_w, a, b, runs, state, chunk):
    """The chunked form (``chunk`` = length: the parallel form)."""
    batch, length, heads, _ = k.shape
    r, k, v, log_w, a, b = (_to_chunks(x, chunk) for x in (r, k, v, log_w, a, b))
    # Padding tokens are the identity; they join the last run so that they mask nothing.
    runs = jnp.pad(runs, [(0, 0), (0, r.shape[2] * chunk - length)], mode="edge")
    runs = runs.reshape(batch, 1, -1, chunk)  # [batch, 1, chunks, chunk]
    previous_end = jnp.concatenate([jnp.zeros_like(runs[:, :, :1, -1]), runs[:, :, :-1, -1]], axis=2)
    terms = _chunk_terms(r, k, v, log_w, a, b, runs, previous_end)

    def carry(s, chunk_terms):
        solve_state, solve_values, b_tail, decay_end, kv_state = chunk_terms
        pseudo_values = _mm("bhck,bhkv->bhcv", solve_state, s) + solve_values
        s_next = decay_end[..., None] * s + _mm("bhck,bhcv->bhkv", b_tail, pseudo_values) + kv_state
        return s_next, s

    scanned = tuple(jnp.moveaxis(terms[name], 2, 0)
                    for name in ("solve_state", "solve_values", "b_tail", "decay_end", "kv_state"))
    final, incoming = jax.lax.scan(carry, state, scanned)
    incoming = jnp.moveaxis(incoming, 0, 2)  # [batch, heads, chunks, d_k, d_v]
    pseudo_values = _mm("bhnck,bhnkv->bhncv", terms["solve_state"], incoming) + terms["solve_values"]
    out = (_mm("bhnck,bhnkv->bhncv", terms["r_in"], incoming) + _mm("bhnts,bhnsv->bhntv", terms["rk"], v)
           + _mm("bhnts,bhnsv->bhntv", terms["rb"], pseudo_values))
    out = out.reshape(batch, heads, -1, v.shape[-1]).transpose(0, 2, 1, 3)[:, :length]
    return out, final


def _mm(spec, x, y):
    return jnp.einsum(spec, x, y, precision=PRECISION)


def _pair_products(x, y, decay):
    """``[..., t, s]`` of ``sum_d x_td y_sd decay_tsd``."""
    return jnp.einsum("...td,...sd,...tsd->...ts", x, y, decay, precision=PRECISION)


def _chunk_terms(r, k, v, log_w, a, b, runs, previous_end):
    """Everything of each chunk that does not depend on its incoming state, parallel over chunks.

    Inputs ``[batch, heads, chunks, chunk, d]``; ``runs [batch, 1, chunks, chunk]`` and ``previous_end
    [batch, 1, chunks]`` (the run of the previous chunk's last token; 0 for the first chunk).
    """
    chunk = k.shape[-2]
    cum = jnp.cumsum(log_w, axis=-2)  # G_t, inclusive, local to the chunk
    cum_before = cum - log_w  # G_{t-1}: the a side reads the state before its own decay
    position = jnp.arange(chunk)
    same_run = runs[..., :, None] == runs[..., None, :]
    upto = (position[:, None] >= position[None, :]) & same_run
    before = (position[:, None] > position[None, :]) & same_run
    decay_upto = recurrent.masked_exp(cum[..., :, None, :] - cum[..., None, :, :], upto[..., None])
    decay_before = recurrent.masked_exp(cum_before[..., :, None, :] - cum[..., None, :, :], before[..., None])

    reads_state = (runs == previous_end[..., None])[..., None]  # [batch, 1, chunks, chunk, 1]
    a_in = jnp.where(reads_state, a * jnp.exp(cum_before), 0.0)
    r_in = jnp.where(reads_state, r * jnp.exp(cum), 0.0)

    # (I - StrictLower(A~ B^^T)) [W | U0] = [A~ | StrictLower(A~ K^^T) V]: the pseudo-values are W S_0 + U0.
    system = jnp.eye(chunk) - _pair_products(a, b, decay_before)
    rhs = jnp.concatenate([a_in, _mm("...ts,...sv->...tv", _pair_products(a, k, decay_before), v)], axis=-1)
    solved = jax.lax.linalg.triangular_solve(system, rhs, left_side=True, lower=True, unit_diagonal=True)

    end_run = runs[..., -1:]
    to_end = recurrent.masked_exp(cum[..., -1:, :] - cum, (runs == end_run)[..., None])  # gamma_C / gamma_s
    keeps_carry = (end_run[..., 0] == previous_end)[..., None]
    return {
        "solve_state": solved[..., :a.shape[-1]],
        "solve_values": solved[..., a.shape[-1]:],
        "b_tail": b * to_end,
        "decay_end": jnp.where(keeps_carry, jnp.exp(cum[..., -1, :]), 0.0),
        "kv_state": _mm("...sk,...sv->...kv", k * to_end, v),
        "r_in": r_in,
        "rk": _pair_products(r, k, decay_upto),
        "rb": _pair_products(r, b, decay_upto),
    }
