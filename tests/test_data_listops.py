"""ListOps: generator against the LRA spec and a naive evaluator, tokenizer ids, on-disk cache."""

import hashlib
import os
import pickle
import subprocess
import sys
import threading

import numpy as np
import pytest

import effjax.data as data
from effjax.data import cache, listops, listops_gen, tokenizer

FULL = dict(num_train=2400, num_validation=300, num_test=300)  # LRA depth, arity and lengths
SMALL = dict(num_train=400, num_validation=50, num_test=50, max_depth=5, min_length=0, max_length=128)


@pytest.fixture(scope="module")
def full_splits(tmp_path_factory):
    cache_dir = str(tmp_path_factory.mktemp("listops"))
    return {split: data.make_source("listops", split, cache_dir=cache_dir, **FULL) for split in data.common.SPLITS}


def _rows(source):
    return np.asarray(source.tokens)


def test_source_attributes_and_elements(full_splits):
    source = full_splits["train"]
    assert (source.task, source.vocab_size, source.num_classes, source.max_length) == ("classification", 16, 10,
                                                                                      2000)
    assert [len(full_splits[s]) for s in ("train", "validation", "test")] == [2400, 300, 300]
    example = source[3]
    assert example["inputs"].shape == (2000,) and example["inputs"].dtype == np.int32
    assert example["targets"].shape == () and example["targets"].dtype == np.int32


def test_labels_match_naive_evaluator(full_splits):
    for source in full_splits.values():
        rows = _rows(source)[:1000]  # the pure-Python evaluator takes ~1 ms per example
        np.testing.assert_array_equal(source.labels[:1000], [listops_gen.evaluate(row) for row in rows])


@pytest.mark.parametrize("max_depth, max_args, min_length, max_length, n", [
    (1, 2, 0, 5, 10), (2, 2, 0, 10, 50), (4, 10, 0, 64, 800), (6, 3, 30, 100, 300), (10, 10, 20, 300, 300)])
def test_generator_on_many_shapes(max_depth, max_args, min_length, max_length, n):
    tokens, labels = listops_gen.generate(num_examples=n, max_depth=max_depth, max_args=max_args,
                                          min_length=min_length, max_length=max_length, seed=3)
    assert tokens.shape == (n, max_length) and labels.shape == (n,)
    assert len(np.unique(tokens, axis=0)) == n
    lengths = (tokens > 0).sum(axis=1)
    assert lengths.min() > min_length and lengths.max() < max_length
    np.testing.assert_array_equal(labels, [listops_gen.evaluate(row) for row in tokens])


def test_sampling_rules_of_one_round():
    # Depth 2 and no length filter keep every root: a digit, or an operator over 2..10 digits.
    tokens, _ = listops_gen.sample_round(np.random.default_rng(0), max_depth=2, max_args=10, min_length=0,
                                         max_length=100)
    assert len(tokens) == listops_gen.ROUND_SIZE
    lengths = (tokens > 0).sum(axis=1)
    assert abs(np.mean(lengths == 1) - 0.75) < 0.015  # leaf probability 1 - VALUE_P
    ops = tokens[lengths > 1]
    arity = lengths[lengths > 1] - 2
    assert arity.min() == 2 and arity.max() == 10
    np.testing.assert_allclose(np.bincount(arity)[2:] / len(arity), 1 / 9, atol=0.02)
    np.testing.assert_allclose(np.bincount(ops[:, 0])[1:5] / len(ops), 1 / 4, atol=0.02)
    digits = np.concatenate([tokens[lengths == 1, 0], ops[:, 1:][ops[:, 1:] >= tokenizer.DIGIT_OFFSET]])
    np.testing.assert_allclose(np.bincount(digits - tokenizer.DIGIT_OFFSET) / len(digits), 0.1, atol=0.01)


@pytest.mark.parametrize("expression, value", [
    ("[MAX 2 9 [MIN 4 7 ] 0 ]", 9), ("[MIN 3 [MAX 1 5 ] ]", 3), ("[MED 1 2 3 9 ]", 2), ("[MED 4 1 7 ]", 4),
    ("[MED 3 4 ]", 3), ("[SM 5 7 9 ]", 1), ("[SM [MED 8 9 ] [MIN 6 2 ] ]", 0), ("7", 7)])
