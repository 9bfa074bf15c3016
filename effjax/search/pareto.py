"""Pareto ranking for multi-objective search (NSGA-II, Deb, Pratap, Agarwal & Meyarivan 2002, Sec. III).

Pure numpy. ``points`` is ``[n, objectives]`` (or a list of equal-length sequences); **lower is better on
every objective**, so negate an objective to maximise it. ``a`` dominates ``b`` when it is no worse on every
objective and strictly better on one; equal points do not dominate each other, so duplicates share a front.
"""

import numpy as np


def _as_points(points) -> np.ndarray:
    """``points`` as a float ``[n, m]`` array; ValueError for another rank or a NaN."""
    array = np.asarray(points, dtype=np.float64)
    if array.ndim == 1 and array.size == 0:
        return array.reshape(0, 0)
    if array.ndim != 2:
        raise ValueError(f"points must be [n, objectives], got shape {array.shape}.")
    if np.isnan(array).any():
        raise ValueError("points hold a NaN; a failed candidate has no place on a Pareto front.")
    return array


def dominates(a, b) -> bool:
    """Whether ``a`` Pareto-dominates ``b``: no worse on every objective and better on at least one."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"dominates: objective vectors differ in shape, {a.shape} and {b.shape}.")
    return bool(np.all(a <= b) and np.any(a < b))


def _domination_matrix(points: np.ndarray) -> np.ndarray:
    """``[n, n]`` bool: entry (i, j) is True when point i dominates point j."""
    no_worse = np.all(points[:, None, :] <= points[None, :, :], axis=-1)
    better = np.any(points[:, None, :] < points[None, :, :], axis=-1)
    return no_worse & better


def non_dominated_sort(points) -> list[list[int]]:
    """Fronts of indices, best first: front 0 is the non-dominated set, front k is non-dominated once fronts
    0..k-1 are removed (Deb et al.'s fast non-dominated sort, O(m n^2)). Indices within a front are ascending."""
    points = _as_points(points)
    n = len(points)
    if n == 0:
        return []
    beats = _domination_matrix(points)
    count = beats.sum(axis=0)  # n_p: how many points dominate p
    front = [int(i) for i in np.flatnonzero(count == 0)]
    fronts = []
    while front:
        fronts.append(front)
        following = []
        for p in front:
            for q in np.flatnonzero(beats[p]):  # S_p: the points p dominates
                count[q] -= 1
                if count[q] == 0:
                    following.append(int(q))
        front = sorted(following)
    return fronts


def crowding_distance(points) -> np.ndarray:
    """NSGA-II crowding distance of each point within ``points`` (one front): per objective, sorted, each
    point adds (next - previous) / (max - min); the two boundary points of every objective get infinity.
    An objective with max == min adds nothing (but its boundary points are still infinite). Ties keep index
    order (a stable sort), so duplicates get a deterministic value."""
    points = _as_points(points)
    n = len(points)
    distance = np.zeros(n)
    if n == 0:
        return distance
    if n <= 2:
        return np.full(n, np.inf)
    for column in points.T:
        order = np.argsort(column, kind="stable")
        ordered = column[order]
        distance[order[0]] = distance[order[-1]] = np.inf
        span = ordered[-1] - ordered[0]
        if span > 0:
            distance[order[1:-1]] += (ordered[2:] - ordered[:-2]) / span
    return distance


def nsga2_order(points) -> list[int]:
    """Every index sorted by (front rank, -crowding distance within its front), ties by index: NSGA-II's
    crowded-comparison order, so ``nsga2_order(p)[:k]`` is the survivors of a population of size k."""
    points = _as_points(points)
    order = []
    for front in non_dominated_sort(points):
        crowding = crowding_distance(points[front])
        order.extend(front[i] for i in sorted(range(len(front)), key=lambda i: (-crowding[i], front[i])))
    return order


def pareto_front(points) -> list[int]:
    """Ascending indices of the non-dominated points (front 0)."""
    fronts = non_dominated_sort(points)
    return fronts[0] if fronts else []
