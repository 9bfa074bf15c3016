"""Hyena operator of order 2 (Poli et al., ICML 2023, Sec. 3, Eq. 7; safari's HyenaOperator) adapted to q, k, v."""

import math

import jax.numpy as jnp
from flax import linen as nn

from effjax.attention import decoding, fftconv
from effjax.attention._capabilities import Capabilities
from effjax.attention.common import check_qkv, dropout, dropout_kwargs, refuse_cross, refuse_segments, torch_uniform

NAME = "hyena"
CAPABILITIES = Capabilities(
    causal=True, mask=True, segments=False, cross=False, dropout=True, pallas=False,
    decode=True, extend=True,
    notes="dropout drops v' * k' before the long convolution (there are no attention weights). Decoding is exact "
          "and keeps every past long-conv input u = v' * k' (float32 [max_length, heads, head_dim]: it grows with "
          "max_length, bounded by it) and the short filter's last short_filter_order - 1 inputs; it runs "
          "deterministic (no dropout).",
)


def positional_embedding(max_length: int, emb_dim: int = 3):
    """safari's ``PositionalEmbedding``: ``[t, Re exp(-i f w), Im exp(-i f w)]`` of shape ``[max_length, emb_dim]``
    with ``t = linspace(0, 1)``, ``w = 2 pi n / max_length`` and ``(emb_dim - 1) / 2`` bands
    ``f = linspace(1e-4, bands - 1)``."""
    if emb_dim < 3 or emb_dim % 2 == 0:
        raise ValueError(f"{NAME}: emb_dim must be odd and >= 3 (time, cosine, sine), got {emb_dim}.")
    bands = (emb_dim - 1) // 2
    t = jnp.linspace(0.0, 1.0, max_length)[:, None]
    w = 2 * math.pi * jnp.arange(max_length, dtype=jnp.float32)[:, None] / max_length
    f = jnp.linspace(1e-4, bands - 1, bands)[None, :]
    return jnp.concatenate([t, jnp.cos(f * w), -jnp.sin(f * w)], axis=-1)


def decay_rates(channels: int, fast_decay_pct=0.3, slow_decay_pct=1.5, target=1e-2):
    """safari's ``ExponentialModulation`` rates ``|delta_c|``, spaced from slow to fast across channels (fixed)."""
    return jnp.abs(jnp.linspace(math.log(target) / slow_decay_pct, math.log(target) / fast_decay_pct, channels))


class ImplicitFilter(nn.Module):
    """safari's ``HyenaFilter.filter``: ``h(t) = window(t) * FFN(z(t))``, one filter per channel.

    FFN = Linear(emb -> width), Sin, [Linear(width -> width), Sin] x ``num_inner``, Linear(width -> channels,
    no bias); one Sin frequency vector (init ``frequency``) shared by all Sin layers, as the reference reuses one
    ``Sin`` module. ``z`` is a learnable ``[max_length, emb_dim]`` param initialised by ``positional_embedding``
    (the reference trains it with lr 1e-5; here it gets the optimizer's lr). The window ``exp(-t |delta_c|)``
    is fixed. ``dims=2`` is Hyena N-D's full 2-D filter: the FFN reads the row and column embeddings
    concatenated and the window is the product of the row and column decays.
    Called with the lengths (one per dim), returns ``[*lengths, channels]`` float32.
    """

    channels: int
    max_length: int
    width: int = 64
    emb_dim: int = 3
    num_inner: int = 2
    frequency: float = 1.0
    dims: int = 1

    @nn.compact
    def __call__(self, lengths):
        for n in lengths:
            if n > self.max_length:
                raise ValueError(f"{NAME}: length {n} exceeds the max_length {self.max_length} of the implicit "
                                 "filter's positional embedding.")
        z = self.param("z", lambda _: positional_embedding(self.max_length, self.emb_dim))
        t = jnp.linspace(0.0, 1.0, self.max_length)
        if self.dims == 1:
            (length,) = lengths
            feats, window_t = z[:length], [t[:length, None]]
        else:
            rows, cols = lengths
            feats = jnp.concatenate([jnp.broadcast_to(z[:rows, None], (rows, cols, self.emb_dim)),
                                     jnp.broadcast_to(z[None, :cols], (rows, cols, self.emb_dim))], axis=-1)
            window_t = [t[:rows, None, None], t[None, :cols, None]]
        freq = self.param("freq", nn.initializers.constant(self.frequency), (self.width,), jnp.float32)
        fan_in = feats.shape[-1]
        for i in range(1 + self.num_inner):
            feats = nn.Dense(self.width, kernel_init=torch_uniform(fan_in), bias_init=torch_uniform(fan_in),
                             name=f"dense_{i}")(feats)
            feats = jnp.sin(freq * feats)
            fan_in = self.width
        h = nn.Dense(self.channels, use_bias=False, kernel_init=torch_uniform(self.width), name="out")(feats)
        rates = decay_rates(self.channels)
        for tt in window_t:
            h = h * jnp.exp(-tt * rates)
        return h


