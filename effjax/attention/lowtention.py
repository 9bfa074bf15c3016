"""LowFormer lowtention (Nottebaum et al., WACV 2025, Sec. 3 [mem]): strided DWConv q/k/v, softmax, ConvTranspose up."""

import jax.numpy as jnp
from flax import linen as nn
from jax import lax

from effjax.attention import grid as grid_lib
from effjax.attention import softmax
from effjax.attention._capabilities import Capabilities
from effjax.attention.common import check_mask, check_qkv, dropout_kwargs, refuse_causal, refuse_cross, refuse_segments

NAME = "lowtention"
CAPABILITIES = Capabilities(causal=False, mask=True, segments=False, cross=False, dropout=True, pallas=False)
_DIMS = ("NHWC", "HWIO", "NHWC")


def default_kernel_size(stride: int) -> int:
    """The reference's down-conv kernel: 5 when it downsamples, else 3 (``LowFormerBlock``)."""
    return 5 if stride > 1 else 3


def up_kernel_size(stride: int) -> int:
    """The reference's transposed-conv kernel: 2 * stride, or 3 at stride 1 (``ConvAttention``)."""
    return 2 * stride if stride > 1 else 3


def downsample(x, kernel, hw, stride):
    """Depthwise conv of ``x [batch, h * w, C]`` with ``kernel [k, k, C]``, stride, zero padding k // 2.

    Returns ``([batch, hl * wl, C], (hl, wl))`` in float32, with ``hl = (h + 2 (k // 2) - k) // stride + 1``
    (PyTorch's Conv2d size rule).
    """
    size = kernel.shape[0]
    pad = size // 2
    y = lax.conv_general_dilated(
        grid_lib.to_grid(x, hw).astype(jnp.float32), kernel.astype(jnp.float32)[:, :, None, :],
        window_strides=(stride, stride), padding=((pad, pad), (pad, pad)), dimension_numbers=_DIMS,
        feature_group_count=x.shape[-1])
    return grid_lib.from_grid(y), (y.shape[1], y.shape[2])


def upsample(x, kernel, low_hw, hw, stride, bias=None):
    """Depthwise transposed conv (PyTorch ``ConvTranspose2d``, padding ``kernel // 4`` or 1 at stride 1), cropped.

    ``x [batch, hl * wl, C]``, ``kernel [K, K, C]``: ``out[y] += x[i] * kernel[y + p - i * stride]`` per axis,
    then the top-left ``hw`` of the output is kept, as the reference's ``o[:, :, :H, :W]``.
    """
    size = kernel.shape[0]
    pad = stride // 2 if stride > 1 else 1
    edge = size - 1 - pad
    if edge < 0:
        raise ValueError(f"{NAME}: the upsampling kernel {size} is smaller than its padding {pad} + 1.")
    # A transposed conv is the direct conv of the stride-dilated input with the flipped kernel.
    y = lax.conv_general_dilated(
        grid_lib.to_grid(x, low_hw).astype(jnp.float32), kernel.astype(jnp.float32)[::-1, ::-1, None, :],
        window_strides=(1, 1), padding=((edge, edge), (edge, edge)), lhs_dilation=(stride, stride),
        dimension_numbers=_DIMS, feature_group_count=x.shape[-1])
    if y.shape[1] < hw[0] or y.shape[2] < hw[1]:
        raise ValueError(f"{NAME}: upsampled grid {y.shape[1:3]} is smaller than the input grid {hw}.")
    y = y[:, :hw[0], :hw[1]]
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return grid_lib.from_grid(y)


def low_resolution_mask(mask, hw, low_hw, stride):
    """[batch, hl * wl] bool: True where the low-resolution cell's stride x stride block holds a real token.

    Low-resolution cell (i, j) stands for grid cells [i s, (i + 1) s) x [j s, (j + 1) s); at stride 1 this is
    the token's own mask.
    """
    (h, w), (hl, wl) = hw, low_hw
    cells = jnp.pad(grid_lib.to_grid(mask, hw), [(0, 0), (0, hl * stride - h), (0, wl * stride - w)])
    return cells.reshape(mask.shape[0], hl, stride, wl, stride).any(axis=(2, 4)).reshape(mask.shape[0], hl * wl)


