"""Informer ProbSparse self-attention (Zhou et al., AAAI 2021, Sec. 3.1, Eq. 3-4 and Algorithm 1)."""

import math

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

from effjax.attention import decoding, softmax
from effjax.attention._capabilities import Capabilities
from effjax.attention.common import check_mask, check_qkv, dropout_kwargs, refuse_segments

NAME = "probsparse"
CAPABILITIES = Capabilities(
    causal=True, mask=True, segments=False, cross=True, dropout=True, pallas=False,
    decode=True, extend=True,
    notes="causal cross attention is refused (the lazy queries' running mean is over the query positions). Decoding "
          "keeps a key/value cache of max_length slots and each cached query's sparsity M (float32 per head), and "
          "reproduces the causal forward over max_length tokens (u and the sample count follow ln max_length).",
)


def sample_sizes(factor: int, q_len: int, kv_len: int) -> tuple[int, int]:
    """(keys sampled per query, queries kept) = c * ceil(ln L_K), c * ceil(ln L_Q), capped at the lengths."""
    if not isinstance(factor, int) or factor < 1:
        raise ValueError(f"{NAME}: factor must be a positive int, got {factor!r}.")
    samples = min(factor * max(math.ceil(math.log(kv_len)), 1), kv_len)
    top = min(factor * max(math.ceil(math.log(q_len)), 1), q_len)
    return samples, top


def query_draws(rng, positions, heads: int, num_samples: int, *, shared=False):
    """Uniform draws ``[batch, heads, n, num_samples]`` for the queries at ``positions [batch, n]``: row b's query
    at position i draws from ``fold_in(fold_in(rng, i), b)`` (``shared``: ``fold_in(rng, i)``, one draw for all
    rows and heads, ``[batch, 1, n, num_samples]``), so a query's sample depends on neither the length nor the
    batch (a decoding step draws the forward's, whatever position each row is at)."""
    batch, n = positions.shape
    rows = jnp.broadcast_to(jnp.arange(batch)[:, None], (batch, n))

    def draw(i, b):
        key = jax.random.fold_in(rng, i)
        if shared:
            return jax.random.uniform(key, (1, num_samples))
        return jax.random.uniform(jax.random.fold_in(key, b), (heads, num_samples))

    return jnp.swapaxes(jax.vmap(jax.vmap(draw))(positions, rows), 1, 2)


def sample_slots(draws, count):
    """Sample indices ``floor(u * count)`` among each query's ``count [batch, n]`` visible real keys (clipped)."""
    count = count[:, None, :, None]
    return jnp.clip(jnp.floor(draws * count).astype(jnp.int32), 0, jnp.maximum(count - 1, 0))


def sample_keys(rng, mask, q_len: int, heads: int, num_samples: int, *, causal=False, shared=False):
    """Key indices ``[batch, heads, q_len, num_samples]`` drawn uniformly with replacement from the real keys
    each query may see (causal: keys j <= i), and ``valid [batch, 1, q_len, 1]`` (False: no key to draw).

    ``shared=True`` (the reference) uses one uniform draw for all batch rows and heads. The draws are
    ``query_draws``': query i's come from ``rng`` folded with i (and the row), whatever the length.
    """
    batch, kv_len = mask.shape
    # Real key positions first, in order: the first n entries are the n earliest real keys.
    order = jnp.argsort(~mask, axis=1, stable=True)
    if causal:
        count = jnp.cumsum(mask, axis=1)[:, :q_len]  # q_len == kv_len
    else:
        count = jnp.broadcast_to(jnp.sum(mask, axis=1, keepdims=True), (batch, q_len))
    positions = jnp.broadcast_to(jnp.arange(q_len)[None, :], (batch, q_len))
    slot = sample_slots(query_draws(rng, positions, heads, num_samples, shared=shared), count)
    index = order[jnp.arange(batch)[:, None, None, None], slot]
    return jnp.broadcast_to(index, (batch, heads, q_len, num_samples)), (count > 0)[:, None, :, None]


