"""FlatFormer flattened window attention (Liu et al., CVPR 2023, Sec. 4: window-based sorting + equal-size groups)."""

import numpy as np
from flax import linen as nn

from effjax.attention import grid, permute
from effjax.attention._capabilities import Capabilities
from effjax.attention.common import check_qkv, dropout_kwargs, refuse_causal, refuse_cross

NAME = "flat_window"
CAPABILITIES = Capabilities(causal=False, mask=True, segments=True, cross=False, dropout=True, pallas=True)
AXES = ("x", "y")


def flat_order(hw, window=(9, 9), axis="x", shift=False) -> np.ndarray:
    """[h * w] order of the row-major tokens of an ``hw`` grid, sorted by FlatFormer's window-based key.

    ``window`` is (rows, cols); x is the column and y the row, as in the reference's coords (b, z, y, x).
    The key of ``axis="x"`` snakes over window rows (alternate rows of windows run right to left) and, inside
    a window, snakes down and up its columns, reversed in the reversed window rows; ``axis="y"`` swaps the
    roles of x and y. ``shift`` adds half a window to both coordinates first. The key is the reference's
    formula with its doubled spacings (which keep the keys distinct).
    """
    h, w = hw
    m2, n2 = (int(s) for s in window)
    if m2 < 1 or n2 < 1:
        raise ValueError(f"{NAME}: window sizes must be >= 1, got {window!r}.")
    if axis not in AXES:
        raise ValueError(f"{NAME}: axis must be 'x' or 'y', got {axis!r}.")
    n1, m1 = -(-w // n2) + 1, -(-h // m2) + 1  # windows along x and y, plus one for the shift
    y, x = np.divmod(np.arange(h * w, dtype=np.int64), w)
    if shift:
        x, y = x + n2 // 2, y + m2 // 2
    x1, y1, x2, y2 = x // n2, y // m2, x % n2, y % m2
    n2, m2, n1, m1 = 2 * n2, 2 * m2, 2 * n1, 2 * m1

    def sign(i):
        return 1 - 2 * (i % 2)

    if axis == "x":
        key = (n1 * y1 + sign(y1) * x1) * n2 * m2 + sign(y1) * (m2 * x2 + sign(x2) * y2)
    else:
        key = (m1 * x1 + sign(x1) * y1) * m2 * n2 + sign(x1) * (n2 * y2 + sign(y2) * x2)
    return np.argsort(key, kind="stable")


def attend(q, k, v, *, mask=None, segment_ids=None, causal=False, grid_hw=None, window=(9, 9), group_size=69,
           axis="x", shift=False, dropout_rate=0.0, dropout_rng=None, impl="xla"):
    """Softmax within consecutive groups of ``group_size`` tokens in FlatFormer's window order on the grid.

    ``grid_hw`` is (h, w) (None: a square grid). A length that is not a multiple of ``group_size`` is filled up
    at the end of the order with masked slots. Padded keys are excluded in every group; ``segment_ids``
    restrict each group further. Self-attention only. ``impl="pallas"``: the flash kernel on each group
    (``permute.attend_in_groups``; any group size, padded inside the kernel); dropout with the kernel's own
    draws, head_dim a power of two.
    """
    check_qkv(NAME, q, k, v)
    refuse_causal(NAME, causal, "groups follow a 2-D window order, not the sequence order.")
    refuse_cross(NAME, q, k, "groups are cut from one sorted sequence.")
    hw = grid.infer(NAME, q.shape[1], grid_hw)
    order = flat_order(hw, window, axis, shift)
    return permute.attend_in_groups(q, k, v, group_size=group_size, method=NAME, order=order, mask=mask,
                                    segment_ids=segment_ids, pad=True, dropout_rate=dropout_rate,
                                    dropout_rng=dropout_rng, impl=impl)


class Attention(nn.Module):
    """Linen wrapper of ``attend``; defaults ``window=(9, 9)``, ``group_size=69`` are FlatFormer's class defaults
    (its Waymo config uses (13, 13) and 144). A FlatFormer block cycles axis/shift through x, x shifted, y,
    y shifted over four layers: a model-level schedule, set per layer here."""

    grid: tuple | None = None
    window: tuple = (9, 9)
    group_size: int = 69
    axis: str = "x"
    shift: bool = False
    dropout_rate: float = 0.0
    impl: str = "xla"  # "pallas": the flash kernel on each group

    @nn.compact
    def __call__(self, q, k, v, *, mask=None, segment_ids=None, causal=False, deterministic=True):
        return attend(q, k, v, mask=mask, segment_ids=segment_ids, causal=causal, grid_hw=self.grid,
                      window=self.window, group_size=self.group_size, axis=self.axis, shift=self.shift,
                      impl=self.impl, **dropout_kwargs(self, deterministic))
