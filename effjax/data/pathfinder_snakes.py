"""Pathfinder's snakes (lra.md §3.5): where the paddles of the two targets and of the distractors go.

The algorithm of drewlinsley/pathfinder ``snakes2.py``, re-written over numpy; ``pathfinder_gen`` holds LRA's
parameter tables (one row is a ``Params``, defined here) and draws the result. One image holds two target snakes
whose first paddles start ``seed_distance`` apart near the centre, plus distractor snakes of
``contour_length // 3`` paddles. A snake is a chain of short segments ("paddles", ``paddle_length`` long,
``paddle_thickness`` wide); the next paddle is drawn on a circle of radius ``length + margin`` around a pivot
``margin`` past the previous paddle's end, with the turn weighted by ``cos(min(continuity * turn, 90°))**2``, so
consecutive paddles leave a gap of at most ``2 * margin``.

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
- The targets, which on a fresh scene meet only the border and each other, are grown without the raster: a
  candidate keeps its centre line an exact segment distance of ``zone`` (a little more than the raster test
  guarantees) from every paddle of both targets but its predecessor. Distractors are tested on the raster with the
  targets and earlier distractors stamped; a distractor's DISTRACTOR_TRIES attempts grow side by side,
  unstamped (keeping ``zone`` from their own earlier paddles the same way), and the first that succeeds is kept:
  given the scene, the distribution of trying them in turn.
So consecutive paddles of a snake are at most ``2 * margin - thickness`` apart edge to edge (plus a cell of
anchor rounding) and different snakes at least ``2 * margin - thickness / 2``: a flood fill that bridges gaps
between those two bounds connects a target's tips and never joins two snakes (the tests check it).

Speed: numpy operations run over many examples at once. The targets of up to TARGET_LANES tries grow side by
side (``place_targets``, ``_Targets``: one round per numpy batch, each example drawing from its own rng); then
each example is a Python generator (``make_scene``) that stamps its targets and yields one request per
distractor, and many of them run side by side on their own raster slots (``lockstep``). An example depends on
its own rng only, never on the examples it shares a batch with.
"""

import dataclasses
import functools
import math

import numpy as np

ANTIALIAS_SCALE = 2  # every LRA builder ends with args.antialias_scale = 2
PADDLE_TRIES = 3  # max_paddle_retrial = 2: draws of a target's first paddle
DISTRACTOR_TRIES = 5  # max_distractor_contour_retrial = 4: attempts per distractor before it is skipped
SEED_TRIES = 32  # uniform draws of a distractor's first paddle (the original sampled among free pixels)
TARGET_BACKTRACKS = 20  # failed paddles per target snake before the example restarts
BACKTRACK_EVERY = 2  # back up one more paddle after every BACKTRACK_EVERY failures
EXAMPLE_RESTARTS = 200  # restarts before the parameters are declared infeasible
TARGET_LANES = 512  # target tries grown side by side (numpy ops over all of them)
_BLOCK = 16  # uniforms drawn ahead from an example's rng while its targets grow
_FAR = 1e6  # coordinate of a segment that is not there
_FIRST_SEEDS = 8  # a distractor attempt's seeds tested before the rest


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


