"""LRA Retrieval: byte-level AAN document pairs read from the release's TSV files (lra.md §3.3).

Each row of ``new_aan_pairs.{train,eval,test}.tsv`` is ``label, id1, id2, text1, text2``, tab separated
without quoting (LRA reads them with ``use_quote_delim=False``). Each text is cut to its first 10,000
bytes, as LRA does before encoding, then to ``max_length`` bytes. A split is parsed once, when the source
is built, into a uint8 byte array ``[pairs, 2, max_length]`` plus the true lengths (the train split at
4,000 bytes per document holds 1.2 GB instead of int32 ids' 4.7 GB); ids are made per item.
"""

import os

import numpy as np

from effjax.data import common

TEXT_BYTES = 10_000  # LRA encodes ``text[:10000]`` (matching/input_pipeline.py)
SPLIT_FILES = {"train": "new_aan_pairs.train.tsv", "validation": "new_aan_pairs.eval.tsv",
               "test": "new_aan_pairs.test.tsv"}
DOWNLOAD = ("download https://storage.googleapis.com/long-range-arena/lra_release.gz, unpack it "
            "(tar xzf lra_release.gz) and point --config.data.data_dir at lra_release/tsv_data")


class AanPairs(common.Source):
    """Pairs of ACL Anthology papers: label 1 when the first cites the second, byte ids, no cross-attention.

    ``inputs`` is document 1 then document 2, each ``max_length`` ids (bytes + 1, pad 0), so the instance's
    ``max_length`` is ``2 * max_length``; ``config.data.max_length`` and ``config.model.max_length`` are per
    document (``effjax.models.dual_encoder`` splits the halves).
    """

    name = "aan"  # config.data.name (LRA Retrieval)

    vocab_size = common.BYTE_VOCAB_SIZE
    num_classes = 2

    def __init__(self, split: str, *, max_length: int = 4000, data_dir: str = ""):
        super().__init__(split, dict(max_length=int(max_length)), dict(data_dir=data_dir))
        self.document_length = int(max_length)
        if self.document_length < 1:
            raise ValueError(f"config.data.max_length={max_length} must be at least 1 (bytes per document).")
        self.max_length = 2 * self.document_length
        self.texts, self.lengths, self.labels = read_pairs(split_path(data_dir, self.split), self.document_length)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        ids = self.texts[index].astype(np.int32) + 1
        ids[np.arange(self.document_length) >= self.lengths[index][:, None]] = 0
        return common.classification_example(ids.reshape(-1), self.labels[index])


def split_path(data_dir: str, split: str) -> str:
    """The TSV file of ``split``; a one-line FileNotFoundError saying how to get it when it is absent."""
    filename = SPLIT_FILES[split]
    if not data_dir:
        raise FileNotFoundError(f"The aan source needs config.data.data_dir, the folder holding {filename}: "
                                f"{DOWNLOAD}.")
    path = os.path.join(os.path.expanduser(data_dir), filename)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"AAN file {path} not found: {DOWNLOAD}.")
    return path


def read_pairs(path: str, document_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(uint8 texts [n, 2, document_length], int32 lengths [n, 2], int32 labels [n]) of one TSV file.

    A first row whose label is not a number is a header and is skipped; blank lines are skipped. Any other
    row without five fields or with a label other than 0 or 1 raises a one-line ValueError naming the line.
    """
    keep = min(TEXT_BYTES, document_length)
    with open(path, "rb") as f:
        rows = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 24), b"")) + 1
    texts = np.zeros((rows, 2, document_length), np.uint8)
    lengths = np.zeros((rows, 2), np.int32)
    labels = np.zeros(rows, np.int32)
    n = 0
    with open(path, "rb") as f:
        for line_number, line in enumerate(f, start=1):
            line = line.rstrip(b"\r\n")
            if not line.strip():
                continue
            fields = line.split(b"\t")
            if len(fields) != 5:
                raise ValueError(f"{path}, line {line_number}: expected 5 tab-separated fields (label, id1, id2, "
                                 f"text1, text2), found {len(fields)}; is this an LRA new_aan_pairs file?")
            label = parse_label(fields[0])
            if label is None and line_number == 1 and not is_number(fields[0]):
                continue  # a header row
            if label is None:
                raise ValueError(f"{path}, line {line_number}: the label {fields[0][:20].decode(errors='replace')!r} "
                                 "is not 0 or 1; is this an LRA new_aan_pairs file?")
            for doc, text in enumerate(fields[3:]):
                text = text[:keep]
                texts[n, doc, :len(text)] = np.frombuffer(text, np.uint8)
                lengths[n, doc] = len(text)
            labels[n] = label
            n += 1
    if n == 0:
        raise ValueError(f"{path} holds no pairs; is this an LRA new_aan_pairs file?")
    return texts[:n], lengths[:n], labels[:n]


def parse_label(field: bytes) -> int | None:
    """0 or 1 from '0', '1', '0.0' or '1.0'; None for anything else."""
    if not is_number(field):
        return None
    value = float(field)
    return int(value) if value in (0.0, 1.0) else None


def is_number(field: bytes) -> bool:
    try:
        float(field)
    except ValueError:
        return False
    return True