def sparsity(q, k, index, valid, divisor=None):
    """M_i = max_s q_i.k_s - sum_s q_i.k_s / divisor over the sampled keys (Eq. 4 on the sample), [b, h, q].

    ``divisor=None`` divides by the number of samples (max minus mean); the reference divides by L_K.
    Queries without a valid sample get -inf.
    """
    batch, heads = index.shape[:2]
    sampled = k[jnp.arange(batch)[:, None, None, None], jnp.arange(heads)[None, :, None, None], index]
    scores = jnp.einsum("bhqd,bhqsd->bhqs", q, sampled)
    divisor = index.shape[-1] if divisor is None else divisor
    measure = jnp.max(scores, axis=-1) - jnp.sum(scores, axis=-1) / divisor
    return jnp.where(valid[..., 0], measure, -jnp.inf)


def causal_selection(measure, num_top: int):
    """Boolean [b, h, L]: query i is active when fewer than ``num_top`` queries j <= i rank above it by M.

    The causal stand-in for the reference's top-u over all queries, which lets later tokens decide which
    earlier queries attend. The last query is ranked exactly as by top-u; the first ``num_top`` are active.
    """
    length = measure.shape[-1]
    i, j = jnp.arange(length)[:, None], jnp.arange(length)[None, :]
    mi, mj = measure[..., :, None], measure[..., None, :]
    above = (j <= i) & ((mj > mi) | ((mj == mi) & (j < i)))
    return jnp.sum(above, axis=-1) < num_top


def lazy_context(v, mask, causal, cumulative_sum=False):
    """The output of queries that get no attention: the mean of the real values (causal: of those up to i,
    or their plain sum with ``cumulative_sum``, as the reference). [b, h, L, d] in float32."""
    v = jnp.where(mask[:, None, :, None], v, 0.0)
    count = mask.astype(jnp.float32)[:, None, :, None]
    if causal:
        total = jnp.cumsum(v, axis=2)
        return total if cumulative_sum else total / jnp.maximum(jnp.cumsum(count, axis=2), 1.0)
    return jnp.sum(v, axis=2, keepdims=True) / jnp.maximum(jnp.sum(count, axis=2, keepdims=True), 1.0)


def _softmax_rows(q, k, v, allowed, dropout_rate, dropout_rng):
    """softmax(q k^T / sqrt d) v for q [b, h, n, d] over k, v [b, h, L, d]; ``allowed`` broadcasts to scores."""
    scores = jnp.einsum("bhnd,bhkd->bhnk", q, k) / jnp.sqrt(jnp.float32(q.shape[-1]))
    weights = softmax.masked_weights(scores, allowed, dropout_rate=dropout_rate, dropout_rng=dropout_rng)
    return jnp.einsum("bhnk,bhkd->bhnd", weights, v)


def attend(q, k, v, *, mask=None, segment_ids=None, causal=False, factor=5, rng=None, reference_quirks=False,
           dropout_rate=0.0, dropout_rng=None):
    """ProbSparse attention: the ``u = c ceil(ln L_Q)`` queries with the largest sparsity M get softmax over all
    keys, the others the mean of the values (causal: the running mean up to i).

    M is measured on ``c ceil(ln L_K)`` keys per query sampled from ``rng`` (``None``: a fixed key 0) among the
    real keys the query may see. Padded keys are excluded from the samples, from the softmax and from the
    mean; with q_len == kv_len (self-attention) padded queries are never kept. Non-causal keeps the top-u
    queries by M (only their u x L_K scores are computed). Causal (self-attention only) keeps query i when
    fewer than u earlier-or-equal queries have a larger M (``causal_selection``), so nothing depends on later
    tokens; it computes the causal scores densely. ``reference_quirks=True`` reproduces the reference's
    cumulative *sum* for causal lazy queries, one key sample shared by batch and heads, and M's divisor L_K.
    ``segment_ids`` raise NotImplementedError.
    """
    return _attend(q, k, v, mask=mask, segment_ids=segment_ids, causal=causal, factor=factor, rng=rng,
                   reference_quirks=reference_quirks, dropout_rate=dropout_rate, dropout_rng=dropout_rng)[0]


