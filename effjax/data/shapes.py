"""Shapes: a generated RGB image classification task for vision models and token reduction, offline.

Each image is a ``size x size`` RGB picture of one shape (the class) drawn in a random colour, position and
scale over a noisy background of another random colour, with a distractor blob in a third colour so that the
shape, not a colour or a pixel count, decides the class. Images are generated from ``(seed, split, index)``
on demand (about 50 microseconds each), so there is nothing to cache or download. Inputs are pixel tokens
``[size * size * 3]`` (value + 1, row-major, channels last) as the other image sources give, and
``vit_classifier`` turns them back into images with ``model.channels = 3``.
"""

import numpy as np

from effjax.data import common

CLASSES = ("disk", "square", "triangle", "ring", "cross", "bar")
SPLIT_STREAMS = {"train": 0, "validation": 1, "test": 2}


def shape_mask(kind: str, yy, xx, cy: float, cx: float, radius: float, angle: float):
    """Boolean mask of shape ``kind`` centred at (cy, cx) with half-size ``radius``, rotated by ``angle``."""
    dy, dx = yy - cy, xx - cx
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy
    if kind == "disk":
        return u * u + v * v <= radius * radius
    if kind == "square":
        return (np.abs(u) <= radius * 0.85) & (np.abs(v) <= radius * 0.85)
    if kind == "triangle":
        return (v <= radius * 0.7) & (v >= 1.7 * np.abs(u) - radius)
    if kind == "ring":
        d2 = u * u + v * v
        return (d2 <= radius * radius) & (d2 >= (0.55 * radius) ** 2)
    if kind == "cross":
        arm = radius * 0.3
        return ((np.abs(u) <= arm) & (np.abs(v) <= radius)) | ((np.abs(v) <= arm) & (np.abs(u) <= radius))
    if kind == "bar":
        return (np.abs(u) <= radius) & (np.abs(v) <= radius * 0.3)
    raise ValueError(f"Unknown shape {kind!r}; known: {', '.join(CLASSES)}.")


def render(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
    """One uint8 image [size, size, 3] of class ``label``."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    colours = rng.uniform(0, 255, (3, 3))
    while np.abs(colours[1] - colours[0]).sum() < 150:  # the shape stands out from the background
        colours[1] = rng.uniform(0, 255, 3)
    image = colours[0] + rng.normal(0, 18, (size, size, 3))
    blob_r = rng.uniform(0.06, 0.12) * size
    by, bx = rng.uniform(blob_r, size - blob_r, 2)
    image[(yy - by) ** 2 + (xx - bx) ** 2 <= blob_r ** 2] = colours[2]
    radius = rng.uniform(0.18, 0.32) * size
    cy, cx = rng.uniform(radius, size - radius, 2)
    image[shape_mask(CLASSES[label], yy, xx, cy, cx, radius, rng.uniform(0, np.pi))] = colours[1]
    return np.clip(image, 0, 255).astype(np.uint8)


class Shapes(common.Source):
    """6-way classification of a shape in an RGB image (see the module doc)."""

    name = "shapes"  # config.data.name

    task = "classification"
    vocab_size = 257  # pixel value + 1; 0 would be padding
    num_classes = len(CLASSES)

    def __init__(self, split: str, *, num_train: int = 20_000, num_validation: int = 2_000, num_test: int = 2_000,
                 image_size: int = 32, seed: int = 0):
        params = dict(num_train=int(num_train), num_validation=int(num_validation), num_test=int(num_test),
                      image_size=int(image_size), seed=int(seed))
        super().__init__(split, params)
        self.size, self.seed = params["image_size"], params["seed"]
        self.length = params[f"num_{split}"]
        self.max_length = self.size * self.size * 3

    def __len__(self) -> int:
        return self.length

    def image(self, index: int) -> tuple[np.ndarray, int]:
        """The uint8 image [size, size, 3] and label of example ``index``."""
        rng = np.random.default_rng((self.seed, SPLIT_STREAMS[self.split], int(index)))
        label = int(rng.integers(len(CLASSES)))
        return render(rng, label, self.size), label

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"shapes {self.split}: index {index} outside 0..{self.length - 1}.")
        image, label = self.image(index)
        return common.classification_example(image.reshape(-1).astype(np.int32) + 1, label)
