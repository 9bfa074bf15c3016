"""Pathfinder / Path-X generator (lra.md §3.5): the "snakes" of Linsley et al. 2018 with LRA's parameter tables.

Re-written over numpy from the algorithm of drewlinsley/pathfinder ``snakes2.py`` (which needs the removed
``scipy.misc.imresize``). One image holds two target snakes whose first paddles start ``seed_distance`` apart
near the centre, plus distractor snakes of ``contour_length // 3`` paddles. A snake is a chain of short
segments ("paddles", ``paddle_length`` long, ``paddle_thickness`` wide); the next paddle is drawn on a circle of
radius ``length + margin`` around a pivot ``margin`` past the previous paddle's end, with the turn weighted by
``cos(min(continuity * turn, 90°))**2``, so consecutive paddles leave a gap of at most ``2 * margin``. Two
circles mark a tip of each target (label 0) or both tips of one (label 1). Everything is drawn at
``antialias_scale``, downsampled with a Lanczos-3 filter and scaled so that the brightest pixel is 255 (as
``scipy.misc.imsave`` did).

Differences from the original, in the geometry's exactness and in bounding every retry:
- Snakes are anchored at the centres of a raster of 1/8 (1/4 above 64 px) pixel cells instead of whole pixels
  rounded up, and the collision test uses that raster's exact zones instead of Lanczos-resized masks: a paddle
  keeps its centre line at least ``2 * margin + thickness / 2`` from every paddle but its predecessor (the
  original's "dilated masks may not overlap", which allowed about ``2 * margin``).
- A paddle is drawn among the free candidates instead of up to three draws that may all collide; turns of 90
  degrees or more (times continuity) weigh exactly 0.
- A target snake that is stuck backs up 1, 2, 3, ... paddles instead of restarting the pair (which at 32x32
  succeeded in under 1% of tries); an example restarts after TARGET_BACKTRACKS failures, at most
  EXAMPLE_RESTARTS times (the original retried forever).
- A distractor's DISTRACTOR_TRIES attempts grow side by side, unstamped, and the first that succeeds is kept
  (given the scene, the distribution of trying them in turn); an attempt keeps its own earlier paddles at an
  exact segment distance of ``clearance`` instead of through the raster.
So consecutive paddles of a snake are at most ``2 * margin - thickness`` apart edge to edge (plus a cell of
anchor rounding) and different snakes at least ``2 * margin - thickness / 2``: a flood fill that bridges gaps
between those two bounds connects a target's tips and never joins two snakes (the tests check it).

Speed: each example is a Python generator that yields its requests (a seed's candidates, a target's next
paddle, or a whole distractor), and ``SLOTS`` examples run side by side, each on its own raster slot, so that
one batch of numpy operations per round answers the requests of all of them; finished examples are drawn
``RENDER_BATCH`` at a time. A paddle is exempt from its predecessor by subtracting a precomputed table (the
predecessor's zone at each candidate's samples, fixed by the two angles) instead of lifting and re-stamping it.
"""

import dataclasses
import functools
import math
import multiprocessing
from concurrent import futures

import numpy as np

RESOLUTIONS = (32, 64, 128, 256)
# LRA's TFDS splits (folders curv_baseline, curv_contour_length_9, curv_contour_length_14)
CONTOUR_LENGTHS = {6: "easy", 9: "intermediate", 14: "hard"}
ANTIALIAS_SCALE = 2  # every LRA builder ends with args.antialias_scale = 2
PADDLE_TRIES = 3  # max_paddle_retrial = 2: draws of a target's first paddle
DISTRACTOR_TRIES = 5  # max_distractor_contour_retrial = 4: attempts per distractor before it is skipped
SEED_TRIES = 32  # uniform draws of a distractor's first paddle (the original sampled among free pixels)
TARGET_BACKTRACKS = 20  # failed paddles per target snake before the example restarts
BACKTRACK_EVERY = 2  # back up one more paddle after every BACKTRACK_EVERY failures
EXAMPLE_RESTARTS = 200  # restarts before the parameters are declared infeasible
SLOTS = 128  # examples generated side by side (their requests share numpy ops)
RENDER_BATCH = 64  # finished examples drawn together

# Builder docstrings of LRA data/pathfinder.py; fields they leave unset are snakes2_wrapper.py's defaults
# (paddle_length 5, padding 22, seed_distance 27, paddle contrast 1). num_distractors = budget // (cl // 3).
_TABLE = {
    32: dict(padding=1, margins=(1,), paddle_length=2, paddle_thickness=0.5, marker_radius=1.5, seed_distance=7,
             continuity=1.0, distractor_budget=20, snake_contrasts=(2.0,), paddle_contrasts=(0.75,)),
    64: dict(padding=1, margins=(1,), paddle_length=5, paddle_thickness=1.0, marker_radius=2.5, seed_distance=12,
             continuity=1.8, distractor_budget=22, snake_contrasts=(0.8,), paddle_contrasts=(1.0,)),
    128: dict(padding=1, margins=(2, 3), paddle_length=5, paddle_thickness=1.5, marker_radius=3.0, seed_distance=20,
              continuity=1.8, distractor_budget=35, snake_contrasts=(0.9,), paddle_contrasts=(1.0,)),
    256: dict(padding=22, margins=(3,), paddle_length=5, paddle_thickness=2.0, marker_radius=5.0, seed_distance=27,
              continuity=1.8, distractor_budget=30, snake_contrasts=(1.0,), paddle_contrasts=(1.0,)),
}


