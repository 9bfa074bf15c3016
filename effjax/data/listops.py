"""LRA ListOps (lra.md §3.1) as a grain source: generated once into the on-disk cache, then memory-mapped."""

import numpy as np

from effjax.data import cache, common, listops_gen, tokenizer

GENERATOR_VERSION = 1  # bump when generation changes, so that old caches are not reused


class ListOps(common.Source):
    """10-way classification of nested MAX/MIN/MED/SM expressions; inputs are padded to max_length."""

    name = "listops"  # config.data.name

    task = "classification"
    vocab_size = tokenizer.VOCAB_SIZE
    num_classes = 10

    def __init__(self, split: str, *, num_train: int = 96_000, num_validation: int = 2_000,
                 num_test: int = 2_000, max_depth: int = 10, max_args: int = 10, min_length: int = 500,
                 max_length: int = 2000, seed: int = 0, cache_dir: str = ""):
        params = dict(num_train=int(num_train), num_validation=int(num_validation), num_test=int(num_test),
                      max_depth=int(max_depth), max_args=int(max_args), min_length=int(min_length),
                      max_length=int(max_length), seed=int(seed))
        super().__init__(split, params, dict(cache_dir=cache_dir))
        self.max_length = params["max_length"]
        arrays = cache.load_or_build("listops", {**params, "version": GENERATOR_VERSION},
                                     lambda: generate_splits(**params), cache_dir)
        self.tokens, self.labels = arrays[f"{split}_tokens"], np.asarray(arrays[f"{split}_labels"])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return common.classification_example(self.tokens[index].astype(np.int32), self.labels[index])


def generate_splits(*, num_train: int, num_validation: int, num_test: int, **generator_params) -> dict:
    """Generates all splits at once (unique across splits): {'<split>_tokens', '<split>_labels'} arrays."""
    sizes = {"train": num_train, "validation": num_validation, "test": num_test}
    tokens, labels = listops_gen.generate(num_examples=sum(sizes.values()), **generator_params)
    return common.split_arrays({"tokens": tokens, "labels": labels}, sizes)