def _attend(q, k, v, *, mask, segment_ids, causal, factor, rng, reference_quirks, dropout_rate, dropout_rng,
            size_length=None):
    """``attend``, returning ``(out, M [batch, heads, q_len])``. ``size_length`` (decoding's prefill: max_length)
    sets u, the sample count and the reference's divisor L_K as for that length: the outputs are those of the
    causal forward over ``size_length`` tokens on this prefix."""
    check_qkv(NAME, q, k, v)
    refuse_segments(NAME, segment_ids, "the lazy queries' mean of V would need one mean per segment.")
    batch, q_len, heads, head_dim = q.shape
    kv_len = k.shape[1]
    if causal and q_len != kv_len:
        raise NotImplementedError(f"{NAME}: causal cross attention (q_len {q_len} != kv_len {kv_len}) is not "
                                  "supported: the causal lazy context is a running mean over the query's own "
                                  "positions, as in the reference (self-attention only).")
    mask = check_mask(NAME, mask, batch, kv_len)
    if mask is None:
        mask = jnp.ones((batch, kv_len), bool)
    sizes = (q_len, kv_len) if size_length is None else (size_length, size_length)
    num_samples, num_top = sample_sizes(factor, *sizes)
    rng = jax.random.key(0) if rng is None else rng
    qh, kh, vh = (jnp.swapaxes(x.astype(jnp.float32), 1, 2) for x in (q, k, v))  # [b, h, L, d]

    index, valid = sample_keys(rng, mask, q_len, heads, num_samples, causal=causal, shared=reference_quirks)
    measure = sparsity(lax.stop_gradient(qh), lax.stop_gradient(kh), index, valid,
                       divisor=sizes[1] if reference_quirks else None)
    if q_len == kv_len:
        measure = jnp.where(mask[:, None, :], measure, -jnp.inf)
    lazy = lazy_context(vh, mask, causal, cumulative_sum=reference_quirks)
    if causal:
        allowed = mask[:, None, None, :] & jnp.tril(jnp.ones((q_len, kv_len), bool))
        active = _softmax_rows(qh, kh, vh, allowed, dropout_rate, dropout_rng)
        out = jnp.where(causal_selection(measure, num_top)[..., None], active, lazy)
    else:
        _, top = lax.top_k(measure, num_top)  # [b, h, u]
        rows = (jnp.arange(batch)[:, None, None], jnp.arange(heads)[None, :, None], top)
        active = _softmax_rows(qh[rows], kh, vh, mask[:, None, None, :], dropout_rate, dropout_rng)
        out = jnp.broadcast_to(lazy, (batch, heads, q_len, head_dim)).at[rows].set(active)
    return jnp.swapaxes(out, 1, 2).astype(q.dtype), measure


def decode(q, k, v, cache, positions, mask, *, rng, factor, reference_quirks, forward):
    """A decoding call (``effjax.attention.decoding``) of causal ProbSparse attention over a key/value cache of
    ``max_length`` slots and each cached query's M (``measure [batch, max_length, heads]``).

    Prefill: ``forward()`` (``_attend`` with u and the sample count of max_length) and the cache. Step at position
    i: M_i on the keys ``query_draws`` gives query i (the forward's sample among keys j <= i), query i is active
    when fewer than u earlier queries have M_j >= M_i (``causal_selection``) and then takes the softmax over keys
    j <= i, else the mean (``reference_quirks``: the sum) of the values j <= i.
    """
    max_length = cache["kv"]["key"].shape[1]
    if positions is None:
        (out, measure), kv = decoding.kv_decode(NAME, q, k, v, cache["kv"], None, mask, forward=forward)
        measure = jnp.pad(jnp.swapaxes(measure, 1, 2), [(0, 0), (0, max_length - q.shape[1]), (0, 0)],
                          constant_values=-jnp.inf)
        return out, {"kv": kv, "measure": measure}
    batch, _, heads, _ = q.shape
    num_samples, num_top = sample_sizes(factor, max_length, max_length)
    kv = decoding.kv_step(cache["kv"], k, v, positions)
    keys, values = kv["key"].astype(jnp.float32), kv["value"].astype(jnp.float32)
    # Position p lives in slot p (max_length slots), and the keys j <= i of a step are all real: the sampled
    # slots are the sampled key positions.
    draws = query_draws(rng, positions[:, None], heads, num_samples, shared=reference_quirks)
    index = jnp.broadcast_to(sample_slots(draws, positions[:, None] + 1), (batch, heads, 1, num_samples))
    measure = sparsity(jnp.swapaxes(q.astype(jnp.float32), 1, 2), jnp.swapaxes(keys, 1, 2), index,
                       jnp.ones((batch, 1, 1, 1), bool), divisor=max_length if reference_quirks else None)[..., 0]
    held = kv["position"]
    earlier = ((held >= 0) & (held < positions[:, None]))[:, :, None]
    above = jnp.sum(earlier & (cache["measure"] >= measure[:, None, :]), axis=1)  # [b, h]: ties go to the earlier
    allowed = decoding.kv_allowed(kv, positions)
    active = softmax.attend(q.astype(jnp.float32), keys, values, mask=allowed)
    total = jnp.sum(jnp.where(allowed[:, :, None, None], values, 0.0), axis=1, keepdims=True)
    lazy = total if reference_quirks else total / jnp.maximum(jnp.sum(allowed, axis=1), 1)[:, None, None, None]
    out = jnp.where((above < num_top)[:, None, :, None], active, lazy).astype(q.dtype)
    here = (jnp.arange(max_length)[None, :] == positions[:, None])[:, :, None]
    return out, {"kv": kv, "measure": jnp.where(here, measure[:, None, :], cache["measure"])}


