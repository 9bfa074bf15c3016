"""2-D grids for token mixers: the (h, w) of a sequence, reshaping to and from it, and a depthwise conv.

Methods that mix over a spatial grid (SLAB's DWC, RALA's LePE, EfficientViT, SHViT, Hyena N-D, ...) see
a sequence ``[batch, length, ...]`` laid out row-major on an ``h x w`` grid. ``infer`` takes a square
grid when the length is a perfect square and an explicit ``grid=(h, w)`` otherwise.
"""

import math

import jax.numpy as jnp
from flax import linen as nn
from jax import lax

# PyTorch's default conv init (kaiming-uniform, a = sqrt 5) for a depthwise kernel [kh, kw, channels]:
# U(-1/sqrt(kh * kw), 1/sqrt(kh * kw)) (fan_in = kh * kw: axis 0 times the receptive field kw).
DEPTHWISE_INIT = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_axis=0, out_axis=-1)


def infer(method: str, length: int, grid=None) -> tuple[int, int]:
    """(h, w) with h * w == length: ``grid`` if given, else the square root; ValueError naming ``method``."""
    if grid is not None:
        if len(tuple(grid)) != 2:
            raise ValueError(f"{method}: grid must be (height, width), got {grid!r}.")
        h, w = (int(g) for g in grid)
        if h < 1 or w < 1 or h * w != length:
            raise ValueError(f"{method}: grid {(h, w)} has {h * w} cells but the sequence has {length} tokens.")
        return h, w
    side = math.isqrt(length)
    if side * side != length:
        raise ValueError(
            f"{method}: sequence length {length} is not a perfect square, so no square grid fits; "
            f"pass grid=(height, width) with height * width == {length} (attention_params.grid).")
    return side, side


def to_grid(x, hw):
    """[batch, h * w, ...] -> [batch, h, w, ...] (row-major)."""
    return x.reshape(x.shape[0], hw[0], hw[1], *x.shape[2:])


def from_grid(x):
    """[batch, h, w, ...] -> [batch, h * w, ...]."""
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def depthwise_conv(x, kernel, hw, bias=None):
    """Depthwise 2-D conv with zero 'SAME' padding of ``x [batch, h * w, channels]`` on the ``hw`` grid.

    ``kernel`` is ``[kh, kw, channels]`` (odd sizes keep the output centred), ``bias`` ``[channels]``.
    Returns ``[batch, h * w, channels]`` in ``x``'s dtype; the conv accumulates in float32.
    """
    kh, kw, channels = kernel.shape
    if x.shape[-1] != channels:
        raise ValueError(f"depthwise_conv: kernel has {channels} channels but x has {x.shape[-1]}.")
    y = lax.conv_general_dilated(
        to_grid(x, hw).astype(jnp.float32), kernel.astype(jnp.float32)[:, :, None, :],
        window_strides=(1, 1), padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=channels)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return from_grid(y).astype(x.dtype)