@dataclasses.dataclass(frozen=True)
class Params:
    """One builder's parameters (lengths in output pixels)."""

    resolution: int
    contour_length: int
    padding: int
    margins: tuple
    paddle_length: float
    paddle_thickness: float
    marker_radius: float
    seed_distance: int
    continuity: float
    distractor_length: int
    num_distractors: int
    snake_contrasts: tuple
    paddle_contrasts: tuple
    antialias_scale: int = ANTIALIAS_SCALE


def check(resolution: int, contour_length: int) -> None:
    """Raises a one-line ValueError unless both are values LRA generated."""
    if resolution not in RESOLUTIONS:
        raise ValueError(f"Pathfinder resolution {resolution!r} is not one of {', '.join(map(str, RESOLUTIONS))} "
                         "(32 is Pathfinder, 128 is Path-X).")
    if contour_length not in CONTOUR_LENGTHS:
        levels = ", ".join(f"{cl} ({name})" for cl, name in CONTOUR_LENGTHS.items())
        raise ValueError(f"Pathfinder contour_length {contour_length!r} is not one of {levels}; LRA uses 14.")


@functools.cache
def params_for(resolution: int = 32, contour_length: int = 14) -> Params:
    """The LRA parameter set for a resolution and a difficulty (contour length 6, 9 or 14)."""
    check(resolution, contour_length)
    row = dict(_TABLE[resolution])
    distractor_length = contour_length // 3
    return Params(resolution=resolution, contour_length=contour_length,
                  distractor_length=distractor_length,
                  num_distractors=row.pop("distractor_budget") // distractor_length, **row)


class _Restart(Exception):
    """A target snake could not be completed; the example starts again."""


class _Geometry:
    """Paddle shapes of one (resolution, margin), precomputed on a raster of ``cells`` cells per pixel.

    Snakes are anchored at cell centres, so each candidate paddle's blocking zone (the cells within ``zone`` of
    its centre line) and the cells it passes through are fixed offsets from its anchor cell. The zone is
    ``clearance`` plus a cell's half-diagonal and half a sampling step: a paddle whose sample points fall in no
    blocked cell is at least ``clearance`` from every stamped paddle. The next pivot is a fixed offset from the
    previous paddle's anchor too, so how often each candidate's samples fall in its predecessor's zone is a
    table (``pred_hits``, one row per predecessor: extension angles, then seed degrees -180..179).
    """

    def __init__(self, p: Params, margin: int):
        self.p, self.margin = p, margin
        self.cells = 8 if p.resolution <= 64 else 4
        # Consecutive paddles are at most 2 * margin (+ one cell of anchor rounding) apart; the clearance between
        # any others exceeds that by thickness / 2, so a flood fill that bridges 2 * margin separates snakes.
        self.clearance = self._clearance(margin)
        self.zone = self.clearance + 1.25 / self.cells
        inset = p.padding - 0.5 + margin + p.paddle_thickness / 2  # the original masks `padding` border rows
        self.low, self.high = inset, p.resolution - 1 - inset
        # No clipping needed; one pad for all margins, so that the examples of a batch share one raster shape.
        self.pad = max(int(math.ceil((p.paddle_length + m + self._clearance(m) + 1.25 / self.cells) * self.cells))
                       for m in p.margins) + 4
        self.size = p.resolution * self.cells + 2 * self.pad  # raster side; cell (pad, pad) is pixel (0, 0)'s first
        self.samples = int(math.ceil(p.paddle_length * self.cells)) + 1
        length, step = p.paddle_length, p.paddle_length + margin
        self.angles = np.arange(0.0, 360.0, 360.0 / (2 * np.pi * step)) * np.pi / 180  # one per pixel of arc
        unit = _direction(self.angles)
        self.ext_start, self.ext_end = margin * unit, step * unit  # from the pivot (snakes.extend_snake)
        self.ext_step = self._offset((length + 2 * margin) * unit)  # pivot to the next pivot, in cells
        ext_path = self._path(self.ext_start, self.ext_end)
        self.ext_cells = self._flat(ext_path)
        self.ext_zones = [self._zone(a, b) for a, b in zip(self.ext_start, self.ext_end, strict=True)]
        degrees = np.arange(-180, 180) * np.pi / 180  # seeds: integer degrees, drawn from the tail
        self.seed_end = length * _direction(degrees)
        self.seed_step = self._offset((length + margin) * _direction(degrees))
        self.seed_cells = self._flat(self._path(np.zeros_like(self.seed_end), self.seed_end))
        self.seed_zones = [self._zone(np.zeros(2), end) for end in self.seed_end]
        steps = np.concatenate([self.ext_step, self.seed_step])
        self.pred_hits = np.stack([_mask_values(mask, step - corner + ext_path)
                                   for (mask, corner), step in zip(self.ext_zones + self.seed_zones, steps,
                                                                   strict=True)])
        self.weights = self._continuity(np.concatenate([self.angles, degrees]))
        # Samples first, so that the "any sample blocked" reductions run over the outer axis (much faster).
        self.ext_cells_t, self.seed_cells_t = self.ext_cells.T[:, None, :], self.seed_cells.T
        self.pred_hits_t = np.ascontiguousarray(self.pred_hits.transpose(2, 0, 1))
        centres = self.centre(np.arange(self.size))
        outside = (centres < self.low) | (centres > self.high)  # the original's masked border, and beyond
        self.border = (outside[:, None] | outside[None, :]).astype(np.uint8)
        # Python scalars for the per-paddle bookkeeping (numpy is slow on 2-vectors): per extension angle
        # (start, end, step to the next pivot, zone mask, zone corner); per seed degree (end, step, mask, corner).
        self.ext = [(tuple(a), tuple(b), tuple(s), mask, tuple(corner)) for a, b, s, (mask, corner)
                    in zip(self.ext_start.tolist(), self.ext_end.tolist(), self.ext_step.tolist(), self.ext_zones,
                           strict=True)]
        self.seed = [(tuple(b), tuple(s), mask, tuple(corner)) for b, s, (mask, corner)
                     in zip(self.seed_end.tolist(), self.seed_step.tolist(), self.seed_zones, strict=True)]

    def _clearance(self, margin):
        return 2 * margin + self.p.paddle_thickness / 2

    def _offset(self, v):
        return np.floor(0.5 + v * self.cells).astype(np.int64)

    def _flat(self, offsets):
        return offsets[..., 0] * self.size + offsets[..., 1]

    def _path(self, a, b):
        """Cell offsets [N, S, 2] of points every <= 1 / cells pixel along segments a->b (anchor-relative)."""
        t = np.linspace(0.0, 1.0, self.samples)[None, :, None]
        return self._offset(a[:, None] + t * (b - a)[:, None])

    def _zone(self, a, b):
        """(int16 mask, offset of its corner from the anchor cell) of the cells within zone of segment a->b."""
        lo = self._offset(np.minimum(a, b) - self.zone) - 1
        hi = self._offset(np.maximum(a, b) + self.zone) + 2
        yc = np.arange(lo[0], hi[0]) / self.cells  # cell centres relative to the anchor's centre
        xc = np.arange(lo[1], hi[1]) / self.cells
        return (_grid_segment_distance(yc, xc, a, b) < self.zone).astype(np.uint8), lo

    def _continuity(self, orientations):
        """Weights [len(orientations), K] of the candidates after each: cos(min(continuity * turn, 90 deg))**2."""
        turn = np.abs(self.angles[None, :] - orientations[:, None]) % (2 * np.pi)
        turn = np.minimum(turn, 2 * np.pi - turn) * self.p.continuity
        return np.where(turn < np.pi / 2, np.cos(turn) ** 2, 0.0)  # exactly 0 from 90 degrees on

    @functools.cached_property
    def reaches_two_back(self) -> bool:
        """Whether a candidate can come within ``clearance`` of the paddle two before it (with turns under 90
        degrees, as in every LRA table, it cannot: the paddle between them holds them apart)."""
        k = len(self.angles)
        starts = np.concatenate([self.ext_start, np.zeros_like(self.seed_end)])  # from the paddle's pivot or anchor
        ends = np.concatenate([self.ext_end, self.seed_end])
        steps = np.concatenate([self.ext_step, self.seed_step]) / self.cells  # to the next pivot
        row, k1, k2 = np.nonzero((self.weights[:, :, None] > 0) & (self.weights[None, :k, :] > 0))
        pivot = steps[row] + self.ext_step[k1] / self.cells
        near = _segment_distances(pivot + self.ext_start[k2], pivot + self.ext_end[k2], starts[row], ends[row])
        return bool((near < self.clearance).any())

    def centre(self, cell):
        """Centre (pixels) of a cell; a tuple (of floats) for a tuple."""
        if isinstance(cell, tuple):
            return tuple((c - self.pad + 0.5) / self.cells - 0.5 for c in cell)
        return (np.asarray(cell) - self.pad + 0.5) / self.cells - 0.5

    def cell(self, point) -> np.ndarray:
        return np.floor((np.asarray(point) + 0.5) * self.cells).astype(np.int64) + self.pad


@functools.cache
def _geometry(p: Params, margin: int) -> _Geometry:
    return _Geometry(p, margin)


def _mask_values(mask, index):
    """mask[index] for integer indices [..., 2], 0 outside the mask."""
    inside = np.all((index >= 0) & (index < mask.shape), axis=-1)
    clipped = np.minimum(np.maximum(index, 0), np.array(mask.shape) - 1)
    return np.where(inside, mask[clipped[..., 0], clipped[..., 1]], 0).astype(mask.dtype)


def _grid_segment_distance(yc, xc, a, b):
    """Distances [len(yc), len(xc)] from grid points to the segment a->b."""
    ab = b - a
    ay, ax = yc[:, None] - a[0], xc[None, :] - a[1]
    t = np.minimum(np.maximum((ay * ab[0] + ax * ab[1]) / max(float(ab @ ab), 1e-12), 0.0), 1.0)
    return np.hypot(ay - t * ab[0], ax - t * ab[1])


class _Scene:
    """The snakes placed so far and a raster (one slot of the batch's) counting, per cell, the paddles whose
    zone covers it."""

    def __init__(self, g: _Geometry, raster: np.ndarray):
        self.g = g
        raster[...] = g.border
        self.blocked, self.flat = raster, raster.reshape(-1)
        self.snakes = []

    def stamp(self, paddle, sign: int = 1) -> None:
        """Adds (sign 1) or removes (sign -1) a paddle's zone."""
        mask, (r, c) = paddle[3:]
        h, w = mask.shape
        if sign > 0:
            self.blocked[r:r + h, c:c + w] += mask
        else:
            self.blocked[r:r + h, c:c + w] -= mask

    def arrays(self):
        """(starts [n, 2], ends [n, 2], snake ids [n], contrasts [n]) of every paddle, snake by snake."""
        rows = [(q[0], q[1], s.ident, q[2]) for s in self.snakes for q in s.paddles]
        starts, ends, snake, contrast = zip(*rows, strict=True)
        return np.array(starts), np.array(ends), np.array(snake, np.int32), np.array(contrast)


class _Snake:
    """A snake being grown (snakes.extend_snake): its paddles and, per paddle, the next pivot cell and the
    paddle's row of the geometry's predecessor tables.

    Every paddle stays stamped on the scene's raster; a candidate is exempt from its predecessor only, by
    subtracting the predecessor's row of ``pred_hits`` from what its samples read.
    """

    def __init__(self, scene: _Scene, ident: int, tail_cell, degree: int, contrast: float):
        g = scene.g
        self.scene, self.ident = scene, ident
        (r, c) = tail_cell = tuple(int(v) for v in tail_cell)
        self.tail = (ty, tx) = g.centre(tail_cell)
        (ey, ex), (dr, dc), mask, (mr, mc) = g.seed[degree + 180]
        self.paddles, self.states = [], []
        self._push(((ty, tx), (ty + ey, tx + ex), contrast, mask, (r + mr, c + mc)), (r + dr, c + dc),
                   len(g.angles) + degree + 180)
        scene.snakes.append(self)

    def _push(self, paddle, pivot, row) -> None:
        self.scene.stamp(paddle)
        self.paddles.append(paddle)
        self.states.append((pivot, row))

    @property
    def head(self) -> tuple:
        return self.paddles[-1][1]

    def __len__(self) -> int:
        return len(self.paddles)

    def backtrack(self, count: int) -> None:
        """Removes the newest ``count`` paddles (at most all but the first)."""
        for _ in range(min(count, len(self.paddles) - 1)):
            self.scene.stamp(self.paddles.pop(), -1)
            self.states.pop()

    def discard(self) -> None:
        for paddle in self.paddles:
            self.scene.stamp(paddle, -1)
        self.scene.snakes.remove(self)

    def extend(self, rng: np.random.Generator, contrast: float):
        """Adds one paddle drawn among the free candidates, weighted for continuity; False when none is free.

        A generator (``ok = yield from snake.extend(...)``): it yields ("extend", geometry, flat pivot cell,
        predecessor row, uniform) and is sent the angle drawn, -1 when none is free (``_lockstep``).
        """
        g = self.scene.g
        (r, c), row = self.states[-1]
        k = yield "extend", g, r * g.size + c, row, rng.random()
        if k < 0:
            return False
        self.place(k, contrast)
        return True

    def place(self, k: int, contrast: float) -> None:
        """Adds the paddle at extension angle ``k`` from the newest pivot."""
        g = self.scene.g
        (r, c), _ = self.states[-1]
        (ay, ax), (by, bx), (dr, dc), mask, (mr, mc) = g.ext[k]
        y, x = g.centre((r, c))
        self._push(((y + ay, x + ax), (y + by, x + bx), contrast, mask, (r + mr, c + mc)), (r + dr, c + dc), k)


def _lockstep(tasks: list, rasters: np.ndarray):
    """Runs example generators side by side, one per raster slot; yields (task index, result) as they finish.

    ``tasks`` are callables raster -> generator. A generator yields requests ("extend", geometry, pivot cell,
    predecessor row, uniform), ("seeds", geometry, tails, degrees) or ("distractor", geometry, uniforms); each
    round, the requests of one kind and geometry of all running examples are answered by one batch of numpy
    operations on their rasters. An example depends only on its own generator (its rng, its raster), never on
    which others share the batch.
    """
    size2 = rasters.shape[1] * rasters.shape[2]
    flat = rasters.reshape(-1)
    finished = []
    queue = iter(enumerate(tasks))
    running = {}  # slot -> (task index, generator, its request)

    def advance(slot, index, gen, value):
        """Sends ``value`` to the slot's generator; when it is done, the slot takes the next task."""
        while True:
            if gen is not None:
                try:
                    running[slot] = (index, gen, gen.send(value))
                    return
                except StopIteration as stop:
                    finished.append((index, stop.value))
            index, task = next(queue, (None, None))
            if task is None:
                running.pop(slot, None)
                return
            gen, value = task(rasters[slot]), None

    for slot in range(min(len(tasks), len(rasters))):
        advance(slot, None, None, None)
    while running:
        groups = {}  # (kind, geometry) -> [(slot, *arguments)]
        for slot, (_, _, request) in running.items():
            groups.setdefault(request[:2], []).append((slot, *request[2:]))
        for (kind, g), requests in groups.items():
            slots, *arguments = zip(*requests, strict=True)
            answer = _ANSWERS[kind]
            for slot, value in zip(slots, answer(g, flat, np.array(slots) * size2, *arguments), strict=True):
                advance(slot, *running[slot][:2], value)
        yield from finished
        finished.clear()


def _extend_answers(g: _Geometry, flat: np.ndarray, bases: np.ndarray, pivots: tuple, rows: tuple,
                    uniforms: tuple) -> list:
    """Per request (a target's flat pivot cell, predecessor row, uniform), the extension angle drawn among the free
    candidates, weighted for continuity; -1 where none is free."""
    rows = np.array(rows)
    free = _free_candidates(g, flat, bases + np.array(pivots), rows)
    return _draw(g.weights[rows] * free, np.array(uniforms)).tolist()


def _free_candidates(g: _Geometry, flat: np.ndarray, starts: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """[N, K]: which candidates after pivots at flat ``starts`` cross no blocked cell but their predecessor's
    (whose rows of the predecessor table are ``rows``)."""
    hits = flat[g.ext_cells_t + starts[:, None]]  # [S, N, K]
    return ~(hits != g.pred_hits_t[:, rows]).any(axis=0)


def _draw(weights: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """Per row of weights [N, K], the index drawn by inverting the cumulative weights at ``uniforms`` [N]; -1
    where they sum to (almost) zero."""
    cumulative = np.cumsum(weights, axis=1)
    total = cumulative[:, -1]
    k = np.minimum((cumulative <= (uniforms * total)[:, None]).sum(axis=1), weights.shape[1] - 1)
    return np.where(total >= 1e-4, k, -1)


def _seed_answers(g: _Geometry, flat: np.ndarray, bases: np.ndarray, tails: tuple, degrees: tuple) -> list:
    """Per request, which seed paddles (tail points [N, 2], integer degrees [N]) cross no blocked cell."""
    ends = np.cumsum([len(d) for d in degrees]).tolist()
    cells = g.cell(np.concatenate(tails))
    starts = np.repeat(bases, np.diff(ends, prepend=0)) + cells[:, 0] * g.size + cells[:, 1]
    free = ~(flat[g.seed_cells_t[:, np.concatenate(degrees) + 180] + starts] != 0).any(axis=0)
    return [free[a:b] for a, b in zip([0] + ends[:-1], ends, strict=True)]


def _distractor_answers(g: _Geometry, flat: np.ndarray, bases: np.ndarray, draws: tuple) -> list:
    """Per request (a distractor's uniforms [DISTRACTOR_TRIES, 3 * SEED_TRIES + distractor_length - 1]), the
    first of its attempts that grows to full length: (tail cell, degree, extension angles), or None.

    Attempt a draws SEED_TRIES seed paddles (tails, degrees) and keeps the first that crosses no blocked cell,
    then extends it one paddle at a time among the free candidates, weighted for continuity. The attempts are
    not stamped: a candidate also keeps ``clearance`` from its own snake's paddles but the newest (exactly, as a
    segment distance; the newest two where the geometry shows the one before cannot be reached).
    """
    tries, n = SEED_TRIES, g.p.distractor_length
    draws = np.stack(draws)  # [R, A, W]
    tails = g.low + (g.high - g.low) * draws[:, :, :2 * tries].reshape(len(draws), -1, 2)
    degrees = (draws[:, :, 2 * tries:3 * tries] * 360).astype(np.int64).reshape(len(draws), -1) - 180
    cells = g.cell(tails)  # [R, A * T, 2]
    starts = bases[:, None] + cells[..., 0] * g.size + cells[..., 1]
    blocked = (flat[g.seed_cells_t[:, degrees + 180] + starts] != 0).any(axis=0)
    free = ~blocked.reshape(len(draws), DISTRACTOR_TRIES, tries)
    request, attempt = np.nonzero(free.any(axis=2))  # the attempts with a free seed, request by request
    seed = attempt * tries + free[request, attempt].argmax(axis=1)
    cells, orientation = cells[request, seed], degrees[request, seed] + 180
    pivots, rows = cells + g.seed_step[orientation], len(g.angles) + orientation
    angles = np.zeros((len(request), n), np.int64)
    segments = np.zeros((len(request), n, 2, 2))
    segments[:, 0, 0] = g.centre(cells)
    segments[:, 0, 1] = segments[:, 0, 0] + g.seed_end[orientation]
    behind = 1 if g.reaches_two_back else 2
    reach = 1.5 * g.p.paddle_length + g.margin + g.clearance  # candidates lie within length + margin of the pivot
    for step in range(1, n):
        hits = flat[g.ext_cells_t + (bases[request] + pivots[:, 0] * g.size + pivots[:, 1])[:, None]]
        free = ~(hits != 0).any(axis=0)  # [N, K]
        centre = g.centre(pivots)
        others = segments[:, :max(step - behind, 0)]  # all paddles but the newest (two)
        if others.shape[1]:
            offset = centre[:, None] - others.mean(axis=2)
            close = np.flatnonzero((np.hypot(offset[..., 0], offset[..., 1]) < reach).any(axis=1))
            at = centre[close, None, None]  # [C, 1, 1, 2]: candidates on axis 2, others on axis 1
            near = _segment_distances(at + g.ext_start, at + g.ext_end, others[close, :, None, 0],
                                      others[close, :, None, 1]) < g.clearance
            free[close] &= ~near.any(axis=1)
        k = _draw(g.weights[rows] * free, draws[request, attempt, 3 * tries + step - 1])
        ok = k >= 0
        request, attempt, cells, orientation, angles, segments = (
            x[ok] for x in (request, attempt, cells, orientation, angles, segments))
        k, centre = k[ok], centre[ok]
        segments[:, step, 0], segments[:, step, 1] = centre + g.ext_start[k], centre + g.ext_end[k]
        pivots, rows, angles[:, step] = pivots[ok] + g.ext_step[k], k, k
    found = [None] * len(draws)
    _, first = np.unique(request, return_index=True)  # attempts are in order within each request
    for i in first.tolist():
        found[request[i]] = (cells[i], int(orientation[i]) - 180, angles[i, 1:].tolist())
    return found


def _segment_distances(p0, p1, q0, q1):
    """Distances between segments p0->p1 and q0->q1 (broadcast over the leading axes of [..., 2] points)."""
    def to_segment(x, a, b):
        ab = b - a
        t = np.clip(np.sum((x - a) * ab, -1) / np.maximum(np.sum(ab * ab, -1), 1e-12), 0.0, 1.0)
        return np.hypot(*np.moveaxis(x - a - t[..., None] * ab, -1, 0))

    def side(o, a, b):
        return (a[..., 0] - o[..., 0]) * (b[..., 1] - o[..., 1]) - (a[..., 1] - o[..., 1]) * (b[..., 0] - o[..., 0])

    crossing = (side(p0, p1, q0) * side(p0, p1, q1) < 0) & (side(q0, q1, p0) * side(q0, q1, p1) < 0)
    ends = np.minimum(np.minimum(to_segment(p0, q0, q1), to_segment(p1, q0, q1)),
                      np.minimum(to_segment(q0, p0, p1), to_segment(q1, p0, p1)))
    return np.where(crossing, 0.0, ends)


_ANSWERS = {"extend": _extend_answers, "seeds": _seed_answers, "distractor": _distractor_answers}


def _rasters(p: Params, slots: int) -> np.ndarray:
    size = _geometry(p, p.margins[0]).size
    return np.zeros((slots, size, size), np.uint8)  # counts stay far below 255


def _seeds(scene: _Scene, tails: np.ndarray, degrees: np.ndarray):
    """Indices of the free seed paddles among tail points [N, 2] and integer-degree orientations [N].

    A generator (``ok = yield from _seeds(...)``): the test is answered by ``_lockstep``."""
    free = yield "seeds", scene.g, tails, degrees
    return np.flatnonzero(free)


def _choice(rng: np.random.Generator, values: tuple):
    return values[int(rng.integers(len(values)))] if len(values) > 1 else values[0]


def _direction(theta):
    return np.stack([np.sin(theta), np.cos(theta)], -1)


def _two_targets(rng: np.random.Generator, scene: _Scene, p: Params):
    """snakes2.two_snakes: two seeds seed_distance apart in the central region, then grown one after the other.

    A generator, as are the functions that call ``extend``."""
    sd = p.seed_distance
    mus = list(p.snake_contrasts) * 2
    rng.shuffle(mus)
    lo, hi = 2 * sd, p.resolution - 1 - 2 * sd  # the first tail avoids a band of 2 * seed_distance
    tails = rng.integers(lo, hi + 1, size=(PADDLE_TRIES, 2)).astype(float)
    degrees = rng.integers(-180, 180, size=PADDLE_TRIES)
    heads = tails + scene.g.seed_end[degrees + 180]
    ok = yield from _seeds(scene, tails, degrees)
    ok = ok[np.all((heads[ok] >= lo) & (heads[ok] <= hi), axis=1)]
    if not len(ok):
        raise _Restart
    snakes = [_Snake(scene, 0, scene.g.cell(tails[ok[0]]), int(degrees[ok[0]]),
                     _choice(rng, p.paddle_contrasts) * mus[0])]
    phis = rng.integers(0, 360, size=PADDLE_TRIES) * np.pi / 180
    tails = np.round(np.asarray(snakes[0].tail) + sd * _direction(phis))
    degrees = rng.integers(-180, 180, size=PADDLE_TRIES)
    ok = yield from _seeds(scene, tails, degrees)
    if not len(ok):
        raise _Restart
    snakes.append(_Snake(scene, 1, scene.g.cell(tails[ok[0]]), int(degrees[ok[0]]),
                         _choice(rng, p.paddle_contrasts) * mus[1]))
    # Grown in turn as in the original, which restarts the pair on any failure: at 32x32 that succeeds in well
    # under 1% of tries (two snakes of 14 paddles, 4 px apart, in 30 px); backing a snake up by 1, 2, 3, ...
    # paddles after failures finds the same kind of snakes fast.
    failures = [0, 0]
    while len(snakes[0]) < p.contour_length or len(snakes[1]) < p.contour_length:
        contrast = _choice(rng, p.paddle_contrasts)
        for i, snake in enumerate(snakes):
            if len(snake) < p.contour_length and not (yield from snake.extend(rng, contrast * mus[i])):
                failures[i] += 1
                if failures[i] > TARGET_BACKTRACKS:
                    raise _Restart
                snake.backtrack(1 + failures[i] // BACKTRACK_EVERY)
    return snakes


def _distractor(rng: np.random.Generator, scene: _Scene, p: Params, ident: int):
    """snakes.make_snake with distractor_length paddles and no backing up; DISTRACTOR_TRIES attempts at most,
    of which the first that succeeds is kept (``_distractor_answers``, one request).

    The attempts run side by side: a failed attempt leaves nothing behind, so given the scene this is the
    distribution of trying them one after another. All of their random numbers come from one draw.
    """
    draws = rng.random((DISTRACTOR_TRIES, 3 * SEED_TRIES + p.distractor_length - 1))
    found = yield "distractor", scene.g, draws
    if found is None:
        return False
    cell, degree, angles = found
    # Distractors take the snake contrast alone, not times the paddle contrast (as in snakes.make_many_snakes).
    snake = _Snake(scene, ident, cell, degree, _choice(rng, p.snake_contrasts))
    for k in angles:
        snake.place(k, _choice(rng, p.snake_contrasts))
    return True


def make_scene(p: Params, rng: np.random.Generator, raster: np.ndarray):
    """Places the two targets and the distractors on ``raster``: (scene, [target0, target1]); restarts are
    bounded. A generator (see ``_lockstep``)."""
    for _ in range(EXAMPLE_RESTARTS):
        scene = _Scene(_geometry(p, _choice(rng, p.margins)), raster)
        try:
            targets = yield from _two_targets(rng, scene, p)
        except _Restart:
            continue
        for ident in range(2, 2 + p.num_distractors):
            yield from _distractor(rng, scene, p, ident)
        return scene, targets
    raise ValueError(f"Could not place two target snakes in {EXAMPLE_RESTARTS} tries at resolution "
                     f"{p.resolution} with contour_length {p.contour_length}; the parameters are infeasible.")


def make_example(p: Params, rng: np.random.Generator, label: int | None = None, *, debug: bool = False):
    """One example: (uint8 image [H, W], label), plus a dict of its geometry when ``debug``.

    Label 1: the markers sit on both tips of the same target snake; label 0: on a tip of each target.
    ``label`` None draws it from ``rng``.
    """
    [(_, info)] = _lockstep([functools.partial(_example, p, rng, label)], _rasters(p, 1))
    images, canvases = _images(p, [info])
    if not debug:
        return images[0], info["label"]
    return images[0], info["label"], dict(info, antialias=canvases[0])


def _example(p: Params, rng: np.random.Generator, label: int | None, raster: np.ndarray):
    """The geometry of one example (a dict; ``_images`` draws it). A generator (see ``_lockstep``)."""
    if label is None:
        label = int(rng.integers(2))
    scene, targets = yield from make_scene(p, rng, raster)
    origin = int(rng.integers(2))
    terminal = origin if label else 1 - origin
    starts, ends, snake, contrast = scene.arrays()
    return dict(label=label, starts=starts, ends=ends, snake=snake, contrast=contrast,
                markers=np.stack([targets[origin].tail, targets[terminal].head]),
                origin_tips=np.stack([t.tail for t in targets]), terminal_tips=np.stack([t.head for t in targets]),
                margin=scene.g.margin, clearance=scene.g.clearance)


def _images(p: Params, infos: list) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images [B, H, W], antialiased canvases [B, h, w]) of examples' geometry, all drawn at once: each
    is scaled so that its brightest pixel is 255 (as ``scipy.misc.imsave`` did)."""
    canvases = _render_batch([(i["starts"], i["ends"], i["contrast"], i["markers"]) for i in infos], p,
                             p.antialias_scale)
    images = downsample(canvases, p.antialias_scale)
    peak = np.maximum(images.max(axis=(1, 2), keepdims=True), 1e-6)
    return np.round(images * (255.0 / peak)).astype(np.uint8), canvases


def render(starts, ends, contrast, markers, p: Params, scale: int) -> np.ndarray:
    """Float image at ``scale`` pixels per output pixel: max over soft-edged paddle capsules and marker discs.

    A pixel's value is clip(0.5 + scale * (radius - distance), 0, 1): 0.5 exactly on the shape's edge. Each
    shape is evaluated only in a window around it, all shapes at once.
    """
    return _render_batch([(starts, ends, contrast, markers)], p, scale)[0]


def _render_batch(items: list, p: Params, scale: int) -> np.ndarray:
    """``render`` of several (starts, ends, contrast, markers) into canvases [B, size, size] at once."""
    size = p.resolution * scale
    canvas = np.zeros(len(items) * size * size)
    paddles = [(np.asarray(a, float).reshape(-1, 2), np.asarray(b, float).reshape(-1, 2), np.asarray(c, float), i)
               for i, (a, b, c, _) in enumerate(items) if len(a)]
    if paddles:
        starts, ends, contrast, image = (np.concatenate(x) for x in zip(
            *[(a, b, c, np.full(len(a), i)) for a, b, c, i in paddles], strict=True))
        values, index = _shapes(starts, ends, p.paddle_thickness / 2, scale, size)
        np.maximum.at(canvas, index + (image * size * size)[:, None, None], values * contrast[:, None, None])
    discs = [(np.asarray(m, float).reshape(-1, 2), i) for i, (*_, m) in enumerate(items) if m is not None and len(m)]
    if discs:
        markers = np.concatenate([m for m, _ in discs])
        image = np.concatenate([np.full(len(m), i) for m, i in discs])
        values, index = _shapes(markers, markers, p.marker_radius, scale, size)
        np.maximum.at(canvas, index + (image * size * size)[:, None, None], values)
    return canvas.reshape(len(items), size, size)


def _shapes(a, b, radius, scale, size):
    """Values [S, w, w] of capsules a->b of ``radius`` on their windows, and flat canvas indices."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    extent = np.abs(b - a).max(initial=0.0) + 2 * radius
    w = int(math.ceil(extent * scale)) + 3
    low = np.floor((np.minimum(a, b) - radius + 0.5) * scale).astype(np.int64) - 1  # fine-pixel corner
    rows = low[:, 0, None] + np.arange(w)  # [S, w]
    cols = low[:, 1, None] + np.arange(w)
    yc = (rows + 0.5) / scale - 0.5  # fine-pixel centres in output-pixel units
    xc = (cols + 0.5) / scale - 0.5
    ab = b - a
    ay, ax = yc - a[:, 0, None], xc - a[:, 1, None]  # [S, w]
    denom = np.maximum(np.sum(ab * ab, 1), 1e-12)[:, None, None]
    t = np.clip((ay[:, :, None] * ab[:, 0, None, None] + ax[:, None, :] * ab[:, 1, None, None]) / denom, 0.0, 1.0)
    dy = ay[:, :, None] - t * ab[:, 0, None, None]
    dx = ax[:, None, :] - t * ab[:, 1, None, None]
    values = np.clip(0.5 + scale * (radius - np.sqrt(dy * dy + dx * dx)), 0.0, 1.0)
    valid = ((rows >= 0) & (rows < size))[:, :, None] & ((cols >= 0) & (cols < size))[:, None, :]
    index = np.clip(rows, 0, size - 1)[:, :, None] * size + np.clip(cols, 0, size - 1)[:, None, :]
    return np.where(valid, values, 0.0), index


@functools.cache
def _lanczos_matrix(size: int, scale: int) -> np.ndarray:
    """[size, size * scale] Lanczos-3 reduction by ``scale`` (PIL's LANCZOS: kernel widened by the factor)."""
    fine = np.arange(size * scale)
    centre = (np.arange(size) + 0.5) * scale - 0.5
    x = (fine[None, :] - centre[:, None]) / scale
    weights = np.where(np.abs(x) < 3, np.sinc(x) * np.sinc(x / 3), 0.0)
    return weights / weights.sum(axis=1, keepdims=True)


def downsample(canvas: np.ndarray, scale: int) -> np.ndarray:
    """Lanczos-3 reduction of square canvases [..., H, W] by an integer ``scale``, clipped to [0, inf).

    Above 64 px the filter is applied as its band (6 * scale taps per output pixel), a sum of strided slices:
    there a matrix product goes multithreaded in BLAS, which stalls (~30x slower) on a busy machine.
    """
    if scale == 1:
        return canvas
    if canvas.shape[-1] <= 64:  # small enough for BLAS to run single-threaded, and faster than the taps
        matrix = _lanczos_matrix(canvas.shape[-1] // scale, scale)
        return np.maximum(matrix @ canvas @ matrix.T, 0.0)
    weights, first = _lanczos_taps(canvas.shape[-1] // scale, scale)
    rows = _reduce(canvas, weights, first, scale)
    return np.maximum(_reduce(rows.swapaxes(-1, -2), weights, first, scale).swapaxes(-1, -2), 0.0)


@functools.cache
def _lanczos_taps(size: int, scale: int) -> tuple[np.ndarray, int]:
    """The band of ``_lanczos_matrix``: (weights [size, taps], offset of tap 0 from output pixel i's i * scale)."""
    matrix = _lanczos_matrix(size, scale)
    rows, cols = np.nonzero(matrix)
    first, last = int((cols - rows * scale).min()), int((cols - rows * scale).max())
    index = np.arange(size)[:, None] * scale + first + np.arange(last - first + 1)
    inside = (index >= 0) & (index < size * scale)
    return np.where(inside, matrix[np.arange(size)[:, None], np.clip(index, 0, size * scale - 1)], 0.0), first


def _reduce(x: np.ndarray, weights: np.ndarray, first: int, scale: int) -> np.ndarray:
    """Filters and decimates the rows of x [..., size * scale, W] to [..., size, W]."""
    size, taps = weights.shape
    padded = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(-first, taps + first - scale), (0, 0)])
    out = weights[:, 0, None] * padded[..., 0:(size - 1) * scale + 1:scale, :]
    for t in range(1, taps):
        out += weights[:, t, None] * padded[..., t:t + (size - 1) * scale + 1:scale, :]
    return out


def example_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, index])


def label_of(seed: int, index: int) -> int:
    """Exactly balanced labels: each aligned pair (2k, 2k + 1) holds one 0 and one 1, in a seeded order."""
    first = int(example_rng(seed, index - index % 2).integers(2))
    return first ^ (index % 2)


def generate_range(start: int, stop: int, resolution: int = 32, contour_length: int = 14,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Examples start..stop-1 of the stream: (uint8 [n, H, W], int32 [n]); each depends on (seed, index) only."""
    p = params_for(resolution, contour_length)
    labels = np.array([label_of(seed, index) for index in range(start, stop)], np.int32)
    tasks = [functools.partial(_example, p, _example_stream(seed, index), int(label))
             for index, label in zip(range(start, stop), labels, strict=True)]
    images = np.zeros((stop - start, resolution, resolution), np.uint8)
    done, remaining = {}, len(tasks)
    for row, info in _lockstep(tasks, _rasters(p, min(SLOTS, max(stop - start, 1)))):
        done[row] = info
        if len(done) == min(RENDER_BATCH, remaining):
            rows = list(done)
            images[rows] = _images(p, [done.pop(r) for r in rows])[0]
            remaining -= len(rows)
    return images, labels


def _example_stream(seed: int, index: int) -> np.random.Generator:
    rng = example_rng(seed, index)
    rng.integers(2)  # the pair's label draw (label_of) comes first in an even example's stream
    return rng


def _generate_range_args(args):
    return generate_range(*args)


def generate(num_examples: int, *, resolution: int = 32, contour_length: int = 14, seed: int = 0,
             workers: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images [N, H, W], int32 labels [N]); identical for any number of ``workers``.

    Workers are spawned processes (never forked: JAX is multithreaded) over contiguous chunks.
    """
    check(resolution, contour_length)
    workers = max(1, min(int(workers), num_examples))
    if workers == 1:
        return generate_range(0, num_examples, resolution, contour_length, seed)
    bounds = np.linspace(0, num_examples, min(workers * 8, num_examples) + 1).astype(int)
    chunks = [(int(a), int(b), resolution, contour_length, seed) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    images = np.zeros((num_examples, resolution, resolution), np.uint8)
    labels = np.zeros(num_examples, np.int32)
    # An executor, not a Pool: a worker that cannot start (say, a __main__ read from stdin) raises instead of
    # being respawned forever.
    with futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for (a, b, *_), (chunk_images, chunk_labels) in zip(chunks, pool.map(_generate_range_args, chunks),
                                                             strict=True):
            images[a:b], labels[a:b] = chunk_images, chunk_labels
    return images, labels