def test_naive_evaluator_on_known_expressions(expression, value):
    assert listops_gen.evaluate(tokenizer.encode(expression)) == value


def test_lengths_strictly_inside_bounds_and_padding_only_after(full_splits):
    for source in full_splits.values():
        rows = _rows(source)
        lengths = (rows > 0).sum(axis=1)
        assert lengths.min() > 500 and lengths.max() < 2000
        # Nonzero tokens form a prefix: position j is nonzero iff j < length.
        np.testing.assert_array_equal(rows > 0, np.arange(2000)[None, :] < lengths[:, None])


def test_depth_is_capped_and_arity_in_range(full_splits):
    for row in _rows(full_splits["validation"])[:50]:
        open_counts, deepest = [], 0  # children seen so far by each open operator
        for i in row[row > 0]:
            if i == tokenizer.CLOSE_ID:
                assert 2 <= open_counts.pop() <= 10
                continue
            if open_counts:
                open_counts[-1] += 1
            if i in tokenizer.OPERATOR_IDS:
                open_counts.append(0)
                deepest = max(deepest, len(open_counts))
        assert not open_counts and deepest <= 9  # operators down to depth 9; depth 10 holds only digits


def test_label_histogram_has_heavy_min_and_max_classes(full_splits):
    labels = np.concatenate([s.labels for s in full_splits.values()])
    rates = np.bincount(labels, minlength=10) / len(labels)
    assert rates[0] > 0.13 and rates[9] > 0.13  # LRA: about 17% each
    assert rates[1:9].max() < 0.12
    assert listops_gen.majority_class_rate(labels) == rates.max()


def test_no_duplicates_within_or_across_splits(tmp_path):
    # Depth 3 with short trees repeats often, so this exercises the deduplication.
    params = dict(num_train=300, num_validation=100, num_test=100, max_depth=3, max_args=3, min_length=0,
                  max_length=32)
    rows = np.concatenate([_rows(data.make_source("listops", s, cache_dir=str(tmp_path), **params))
                           for s in ("train", "validation", "test")])
    assert len(np.unique(rows, axis=0)) == len(rows) == 500


def test_deterministic_across_cache_dirs_and_processes(tmp_path):
    first = listops.ListOps("train", cache_dir=str(tmp_path / "a"), **SMALL)
    second = listops.ListOps("train", cache_dir=str(tmp_path / "b"), **SMALL)
    np.testing.assert_array_equal(first.tokens, second.tokens)
    np.testing.assert_array_equal(first.labels, second.labels)
    code = ("import sys, hashlib, numpy as np; from effjax.data import listops; "
            f"s = listops.ListOps('train', cache_dir=sys.argv[1], **{SMALL!r}); "
            "print(hashlib.sha256(np.asarray(s.tokens).tobytes() + s.labels.tobytes()).hexdigest())")
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "c")], env=env, check=True,
                         capture_output=True, text=True).stdout.strip()
    assert out == hashlib.sha256(np.asarray(first.tokens).tobytes() + first.labels.tobytes()).hexdigest()


def test_different_seed_gives_different_data(tmp_path):
    a = listops.ListOps("train", cache_dir=str(tmp_path), **SMALL)
    b = listops.ListOps("train", cache_dir=str(tmp_path), **{**SMALL, "seed": 1})
    assert not np.array_equal(a.tokens, b.tokens)
    assert repr(a) != repr(b)


def test_repr_is_deterministic_and_ignores_cache_dir(tmp_path):
    a = listops.ListOps("test", cache_dir=str(tmp_path / "a"), **SMALL)
    b = listops.ListOps("test", cache_dir=str(tmp_path / "b"), **SMALL)
    assert repr(a) == repr(b) == (
        "ListOps(split='test', num_train=400, num_validation=50, num_test=50, max_depth=5, max_args=10, "
        "min_length=0, max_length=128, seed=0)")


def test_pickle_rebuilds_from_the_cache_instead_of_copying_arrays(tmp_path):
    source = listops.ListOps("validation", cache_dir=str(tmp_path), **SMALL)
    blob = pickle.dumps(source)
    assert len(blob) < 1000
    copy = pickle.loads(blob)
    assert repr(copy) == repr(source)
    np.testing.assert_array_equal(copy.tokens, source.tokens)


