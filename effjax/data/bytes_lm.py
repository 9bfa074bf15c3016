"""Byte-level language modelling on local text files (by default the Python standard library's sources)."""

import glob
import os
import sysconfig

import numpy as np

from effjax.data import common

_SEPARATOR = b"\n"  # between files, so that one file's last line never runs into the next one's first
_NOT_STDLIB = ("site-packages", "dist-packages", "__pycache__")


class BytesLM(common.Source):
    """Non-overlapping max_length windows of the concatenated files; windows are split by a seeded permutation."""

    name = "bytes_lm"  # config.data.name

    task = "lm"
    vocab_size = common.BYTE_VOCAB_SIZE
    num_classes = None

    def __init__(self, split: str, *, paths: str = "", max_length: int = 512, max_files: int = 2000,
                 validation_fraction: float = 0.05, test_fraction: float = 0.05, seed: int = 0):
        super().__init__(split, dict(paths=paths, max_length=int(max_length), max_files=int(max_files),
                                     validation_fraction=float(validation_fraction),
                                     test_fraction=float(test_fraction), seed=int(seed)))
        self.max_length = int(max_length)
        files = find_files(paths)[: int(max_files)]
        self.corpus = np.frombuffer(_SEPARATOR.join(_read(f) for f in files), np.uint8)
        num_windows = -(-len(self.corpus) // self.max_length)
        self.windows = split_windows(num_windows, float(validation_fraction), float(test_fraction),
                                     int(seed))[split]
        if not len(self.windows):
            raise ValueError(f"Split {split!r} of bytes_lm is empty: {num_windows} windows of {max_length} "
                             f"bytes from {len(files)} files; add text or raise the split's fraction.")

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict:
        start = int(self.windows[index]) * self.max_length
        return {"inputs": common.pad_ids(common.byte_ids(self.corpus[start:start + self.max_length]),
                                         self.max_length)}


def find_files(paths: str) -> list[str]:
    """Sorted files named by comma-separated files, directories (searched recursively) or globs.

    "" means the standard library's own ``.py`` files, which every Python installation has.
    """
    if not paths:
        stdlib = sysconfig.get_paths()["stdlib"]
        found = [f for f in glob.glob(os.path.join(stdlib, "**", "*.py"), recursive=True)
                 if not any(part in _NOT_STDLIB for part in f.split(os.sep))]
    else:
        found = []
        for pattern in filter(None, (p.strip() for p in paths.split(","))):
            for match in glob.glob(os.path.expanduser(pattern), recursive=True):
                if os.path.isdir(match):
                    found += glob.glob(os.path.join(match, "**", "*"), recursive=True)
                else:
                    found.append(match)
    files = sorted({f for f in found if os.path.isfile(f)})
    if not files:
        raise FileNotFoundError(f"bytes_lm found no files for paths={paths!r} (comma-separated files, "
                                "directories or globs; '' = the Python standard library's .py files).")
    return files


def split_windows(num_windows: int, validation_fraction: float, test_fraction: float,
                  seed: int) -> dict[str, np.ndarray]:
    """Partitions window indices into sorted train/validation/test index arrays with a seeded permutation."""
    if not (0 <= validation_fraction and 0 <= test_fraction and validation_fraction + test_fraction < 1):
        raise ValueError(f"bytes_lm needs 0 <= validation_fraction, test_fraction and a sum below 1; got "
                         f"{validation_fraction} and {test_fraction}.")
    order = np.random.default_rng(seed).permutation(num_windows)
    num_val = round(num_windows * validation_fraction)
    num_test = round(num_windows * test_fraction)
    return {"validation": np.sort(order[:num_val]), "test": np.sort(order[num_val:num_val + num_test]),
            "train": np.sort(order[num_val + num_test:])}


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()