def short_filter_params(module, taps: int, shape: tuple):
    """Depthwise short-conv taps ``[taps, *shape]`` and bias ``[*shape]`` with PyTorch's Conv init (fan_in taps)."""
    init = torch_uniform(taps)
    return (module.param("short_taps", init, (taps, *shape), jnp.float32),
            module.param("short_bias", init, shape, jnp.float32))


def gated_inputs(q, k, v, mask, short):
    """Zero every input at padded positions, run the short filter ``short(x [b, l, 3, h, d])``, zero pads again.

    Returns float32 ``(gate, u)``: the output gate ``q'`` and the long-conv input ``u = v' * k'`` (the
    reference's ``v * x_i``), all zero at padded positions so padding cannot reach a real output.
    """
    x = jnp.stack([q, k, v], axis=2).astype(jnp.float32)  # [b, l, 3, h, d]
    keep = None if mask is None else jnp.asarray(mask).astype(bool)[:, :, None, None, None]
    if keep is not None:
        x = jnp.where(keep, x, 0.0)
    x = short(x)
    if keep is not None:
        x = jnp.where(keep, x, 0.0)
    return x[:, :, 0], x[:, :, 2] * x[:, :, 1]


def decode_step(q, k, v, filter_full, skip, short_taps, short_bias, cache, positions):
    """One token per sequence at ``positions``: the short filter over its history, then the long convolution read
    directly from the cached past inputs, ``y_p = sum_{j <= p} h_{p - j} u_j + skip * u_p``, and the gate.

    ``filter_full [slots, heads, head_dim]`` is the long filter for every lag the cache can hold; ``cache =
    {"short": the last taps - 1 inputs [batch, taps - 1, 3, heads, head_dim], "u": [batch, slots, heads,
    head_dim]}``, ``u`` of position j in slot j. Returns ``(out [batch, 1, heads, head_dim], cache)``.
    """
    x = jnp.stack([q, k, v], axis=2).astype(jnp.float32)  # [b, 1, 3, h, d]
    x, short = decoding.conv_step(cache["short"], x, lambda w: fftconv.short_causal(w, short_taps, short_bias))
    gate, u = x[:, 0, 0], x[:, 0, 2] * x[:, 0, 1]  # [b, h, d]
    slots = cache["u"].shape[1]
    here = jnp.arange(slots)[None, :] == positions[:, None]  # [b, slots]
    past = jnp.where(here[:, :, None, None], u[:, None].astype(cache["u"].dtype), cache["u"])
    lag = positions[:, None] - jnp.arange(slots)[None, :]  # p - j
    taps = jnp.where((lag >= 0)[:, :, None, None], filter_full[jnp.clip(lag, 0, slots - 1)], 0.0)
    y = jnp.sum(taps * past.astype(jnp.float32), axis=1) + skip.astype(jnp.float32) * u
    return (gate * y)[:, None].astype(q.dtype), {"short": short, "u": past}


