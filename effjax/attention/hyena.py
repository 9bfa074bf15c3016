"""Hyena operator of order 2 (Poli et al., ICML 2023, Sec. 3, Eq. 7; safari's HyenaOperator) adapted to q, k, v."""

import math

import jax.numpy as jnp
from flax import linen as nn

from effjax.attention import fftconv
from effjax.attention._capabilities import Capabilities
from effjax.attention.common import check_qkv, dropout, dropout_kwargs, refuse_cross, refuse_segments, torch_uniform

NAME = "hyena"
CAPABILITIES = Capabilities(
    causal=True, mask=True, segments=False, cross=False, dropout=True, pallas=False,
    notes="dropout drops v' * k' before the long convolution (there are no attention weights).",
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
    """

    filter_order: int = 64
    emb_dim: int = 3
    num_inner_mlps: int = 2
    frequency: float = 1.0
    short_filter_order: int = 3
    max_length: int | None = None
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, q, k, v, *, mask=None, segment_ids=None, causal=False, deterministic=True):
        check_qkv(NAME, q, k, v)
        _refuse(q, k, segment_ids)
        length, heads, head_dim = v.shape[1:]
        filters = dict(channels=heads * head_dim, max_length=self.max_length or length, width=self.filter_order,
                       emb_dim=self.emb_dim, num_inner=self.num_inner_mlps, frequency=self.frequency)
        taps, bias = short_filter_params(self, self.short_filter_order, (3, heads, head_dim))
        skip = self.param("skip", nn.initializers.normal(1.0), (heads, head_dim), jnp.float32)
        forward = ImplicitFilter(**filters, name="filter")((length,)).reshape(length, heads, head_dim)
        backward = None
        if not causal:
            backward = ImplicitFilter(**filters, name="filter_backward")((length,)).reshape(length, heads, head_dim)
        return attend(q, k, v, forward, skip, taps, bias, filter_backward=backward, mask=mask,
                      segment_ids=segment_ids, causal=causal, **dropout_kwargs(self, deterministic))
