"""Scatterbrain (Chen, Dao et al., NeurIPS 2021, Sec. 3): local-window sparse + Performer low rank (S + Phi Phi^T)."""

import math

import jax.numpy as jnp
from flax import linen as nn
from jax import lax

from effjax.attention import decoding, performer
from effjax.attention import kernel_attention as ka
from effjax.attention._capabilities import Capabilities
from effjax.attention.common import allowed_pairs, check_mask, check_qkv, dropout, dropout_kwargs, refuse_segments

NAME = "scatterbrain"
CAPABILITIES = Capabilities(causal=True, mask=True, segments=False, cross=True, dropout=True, pallas=False,
                            decode=True, extend=True,
                            notes="decoding keeps a key/value ring of the causal band's window // 2 + 1 keys "
                                  "(at most max_length) and the low-rank running sums sum phi(k) v^T, sum phi(k) "
                                  "and the running key max in float32: constant in the context length; it runs "
                                  "deterministic (no dropout).")


def default_num_features(head_dim: int) -> int:
    """The reference's number of projection rows, floor(d ln d) (at least 1)."""
    return max(1, int(head_dim * math.log(head_dim)))


def local_band(q_len: int, kv_len: int, window: int):
    """[q_len, kv_len]: the ``window`` keys j with -(window // 2) <= j - i < window - window // 2.

    That is the reference's [i - w/2, i + w/2) for even w and i +- (w - 1)/2 for odd w; ``window=0`` is
    empty and ``window >= 2 * max(q_len, kv_len)`` covers every key. Queries are aligned to the end.
    """
    i = jnp.arange(q_len)[:, None] + (kv_len - q_len)
    j = jnp.arange(kv_len)[None, :]
    return (j - i >= -(window // 2)) & (j - i < window - window // 2)


def _prefix_states(log_scale, state):
    """Running sums of ``state [b, n, h, ...]`` in units of exp(-running max of ``log_scale [b, n, h]``)."""

    def combine(a, b):
        (sa, xa), (sb, xb) = a, b
        top = jnp.maximum(sa, sb)
        grow = tuple(range(top.ndim, xa.ndim))
        return top, (xa * jnp.expand_dims(jnp.exp(sa - top), grow) + xb * jnp.expand_dims(jnp.exp(sb - top), grow))

    return lax.associative_scan(combine, (log_scale, state), axis=1)


def _low_rank_sums(phi_k, values, key_scale, causal, q_len):
    """sum_j exp(key_scale_j - top_i) phi_k_j values_j^T over the keys query i may see, and top_i.

    Returns ``[b, q_len, h, m, e]`` states and ``top [b, q_len, h]`` (the largest key scale seen; ka.LOG_SCALE_FLOOR if
    none). Bidirectional: one state for all queries; causal: prefix states aligned to the end.
    """
    state = jnp.einsum("bkhm,bkhe->bkhme", phi_k, values)
    kv_len = phi_k.shape[1]
    if not causal:
        top = jnp.max(key_scale, axis=1, keepdims=True)  # [b, 1, h]
        total = jnp.einsum("bkh,bkhme->bhme", jnp.exp(key_scale - top), state)
        return total[:, None], top
    top, prefix = _prefix_states(key_scale, state)
    offset = kv_len - q_len
    if offset >= 0:
        return prefix[:, offset:], top[:, offset:]
    # More queries than keys: the first -offset queries see no key.
    front = -offset
    prefix = jnp.pad(prefix, [(0, 0), (front, 0)] + [(0, 0)] * (prefix.ndim - 2))
    top = jnp.pad(top, [(0, 0), (front, 0), (0, 0)], constant_values=ka.LOG_SCALE_FLOOR)
    return prefix, top


def attend(q, k, v, projection, *, mask=None, segment_ids=None, causal=False, window=49, hyperbolic=True,
           dropout_rate=0.0, dropout_rng=None):
    """Scatterbrain attention with a local band of ``window`` keys and Performer features from ``projection``.

    ``out_i = [sum_band (exp(s_ij) - p_ij) v_j + sum_j p_ij v_j] / [sum_band (exp(s_ij) - p_ij) + sum_j p_ij]``
    with exact scores ``s = q.k / sqrt(d)`` and Performer estimates ``p_ij = phi(q_i).phi(k_j)``: exact on the
    band, the Performer estimate elsewhere, and the band is never counted twice. ``phi`` is
    ``performer``'s positive feature map; ``hyperbolic=True`` (the reference's default) uses the rows
    ``[W; -W]`` of ``projection`` W, i.e. cosh features with 2 * rows features. The low-rank sums are linear
    in the length (causal: prefix sums by an associative scan); the band is a masked dense softmax like
    ``sliding_window``. Everything runs in float32 in log-scaled units, as in the reference. The
    denominator's low-rank remainder is clamped at 0 (the reference: 1e-24 in log space). ``dropout``
    drops entries of the exact band term only, as in the reference. ``segment_ids`` raise
    NotImplementedError. ``causal`` keeps the band keys j <= i and prefix low-rank sums.
    """
    check_qkv(NAME, q, k, v)
    refuse_segments(NAME, segment_ids, "the low-rank sums phi(k)^T v mix keys of all segments.")
    if window < 0:
        raise ValueError(f"{NAME}: window must be >= 0, got {window}.")
    projection = _projection(projection, q.shape[-1], hyperbolic)
    batch, q_len, heads, head_dim = q.shape
    kv_len = k.shape[1]
    mask = check_mask(NAME, mask, batch, kv_len)
    q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))

    # Features in log-scaled units: phi(x) = m^{-1/2} exp(log_x) = m^{-1/2} exp(scale) hat, so
    # phi(q).phi(k) = exp(q_scale + k_scale - log m) hat_q.hat_k.
    hat_q, q_scale = features(q32, projection)  # [b, q, h, m], [b, q, h]
    hat_k, k_scale = features(k32, projection)
    if mask is not None:
        real = mask[:, :, None]
        hat_k = jnp.where(real[..., None], hat_k, 0.0)
        v32 = jnp.where(real[..., None], v32, 0.0)
        k_scale = jnp.where(real, k_scale, ka.LOG_SCALE_FLOOR)

    # Low-rank part over every visible key, in units of exp(low_unit_i).
    values = jnp.concatenate([v32, jnp.ones_like(v32[..., :1])], axis=-1)  # the ones column gives the row sums
    states, key_top = _low_rank_sums(hat_k, values, k_scale, causal, q_len)
    if causal:
        low = jnp.einsum("bqhm,bqhme->bqhe", hat_q, states)
    else:
        low = jnp.einsum("bqhm,bhme->bqhe", hat_q, states[:, 0])
    key_top = jnp.broadcast_to(key_top, (batch, q_len, heads))

    band = local_band(q_len, kv_len, window)[None, None]
    allowed = allowed_pairs(q_len, kv_len, batch, mask=mask, causal=causal)
    band = band if allowed is None else band & allowed
    out = _combine(q32, k32, v32, hat_q, q_scale, hat_k, k_scale, low, key_top, band, projection.shape[0],
                   dropout_rate=dropout_rate, dropout_rng=dropout_rng)
    return out.astype(q.dtype)


