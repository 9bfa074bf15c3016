"""The data cache verifies sizes and checksums and regenerates damaged directories; errors name the file."""

import json
import logging

import numpy as np
import pytest

from effjax.data import cache, listops

SMALL = dict(num_train=40, num_validation=8, num_test=8, max_depth=3, min_length=0, max_length=32)


def build_counting(calls):
    def build():
        calls.append(1)
        return {"train_tokens": np.arange(4000, dtype=np.uint8).reshape(100, 40) % 16, "train_labels": np.arange(100)}

    return build


def load(tmp_path, calls):
    return cache.load_or_build("t", {"k": 1}, build_counting(calls), str(tmp_path))


def cached_file(tmp_path, key="train_tokens"):
    return cache.cache_dir_for("t", {"k": 1}, str(tmp_path)) / f"{key}.npy"


def truncate(path):
    path.write_bytes(path.read_bytes()[:-100])


def empty(path):
    path.write_bytes(b"")


def delete(path):
    path.unlink()


def flip_a_byte(path):
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 1
    path.write_bytes(bytes(blob))


def delete_meta(path):
    (path.parent / "meta.json").unlink()


def garble_meta(path):
    (path.parent / "meta.json").write_text("{not json")


def old_format_meta(path):
    (path.parent / "meta.json").write_text(json.dumps({"params": {}, "arrays": ["train_labels", "train_tokens"]}))


@pytest.mark.parametrize("damage", [truncate, empty, delete, flip_a_byte, delete_meta, garble_meta, old_format_meta])
def test_damaged_cache_is_regenerated_with_a_warning_naming_it(tmp_path, damage, caplog):
    calls = []
    want = {key: np.array(value) for key, value in load(tmp_path, calls).items()}
    assert load(tmp_path, calls).keys() == want.keys() and len(calls) == 1  # reused while intact
    damage(cached_file(tmp_path))
    with caplog.at_level(logging.WARNING):
        got = load(tmp_path, calls)
    assert len(calls) == 2
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])
    [record] = caplog.records
    assert str(cached_file(tmp_path).parent) in record.getMessage()
    assert cache.damage(cached_file(tmp_path).parent) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([cached_file(tmp_path).parent.name,
                                                                 cached_file(tmp_path).parent.name + ".lock"])


@pytest.mark.parametrize("damage, phrase", [(truncate, "has 4028 bytes instead of 4128"),
                                            (empty, "has 0 bytes instead of 4128"),
                                            (delete, "is missing"),
                                            (flip_a_byte, "has changed bytes (sha256 mismatch)")])
def test_damage_names_the_file_and_what_is_wrong(tmp_path, damage, phrase):
    load(tmp_path, [])
    path = cached_file(tmp_path)
    damage(path)
    assert cache.damage(path.parent) == f"{path} {phrase}"


def test_a_file_that_cannot_be_read_raises_one_line_naming_it(tmp_path, monkeypatch):
    load(tmp_path, [])
    path = cached_file(tmp_path)
    truncate(path)
    monkeypatch.setattr(cache, "damage", lambda directory: None)  # e.g. damaged after the check
    with pytest.raises(cache.CacheError) as error:
        load(tmp_path, [])
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"Cannot read data cache file {path}: ")


def test_an_unwritable_cache_raises_one_line_naming_it(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(cache.CacheError, match=f"Cannot create the data cache directory {blocker}") as error:
        cache.load_or_build("t", {"k": 1}, build_counting([]), str(blocker / "cache"))
    assert "\n" not in str(error.value)


def test_truncated_listops_tokens_are_regenerated(tmp_path):
    first = np.array(listops.ListOps("train", cache_dir=str(tmp_path), **SMALL).tokens)
    (path,) = tmp_path.glob("listops-*/train_tokens.npy")
    truncate(path)
    np.testing.assert_array_equal(listops.ListOps("train", cache_dir=str(tmp_path), **SMALL).tokens, first)
