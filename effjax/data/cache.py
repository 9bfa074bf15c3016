"""On-disk cache for generated data: one directory per parameter hash, ``.npy`` files written atomically."""

import contextlib
import fcntl
import hashlib
import json
import os
import pathlib
import tempfile
from collections.abc import Callable

import numpy as np

_META = "meta.json"  # written last: a directory without it is incomplete


def cache_root(cache_dir: str = "") -> pathlib.Path:
    """``cache_dir``, else ``$EFFJAX_CACHE``, else ``~/.cache/effjax``."""
    return pathlib.Path(cache_dir or os.environ.get("EFFJAX_CACHE") or "~/.cache/effjax").expanduser()


def cache_dir_for(name: str, params: dict, cache_dir: str = "") -> pathlib.Path:
    """The directory holding the arrays for ``name`` built with ``params`` (any change gives a new one)."""
    blob = json.dumps(params, sort_keys=True)
    return cache_root(cache_dir) / f"{name}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def load_or_build(name: str, params: dict, build: Callable[[], dict], cache_dir: str = "") -> dict:
    """Memory-maps the cached arrays of ``build()``, calling it and writing them first if missing."""
    directory = cache_dir_for(name, params, cache_dir)
    if not (directory / _META).exists():
        directory.mkdir(parents=True, exist_ok=True)
        # Concurrent processes (several local JAX processes) wait here instead of all generating.
        with _lock(directory.parent / f"{directory.name}.lock"):
            if not (directory / _META).exists():
                _write(directory, build(), params)
    meta = json.loads((directory / _META).read_text())
    # Plain ndarray views of the maps, so that elements sliced from them are plain arrays too.
    return {key: np.load(directory / f"{key}.npy", mmap_mode="r").view(np.ndarray) for key in meta["arrays"]}


@contextlib.contextmanager
def _lock(path: pathlib.Path):
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _write(directory: pathlib.Path, arrays: dict, params: dict) -> None:
    for key, array in arrays.items():
        _write_atomically(directory / f"{key}.npy", lambda f, a=array: np.save(f, a))
    meta = json.dumps({"params": params, "arrays": sorted(arrays)}, indent=1, sort_keys=True)
    _write_atomically(directory / _META, lambda f: f.write(meta.encode()))


def _write_atomically(path: pathlib.Path, write: Callable) -> None:
    """Writes to a temporary file beside ``path``, then renames it over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