def _prefill_inputs(q, k, v, mask, short_taps, short_bias):
    """A prefill's cache entries: the stacked raw inputs ``[b, P, 3, h, d]`` (zero at padded positions) whose last
    real ones the short filter's history keeps, and the long-conv inputs ``u`` as ``attend`` makes them."""
    x = jnp.stack([q, k, v], axis=2).astype(jnp.float32)
    if mask is not None:
        x = jnp.where(jnp.asarray(mask).astype(bool)[:, :, None, None, None], x, 0.0)
    _, u = gated_inputs(q, k, v, mask, lambda x: fftconv.short_causal(x, short_taps, short_bias))
    return x, u


def _refuse(q, k, segment_ids):
    refuse_cross(NAME, q, k, "q and k gate v position by position")
    refuse_segments(NAME, segment_ids, "the long convolution mixes all positions of the sequence")


def attend(q, k, v, filter_forward, skip, short_taps, short_bias, *, filter_backward=None, mask=None,
           segment_ids=None, causal=False, dropout_rate=0.0, dropout_rng=None):
    """Order-2 Hyena on q, k, v: ``y = q' * (h * u + skip * u)`` with ``u = v' * k'``, per head channel.

    ``q', k', v'`` are q, k, v after the causal short filter (``short_taps [taps, 3, heads, head_dim]``, bias
    ``[3, heads, head_dim]``); v is the input, k the inner gate x_2 and q the output gate x_1 of safari's
    recurrence. ``h * u`` is a long convolution by FFT with ``filter_forward [taps, heads, head_dim]``: causal
    when ``causal``, else two-sided with ``filter_backward`` for the keys after the query (safari's
    bidirectional LongConv). ``skip [heads, head_dim]`` is the filter's bias (the reference's D term).
    Refuses segment_ids and cross attention.
    """
    check_qkv(NAME, q, k, v)
    _refuse(q, k, segment_ids)
    if not causal and filter_backward is None:
        raise ValueError(f"{NAME}: causal=False needs filter_backward for the two-sided convolution.")
    gate, u = gated_inputs(q, k, v, mask, lambda x: fftconv.short_causal(x, short_taps, short_bias))
    u = dropout(u, dropout_rate, dropout_rng)
    if causal:
        y = fftconv.causal(u, filter_forward)
    else:
        y = fftconv.two_sided(u, filter_forward, filter_backward)
    y = y + skip.astype(jnp.float32) * u
    return (gate * y).astype(q.dtype)


