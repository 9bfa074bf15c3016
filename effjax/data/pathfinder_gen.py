"""Pathfinder / Path-X generator (lra.md §3.5): the "snakes" of Linsley et al. 2018 with LRA's parameter tables.

Re-written over numpy from drewlinsley/pathfinder ``snakes2.py`` (which needs the removed
``scipy.misc.imresize``). This file holds LRA's parameter tables (``params_for``), the drawing and the entry
points (``make_example(s)``, ``generate`` and its worker processes); ``pathfinder_snakes`` places the snakes (its
docstring describes the algorithm). One image holds two target snakes and distractor snakes; two circles mark a
tip of each target (label 0) or both tips of one (label 1). Everything is drawn at ``antialias_scale``,
downsampled with a Lanczos-3 filter and scaled so that the brightest pixel is 255 (as ``scipy.misc.imsave``
did).

Speed: numpy operations run over many examples at once. The targets of TARGET_BATCH examples are placed in one go
(``pathfinder_snakes.place_targets``); then each example is a Python generator (``_example``) that places its
distractors, and ``SLOTS`` of them run side by side on their own raster slots (``pathfinder_snakes.lockstep``);
finished examples are drawn ``RENDER_BATCH`` at a time. An example depends on its seed and index only, never on
the examples it shares a batch with.
"""

import functools
import math
import multiprocessing
from concurrent import futures

import numpy as np

from effjax.data.pathfinder_snakes import Params, lockstep, make_scene, place_targets, rasters

RESOLUTIONS = (32, 64, 128, 256)
# LRA's TFDS splits (folders curv_baseline, curv_contour_length_9, curv_contour_length_14)
CONTOUR_LENGTHS = {6: "easy", 9: "intermediate", 14: "hard"}
SLOTS = 128  # examples whose distractors are placed side by side (their requests share numpy ops)
TARGET_BATCH = 2048  # examples whose targets are placed in one go
_CANVAS_BYTES = 1 << 20  # antialiased canvases drawn together (float64)
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


def make_example(p: Params, rng: np.random.Generator, label: int | None = None, *, debug: bool = False):
    """One example: (uint8 image [H, W], label), plus a dict of its geometry when ``debug``.

    Label 1: the markers sit on both tips of the same target snake; label 0: on a tip of each target.
    ``label`` None draws it from ``rng``.
    """
    return make_examples(p, [rng], [label], debug=debug)[0]


def make_examples(p: Params, rngs: list, labels: list, *, debug: bool = False) -> list:
    """``make_example`` for several rngs and labels, generated together (each comes out as it would alone)."""
    labels = [int(rng.integers(2)) if label is None else int(label) for rng, label in zip(rngs, labels, strict=True)]
    targets = place_targets(p, rngs)
    tasks = [functools.partial(_example, p, *args) for args in zip(rngs, labels, targets, strict=True)]
    infos = dict(lockstep(tasks, rasters(p, min(SLOTS, max(len(tasks), 1)))))
    infos = [infos[i] for i in range(len(tasks))]
    images, canvases = _images(p, infos) if infos else ([], [])
    if not debug:
        return [(image, info["label"]) for image, info in zip(images, infos, strict=True)]
    return [(image, info["label"], dict(info, antialias=canvas))
            for image, info, canvas in zip(images, infos, canvases, strict=True)]


def _example(p: Params, rng: np.random.Generator, label: int, targets, raster: np.ndarray):
    """The geometry of one example (a dict; ``_images`` draws it). A generator (see ``lockstep``)."""
    scene, targets = yield from make_scene(p, rng, raster, targets)
    origin = int(rng.integers(2))
    terminal = origin if label else 1 - origin
    starts, ends, snake, contrast = scene.arrays()
    return dict(label=label, starts=starts, ends=ends, snake=snake, contrast=contrast,
                markers=np.stack([targets[origin].tail, targets[terminal].head]),
                origin_tips=np.stack([t.tail for t in targets]), terminal_tips=np.stack([t.head for t in targets]),
                margin=scene.g.margin, clearance=scene.g.clearance)


def _images(p: Params, infos: list) -> tuple[np.ndarray, list]:
    """(uint8 images [B, H, W], antialiased canvases [h, w]) of examples' geometry: each is scaled so that its
    brightest pixel is 255 (as ``scipy.misc.imsave`` did). They are drawn a few at a time, as many as fit in a
    cache-sized canvas (larger batches run slower at 128 px)."""
    scale, size = p.antialias_scale, p.resolution * p.antialias_scale
    step = max(1, _CANVAS_BYTES // (size * size * 8))
    images, canvases = [], []
    for first in range(0, len(infos), step):
        chunk = infos[first:first + step]
        canvas = _render_batch([(i["starts"], i["ends"], i["contrast"], i["markers"]) for i in chunk], p, scale)
        image = downsample(canvas, scale)
        peak = np.maximum(image.max(axis=(1, 2), keepdims=True), 1e-6)
        images.append(np.round(image * (255.0 / peak)).astype(np.uint8))
        canvases.extend(canvas)
    return np.concatenate(images), canvases


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
    rngs = [_example_stream(seed, index) for index in range(start, stop)]
    images = np.zeros((stop - start, resolution, resolution), np.uint8)
    for first in range(0, len(rngs), TARGET_BATCH):
        rows = range(first, min(first + TARGET_BATCH, len(rngs)))
        targets = place_targets(p, [rngs[row] for row in rows])
        tasks = [functools.partial(_example, p, rngs[row], int(labels[row]), placed)
                 for row, placed in zip(rows, targets, strict=True)]
        done, remaining = {}, len(tasks)
        for row, info in lockstep(tasks, rasters(p, min(SLOTS, len(tasks)))):
            done[first + row] = info
            if len(done) == min(RENDER_BATCH, remaining):
                drawn = list(done)
                images[drawn] = _images(p, [done.pop(r) for r in drawn])[0]
                remaining -= len(drawn)
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
