"""Shared pieces of the data sources: the source base class, split names, padding, errors."""

import difflib
import functools

import numpy as np

SPLITS = ("train", "validation", "test")
BYTE_VOCAB_SIZE = 257  # UTF-8 bytes shifted by one so that 0 stays padding


def unknown_name_error(kind: str, name: str, known, where: str = "") -> ValueError:
    """A ValueError naming a bad name (of a ``kind``, ``where``), the known names and the closest match."""
    known = sorted(known)
    close = difflib.get_close_matches(str(name), known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ValueError(f"Unknown {kind} {name!r}{where}; known: {', '.join(known)}.{hint}")


def check_split(split: str) -> str:
    """Returns ``split`` or raises a ValueError listing the valid splits."""
    if split not in SPLITS:
        raise unknown_name_error("split", split, SPLITS)
    return split


def pad_ids(ids: np.ndarray, length: int) -> np.ndarray:
    """Truncates or zero-pads a 1-D id array to int32[length]."""
    out = np.zeros(length, np.int32)
    ids = ids[:length]
    out[: len(ids)] = ids
    return out


def byte_ids(data: bytes | np.ndarray) -> np.ndarray:
    """Byte-level ids: each byte plus one (pad 0, vocab 257)."""
    return np.frombuffer(data, np.uint8).astype(np.int32) + 1


def split_arrays(arrays: dict, sizes: dict) -> dict:
    """Cuts each array of one stream into consecutive splits: ``{'<split>_<name>': array[start:start + size]}``."""
    out, start = {}, 0
    for split, size in sizes.items():
        out.update({f"{split}_{name}": array[start:start + size] for name, array in arrays.items()})
        start += size
    return out


def classification_example(inputs: np.ndarray, target: int) -> dict:
    """The element layout of every classification source."""
    return {"inputs": inputs, "targets": np.asarray(target, np.int32)}


class Source:
    """A grain random-access source; subclasses set the class attributes and ``__getitem__``.

    ``repr`` lists the split and the ``content`` parameters, so grain's check on restore catches a
    changed dataset; ``location`` parameters (cache and data directories) are left out so that a
    checkpoint restores on a machine that keeps the data elsewhere. Pickling rebuilds the source
    from its parameters (a cache hit) instead of copying its arrays into each grain worker.
    """

    name: str  # config.data.name; ``effjax.data`` finds every subclass that sets it
    task: str = "classification"
    vocab_size: int
    num_classes: int | None
    max_length: int

    def __init__(self, split: str, content: dict, location: dict | None = None):
        self.split = check_split(split)
        self._content, self._location = content, location or {}

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict:
        raise NotImplementedError

    def __repr__(self) -> str:
        params = "".join(f", {k}={v!r}" for k, v in self._content.items())
        return f"{type(self).__name__}(split={self.split!r}{params})"

    def __reduce__(self):
        return functools.partial(type(self), self.split, **self._content, **self._location), ()
