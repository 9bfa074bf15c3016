"""The source registry, the byte-level LM source and the TFDS sources (under tfds.testing.mock_data)."""

import pickle
import subprocess
import sys

import numpy as np
import pytest

import effjax.data as data
from effjax.data import bytes_lm, tfds_sources


def test_names():
    assert data.names() == ["aan", "bytes_lm", "listops", "pathfinder", "shapes", "tfds_cifar10", "tfds_imdb"]


def test_unknown_name_lists_known_ones_and_a_close_match():
    known = "aan, bytes_lm, listops, pathfinder, shapes, tfds_cifar10, tfds_imdb"
    with pytest.raises(ValueError, match=rf"'listop'.*{known}.*'listops'"):
        data.make_source("listop", "train")


def test_unknown_param_names_param_source_and_accepted_ones():
    with pytest.raises(ValueError, match=r"'num_trian' of data source 'listops'.*num_train.*seed"):
        data.make_source("listops", "train", num_trian=10)
    with pytest.raises(ValueError, match=r"'max_len' of data source 'tfds_cifar10'; known: data_dir"):
        data.make_source("tfds_cifar10", "train", max_len=10)


def test_unknown_split_lists_valid_ones():
    with pytest.raises(ValueError, match=r"'val'.*test, train, validation"):
        data.make_source("bytes_lm", "val")
    with pytest.raises(ValueError, match=r"'dev'.*test, train, validation"):
        bytes_lm.BytesLM("dev")


def test_every_param_has_a_default():
    for name in data.names():
        assert data.params_of(name), name


def test_importing_the_package_does_not_import_tfds():
    code = "import sys, effjax.data; assert 'tensorflow_datasets' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.fixture()
def corpus(tmp_path):
    for i in range(5):
        (tmp_path / f"f{i}.txt").write_text(f"file {i} " + "héllo wörld " * (40 + 10 * i))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "g.txt").write_bytes(bytes(range(256)) * 3)
    return str(tmp_path)


def _bytes_lm(split, corpus, **params):
    params = {"max_length": 64, "validation_fraction": 0.1, "test_fraction": 0.1, **params}
    return data.make_source("bytes_lm", split, paths=corpus, **params)


