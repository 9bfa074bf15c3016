"""Hyena N-D on a 2-D grid (Zimerman & Wolf, AISTATS 2024; HyenaND's HyenaOperator2d, order 2) adapted to q, k, v."""

import jax.numpy as jnp
from flax import linen as nn

from effjax.attention import fftconv, grid
from effjax.attention._capabilities import Capabilities
from effjax.attention.common import (
    check_qkv,
    dropout,
    dropout_kwargs,
    refuse_causal,
    refuse_cross,
    refuse_segments,
    torch_uniform,
)
from effjax.attention.hyena import ImplicitFilter, gated_inputs

NAME = "hyena_nd"
CAPABILITIES = Capabilities(
    causal=False, mask=True, segments=False, cross=False, dropout=True, pallas=False,
    notes="dropout drops v' * k' before the long convolution (there are no attention weights).",
)

# Axes of the [batch, h, w, ...] grid flipped before (and after) the quadrant conv, per direction: HyenaND's
# ``augment`` order (identity, both axes, columns, rows).
DIRECTIONS = {"standard": [()], "flipped": [(1, 2)], "4dir": [(), (1, 2), (2,), (1,)]}


def _refuse(q, k, segment_ids, causal):
    refuse_causal(NAME, causal, "the 2-D short filter is two-sided and a grid has no causal order")
    refuse_cross(NAME, q, k, "q and k gate v cell by cell on one grid")
    refuse_segments(NAME, segment_ids, "the 2-D long convolution mixes the whole grid")


def attend(q, k, v, long_filter, skip, short_kernel, short_bias, *, grid_hw=None, directional_mode="standard",
           mix=None, mask=None, segment_ids=None, causal=False, dropout_rate=0.0, dropout_rng=None):
    """Order-2 Hyena N-D: ``y = q' * (scale * (h ** u) + skip * u)`` with ``u = v' * k'`` on the ``h x w`` grid.

    ``q', k', v'`` come from the two-sided 3x3 depthwise short filter (``short_kernel [3, 3, 3, heads,
    head_dim]``, bias ``[3, heads, head_dim]``); ``h ** u`` is the quadrant-causal 2-D FFT conv with
    ``long_filter [h, w, heads, head_dim]``, anchored top-left (``standard``), bottom-right (``flipped``) or run
    in all four flips and mixed by ``mix = (weights [4], bias)`` (``4dir``). ``scale = 1 / (2 max(h, w))`` is
    the reference's ``k_f / fft_size``. Padded cells are zeroed before every conv. Refuses causal, cross
    attention and segment_ids.
    """
    check_qkv(NAME, q, k, v)
    _refuse(q, k, segment_ids, causal)
    if directional_mode not in DIRECTIONS:
        raise ValueError(f"{NAME}: directional_mode must be one of {sorted(DIRECTIONS)}, got {directional_mode!r}.")
    if directional_mode == "4dir" and mix is None:
        raise ValueError(f"{NAME}: directional_mode '4dir' needs mix = (weights [4], bias).")
    hw = grid.infer(NAME, q.shape[1], grid_hw)
    batch, length, heads, head_dim = q.shape
    channels = 3 * heads * head_dim
    kernel = short_kernel.reshape(3, 3, channels)

    def short(x):  # [b, l, 3, h, d] -> same, depthwise 3x3 on the grid
        y = grid.depthwise_conv(x.reshape(batch, length, channels), kernel, hw, short_bias.reshape(channels))
        return y.reshape(x.shape)

    gate, u = gated_inputs(q, k, v, mask, short)
    u = dropout(u, dropout_rate, dropout_rng)
    u_grid = grid.to_grid(u, hw)
    scale = 1.0 / (2 * max(hw))
    outs = []
    for axes in DIRECTIONS[directional_mode]:
        conv = fftconv.causal2d(jnp.flip(u_grid, axes) if axes else u_grid, long_filter)
        conv = grid.from_grid(jnp.flip(conv, axes) if axes else conv)
        outs.append(gate * (scale * conv + skip.astype(jnp.float32) * u))
    if mix is None:
        y = outs[0]
    else:
        weights, bias = mix
        y = sum(w * o for w, o in zip(weights.astype(jnp.float32), outs, strict=True)) + bias.astype(jnp.float32)
    return y.astype(q.dtype)


class Attention(nn.Module):
    """Linen wrapper owning the 3x3 short filter, the implicit 2-D long filter, the skip and the 4dir mix.

    ``filter_2d=False`` (the reference's default) builds the separable filter ``h[y, x, c] = h_rows[y, c] *
    h_cols[x, c]`` from two 1-D implicit filters, each with its own decay window; ``filter_2d=True`` (the
    README runs' ``--hyena2d_filter``) one implicit filter over concatenated row and column embeddings.
    ``directional_mode`` is ``standard`` (reference default), ``flipped`` (one layer of the reference's
    ``seq`` mode, which alternates flipped and standard across blocks) or ``4dir`` (``Linear(4 -> 1)`` mix).
    ``max_length=None`` sizes the positional embedding from the grid's longer side at init.
    ``dropout_rate`` drops ``v' * k'`` before the long conv.
    """

    filter_order: int = 64
    emb_dim: int = 3
    num_inner_mlps: int = 2
    frequency: float = 1.0
    filter_2d: bool = False
    directional_mode: str = "standard"
    max_length: int | None = None
    grid: tuple | None = None
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, q, k, v, *, mask=None, segment_ids=None, causal=False, deterministic=True):
        check_qkv(NAME, q, k, v)
        _refuse(q, k, segment_ids, causal)
        hw = grid.infer(NAME, q.shape[1], self.grid)
        heads, head_dim = q.shape[2:]
        filters = dict(channels=heads * head_dim, max_length=self.max_length or max(hw), width=self.filter_order,
                       emb_dim=self.emb_dim, num_inner=self.num_inner_mlps, frequency=self.frequency)
        if self.filter_2d:
            long_filter = ImplicitFilter(**filters, dims=2, name="filter")(hw)
        else:
            rows = ImplicitFilter(**filters, name="filter_rows")((hw[0],))
            cols = ImplicitFilter(**filters, name="filter_cols")((hw[1],))
            long_filter = rows[:, None] * cols[None, :]
        long_filter = long_filter.reshape(*hw, heads, head_dim)
        short_init = torch_uniform(9)  # PyTorch Conv2d init, depthwise 3x3: fan_in 9
        short_kernel = self.param("short_kernel", short_init, (3, 3, 3, heads, head_dim), jnp.float32)
        short_bias = self.param("short_bias", short_init, (3, heads, head_dim), jnp.float32)
        skip = self.param("skip", nn.initializers.normal(1.0), (heads, head_dim), jnp.float32)
        mix = None
        if self.directional_mode == "4dir":
            mix_init = torch_uniform(4)
            mix = (self.param("mix_weights", mix_init, (4,), jnp.float32), self.param("mix_bias", mix_init, (),
                                                                                       jnp.float32))
        return attend(q, k, v, long_filter, skip, short_kernel, short_bias, grid_hw=hw,
                      directional_mode=self.directional_mode, mix=mix, mask=mask, segment_ids=segment_ids,
                      causal=causal, **dropout_kwargs(self, deterministic))
