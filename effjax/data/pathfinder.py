"""LRA Pathfinder (32x32) and Path-X (128x128) (lra.md §3.5) as a grain source: generated once, memory-mapped.

Tokens are pixel + 1 (vocab 257), so that no pixel is padding. LRA used the pixel itself as the token and built
its attention mask as ``inputs > 0``, so every black pixel (most of a Pathfinder image) was masked out
(lra.md §7.7); that bias is not reproduced.
"""

import os

import numpy as np

from effjax.data import cache, common, pathfinder_gen

GENERATOR_VERSION = 2  # bump when generation changes, so that old caches are not reused


class Pathfinder(common.Source):
    """Are the two circles on the same snake? 2-way classification of ``resolution**2`` pixel tokens.

    LRA's Pathfinder is resolution 32, Path-X 128, both with contour_length 14 ("hard"); 6 and 9 are its easy
    and intermediate levels. The default split sizes are LRA's 80/10/10 of 200K images. ``workers`` (0: all
    CPUs) only sets how many processes generate, not what they generate, so it is not part of the cache key or
    the repr.
    """

    name = "pathfinder"  # config.data.name

    task = "classification"
    vocab_size = 256 + 1  # pixel + 1
    num_classes = 2

    def __init__(self, split: str, *, resolution: int = 32, contour_length: int = 14, num_train: int = 160_000,
                 num_validation: int = 20_000, num_test: int = 20_000, seed: int = 0, workers: int = 0,
                 cache_dir: str = ""):
        pathfinder_gen.check(resolution, contour_length)
        params = dict(resolution=int(resolution), contour_length=int(contour_length), num_train=int(num_train),
                      num_validation=int(num_validation), num_test=int(num_test), seed=int(seed))
        super().__init__(split, params, dict(workers=workers, cache_dir=cache_dir))
        self.max_length = params["resolution"] ** 2
        arrays = cache.load_or_build("pathfinder", {**params, "version": GENERATOR_VERSION},
                                     lambda: generate_splits(**params, workers=workers or os.cpu_count() or 1),
                                     cache_dir)
        self.images, self.labels = arrays[f"{split}_images"], np.asarray(arrays[f"{split}_labels"])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return common.classification_example(self.images[index].reshape(-1).astype(np.int32) + 1,
                                             self.labels[index])


def generate_splits(*, num_train: int, num_validation: int, num_test: int, **generator_params) -> dict:
    """All splits from one stream (train first): {'<split>_images' uint8 [n, H, W], '<split>_labels' int32 [n]}."""
    sizes = {"train": num_train, "validation": num_validation, "test": num_test}
    images, labels = pathfinder_gen.generate(sum(sizes.values()), **generator_params)
    return common.split_arrays({"images": images, "labels": labels}, sizes)