def test_bytes_lm_splits_are_disjoint_and_cover_the_corpus(corpus):
    splits = {s: _bytes_lm(s, corpus) for s in ("train", "validation", "test")}
    windows = [set(splits[s].windows.tolist()) for s in splits]
    assert not (windows[0] & windows[1] or windows[0] & windows[2] or windows[1] & windows[2])
    total = -(-len(splits["train"].corpus) // 64)
    assert set().union(*windows) == set(range(total))
    assert all(len(s) > 0 for s in splits.values())
    text = b"".join(bytes((s[i]["inputs"][s[i]["inputs"] > 0] - 1).astype(np.uint8))
                    for s in splits.values() for i in range(len(s)))
    assert sorted(text) == sorted(bytes(splits["train"].corpus))  # every byte lands in exactly one split


def test_bytes_lm_elements(corpus):
    source = _bytes_lm("train", corpus)
    assert (source.task, source.vocab_size, source.num_classes, source.max_length) == ("lm", 257, None, 64)
    ids = np.stack([source[i]["inputs"] for i in range(len(source))])
    assert ids.dtype == np.int32 and ids.shape == (len(source), 64) and set(source[0]) == {"inputs"}
    assert ids.min() >= 0 and ids.max() <= 256 and ids.max() == 256  # byte 255 -> id 256
    assert bytes((ids[0] - 1).astype(np.uint8)) == bytes(source.corpus[source.windows[0] * 64:][:64])


def test_bytes_lm_last_window_is_zero_padded(corpus):
    sources = [_bytes_lm(s, corpus) for s in ("train", "validation", "test")]
    last = -(-len(sources[0].corpus) // 64) - 1
    (source,) = [s for s in sources if last in s.windows]
    ids = source[int(np.flatnonzero(source.windows == last)[0])]["inputs"]
    tail = len(source.corpus) - last * 64
    assert (ids[:tail] > 0).all() and (ids[tail:] == 0).all()


def test_bytes_lm_files_are_sorted_and_capped(corpus):
    files = bytes_lm.find_files(corpus)
    assert files == sorted(files) and len(files) == 6
    assert bytes_lm.find_files(f"{corpus}/f1.txt, {corpus}/f0.txt") == [f"{corpus}/f0.txt", f"{corpus}/f1.txt"]
    one_file = _bytes_lm("train", corpus, max_files=1, seed=0)
    assert len(one_file.corpus) == len(open(files[0], "rb").read())


def test_bytes_lm_repr_is_deterministic_and_seed_changes_split(corpus):
    a, b = _bytes_lm("validation", corpus), _bytes_lm("validation", corpus)
    assert repr(a) == repr(b) == (f"BytesLM(split='validation', paths={corpus!r}, max_length=64, max_files=2000, "
                                  "validation_fraction=0.1, test_fraction=0.1, seed=0)")
    np.testing.assert_array_equal(a.windows, b.windows)
    assert not np.array_equal(a.windows, _bytes_lm("validation", corpus, seed=1).windows)


def test_bytes_lm_pickles_by_parameters(corpus):
    source = _bytes_lm("train", corpus)
    copy = pickle.loads(pickle.dumps(source))
    assert repr(copy) == repr(source) and len(pickle.dumps(source)) < 1000
    np.testing.assert_array_equal(copy[len(copy) - 1]["inputs"], source[len(source) - 1]["inputs"])


def test_bytes_lm_errors(tmp_path, corpus):
    with pytest.raises(FileNotFoundError, match="found no files"):
        data.make_source("bytes_lm", "train", paths=str(tmp_path / "missing*.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="found no files"):
        data.make_source("bytes_lm", "train", paths=str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="is empty"):
        _bytes_lm("test", corpus, max_files=1, test_fraction=0.0)


def test_bytes_lm_default_reads_the_standard_library():
    source = data.make_source("bytes_lm", "validation", max_files=50)
    assert len(source) > 0 and all(f.endswith(".py") for f in bytes_lm.find_files(""))


def _check_classification(source, length, vocab, classes):
    assert (source.task, source.max_length, source.vocab_size, source.num_classes) == (
        "classification", length, vocab, classes)
    for i in range(len(source)):
        example = source[i]
        assert example["inputs"].shape == (length,) and example["inputs"].dtype == np.int32
        assert example["targets"].shape == () and example["targets"].dtype == np.int32
        assert 0 <= example["inputs"].min() and example["inputs"].max() < vocab
        assert 0 <= example["targets"] < classes


def test_tfds_imdb_under_mock_data():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=6):
        for split in ("train", "validation", "test"):
            source = data.make_source("tfds_imdb", split, max_length=50)
            assert len(source) == 6
            _check_classification(source, 50, 257, 2)
            text = source.records[0]["text"]
            expected = np.frombuffer(text.encode() if isinstance(text, str) else text, np.uint8)[:50] + 1
            np.testing.assert_array_equal(source[0]["inputs"][: len(expected)], expected)
            assert source[0]["inputs"].max() > 0


def test_tfds_cifar10_under_mock_data():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=4):
        for split in ("train", "validation", "test"):
            source = data.make_source("tfds_cifar10", split)
            _check_classification(source, 1024, 257, 10)
            image = source.records[1]["image"].astype(np.float64)
            gray = np.rint(0.2989 * image[..., 0] + 0.5870 * image[..., 1] + 0.1140 * image[..., 2])
            np.testing.assert_array_equal(source[1]["inputs"], gray.reshape(-1) + 1)
            assert source[1]["inputs"].min() >= 1  # no pixel is padding


def test_grayscale_matches_itu_601_weights():
    pixels = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255], [0, 0, 0]], np.uint8)
    np.testing.assert_array_equal(tfds_sources.grayscale(pixels), [76, 150, 29, 255, 0])


def test_tfds_splits_follow_lra():
    assert tfds_sources.TfdsImdb.TFDS_SPLITS == {"train": "train", "validation": "test", "test": "test"}
    assert tfds_sources.TfdsCifar10.TFDS_SPLITS == {"train": "train[:90%]", "validation": "train[90%:]",
                                                    "test": "test"}


@pytest.mark.parametrize("name, tfds_name", [("tfds_imdb", "imdb_reviews"), ("tfds_cifar10", "cifar10")])
def test_tfds_not_prepared_gives_a_clear_error(tmp_path, name, tfds_name):
    with pytest.raises(FileNotFoundError, match=rf"'{tfds_name}'.*not prepared.*tfds build {tfds_name}.*"
                                                rf"--data_dir={tmp_path}"):
        data.make_source(name, "train", data_dir=str(tmp_path))
    assert not any(tmp_path.rglob("*.array_record*"))  # nothing was downloaded or prepared