def _projection(projection, head_dim: int, hyperbolic: bool):
    """The checked float32 projection, stacked as ``[W; -W]`` when ``hyperbolic``."""
    projection = performer.check_projection(NAME, projection, head_dim).astype(jnp.float32)
    return jnp.concatenate([projection, -projection], axis=0) if hyperbolic else projection


def features(x32, projection):
    """Performer's log-features of ``x32 [b, l, h, d]`` split as ``hat = exp(log - scale)`` and ``scale [b, l, h]``
    (their max, no gradient), so that ``phi(x) = m^{-1/2} exp(scale) hat``; per token."""
    log_x = performer.log_features(x32, projection)
    scale = lax.stop_gradient(jnp.max(log_x, axis=-1))
    return jnp.exp(log_x - scale[..., None]), scale


def _combine(q32, k32, v32, hat_q, q_scale, hat_k, k_scale, low, key_top, band, num_features, *, dropout_rate,
             dropout_rng):
    """The band's exact terms with their Performer estimates swapped out of the low-rank sums, float32 ``[b, q, h,
    d]``. ``low [b, q, h, d + 1]``: ``hat_q`` read out of the low-rank sums (numerator | row sum) in units of
    ``exp(key_top [b, q, h])``; ``band`` (bool, broadcastable to ``[b, h, q, k]``): the band keys each query sees."""
    head_dim = q32.shape[-1]
    low_unit = q_scale + key_top - math.log(num_features)  # phi(q).phi(k) carries 1/m; [b, q, h]

    # Band part: exact scores and the Performer estimates of the same pairs (same units as ``low``).
    scores = jnp.einsum("bqhd,bkhd->bhqk", q32, k32) / jnp.sqrt(jnp.float32(head_dim))
    scores = jnp.where(band, scores, -jnp.inf)
    key_top_t = jnp.swapaxes(key_top, 1, 2)  # [b, h, q]
    estimate = jnp.einsum("bqhm,bkhm->bhqk", hat_q, hat_k) * jnp.exp(
        jnp.minimum(jnp.swapaxes(k_scale, 1, 2)[:, :, None, :] - key_top_t[..., None], 0.0))
    estimate = jnp.where(band, estimate, 0.0)

    # Common units per query: the larger of the band's top score and the low-rank unit.
    unit = jnp.maximum(jnp.max(scores, axis=-1), jnp.swapaxes(low_unit, 1, 2))  # [b, h, q]
    unit = lax.stop_gradient(jnp.where(jnp.isfinite(unit), unit, 0.0))
    exact = jnp.exp(scores - unit[..., None])  # 0 off the band
    low_weight = jnp.exp(jnp.swapaxes(low_unit, 1, 2) - unit)  # [b, h, q]
    low = jnp.swapaxes(low, 1, 2)  # [b, h, q, d + 1]
    remainder = jnp.maximum(low[..., -1] - jnp.sum(estimate, axis=-1), 0.0)
    den = jnp.sum(exact, axis=-1) + low_weight * remainder
    exact = dropout(exact, dropout_rate, dropout_rng)
    num = jnp.einsum("bhqk,bkhd->bhqd", exact, v32)
    num = num + low_weight[..., None] * (low[..., :-1] - jnp.einsum("bhqk,bkhd->bhqd", estimate, v32))
    out = num / jnp.where(den > 0, den, 1.0)[..., None]  # a query with no visible key gives 0
    return jnp.swapaxes(out, 1, 2)


