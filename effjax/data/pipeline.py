"""grain pipelines over a source: an endless shuffled train iterator and a one-pass eval iterator.

Both cut global batches into process slices by index arithmetic: examples are batched in local
batches of l = global_batch_size // process_count, and process p takes local batches p, p + P, ...
Global batch b is then examples [b * G, (b + 1) * G) for any process count, and process p holds its
rows [p * l, (p + 1) * l). (Slicing examples with ``[p::P]`` before batching would make the global
batch depend on P.)
"""

import grain
import numpy as np

# One background thread keeps a few batches ready, so next() returns in ~0.2 ms while a train step
# runs; more threads only contend for the GIL on small hosts. A small buffer keeps memory low.
_READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)


def train_iterator(source, *, global_batch_size: int, seed: int, process_index: int = 0,
                   process_count: int = 1) -> grain.DatasetIterator:
    """Endless, seeded, per-epoch reshuffled local batches; checkpoint it with grain.checkpoint."""
    examples = grain.MapDataset.source(source).seed(seed).shuffle().repeat(None)
    local = _process_batches(examples, global_batch_size, process_index, process_count)
    return iter(local.to_iter_dataset(_READ_OPTIONS))


def eval_batches(source, *, global_batch_size: int, process_index: int = 0, process_count: int = 1):
    """One in-order pass over the split; the last batch is padded with zero rows of weight 0."""
    num_batches = -(-len(source) // global_batch_size)
    padded = grain.MapDataset.range(num_batches * global_batch_size).map(_Weighted(source))
    local = _process_batches(padded, global_batch_size, process_index, process_count)
    return iter(local.to_iter_dataset(_READ_OPTIONS))


def local_batch_size(global_batch_size: int, process_count: int) -> int:
    """global_batch_size // process_count, or a ValueError when it does not divide."""
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                         f"process_count={process_count}.")
    return global_batch_size // process_count


def _process_batches(examples, global_batch_size, process_index, process_count):
    local = local_batch_size(global_batch_size, process_count)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must lie in [0, process_count={process_count}).")
    return examples.batch(local, drop_remainder=True)[process_index::process_count]


class _Weighted:
    """Index -> example with weight 1, or a zero example with weight 0 past the end of the source."""

    def __init__(self, source):
        self.source = source
        self.zeros = {k: np.zeros_like(v) for k, v in source[0].items()} if len(source) else {}

    def __call__(self, index: int) -> dict:
        if index < len(self.source):
            return {**self.source[index], "weights": np.float32(1)}
        return {**self.zeros, "weights": np.float32(0)}