class _Geometry:
    """Paddle shapes of one (resolution, margin), precomputed on a raster of ``cells`` cells per pixel.

    Snakes are anchored at cell centres, so each candidate paddle's blocking zone (the cells within ``zone`` of
    its centre line) and the cells it passes through are fixed offsets from its anchor cell. The zone is
    ``clearance`` plus a cell's half-diagonal and half a sampling step: a paddle whose sample points fall in no
    blocked cell is at least ``clearance`` from every stamped paddle. The next pivot is a fixed offset from the
    previous paddle's anchor too. Continuity weights have one row per predecessor: extension angles, then seed
    degrees -180..179.
    """

    def __init__(self, p: Params, margin: int):
        self.p, self.margin = p, margin
        self.cells = 8 if p.resolution <= 64 else 4
        # Consecutive paddles are at most 2 * margin (+ one cell of anchor rounding) apart; the clearance between
        # any others exceeds that by thickness / 2, so a flood fill that bridges 2 * margin separates snakes.
        self.clearance = self._clearance(margin)
        self.zone = self.clearance + 1.25 / self.cells
        if p.paddle_length >= 2 * self.zone:  # _closer_than decides by the segments' ends
            raise ValueError(f"Pathfinder paddle_length {p.paddle_length} must be under 2 * {self.zone}; shorten it.")
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
        self.ext_zones = [self._zone(a, b) for a, b in zip(self.ext_start, self.ext_end, strict=True)]
        degrees = np.arange(-180, 180) * np.pi / 180  # seeds: integer degrees, drawn from the tail
        self.seed_end = length * _direction(degrees)
        self.seed_step = self._offset((length + margin) * _direction(degrees))
        self.seed_cells = self._flat(self._path(np.zeros_like(self.seed_end), self.seed_end))
        self.seed_zones = [self._zone(np.zeros(2), end) for end in self.seed_end]
        self.weights = self._continuity(np.concatenate([self.angles, degrees]))
        # Per row, the candidates of positive weight (repeating the last to a common width).
        drawable = [np.flatnonzero(row > 0) for row in self.weights]
        width = max(len(d) for d in drawable)
        self.drawable = np.stack([np.pad(d, (0, width - len(d)), mode="edge") for d in drawable])
        # Samples first, so that the "any sample blocked" reductions run over the outer axis (much faster).
        self.ext_cells_t, self.seed_cells_t = self._flat(ext_path).T[:, None, :], self.seed_cells.T
        centres = self.centre(np.arange(self.size))
        outside = (centres < self.low) | (centres > self.high)  # the original's masked border, and beyond
        self.border = (outside[:, None] | outside[None, :]).astype(np.uint8)
        self.inside = tuple(np.flatnonzero(~outside)[[0, -1]].tolist())  # first and last cell inside, per axis
        self.ext_low, self.ext_high = ext_path.min(axis=1), ext_path.max(axis=1)  # [K, 2] sample cell offsets
        self.ext_mid = (self.ext_start + self.ext_end) / 2
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
        """Whether a candidate can come within ``zone`` of the paddle two before it (with turns under 90
        degrees, as in every LRA table, it cannot: the paddle between them holds them apart)."""
        k = len(self.angles)
        starts = np.concatenate([self.ext_start, np.zeros_like(self.seed_end)])  # from the paddle's pivot or anchor
        ends = np.concatenate([self.ext_end, self.seed_end])
        steps = np.concatenate([self.ext_step, self.seed_step]) / self.cells  # to the next pivot
        row, k1, k2 = np.nonzero((self.weights[:, :, None] > 0) & (self.weights[None, :k, :] > 0))
        pivot = steps[row] + self.ext_step[k1] / self.cells
        near = _segment_distances(pivot + self.ext_start[k2], pivot + self.ext_end[k2], starts[row], ends[row])
        return bool((near < self.zone).any())

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

    def arrays(self):
        """(starts [n, 2], ends [n, 2], snake ids [n], contrasts [n]) of every paddle, snake by snake."""
        rows = [(q[0], q[1], s.ident, q[2]) for s in self.snakes for q in s.paddles]
        starts, ends, snake, contrast = zip(*rows, strict=True)
        return np.array(starts), np.array(ends), np.array(snake, np.int32), np.array(contrast)


class _Snake:
    """A finished snake on a scene: its paddles (start, end, contrast), each stamped on the scene's raster.

    Its first paddle is a seed (a tail cell and an integer degree), each next one an extension angle from the
    pivot ``margin`` past the previous paddle's end (snakes.extend_snake)."""

    def __init__(self, scene: _Scene, ident: int, tail_cell, degree: int, angles: list, contrasts: list):
        g, blocked = scene.g, scene.blocked
        scale, offset = 1.0 / g.cells, (0.5 - g.pad) / g.cells - 0.5  # cell -> centre, as in g.centre
        r, c = (int(v) for v in tail_cell)
        y, x = r * scale + offset, c * scale + offset
        (ey, ex), (dr, dc), mask, (mr, mc) = g.seed[degree + 180]
        h, w = mask.shape
        blocked[r + mr:r + mr + h, c + mc:c + mc + w] += mask
        self.paddles = [((y, x), (y + ey, x + ex), contrasts[0])]
        r, c = r + dr, c + dc
        for k, contrast in zip(angles, contrasts[1:], strict=True):
            (ay, ax), (by, bx), (dr, dc), mask, (mr, mc) = g.ext[k]
            h, w = mask.shape
            blocked[r + mr:r + mr + h, c + mc:c + mc + w] += mask
            y, x = r * scale + offset, c * scale + offset
            self.paddles.append(((y + ay, x + ax), (y + by, x + bx), contrast))
            r, c = r + dr, c + dc
        self.ident, self.tail, self.head = ident, self.paddles[0][0], self.paddles[-1][1]
        scene.snakes.append(self)


