"""grain pipelines: process slices of one global batch, exact resume, one-pass eval with weights."""

import json

import numpy as np
import pytest

from effjax.data import pipeline


class Numbers:
    """A tiny source whose element i holds i, so batches show which examples they contain."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"inputs": np.full(3, i + 1, np.int32), "targets": np.asarray(i % 7, np.int32)}

    def __repr__(self):
        return f"Numbers({self.n})"


def _ids(batch):
    return batch["inputs"][:, 0] - 1


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_slices_concatenate_to_the_global_batch(process_count):
    source, global_batch = Numbers(37), 8
    whole = _take(pipeline.train_iterator(source, global_batch_size=global_batch, seed=3), 12)
    parts = [_take(pipeline.train_iterator(source, global_batch_size=global_batch, seed=3, process_index=p,
                                           process_count=process_count), 12) for p in range(process_count)]
    for b, batch in enumerate(whole):  # 12 batches of 8 cross two epochs of 37
        assert batch["inputs"].shape == (global_batch, 3)
        for key in batch:
            assert all(part[b][key].shape[0] == global_batch // process_count for part in parts)
            np.testing.assert_array_equal(batch[key], np.concatenate([part[b][key] for part in parts]))


def test_epochs_are_permutations_reshuffled_each_epoch():
    source = Numbers(24)
    ids = np.concatenate([_ids(b) for b in _take(pipeline.train_iterator(source, global_batch_size=6, seed=0), 12)])
    epochs = ids.reshape(3, 24)
    for epoch in epochs:
        assert sorted(epoch) == list(range(24))
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[0], np.arange(24))
    other_seed = np.concatenate([_ids(b) for b in _take(pipeline.train_iterator(source, global_batch_size=6,
                                                                                   seed=1), 4)])
    assert not np.array_equal(other_seed, epochs[0])


@pytest.mark.parametrize("process_index, process_count", [(0, 1), (1, 2)])
def test_state_restore_resumes_exactly_across_an_epoch_boundary(process_index, process_count):
    source = Numbers(20)
    make = lambda: pipeline.train_iterator(source, global_batch_size=4, seed=5, process_index=process_index,
                                           process_count=process_count)
    iterator = make()
    _take(iterator, 4)  # 16 of 20 examples: the next 5 batches cross the epoch boundary
    state = json.loads(json.dumps(iterator.get_state()))  # what grain's orbax handler writes
    expected = _take(iterator, 5)
    restored = make()
    restored.set_state(state)
    for want, got in zip(expected, _take(restored, 5), strict=True):
        for key in want:
            np.testing.assert_array_equal(want[key], got[key])


def test_checkpoint_with_orbax(tmp_path):
    grain = pytest.importorskip("grain")
    ocp = pytest.importorskip("orbax.checkpoint")
    source = Numbers(10)
    iterator = pipeline.train_iterator(source, global_batch_size=4, seed=0)
    _take(iterator, 2)
    with ocp.CheckpointManager(tmp_path) as manager:
        manager.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
        manager.wait_until_finished()
        expected = _ids(next(iterator))
        restored = pipeline.train_iterator(source, global_batch_size=4, seed=0)
        manager.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    np.testing.assert_array_equal(_ids(next(restored)), expected)


def test_indivisible_global_batch_raises():
    with pytest.raises(ValueError, match="global_batch_size=6 must be a positive multiple of process_count=4"):
        pipeline.train_iterator(Numbers(10), global_batch_size=6, seed=0, process_count=4)
    with pytest.raises(ValueError, match="multiple of process_count=4"):
        pipeline.eval_batches(Numbers(10), global_batch_size=6, process_count=4)
    with pytest.raises(ValueError, match=r"process_index=2 must lie in \[0, process_count=2\)"):
        pipeline.eval_batches(Numbers(10), global_batch_size=4, process_index=2, process_count=2)


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_batches_cover_each_example_once_in_order(process_count):
    source, global_batch = Numbers(23), 6
    local = global_batch // process_count
    per_process = [list(pipeline.eval_batches(source, global_batch_size=global_batch, process_index=p,
                                              process_count=process_count)) for p in range(process_count)]
    assert all(len(batches) == 4 for batches in per_process)  # ceil(23 / 6)
    rows = []
    for b in range(4):
        for batches in per_process:
            batch = batches[b]
            assert batch["weights"].dtype == np.float32 and batch["weights"].shape == (local,)
            assert batch["inputs"].shape == (local, 3) and batch["targets"].shape == (local,)
            rows += [(int(i), float(w), int(t)) for i, w, t in zip(_ids(batch), batch["weights"],
                                                                    batch["targets"], strict=True)]
    real = [(i, t) for i, w, t in rows if w == 1]
    assert real == [(i, i % 7) for i in range(23)]  # every example once, in order
    assert [r for r in rows if r[1] == 0] == [(-1, 0.0, 0)]  # one zero padding row of weight 0


def test_eval_batches_of_an_exact_multiple_have_no_padding():
    batches = list(pipeline.eval_batches(Numbers(12), global_batch_size=4))
    assert len(batches) == 3 and all(b["weights"].min() == 1 for b in batches)