def attend(q, k, v, down_kernels, up_kernel, up_bias=None, *, mask=None, segment_ids=None, causal=False,
           stride=2, grid=None, dropout_rate=0.0, dropout_rng=None):
    """``Up(softmax(Down_q(q) Down_k(k)^T / sqrt(d)) Down_v(v))`` on the ``grid`` of the sequence.

    ``down_kernels [3, k, k, heads * head_dim]`` are the depthwise kernels of q, k, v (odd k, stride
    ``stride``, zero padding k // 2); ``up_kernel [K, K, heads * head_dim]`` is the depthwise transposed conv
    back to the grid (``up_bias`` optional). Softmax runs over the ceil(h/s) x ceil(w/s) low-resolution tokens
    of every head. Padded tokens (``mask`` False) are zeroed before the down convs, and a low-resolution key
    whose stride x stride block holds no real token is masked, so padding never reaches a real output.
    Self-attention on one grid only: causal, cross attention and ``segment_ids`` raise NotImplementedError.
    """
    check_qkv(NAME, q, k, v)
    refuse_causal(NAME, causal, "the strided 2-D convs and the upsampling mix tokens below and to the right.")
    refuse_cross(NAME, q, k, "q, k and v are downsampled on one grid.")
    refuse_segments(NAME, segment_ids, "the strided convs mix neighbouring grid cells whatever their segment.")
    batch, length, heads, head_dim = q.shape
    channels = heads * head_dim
    if not isinstance(stride, int) or stride < 1:
        raise ValueError(f"{NAME}: stride must be a positive int, got {stride!r}.")
    size = down_kernels.shape[1]
    if down_kernels.shape != (3, size, size, channels) or size % 2 == 0:
        raise ValueError(f"{NAME}: down_kernels must have shape [3, k, k, heads * head_dim = {channels}] with odd "
                         f"k, got {down_kernels.shape}.")
    if up_kernel.ndim != 3 or up_kernel.shape[0] != up_kernel.shape[1] or up_kernel.shape[2] != channels:
        raise ValueError(f"{NAME}: up_kernel must have shape [K, K, {channels}], got {up_kernel.shape}.")
    hw = grid_lib.infer(NAME, length, grid)
    mask = check_mask(NAME, mask, batch, length)

    low = []
    for x, kernel in zip((q, k, v), down_kernels, strict=True):
        x = x.astype(jnp.float32).reshape(batch, length, channels)
        if mask is not None:
            x = jnp.where(mask[:, :, None], x, 0.0)
        y, low_hw = downsample(x, kernel, hw, stride)
        low.append(y.reshape(batch, -1, heads, head_dim))
    low_mask = None if mask is None else low_resolution_mask(mask, hw, low_hw, stride)
    out = softmax.attend(*low, mask=low_mask, dropout_rate=dropout_rate, dropout_rng=dropout_rng)
    out = upsample(out.reshape(batch, -1, channels), up_kernel, low_hw, hw, stride, up_bias)
    return out.reshape(batch, length, heads, head_dim).astype(q.dtype)


class Attention(nn.Module):
    """Linen wrapper owning the down kernels of q, k, v and the transposed-conv kernel and bias.

    ``stride`` 2 is LowFormer's penultimate stage (the only one that downsamples; the last stage uses 1);
    ``kernel_size`` None takes the reference's 5 at stride > 1, else 3; the upsampling kernel is 2 * stride
    (3 at stride 1). Kernels use PyTorch's default conv init, the bias starts at zero; all are sized from the
    input at init. ``grid`` is the (height, width) of the sequence; None takes the square root of the length.
    """

    stride: int = 2
    kernel_size: int | None = None
    grid: tuple | None = None
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, q, k, v, *, mask=None, segment_ids=None, causal=False, deterministic=True):
        check_qkv(NAME, q, k, v)
        if not isinstance(self.stride, int) or self.stride < 1:
            raise ValueError(f"{NAME}: stride must be a positive int, got {self.stride!r}.")
        size = self.kernel_size or default_kernel_size(self.stride)
        if size < 1 or size % 2 == 0:
            raise ValueError(f"{NAME}: kernel_size must be a positive odd int, got {size}.")
        channels = q.shape[2] * q.shape[3]
        up = up_kernel_size(self.stride)
        down_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_axis=1, out_axis=-1,
                                                     batch_axis=0)  # grid_lib.DEPTHWISE_INIT for each of q, k, v
        down_kernels = self.param("down_kernels", down_init, (3, size, size, channels), jnp.float32)
        up_kernel = self.param("up_kernel", grid_lib.DEPTHWISE_INIT, (up, up, channels), jnp.float32)
        up_bias = self.param("up_bias", nn.initializers.zeros, (channels,), jnp.float32)
        return attend(q, k, v, down_kernels, up_kernel, up_bias, mask=mask, segment_ids=segment_ids, causal=causal,
                      stride=self.stride, grid=self.grid, **dropout_kwargs(self, deterministic))

