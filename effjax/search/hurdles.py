"""Halving hurdles (Primer, So et al. 2021, §1.4 of ``shared/methods/search.md``).

Training is split into ``h + 1`` bands; after band ``k`` (hurdle ``k``, 0-based) a candidate goes on only when its
fitness is no worse than the median of the earlier candidates' fitness at that same point. With a pass rate of
one half, bands of length ``c * 2**i`` make every band cost the same in expectation:
``T = c * (2**(h+1) - 1)`` and the expected cost per candidate is ``(h + 1) * c``. Primer: h = 4, T = 25,200 s,
c = 812.9 s, cut points 812.9, 2,438.7, 5,690.3 and 12,193.5 s, expected cost 4,064.5 s (6.2x less than T).
"""

import numpy as np


def _check(hurdles: int, total: float) -> None:
    if int(hurdles) != hurdles or hurdles < 0:
        raise ValueError(f"hurdles={hurdles!r} must be an integer >= 0: pass the number of hurdles (Primer used 4)")
    if not total > 0:
        raise ValueError(f"total={total!r} must be > 0: pass the full training budget (seconds, steps or FLOPs)")


def unit(hurdles: int, total: float) -> float:
    """The first band's length ``c = T / (2**(h+1) - 1)``."""
    _check(hurdles, total)
    return total / (2 ** (hurdles + 1) - 1)


def band_lengths(hurdles: int, total: float) -> list[float]:
    """Length of each of the ``h + 1`` bands, ``c * 2**i``; they sum to ``total``."""
    c = unit(hurdles, total)
    return [c * 2**i for i in range(hurdles + 1)]


def cut_points(hurdles: int, total: float) -> list[float]:
    """Cumulative budget at each of the ``h`` hurdles (the end of bands 0 .. h-1)."""
    return [float(x) for x in np.cumsum(band_lengths(hurdles, total))[:-1]]


def expected_cost(hurdles: int, total: float) -> float:
    """Expected budget per candidate when half pass each hurdle: ``(h + 1) * c``."""
    return (hurdles + 1) * unit(hurdles, total)


def band_steps(hurdles: int, total_steps: int) -> list[int]:
    """Integer band lengths (for a step budget) that sum exactly to ``total_steps``: rounded cumulative cuts."""
    cuts = [round(x) for x in cut_points(hurdles, total_steps)] + [int(total_steps)]
    steps = np.diff([0] + cuts).tolist()
    if min(steps) < 1:
        raise ValueError(f"total_steps={total_steps} is too small for {hurdles} hurdles: use at least "
                         f"{2 ** (hurdles + 1) - 1} steps or fewer hurdles")
    return steps


def passes(fitness: float, earlier: list[float], min_history: int = 10) -> bool:
    """Whether a candidate passes a hurdle: ``fitness`` (lower is better) is at most the median of the earlier
    candidates' fitness at the same hurdle. With fewer than ``min_history`` earlier values everyone passes."""
    if len(earlier) < min_history:
        return True
    return bool(fitness <= float(np.median(np.asarray(earlier, dtype=float))))
