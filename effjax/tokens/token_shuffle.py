"""Token-Shuffle (Ma et al., 2025, "Token-Shuffle: Towards High-Resolution Image Generation with Autoregressive
Models").

Token-shuffle merges spatially local tokens along the channel dimension before the Transformer, so it sees
``s^2`` times fewer tokens, and token-unshuffle untangles them again after the Transformer blocks [abs]. No
official code was found; the module forms below follow third-party summaries of the paper (catalog: "verify"):
  * ``shuffle(x [B, H*W, C], (H, W), s) -> [B, (H/s)(W/s), s^2 C]``: each ``s x s`` window of the row-major
    token grid becomes one token (windows row-major; inside a token the channels run over the window's rows,
    then columns, then ``C``); ``unshuffle`` is its exact inverse (a reshape and a transpose each way);
  * ``ShuffleIn``: a linear projection ``C -> C / s^2`` (the paper's low-dimensional projection), ``shuffle``
    (back to ``C`` channels), then ``num_blocks`` residual MLP blocks (LayerNorm, C -> C -> C with GELU);
  * ``ShuffleOut``: ``num_blocks`` residual MLP blocks, ``unshuffle`` to ``s^2`` tokens of ``C / s^2``
    channels, and a projection back up to ``C``. The MLP widths and depths are unverified (no code).
In an autoregressive model causal masking must act at the shuffled-token granularity (a window is one step);
the paper's per-token prediction heads inside a window and its CFG scheduler are not here.

As a token-reduction ``Reducer`` (place 'block'): the non-prefix tokens must be a square grid whose side the
window ``s`` divides, where ``s`` follows from the schedule (``s^2 = P / (keep - prefix)``; ``keep=0.25`` is
``s = 2``; a second stage on the window grid is allowed, e.g. ``keep=0.25, layers='1,2'``: 16 -> 4 -> 1 on a
4 x 4 grid). Each window becomes one token by a learned fold ``Dense(s^2 C -> C)`` of its shuffled channels,
initialised to the window mean (so an untrained Reducer is average pooling); the token's size is the sum of the
window's sizes (``s^2``), the source map sends each token to its window, and ``recover`` paints each window with
its token (the paper unshuffles instead, with ``ShuffleOut``). Prefix tokens pass unchanged and stay first.
"""

import math

import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from effjax.tokens import state as state_lib
from effjax.tokens._pruning import dense_init
from effjax.tokens._spec import Spec

SPEC = Spec(place="block", needs=(), learned=True, min_prefix=0, max_prefix=2,
            notes="Each s x s window of the token grid folds into one token by a learned Dense(s^2 C -> C) "
                  "initialised to the window mean; s from the schedule (keep=0.25 is s=2); shuffle/unshuffle and "
                  "the ShuffleIn/ShuffleOut MLP modules for autoregressive use (widths unverified).")


def _check(grid, s: int, length: int):
    height, width = grid
    if height * width != length:
        raise ValueError(f"token_shuffle: a {height}x{width} grid has {height * width} tokens, got {length}.")
    if s < 1 or height % s or width % s:
        raise ValueError(f"token_shuffle: window {s} does not divide the {height}x{width} grid.")