def lockstep(tasks: list, rasters: np.ndarray):
    """Runs example generators side by side, one per raster slot; yields (task index, result) as they finish.

    ``tasks`` are callables raster -> generator. A generator yields requests (kind, geometry, *arguments): only
    ("distractor", geometry, uniforms) so far; each round, the requests of one kind and geometry of all running
    examples are answered by one batch of numpy operations on their rasters (``_ANSWERS``). An example depends
    only on its own generator (its rng, its raster), never on which others share the batch.
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


def _draw(weights: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """Per row of weights [N, K], the index drawn by inverting the cumulative weights at ``uniforms`` [N]; -1
    where they sum to (almost) zero."""
    cumulative = np.cumsum(weights, axis=1)
    total = cumulative[:, -1]
    k = np.minimum((cumulative <= (uniforms * total)[:, None]).sum(axis=1), weights.shape[1] - 1)
    return np.where(total >= 1e-4, k, -1)


def _distractor_answers(g: _Geometry, flat: np.ndarray, bases: np.ndarray, draws: tuple) -> list:
    """Per request (a distractor's uniforms [DISTRACTOR_TRIES, 3 * SEED_TRIES + distractor_length - 1]), the
    first of its attempts that grows to full length: (tail cell, degree, extension angles), or None.

    Attempt a draws SEED_TRIES seed paddles (tails, degrees) and keeps the first that crosses no blocked cell,
    then extends it one paddle at a time among the free candidates, weighted for continuity. The attempts are
    not stamped: a candidate also keeps ``zone`` from its own snake's paddles but the newest (exactly, as a
    segment distance; the newest two where the geometry shows the one before cannot be reached).
    """
    tries, n = SEED_TRIES, g.p.distractor_length
    draws = np.stack(draws)  # [R, A, W]
    tails = g.low + (g.high - g.low) * draws[:, :, :2 * tries].reshape(len(draws), DISTRACTOR_TRIES, tries, 2)
    degrees = (draws[:, :, 2 * tries:3 * tries] * 360).astype(np.int64) - 180
    # Only the first free seed of an attempt counts: test a few, and the rest where none of those is free.
    free = np.zeros(degrees.shape, bool)
    free[:, :, :_FIRST_SEEDS] = _seed_free(g, flat, tails[:, :, :_FIRST_SEEDS], degrees[:, :, :_FIRST_SEEDS],
                                           bases[:, None, None])
    request, attempt = np.nonzero(~free.any(axis=2))
    free[request, attempt, _FIRST_SEEDS:] = _seed_free(g, flat, tails[request, attempt, _FIRST_SEEDS:],
                                                       degrees[request, attempt, _FIRST_SEEDS:], bases[request, None])
    request, attempt = np.nonzero(free.any(axis=2))  # the attempts with a free seed, request by request
    seed = free[request, attempt].argmax(axis=1)
    cells, orientation = g.cell(tails[request, attempt, seed]), degrees[request, attempt, seed] + 180
    pivots, rows = cells + g.seed_step[orientation], len(g.angles) + orientation
    angles = np.zeros((len(request), n), np.int64)
    segments = np.zeros((len(request), n, 2, 2))
    segments[:, 0, 0] = g.centre(cells)
    segments[:, 0, 1] = segments[:, 0, 0] + g.seed_end[orientation]
    behind = 1 if g.reaches_two_back else 2
    reach = 1.5 * g.p.paddle_length + g.margin + g.zone  # candidates lie within length + margin of the pivot
    for step in range(1, n):
        drawable = g.drawable[rows]  # [N, W]: only candidates of positive weight are read
        hits = flat[g.ext_cells_t[:, 0, drawable] + (bases[request] + pivots[:, 0] * g.size + pivots[:, 1])[:, None]]
        free = np.zeros((len(rows), len(g.angles)), bool)
        free[np.arange(len(rows))[:, None], drawable] = ~(hits != 0).any(axis=0)
        centre = g.centre(pivots)
        others = segments[:, :max(step - behind, 0)]  # all paddles but the newest (two)
        if others.shape[1]:
            free &= ~_near_candidates(g, centre, rows, others.mean(axis=2), others, np.arange(len(others)), reach)
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
    (p0y, p0x), (p1y, p1x), (q0y, q0x), (q1y, q1x) = (np.moveaxis(np.asarray(v, float), -1, 0)
                                                      for v in (p0, p1, q0, q1))

    def side(oy, ox, ay, ax, by, bx):
        return (ay - oy) * (bx - ox) - (ax - ox) * (by - oy)

    crossing = ((side(p0y, p0x, p1y, p1x, q0y, q0x) * side(p0y, p0x, p1y, p1x, q1y, q1x) < 0)
                & (side(q0y, q0x, q1y, q1x, p0y, p0x) * side(q0y, q0x, q1y, q1x, p1y, p1x) < 0))
    ends = functools.reduce(np.minimum, [_to_segment_squared(y, x, ay, ax, by, bx) for (y, x), (ay, ax, by, bx) in (
        ((p0y, p0x), (q0y, q0x, q1y, q1x)), ((p1y, p1x), (q0y, q0x, q1y, q1x)),
        ((q0y, q0x), (p0y, p0x, p1y, p1x)), ((q1y, q1x), (p0y, p0x, p1y, p1x)))])
    return np.where(crossing, 0.0, np.sqrt(ends))


def _closer_than(p0, p1, q0, q1, distance: float) -> np.ndarray:
    """Whether segments p0->p1 and q0->q1 ([..., 2], broadcast) come closer than ``distance``, for segments
    shorter than 2 * distance: then crossing ones have an end within distance of the other segment, so the
    ends decide."""
    (p0y, p0x), (p1y, p1x), (q0y, q0x), (q1y, q1x) = (np.moveaxis(np.asarray(v, float), -1, 0)
                                                      for v in (p0, p1, q0, q1))
    squared = distance * distance
    close = _to_segment_squared(p0y, p0x, q0y, q0x, q1y, q1x) < squared
    close |= _to_segment_squared(p1y, p1x, q0y, q0x, q1y, q1x) < squared
    close |= _to_segment_squared(q0y, q0x, p0y, p0x, p1y, p1x) < squared
    close |= _to_segment_squared(q1y, q1x, p0y, p0x, p1y, p1x) < squared
    return close


def _to_segment_squared(y, x, ay, ax, by, bx):
    """Squared distance from points (y, x) to segments a->b (components broadcast)."""
    dy, dx, ry, rx = by - ay, bx - ax, y - ay, x - ax
    t = np.clip((ry * dy + rx * dx) / np.maximum(dy * dy + dx * dx, 1e-12), 0.0, 1.0)
    ry = ry - t * dy
    rx = rx - t * dx
    return ry * ry + rx * rx


def _near_candidates(g: _Geometry, centres: np.ndarray, rows: np.ndarray, mids: np.ndarray, segments: np.ndarray,
                     owners: np.ndarray, reach: float) -> np.ndarray:
    """[N, K]: which extension candidates from pivots at ``centres`` [N, 2] (after paddles of continuity rows
    ``rows`` [N]) come within ``zone`` of any of their segments: those of row ``owners[n]`` of ``segments``
    [M, J, 2, 2], whose midpoints are ``mids`` [N, J, 2] (far away for segments to ignore).

    Only segments with a midpoint within ``reach`` are measured, and only candidates of positive weight (the
    others are never drawn; their entries stay False)."""
    offset = centres[:, None] - mids
    pair, other = np.nonzero(np.einsum("njc,njc->nj", offset, offset) < reach * reach)
    near = np.zeros((len(centres), len(g.angles)), bool)
    if len(pair):
        k = g.drawable[rows[pair]]  # [P, W]
        at, segment = centres[pair, None], segments[owners[pair], other, None]
        hit = _closer_than(at + g.ext_start[k], at + g.ext_end[k], segment[..., 0, :], segment[..., 1, :], g.zone)
        near.reshape(-1)[(pair[:, None] * len(g.angles) + k)[hit]] = True
    return near


def _border_blocked(g: _Geometry, pivots: np.ndarray) -> np.ndarray:
    """[N, K]: which extension candidates from pivot cells [N, 2] have a sample in a border cell (the cells of
    ``g.border``: a sample's cell is outside g.inside on either axis)."""
    first, last = g.inside
    return ((pivots[:, None] + g.ext_low < first) | (pivots[:, None] + g.ext_high > last)).any(axis=2)


_ANSWERS = {"distractor": _distractor_answers}


def rasters(p: Params, slots: int) -> np.ndarray:
    size = _geometry(p, p.margins[0]).size
    return np.zeros((slots, size, size), np.uint8)  # counts stay far below 255


def _choice(rng: np.random.Generator, values: tuple):
    return values[int(rng.integers(len(values)))] if len(values) > 1 else values[0]


def _direction(theta):
    return np.stack([np.sin(theta), np.cos(theta)], -1)


def place_targets(p: Params, rngs: list) -> list:
    """snakes2.two_snakes for many examples at once: per rng, (geometry, [(tail cell, degree, angles)] * 2).

    Every try of an example draws its margin and joins that geometry's ``_Targets``; a failed try starts again,
    at most EXAMPLE_RESTARTS times. An example's result depends only on its own rng."""
    results, tries, growers = [None] * len(rngs), [0] * len(rngs), {}

    def start(job):
        tries[job] += 1
        if tries[job] > EXAMPLE_RESTARTS:
            raise ValueError(f"Could not place two target snakes in {EXAMPLE_RESTARTS} tries at resolution "
                             f"{p.resolution} with contour_length {p.contour_length}; the parameters are infeasible.")
        g = _geometry(p, _choice(rngs[job], p.margins))
        if g not in growers:
            growers[g] = _Targets(g, min(len(rngs), TARGET_LANES))
        growers[g].queue.append(job)

    for job in range(len(rngs)):
        start(job)
    while any(grower.busy for grower in growers.values()):
        for grower in list(growers.values()):
            grower.admit(rngs, start)
            for job, targets in grower.step(rngs, start):
                results[job] = (grower.g, targets)
    return results


class _Targets:
    """Tries of two target snakes, one per lane, grown side by side: seeds ``seed_distance`` apart in the central
    region, then paddle by paddle, the targets in turn.

    On a fresh scene the targets meet only the border and each other, so they are grown unstamped: a candidate
    is free when its samples cross no border cell and its centre line stays ``zone`` from every paddle of
    both targets but its predecessor (exact segment distances, for the paddles within reach). A stuck target
    backs up 1, 2, 3, ... paddles; after TARGET_BACKTRACKS failures the try fails. Uniforms come from each
    example's rng in blocks, so that an example draws the same numbers whichever lanes it shares the rounds with.
    """

    def __init__(self, g: _Geometry, lanes: int):
        length = g.p.contour_length
        self.g, self.queue, self.border = g, [], g.border.reshape(-1)
        self.job = np.full(lanes, -1)
        self.segments = np.full((lanes, 2, length, 2, 2), _FAR)  # [lane, target, paddle, start/end, yx]
        self.mids = np.full((lanes, 2, length, 2), _FAR)  # their midpoints (far where there is no paddle)
        self.pivots = np.zeros((lanes, 2, length, 2), np.int64)  # the next pivot cell after each paddle
        self.rows = np.zeros((lanes, 2, length), np.int64)  # each paddle's row of the continuity weights
        self.seeds = np.zeros((lanes, 2, 3), np.int64)  # tail cell and degree
        self.size, self.failures = np.ones((lanes, 2), np.int64), np.zeros((lanes, 2), np.int64)
        self.uniforms, self.used = np.zeros((lanes, _BLOCK)), np.full(lanes, _BLOCK)
        # Candidates lie within length + margin of the pivot; with turns under 90 degrees the paddle two back
        # is out of reach (reaches_two_back), so only paddles three or more back and the other target count.
        self.reach = 1.5 * g.p.paddle_length + g.margin + g.zone  # to a paddle's midpoint
        self.exempt = 1 if g.reaches_two_back else 2

    @property
    def busy(self) -> bool:
        return bool(self.queue) or bool((self.job >= 0).any())

    def admit(self, rngs: list, retry) -> None:
        """Seeds queued tries into free lanes (snakes2.two_snakes' seeds); a try whose seeds fail is retried."""
        g, p, tries = self.g, self.g.p, PADDLE_TRIES
        # In bulk: a handful of lanes costs as many numpy calls as all of them.
        while self.queue and (self.job < 0).sum() >= min(len(self.queue), len(self.job) // 8):
            lanes = np.flatnonzero(self.job < 0)[:len(self.queue)]
            jobs, self.queue = self.queue[:len(lanes)], self.queue[len(lanes):]
            draws = np.stack([rngs[job].random(5 * tries) for job in jobs])
            sd, count = p.seed_distance, len(jobs)
            lo, hi = 2 * sd, p.resolution - 1 - 2 * sd  # the first tail avoids a band of 2 * seed_distance
            tails = lo + np.floor(draws[:, :2 * tries] * (hi - lo + 1)).reshape(count, tries, 2)
            degrees = np.floor(draws[:, 2 * tries:3 * tries] * 360).astype(np.int64) - 180
            heads = tails + g.seed_end[degrees + 180]
            ok = _seed_free(g, self.border, tails, degrees) & np.all((heads >= lo) & (heads <= hi), axis=2)
            pick = (np.arange(count), ok.argmax(axis=1))
            first = (g.cell(tails[pick]), degrees[pick])
            alive = ok.any(axis=1)
            start = g.centre(first[0])
            end = start + g.seed_end[first[1] + 180]
            phis = np.floor(draws[:, 3 * tries:4 * tries] * 360) * np.pi / 180
            tails = np.round(start[:, None] + sd * _direction(phis))
            degrees = np.floor(draws[:, 4 * tries:5 * tries] * 360).astype(np.int64) - 180
            second_start = g.centre(g.cell(tails))
            ok = _seed_free(g, self.border, tails, degrees) & (_segment_distances(
                second_start, second_start + g.seed_end[degrees + 180], start[:, None], end[:, None]) >= g.zone)
            pick = (np.arange(count), ok.argmax(axis=1))
            second = (g.cell(tails[pick]), degrees[pick])
            alive &= ok.any(axis=1)
            self.mids[lanes] = _FAR
            for i, (cell, degree) in enumerate((first, second)):
                self.seeds[lanes, i, :2], self.seeds[lanes, i, 2] = cell, degree
                self.segments[lanes, i, 0, 0] = g.centre(cell)
                self.segments[lanes, i, 0, 1] = self.segments[lanes, i, 0, 0] + g.seed_end[degree + 180]
                self.mids[lanes, i, 0] = self.segments[lanes, i, 0].mean(axis=1)
                self.pivots[lanes, i, 0] = cell + g.seed_step[degree + 180]
                self.rows[lanes, i, 0] = len(g.angles) + degree + 180
            self.size[lanes], self.failures[lanes], self.used[lanes] = 1, 0, _BLOCK
            self.job[lanes[alive]] = np.array(jobs)[alive]
            for job in np.array(jobs)[~alive].tolist():
                retry(job)

    def step(self, rngs: list, retry) -> list:
        """One round: each growing target of every lane adds a paddle or backs up. Returns the finished tries,
        [(job, [(tail cell, degree, angles)] * 2)], and retries the failed ones."""
        g, length = self.g, self.g.p.contour_length
        for i in (0, 1):
            refill = np.flatnonzero((self.job >= 0) & (self.used == _BLOCK))
            for lane in refill.tolist():
                self.uniforms[lane] = rngs[self.job[lane]].random(_BLOCK)
            self.used[refill] = 0
            b = np.flatnonzero((self.job >= 0) & (self.size[:, i] < length))
            if not len(b):
                continue
            n = self.size[b, i]
            pivot, previous = self.pivots[b, i, n - 1], self.rows[b, i, n - 1]
            mids = self.mids[b].reshape(len(b), 2 * length, 2)
            for back in range(1, self.exempt + 1):
                mids[np.arange(len(b)), i * length + np.maximum(n - back, 0)] = _FAR
            centre = g.centre(pivot)
            free = ~_border_blocked(g, pivot) & ~_near_candidates(
                g, centre, previous, mids, self.segments.reshape(len(self.job), 2 * length, 2, 2), b, self.reach)
            k = _draw(g.weights[previous] * free, self.uniforms[b, self.used[b]])
            self.used[b] += 1
            grown = k >= 0
            bg, kg, ng, cg = b[grown], k[grown], n[grown], centre[grown]
            self.segments[bg, i, ng, 0], self.segments[bg, i, ng, 1] = cg + g.ext_start[kg], cg + g.ext_end[kg]
            self.mids[bg, i, ng] = cg + g.ext_mid[kg]
            self.pivots[bg, i, ng], self.rows[bg, i, ng] = pivot[grown] + g.ext_step[kg], kg
            self.size[bg, i] += 1
            stuck = b[~grown]
            self.failures[stuck, i] += 1
            failed = stuck[self.failures[stuck, i] > TARGET_BACKTRACKS]
            for job in self.job[failed].tolist():
                retry(job)
            self.job[failed] = -1
            stuck = stuck[self.failures[stuck, i] <= TARGET_BACKTRACKS]
            self.size[stuck, i] = np.maximum(self.size[stuck, i] - 1 - self.failures[stuck, i] // BACKTRACK_EVERY, 1)
            removed = np.arange(length) >= self.size[stuck, i, None]
            self.mids[stuck, i] = np.where(removed[..., None], _FAR, self.mids[stuck, i])
        done = np.flatnonzero((self.job >= 0) & (self.size == length).all(axis=1))
        finished = [(int(self.job[lane]), [(tuple(self.seeds[lane, i, :2].tolist()), int(self.seeds[lane, i, 2]),
                                            self.rows[lane, i, 1:].tolist()) for i in (0, 1)])
                    for lane in done.tolist()]
        self.job[done] = -1
        return finished


def _seed_free(g: _Geometry, flat: np.ndarray, tails: np.ndarray, degrees: np.ndarray, bases=0) -> np.ndarray:
    """Which seed paddles (tail points [..., 2], integer degrees [...]) cross no blocked cell of rasters (flat,
    each starting at ``bases``, broadcast)."""
    cells = g.cell(tails)
    starts = bases + cells[..., 0] * g.size + cells[..., 1]
    return ~(flat[g.seed_cells_t[:, degrees + 180] + starts] != 0).any(axis=0)


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
    _Snake(scene, ident, cell, degree, angles, [_choice(rng, p.snake_contrasts) for _ in range(len(angles) + 1)])
    return True


def make_scene(p: Params, rng: np.random.Generator, raster: np.ndarray, targets=None):
    """Places the two targets (``place_targets``, or given) and the distractors on ``raster``: (scene, [target0,
    target1]). A generator (see ``lockstep``)."""
    g, placed = targets or place_targets(p, [rng])[0]
    scene = _Scene(g, raster)
    mus = list(p.snake_contrasts) * 2
    rng.shuffle(mus)
    snakes = [_Snake(scene, ident, cell, degree, angles,
                     [_choice(rng, p.paddle_contrasts) * mus[ident] for _ in range(len(angles) + 1)])
              for ident, (cell, degree, angles) in enumerate(placed)]
    for ident in range(2, 2 + p.num_distractors):
        yield from _distractor(rng, scene, p, ident)
    return scene, snakes