def decode_step(q, k, v, projection, cache, positions, *, window, hyperbolic):
    """One decoding step (one token per sequence at ``positions``): the new key and value enter the band's
    key/value ring and the low-rank running sums, then the query mixes them as ``attend``'s causal form does."""
    projection = _projection(projection, q.shape[-1], hyperbolic)
    q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
    hat_q, q_scale = features(q32, projection)
    hat_k, k_scale = features(k32, projection)
    low_rank = ka.state_step(NAME, cache["low_rank"], hat_k, v32, k_scale)
    ring = decoding.kv_step(cache["window"], k, v, positions)
    low = jnp.concatenate([jnp.einsum("bqhm,bhmd->bqhd", hat_q, low_rank["kv"]),
                           jnp.einsum("bqhm,bhm->bqh", hat_q, low_rank["z"])[..., None]], axis=-1)
    band = decoding.kv_allowed(ring, positions, _lookback(window))[:, None, None, :]  # [b, 1, 1, slots]
    ring_k, ring_v = ring["key"].astype(jnp.float32), ring["value"].astype(jnp.float32)
    hat_ring, ring_scale = features(ring_k, projection)
    out = _combine(q32, ring_k, ring_v, hat_q, q_scale, hat_ring, ring_scale, low, low_rank["top"][:, None], band,
                   projection.shape[0], dropout_rate=0.0, dropout_rng=None)
    return out.astype(q.dtype), {"window": ring, "low_rank": low_rank}