class Attention(nn.Module):
    """Linen wrapper of ``attend``.

    ``factor`` is the reference's c = 5. ``resample=True`` (the reference's behaviour) draws a fresh key
    sample from the ``random`` RNG stream on every call with ``deterministic=False``; with
    ``deterministic=True`` (or ``resample=False``) the sample is drawn from ``jax.random.key(eval_seed)``, so
    evaluation is reproducible (the reference samples anew at eval too). ``reference_quirks``: see ``attend``.
    ``dropout_rate`` applies to the kept queries' attention weights (the reference defines a dropout in
    ProbAttention but never applies it).
    """

    factor: int = 5
    resample: bool = True
    eval_seed: int = 0
    reference_quirks: bool = False
    dropout_rate: float = 0.0

    def init_cache(self, batch, max_length, heads, head_dim, dtype):
        """``{"kv": the key/value cache of max_length slots, "measure": each cached query's sparsity M, float32
        [batch, max_length, heads]}`` (``effjax.attention.decoding``, ``decode``)."""
        measure = decoding.boxed_full((batch, max_length, heads), -jnp.inf, jnp.float32, ("batch", "length", "heads"))
        return {"kv": decoding.kv_init(batch, max_length, heads, head_dim, dtype), "measure": measure}

    @nn.compact
    def __call__(self, q, k, v, *, mask=None, segment_ids=None, causal=False, deterministic=True, cache=None,
                 positions=None):
        """``cache``: a decoding call (prefill, or a step with ``positions``; ``decoding``, ``decode``), returns
        ``(out, cache)``. Decoding always samples from ``key(eval_seed)``: the prefill and the steps draw from one
        key, as one forward pass does."""
        fresh = self.resample and not deterministic and cache is None
        rng = self.make_rng("random") if fresh else jax.random.key(self.eval_seed)
        call = dict(mask=mask, segment_ids=segment_ids, causal=causal, factor=self.factor, rng=rng,
                    reference_quirks=self.reference_quirks, **dropout_kwargs(self, deterministic))
        if cache is None:
            return attend(q, k, v, **call)
        decoding.check_call(NAME, q, causal=causal, segment_ids=segment_ids, positions=positions)
        max_length = cache["kv"]["key"].shape[1]
        settings = dict(rng=rng, factor=self.factor, reference_quirks=self.reference_quirks)
        if positions is not None:
            return decoding.stepped(lambda q, k, v, c, p: decode(q, k, v, c, p, None, **settings, forward=None),
                                    q, k, v, cache, positions, mask)
        return decode(q, k, v, cache, None, mask, **settings,
                      forward=lambda: _attend(q, k, v, **call, size_length=max_length))