class Attention(nn.Module):
    """Linen wrapper owning the short filter, the implicit long filter(s) and the skip (safari defaults).

    Channels are the ``heads * head_dim`` of v, each with its own filter (safari's ``num_heads=1``). The short
    filter (``short_filter_order=3``) is causal in both modes. ``causal=False`` adds a second implicit filter
    (``filter_backward``) for the anti-causal half; it is created only when the module is used with
    ``causal=False``. ``max_length=None`` sizes the positional embedding (``l_max``) from the length at init;
    a longer ``max_length`` lets the module run at any length up to it (``t`` is then ``linspace(0, 1,
    max_length)[:L]``, as in safari). The projections in/out are the surrounding block's q/k/v/o.
    ``dropout_rate`` drops ``v' * k'`` before the long conv, as the reference's ``dropout``.

    Decoding (``init_cache``, ``cache``/``positions``) is exact and not constant-state: the cache holds every past
    long-conv input ``u = v' * k'`` (float32 ``[batch, max_length, heads, head_dim]``, so it grows with
    ``max_length``, bounded by it) and the short filter's last ``short_filter_order - 1`` inputs; a step reads the
    long convolution directly from it (O(max_length) per token). Distilling the filter into a recurrence (Laughing
    Hyena, Massaroli et al. 2023) would make it constant but approximate, and is not done. With ``max_length=None``
    a decoding call sizes the filter from the cache's ``max_length`` (which must then be the length the module was
    initialised with). Decoding is deterministic: a call with ``deterministic=False`` and a dropout rate is refused.
    """

    filter_order: int = 64
    emb_dim: int = 3
    num_inner_mlps: int = 2
    frequency: float = 1.0
    short_filter_order: int = 3
    max_length: int | None = None
    dropout_rate: float = 0.0

    def init_cache(self, batch, max_length, heads, head_dim, dtype):
        """``{"short": zeros [batch, short_filter_order - 1, 3, heads, head_dim] of dtype, "u": zeros [batch,
        max_length, heads, head_dim] float32}``: the long convolution's past inputs, one slot per position."""
        if self.max_length is not None and self.max_length < max_length:
            raise ValueError(f"{NAME}: the cache's max_length {max_length} exceeds the max_length {self.max_length} "
                             "of the implicit filter.")
        return {"short": decoding.boxed_zeros((batch, self.short_filter_order - 1, 3, heads, head_dim), dtype,
                                              ("batch", None, None, "heads", "head_dim")),
                "u": decoding.boxed_zeros((batch, max_length, heads, head_dim), jnp.float32,
                                          ("batch", "length", "heads", "head_dim"))}

    @nn.compact
    def __call__(self, q, k, v, *, mask=None, segment_ids=None, causal=False, deterministic=True, cache=None,
                 positions=None):
        """``cache``: a decoding call (prefill, or a step with ``positions``; ``decoding``), returns
        ``(out, cache)``."""
        check_qkv(NAME, q, k, v)
        _refuse(q, k, segment_ids)
        length, heads, head_dim = v.shape[1:]
        if cache is not None:
            decoding.check_call(NAME, q, causal=causal, segment_ids=segment_ids, positions=positions)
            if self.dropout_rate > 0.0 and not deterministic:
                raise ValueError(f"{NAME}: decoding runs deterministic: call it with deterministic=True (dropout "
                                 "of v' * k' is a training option).")
            slots = cache["u"].shape[1]
            if self.max_length is None:
                decoding.check_length_fixed_at_init(NAME, self, ("filter", "z"), lambda shape: shape[0], slots,
                                                    "implicit filter (its positions t = linspace(0, 1, length))")
            if length > slots:
                raise ValueError(f"{NAME}: a prompt of {length} tokens does not fit the cache's max_length {slots}.")
        filter_length = self.max_length or (length if cache is None else slots)
        filters = dict(channels=heads * head_dim, max_length=filter_length, width=self.filter_order,
                       emb_dim=self.emb_dim, num_inner=self.num_inner_mlps, frequency=self.frequency)
        taps, bias = short_filter_params(self, self.short_filter_order, (3, heads, head_dim))
        skip = self.param("skip", nn.initializers.normal(1.0), (heads, head_dim), jnp.float32)
        implicit = ImplicitFilter(**filters, name="filter")
        if cache is not None and positions is not None:
            filter_full = implicit((slots,)).reshape(slots, heads, head_dim)
            return decoding.stepped(lambda q, k, v, c, p: decode_step(q, k, v, filter_full, skip, taps, bias, c, p),
                                    q, k, v, cache, positions, mask)
        forward = implicit((length,)).reshape(length, heads, head_dim)
        backward = None
        if not causal:
            backward = ImplicitFilter(**filters, name="filter_backward")((length,)).reshape(length, heads, head_dim)
        out = attend(q, k, v, forward, skip, taps, bias, filter_backward=backward, mask=mask,
                     segment_ids=segment_ids, causal=causal, **dropout_kwargs(self, deterministic))
        if cache is None:
            return out
        x, u = _prefill_inputs(q, k, v, mask, taps, bias)
        u = jnp.pad(u, [(0, 0), (0, slots - length), (0, 0), (0, 0)]).astype(cache["u"].dtype)
        return out, {"short": decoding.conv_history(x, mask, self.short_filter_order - 1).astype(cache["short"].dtype),
                     "u": u}