def _lookback(window: int) -> int:
    """How far back the causal band reaches: keys ``i - window // 2 .. i`` (none for ``window=0``)."""
    return window // 2 if window > 0 else -1


class Attention(nn.Module):
    """Linen wrapper of ``attend`` owning the Performer projection.

    ``window`` is the reference's ``local_context`` (total band width; 49 is its T2T-ViT layer-1 value).
    ``num_features`` is the number of projection rows (None: the reference's floor(d ln d)); with
    ``hyperbolic`` the feature count is twice that. The projection is drawn at init from the ``params``
    stream by ``performer.random_projection`` and stored as the param ``frozen_projection`` (never
    trained: ``stop_gradient`` and the trainer's ``frozen_*`` rule); like the reference it is never redrawn.

    Decoding (``init_cache``, ``cache``/``positions``): the causal band of query i is keys ``i - window // 2 ..
    i``, held in a key/value ring of ``window // 2 + 1`` slots (``decoding.kv_init``), and the low-rank part is
    ``kernel_attention``'s running sums (with the running key max as their log-scale); a step mixes them as the
    causal forward does. Decoding is deterministic: a call with ``deterministic=False`` and a dropout rate is
    refused.
    """

    window: int = 49
    num_features: int | None = None
    hyperbolic: bool = True
    orthogonal: bool = True
    dropout_rate: float = 0.0

    def _rows(self, head_dim: int) -> int:
        return default_num_features(head_dim) if self.num_features is None else self.num_features

    def init_cache(self, batch, max_length, heads, head_dim, dtype):
        """``{"window": the band's key/value ring (min(window // 2 + 1, max_length) slots, ``dtype``), "low_rank":
        kernel_attention.state_init (float32)}``."""
        if self.window < 0:
            raise ValueError(f"{NAME}: window must be >= 0, got {self.window}.")
        features = self._rows(head_dim) * (2 if self.hyperbolic else 1)
        slots = min(_lookback(self.window) + 1, max_length) if self.window > 0 else 1
        return {"window": decoding.kv_init(batch, slots, heads, head_dim, dtype),
                "low_rank": ka.state_init(batch, heads, features, head_dim)}

    @nn.compact
    def __call__(self, q, k, v, *, mask=None, segment_ids=None, causal=False, deterministic=True, cache=None,
                 positions=None):
        """``cache``: a decoding call (prefill, or a step with ``positions``; ``decoding``), returns
        ``(out, cache)``."""
        check_qkv(NAME, q, k, v)
        head_dim = q.shape[-1]
        projection = self.param(
            "frozen_projection",
            lambda rng: performer.random_projection(rng, self._rows(head_dim), head_dim, self.orthogonal,
                                                    method=NAME))

        def forward():
            return attend(q, k, v, projection, mask=mask, segment_ids=segment_ids, causal=causal,
                          window=self.window, hyperbolic=self.hyperbolic, **dropout_kwargs(self, deterministic))

        if cache is None:
            return forward()
        decoding.check_call(NAME, q, causal=causal, segment_ids=segment_ids, positions=positions)
        ka.check_self_attention(NAME, q, k)
        if self.dropout_rate > 0.0 and not deterministic:
            raise ValueError(f"{NAME}: decoding runs deterministic: call it with deterministic=True (dropout of "
                             "the band's weights is a training option).")
        if positions is not None:
            return decoding.stepped(lambda q, k, v, c, p: decode_step(q, k, v, projection, c, p, window=self.window,
                                                                      hyperbolic=self.hyperbolic),
                                    q, k, v, cache, positions, mask)
        hat_k, k_scale = features(k.astype(jnp.float32), _projection(projection, head_dim, self.hyperbolic))
        return forward(), {"window": decoding.kv_prefill(NAME, cache["window"], k, v, mask),
                           "low_rank": ka.state_prefill(NAME, cache["low_rank"], hat_k, v, mask, k_scale)}
