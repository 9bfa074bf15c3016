"""On-disk cache for generated data: one directory per parameter hash, holding ``.npy`` files and ``meta.json``.

A directory is built whole in a temporary directory beside it and renamed into place, so it is complete or
absent. ``meta.json`` records every file's size and sha256; each load verifies them, and a directory that
fails (a file missing, truncated, emptied or with changed bytes, or a meta.json unreadable or from an older
format) is regenerated. An error that regeneration cannot fix is one line naming the file.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable

import numpy as np
from absl import logging

_META = "meta.json"
_FORMAT = 2  # meta.json layout: 2 records sizes and sha256 checksums


class CacheError(ValueError):
    """A cache file that cannot be read or regenerated; the message is one line naming the file.

    A ValueError, so that the entry point reports it in one line as it does other bad settings and inputs.
    """


def cache_root(cache_dir: str = "") -> pathlib.Path:
    """``cache_dir``, else ``$EFFJAX_CACHE``, else ``~/.cache/effjax``."""
    return pathlib.Path(cache_dir or os.environ.get("EFFJAX_CACHE") or "~/.cache/effjax").expanduser()


def cache_dir_for(name: str, params: dict, cache_dir: str = "") -> pathlib.Path:
    """The directory holding the arrays for ``name`` built with ``params`` (any change gives a new one)."""
    blob = json.dumps(params, sort_keys=True)
    return cache_root(cache_dir) / f"{name}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def load_or_build(name: str, params: dict, build: Callable[[], dict], cache_dir: str = "") -> dict:
    """Memory-maps the cached arrays of ``build()``, calling it and writing them first if missing or damaged."""
    directory = cache_dir_for(name, params, cache_dir)
    if damage(directory) is not None:
        _create_parent(directory)
        # Concurrent processes (several local JAX processes) wait here instead of all generating.
        with _lock(directory.parent / f"{directory.name}.lock"):
            problem = damage(directory)
            if problem is not None:
                if directory.exists():
                    logging.warning("Data cache %s cannot be used (%s); regenerating it.", directory, problem)
                _build_directory(directory, build(), params)
    return _open_arrays(directory)


def damage(directory: pathlib.Path) -> str | None:
    """What is wrong with the cache ``directory`` (one phrase naming the file), or None when it is intact."""
    meta_path = directory / _META
    if not meta_path.is_file():
        return f"{meta_path} is missing"
    try:
        meta = json.loads(meta_path.read_text())
        files = meta["files"] if meta.get("format") == _FORMAT else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        return f"{meta_path} is unreadable ({type(error).__name__})"
    if files is None:
        return f"{meta_path} is from an older cache format without checksums"
    for key, want in sorted(files.items()):
        problem = _file_damage(directory / f"{key}.npy", want)
        if problem is not None:
            return problem
    return None


def _file_damage(path: pathlib.Path, want: dict) -> str | None:
    """What is wrong with one cached file given its recorded ``{'bytes', 'sha256'}``, or None."""
    if not path.is_file():
        return f"{path} is missing"
    size = path.stat().st_size
    if size != want["bytes"]:
        return f"{path} has {size} bytes instead of {want['bytes']}"
    if _sha256(path) != want["sha256"]:
        return f"{path} has changed bytes (sha256 mismatch)"
    return None


def _sha256(path: pathlib.Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _open_arrays(directory: pathlib.Path) -> dict:
    """Plain ndarray views of memory maps of the verified files (so that sliced elements are plain arrays)."""
    arrays = {}
    for key in sorted(json.loads((directory / _META).read_text())["files"]):
        path = directory / f"{key}.npy"
        try:
            arrays[key] = np.load(path, mmap_mode="r").view(np.ndarray)
        except (OSError, ValueError, EOFError) as error:
            raise CacheError(f"Cannot read data cache file {path}: {error}; delete {directory} to regenerate "
                             "it.") from None
    return arrays


def _create_parent(directory: pathlib.Path) -> None:
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CacheError(f"Cannot create the data cache directory {directory.parent}: {error.strerror}; set "
                         "$EFFJAX_CACHE or config.data.cache_dir to a writable directory.") from None


@contextlib.contextmanager
def _lock(path: pathlib.Path):
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build_directory(directory: pathlib.Path, arrays: dict, params: dict) -> None:
    """Writes ``arrays`` and their meta.json into a temporary directory, then swaps it in for ``directory``."""
    try:
        tmp = pathlib.Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.", suffix=".tmp"))
        try:
            meta = {"format": _FORMAT, "params": params, "files": _write_arrays(tmp, arrays)}
            (tmp / _META).write_text(json.dumps(meta, indent=1, sort_keys=True))
            _swap_in(tmp, directory)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as error:
        raise CacheError(f"Cannot write the data cache {directory}: {error.strerror or error}; set $EFFJAX_CACHE "
                         "or config.data.cache_dir to a writable directory with space.") from None


def _write_arrays(directory: pathlib.Path, arrays: dict) -> dict:
    """Saves each array as ``<key>.npy`` in ``directory``; returns ``{key: {'bytes', 'sha256'}}``."""
    files = {}
    for key, array in arrays.items():
        path = directory / f"{key}.npy"
        with open(path, "wb") as f:
            np.save(f, array)
            f.flush()
            os.fsync(f.fileno())
        files[key] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    return files


def _swap_in(new: pathlib.Path, directory: pathlib.Path) -> None:
    """Renames ``new`` to ``directory``, first moving a damaged ``directory`` aside and deleting it."""
    old = None
    if directory.exists():
        old = pathlib.Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.", suffix=".old"))
        os.replace(directory, old / "damaged")
    os.replace(new, directory)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
