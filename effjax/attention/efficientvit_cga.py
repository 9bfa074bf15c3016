"""EfficientViT cascaded group attention (Liu et al., CVPR 2023, Sec. 3.2 Eq. 1-2 [mem]) in windows with a bias."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from effjax.attention import grid as grid_lib
from effjax.attention import softmax
from effjax.attention._capabilities import Capabilities
from effjax.attention.common import check_mask, check_qkv, dropout_kwargs, refuse_causal, refuse_cross, refuse_segments

NAME = "efficientvit_cga"
CAPABILITIES = Capabilities(causal=False, mask=True, segments=False, cross=False, dropout=True, pallas=False)


def window_shape(hw, window: int) -> tuple[int, int]:
    """The (height, width) of a window: ``window`` per axis, or the whole axis when the grid is smaller."""
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"{NAME}: window must be a positive int, got {window!r}.")
    return min(window, hw[0]), min(window, hw[1])


def partition(x, hw, win):
    """[batch, h * w, ...] -> [batch, windows, wh * ww, ...], zero padding the grid's bottom and right edges."""
    (h, w), (wh, ww) = hw, win
    tail = x.shape[2:]
    cells = grid_lib.to_grid(x, hw)
    cells = jnp.pad(cells, [(0, 0), (0, -h % wh), (0, -w % ww)] + [(0, 0)] * len(tail))
    nh, nw = cells.shape[1] // wh, cells.shape[2] // ww
    cells = cells.reshape(x.shape[0], nh, wh, nw, ww, *tail).swapaxes(2, 3)
    return cells.reshape(x.shape[0], nh * nw, wh * ww, *tail)