def test_cache_is_reused_and_keyed_by_every_param(tmp_path, monkeypatch):
    first = listops.ListOps("train", cache_dir=str(tmp_path), **SMALL)

    def fail(**_):
        raise AssertionError("regenerated")

    monkeypatch.setattr(listops, "generate_splits", fail)
    again = listops.ListOps("validation", cache_dir=str(tmp_path), **SMALL)
    assert len(again) == 50 and len(first) == 400
    for name, value in [("max_args", 9), ("min_length", 1), ("num_test", 51), ("max_depth", 6),
                        ("max_length", 127), ("seed", 2), ("num_train", 401), ("num_validation", 49)]:
        with pytest.raises(AssertionError, match="regenerated"):
            listops.ListOps("train", cache_dir=str(tmp_path), **{**SMALL, name: value})


def test_cache_dir_defaults_to_env(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFJAX_CACHE", str(tmp_path))
    listops.ListOps("train", **SMALL)
    assert len(list(tmp_path.glob("listops-*/meta.json"))) == 1


def test_cache_files_are_complete_and_no_temp_files_remain(tmp_path):
    listops.ListOps("train", cache_dir=str(tmp_path), **SMALL)
    (directory,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        ["meta.json"] + [f"{s}_{k}.npy" for s in ("train", "validation", "test") for k in ("tokens", "labels")])


def test_failed_write_leaves_neither_temp_nor_target(tmp_path, monkeypatch):
    def save(f, array):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache.np, "save", save)
    with pytest.raises(cache.CacheError, match="Cannot write the data cache .*No space left on device"):
        cache.load_or_build("t", {"k": 1}, lambda: {"a": np.arange(3)}, str(tmp_path))
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_concurrent_builders_generate_once(tmp_path):
    calls = []

    def build():
        calls.append(1)
        return {"a": np.arange(3)}

    threads = [threading.Thread(target=cache.load_or_build, args=("t", {"k": 1}, build, str(tmp_path)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    np.testing.assert_array_equal(cache.load_or_build("t", {"k": 1}, build, str(tmp_path))["a"], [0, 1, 2])


def test_infeasible_parameters_raise(tmp_path):
    with pytest.raises(ValueError, match="Found only"):
        listops_gen.generate(num_examples=10, max_depth=2, max_args=3, min_length=5, max_length=10, seed=0)
    with pytest.raises(ValueError, match="Infeasible"):
        listops_gen.generate(num_examples=10, max_depth=5, max_args=3, min_length=9, max_length=10, seed=0)


def test_tokenizer_ids_are_fixed():
    expected = {"[MAX": 1, "[MIN": 2, "[MED": 3, "[SM": 4, "X": 5, **{str(d): 6 + d for d in range(10)}}
    assert tokenizer.TOKEN_TO_ID == expected
    assert tokenizer.VOCAB_SIZE == 16 and tokenizer.PAD == 0


def test_tokenizer_round_trip_and_raw_form():
    text = "[MAX 2 9 [MIN 4 7 X 0 X"
    ids = tokenizer.encode(text)
    assert ids == [1, 8, 15, 2, 10, 13, 5, 6, 5]
    assert tokenizer.decode(ids + [0, 0]) == text
    assert tokenizer.encode("[MAX 2 9 [MIN 4 7 ] 0 ]") == ids
    assert tokenizer.encode("( ( ( ( [MAX 2 ) 9 ) 4 ) ] )") == tokenizer.encode("[MAX 2 9 4 X")
    with pytest.raises(ValueError, match="Unknown ListOps token"):
        tokenizer.encode("[FIRST 1 2 ]")
    with pytest.raises(ValueError, match="must lie in"):
        tokenizer.decode([16])


def test_generated_rows_decode_to_balanced_expressions(full_splits):
    row = _rows(full_splits["test"])[0]
    text = tokenizer.decode(row)
    assert tokenizer.encode(text) == [int(i) for i in row[row > 0]]
    assert sum(text.count(op) for op in tokenizer.OPERATORS) == text.split().count("X")
