"""Informer self-attention distilling (Zhou et al., AAAI 2021, Sec. 3.2, Eq. 5): Conv1d, BN, ELU, MaxPool stride 2.

Between two encoder attention layers, ``X_{j+1} = MaxPool(ELU(Conv1d([X_j]_AB)))`` halves the length. As in the
reference ``ConvLayer`` (Informer2020 ``models/encoder.py``): a C -> C conv of width 3 with circular padding 1,
BatchNorm1d, ELU, and max pooling of width 3, stride 2, padding 1, so L tokens become ceil(L / 2).
"""

import jax.numpy as jnp
from flax import linen as nn
from jax import lax

WIDTH = 3


def _neighbours(x, mask):
    """(x_{t-1}, x_{t+1}) with circular wrap inside the first n = sum(mask) positions of each row.

    Without a mask n is the length (the reference's circular padding). With a mask, padded positions are
    already zero, so they contribute nothing; a right-padded row wraps exactly as the unpadded sequence.
    """
    length = x.shape[1]
    t = jnp.arange(length)
    n = jnp.full((x.shape[0], 1), length) if mask is None else jnp.sum(mask, axis=1, keepdims=True)
    n = jnp.maximum(n, 1)
    prev_index = jnp.where(t == 0, n - 1, t - 1)  # [b, L]
    next_index = jnp.where(t + 1 >= n, 0, t + 1)
    take = lambda index: jnp.take_along_axis(x, index[:, :, None], axis=1)  # noqa: E731
    return take(prev_index), take(next_index)


def circular_conv(x, kernel, bias=None, mask=None):
    """Width-3 conv ``[batch, length, c_in] -> [batch, length, c_out]`` with circular padding 1, in float32.

    ``kernel`` is ``[3, c_in, c_out]`` (taps t-1, t, t+1). Padded positions (``mask`` False) are zeroed first
    and the wrap stays inside each row's real prefix (see ``_neighbours``), so padding reaches no real output.
    """
    if kernel.ndim != 3 or kernel.shape[0] != WIDTH or kernel.shape[1] != x.shape[-1]:
        raise ValueError(f"circular_conv: kernel must have shape [3, {x.shape[-1]}, c_out], got {kernel.shape}.")
    x = x.astype(jnp.float32)
    if mask is not None:
        x = jnp.where(mask[:, :, None], x, 0.0)
    before, after = _neighbours(x, mask)
    kernel = kernel.astype(jnp.float32)
    y = sum(jnp.einsum("blc,cd->bld", part, kernel[tap]) for tap, part in enumerate((before, x, after)))
    return y if bias is None else y + bias.astype(jnp.float32)


def halve_mask(mask):
    """The padding mask after ``max_pool_halve``: output t is real iff its centre 2t is real.

    A right-padded row of n real tokens keeps ceil(n / 2), exactly the length its unpadded sequence gets.
    """
    return None if mask is None else mask[:, ::2]


def max_pool_halve(x, mask=None):
    """Max pool of width 3, stride 2, padding 1 along length: ``[b, L, c] -> [b, ceil(L / 2), c]``.

    Padded positions count as -inf (like the pool's own padding), so they never win a real output.
    Returns ``(y, halve_mask(mask))``; padded outputs are zero.
    """
    if mask is not None:
        x = jnp.where(mask[:, :, None], x, -jnp.inf)
    y = lax.reduce_window(x, -jnp.inf, lax.max, (1, WIDTH, 1), (1, 2, 1), ((0, 0), (1, 1), (0, 0)))
    new_mask = halve_mask(mask)
    if new_mask is not None:
        y = jnp.where(new_mask[:, :, None], y, 0.0)
    return y, new_mask


class Distil(nn.Module):
    """The distilling layer: ``(x [b, L, c], mask) -> (y [b, ceil(L/2), c], halved mask)``.

    BatchNorm (PyTorch defaults: momentum 0.1, i.e. flax momentum 0.9; eps 1e-5) uses batch statistics over
    the real tokens only (``mask``) when ``deterministic=False`` and updates ``batch_stats`` (apply with
    ``mutable=["batch_stats"]``); ``deterministic=True`` uses the running averages. The conv kernel uses
    PyTorch's default Conv1d init scale (uniform, variance 1/(3 fan_in)); the bias starts at zero.
    """

    momentum: float = 0.9
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x, mask=None, *, deterministic=True):
        if mask is not None:
            if mask.shape != x.shape[:2]:
                raise ValueError(f"Distil: mask must have shape [batch, length] = {x.shape[:2]}, got {mask.shape}.")
            mask = jnp.asarray(mask).astype(bool)
        channels = x.shape[-1]
        kernel = self.param("kernel", nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_axis=(0, 1)),
                            (WIDTH, channels, channels), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        y = circular_conv(x, kernel, bias, mask)
        norm_mask = None if mask is None else jnp.broadcast_to(mask[:, :, None], y.shape)
        y = nn.BatchNorm(use_running_average=deterministic, momentum=self.momentum, epsilon=self.epsilon,
                         name="norm")(y, mask=norm_mask)
        y, new_mask = max_pool_halve(nn.elu(y), mask)
        return y.astype(x.dtype), new_mask