def shuffle(x, grid, s: int = 2):
    """``x [batch, H*W, C]`` (row-major grid ``(H, W)``) -> ``[batch, (H/s)(W/s), s*s*C]``: each ``s x s``
    window folded into the channels."""
    batch, length, channels = x.shape
    _check(grid, s, length)
    height, width = grid
    x = x.reshape(batch, height // s, s, width // s, s, channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, (height // s) * (width // s), s * s * channels)


def unshuffle(x, grid, s: int = 2):
    """The inverse of ``shuffle``: ``[batch, (H/s)(W/s), s*s*C]`` -> ``[batch, H*W, C]`` for grid ``(H, W)``."""
    batch, length, folded = x.shape
    height, width = grid
    _check(grid, s, length * s * s)
    if folded % (s * s):
        raise ValueError(f"token_shuffle: {folded} channels do not split into {s * s} tokens.")
    x = x.reshape(batch, height // s, width // s, s, s, folded // (s * s)).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, height * width, folded // (s * s))


def windows(grid, s: int = 2) -> np.ndarray:
    """Static ``[H*W]`` window index (the shuffled token) of each row-major grid position."""
    height, width = grid
    rows, cols = np.divmod(np.arange(height * width), width)
    return (rows // s * (width // s) + cols // s).astype(np.int32)


class MlpBlock(nn.Module):
    """Residual MLP block: ``x + Dense(GELU(Dense(LayerNorm(x))))`` at width ``C``."""

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        h = nn.gelu(nn.Dense(width, kernel_init=dense_init, name="wi")(nn.LayerNorm(name="norm")(x)),
                    approximate=False)
        return x + nn.Dense(width, kernel_init=dense_init, name="wo")(h)


def _reduced_width(width: int, s: int) -> int:
    if width % (s * s):
        raise ValueError(f"token_shuffle: width {width} is not divisible by s^2 = {s * s}.")
    return width // (s * s)


class ShuffleIn(nn.Module):
    """Token-shuffle before the Transformer: ``[batch, H*W, C] -> [batch, H*W / s^2, C]``."""

    grid: tuple
    s: int = 2
    num_blocks: int = 2

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        x = nn.Dense(_reduced_width(width, self.s), kernel_init=dense_init, name="down")(x)
        x = shuffle(x, self.grid, self.s)
        for i in range(self.num_blocks):
            x = MlpBlock(name=f"mlp_{i}")(x)
        return x


class ShuffleOut(nn.Module):
    """Token-unshuffle after the Transformer: ``[batch, H*W / s^2, C] -> [batch, H*W, C]``."""

    grid: tuple
    s: int = 2
    num_blocks: int = 2

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        _reduced_width(width, self.s)
        for i in range(self.num_blocks):
            x = MlpBlock(name=f"mlp_{i}")(x)
        return nn.Dense(width, kernel_init=dense_init, name="up")(unshuffle(x, self.grid, self.s))


def window_size(patches: int, count: int):
    """``(s, side)`` for folding a square grid of ``patches`` tokens into ``count`` windows, or ValueError."""
    side = math.isqrt(patches)
    s = math.isqrt(patches // count) if count and patches % count == 0 else 0
    if side * side != patches or s < 1 or s * s * count != patches or side % s:
        raise ValueError(f"token_shuffle folds a square grid by s x s windows: {patches} tokens cannot become "
                         f"{count} (model.tokens.keep must leave P / s^2 tokens, e.g. keep=0.25 for s = 2).")
    return s, side


def mean_fold_init(s: int, width: int):
    """A ``[s^2 C, C]`` kernel that averages the ``s^2`` tokens of a shuffled window."""
    def init(key, shape, dtype=jnp.float32):
        return jnp.tile(jnp.eye(width, dtype=dtype) / (s * s), (s * s, 1))
    return init


class Reducer(nn.Module):
    """Token-Shuffle as a reduction: each ``s x s`` window of the token grid folded into one token."""

    @nn.compact
    def __call__(self, x, tokens, stats, *, keep: int, prefix: int, deterministic: bool = True):
        batch, n, width = x.shape
        if keep >= n:
            return x, tokens
        s, side = window_size(n - prefix, keep - prefix)
        folded = nn.Dense(width, kernel_init=mean_fold_init(s, width), name="fold")(
            shuffle(x[:, prefix:], (side, side), s))
        assign = np.concatenate([np.arange(prefix), windows((side, side), s) + prefix])
        _, new = state_lib.reduce(x, tokens, jnp.broadcast_to(jnp.asarray(assign, jnp.int32), (batch, n)), keep)
        return jnp.concatenate([x[:, :prefix], folded.astype(x.dtype)], axis=1), new