def unpartition(x, hw, win):
    """Inverse of ``partition``: [batch, windows, wh * ww, ...] -> [batch, h * w, ...], dropping the padding."""
    (h, w), (wh, ww) = hw, win
    nh, nw = -(-h // wh), -(-w // ww)
    tail = x.shape[3:]
    cells = x.reshape(x.shape[0], nh, nw, wh, ww, *tail).swapaxes(2, 3)
    cells = cells.reshape(x.shape[0], nh * wh, nw * ww, *tail)[:, :h, :w]
    return grid_lib.from_grid(cells)


def bias_index(win):
    """Static int [wh * ww, wh * ww, 2]: the offset (|dy|, |dx|) between two cells of a window (LeViT bias)."""
    ys, xs = np.divmod(np.arange(win[0] * win[1]), win[1])
    return np.stack([np.abs(ys[:, None] - ys[None, :]), np.abs(xs[:, None] - xs[None, :])], axis=-1)


def _conv_in_windows(x, kernel, bias, win):
    """Depthwise 'SAME' conv of x [batch, windows, cells, d] inside each window (zero padding at its border)."""
    b, n = x.shape[:2]
    y = grid_lib.depthwise_conv(x.reshape(b * n, *x.shape[2:]), kernel, win, bias)
    return y.reshape(x.shape)


def attend(q, k, v, q_kernels, attention_bias, cascade=None, q_bias=None, *, mask=None, segment_ids=None,
           causal=False, window=7, grid=None, dropout_rate=0.0, dropout_rng=None):
    """Cascaded group attention over [batch, length, heads, head_dim] inputs on the ``grid`` of the sequence.

    The grid is cut into windows of ``window`` x ``window`` cells (padded at the bottom/right; the padding is
    masked). Head by head, in order: head i's q, k, v get head i-1's output added through ``cascade[i - 1]``
    (``[3, head_dim, head_dim]`` maps for q, k, v; ``cascade=None`` adds the output itself), q goes through the
    depthwise conv ``q_kernels[i]`` ``[k_i, k_i, head_dim]`` (+ ``q_bias[i]``) inside its window, and
    ``softmax(q k^T / sqrt(d) + B_i) v`` runs over the window's real keys, where
    ``B_i = attention_bias[i, |dy|, |dx|]`` (``attention_bias [heads, wh, ww]``). Padded tokens (``mask``
    False) are zeroed before the conv and the cascade, and masked as keys. Self-attention on one grid only:
    causal, cross attention and ``segment_ids`` raise NotImplementedError.
    """
    check_qkv(NAME, q, k, v)
    refuse_causal(NAME, causal, "the window softmax and the 2-D conv on q read tokens below and to the right.")
    refuse_cross(NAME, q, k, "windows are cells of one grid.")
    refuse_segments(NAME, segment_ids, "windows and the conv on q mix neighbouring cells whatever their segment.")
    batch, length, heads, head_dim = q.shape
    dtype = q.dtype
    hw = grid_lib.infer(NAME, length, grid)
    win = window_shape(hw, window)
    if len(q_kernels) != heads:
        raise ValueError(f"{NAME}: got {len(q_kernels)} q kernels for {heads} heads.")
    if attention_bias.shape != (heads, *win):
        raise ValueError(f"{NAME}: attention_bias must have shape {(heads, *win)}, got {attention_bias.shape}.")
    if cascade is not None and cascade.shape != (heads - 1, 3, head_dim, head_dim):
        raise ValueError(f"{NAME}: cascade must have shape {(heads - 1, 3, head_dim, head_dim)}, "
                         f"got {cascade.shape}.")
    mask = check_mask(NAME, mask, batch, length)
    real = jnp.ones((batch, length), bool) if mask is None else mask
    real = partition(real, hw, win)  # [b, n, c]; False on padded tokens and on the window padding
    allowed = real[:, :, None, :]  # [b, n, 1 (query), c (key)]
    q, k, v = (partition(x.astype(jnp.float32), hw, win) for x in (q, k, v))  # [b, n, c, h, d]
    index = bias_index(win)
    rngs = [None] * heads if dropout_rng is None else list(jax.random.split(dropout_rng, heads))

    outputs = []
    for i in range(heads):
        qi, ki, vi = q[..., i, :], k[..., i, :], v[..., i, :]
        if i > 0:
            prev = outputs[-1]
            if cascade is None:
                qi, ki, vi = qi + prev, ki + prev, vi + prev
            else:
                qi, ki, vi = (x + prev @ cascade[i - 1, j].astype(jnp.float32) for j, x in enumerate((qi, ki, vi)))
        qi, ki, vi = (jnp.where(real[..., None], x, 0.0) for x in (qi, ki, vi))
        qi = _conv_in_windows(qi, q_kernels[i], None if q_bias is None else q_bias[i], win)
        logits = jnp.einsum("bnqd,bnkd->bnqk", qi, ki) / jnp.sqrt(jnp.float32(head_dim))
        logits = logits + attention_bias[i].astype(jnp.float32)[index[..., 0], index[..., 1]]
        weights = softmax.masked_weights(logits, allowed, dropout_rate=dropout_rate, dropout_rng=rngs[i])
        outputs.append(jnp.einsum("bnqk,bnkd->bnqd", weights, vi))
    out = jnp.stack(outputs, axis=-2)  # [b, n, c, h, d]
    return unpartition(out, hw, win).astype(dtype)


def head_kernel_sizes(kernels, heads: int) -> tuple[int, ...]:
    """The q-conv kernel size of each head: ``kernels[:heads]`` (as the reference), or one size for all heads."""
    kernels = tuple(int(s) for s in kernels)
    if len(kernels) == 1:
        kernels *= heads
    if len(kernels) < heads:
        raise ValueError(f"{NAME}: kernels {kernels} name fewer sizes than the {heads} heads; give one per head "
                         "or a single size for all, e.g. kernels=(5,).")
    if any(s < 1 or s % 2 == 0 for s in kernels[:heads]):
        raise ValueError(f"{NAME}: kernels must be positive odd sizes, got {kernels}.")
    return kernels[:heads]


class Attention(nn.Module):
    """Linen wrapper owning the per-head q convs, the cascade maps and the window bias table.

    Defaults are EfficientViT-M0's (``model/build.py``): window 7, q kernel 5 for every head (M0's
    (5, 5, 5, 5), at any head count); the head dim of q/k/v plays key_dim and the value dim (the reference's
    key_dim 16, d_v = C / heads). Head i > 0 owns
    ``cascade[i - 1]``, the part of its q/k/v projection applied to head i-1's output (the reference projects
    ``x_i + out_{i-1}`` with one linear map, so this is that map on the added output). Init as the reference:
    PyTorch's default conv init for the q convs and the cascade maps, zero bias table, zero q-conv bias (its
    BN shift). The BNs are folded away (affine at inference); the ReLU before the output projection is not
    applied (the encoder's output projection is linear).
    """

    window: int = 7
    kernels: tuple = (5,)
    grid: tuple | None = None
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, q, k, v, *, mask=None, segment_ids=None, causal=False, deterministic=True):
        check_qkv(NAME, q, k, v)
        _, length, heads, head_dim = q.shape
        sizes = head_kernel_sizes(self.kernels, heads)
        win = window_shape(grid_lib.infer(NAME, length, self.grid), self.window)
        q_kernels = [self.param(f"q_kernel_{i}", grid_lib.DEPTHWISE_INIT, (s, s, head_dim), jnp.float32)
                     for i, s in enumerate(sizes)]
        q_bias = self.param("q_bias", nn.initializers.zeros, (heads, head_dim), jnp.float32)
        attention_bias = self.param("attention_bias", nn.initializers.zeros, (heads, *win), jnp.float32)
        cascade = None
        if heads > 1:
            # PyTorch's default 1x1-conv init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = head_dim.
            init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_axis=-2, out_axis=-1,
                                                    batch_axis=(0, 1))
            cascade = self.param("cascade", init, (heads - 1, 3, head_dim, head_dim), jnp.float32)
        return attend(q, k, v, q_kernels, attention_bias, cascade, q_bias, mask=mask, segment_ids=segment_ids,
                      causal=causal, window=self.window, grid=self.grid, **dropout_kwargs(self, deterministic))
