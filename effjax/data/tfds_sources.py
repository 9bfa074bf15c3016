"""LRA Text (byte-level IMDb) and Image (grayscale CIFAR-10) over prepared TFDS data (lra.md §3.2, §3.4).

tensorflow_datasets is imported only when one of these sources is built. Nothing is downloaded:
the data must have been prepared in ``array_record`` format beforehand.
"""

import numpy as np

from effjax.data import common

# ITU-R 601 luma, the weights of tf.image.rgb_to_grayscale.
GRAY_WEIGHTS = np.array([0.2989, 0.5870, 0.1140])


def load_tfds(name: str, split: str, data_dir: str):
    """``tfds.data_source`` without downloading; a clear error when the data set is not prepared."""
    import tensorflow_datasets as tfds  # slow import, and only these sources need it

    try:
        return tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
    except Exception as e:  # tfds raises assorted types here (NotImplementedError, AssertionError, ...)
        flag = f" --data_dir={data_dir}" if data_dir else ""
        where = f"in data_dir={data_dir!r}" if data_dir else "in the default data_dir (~/tensorflow_datasets)"
        said = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FileNotFoundError(
            f"TFDS data set {name!r} (split {split!r}) is not prepared {where}. Prepare it on a machine with "
            f"internet with `tfds build {name} --file_format=array_record{flag}`, copy that directory here "
            f"and pass it as the source's data_dir. (tfds: {said})") from e


class TfdsImdb(common.Source):
    """IMDb reviews as UTF-8 bytes + 1 (pad 0, vocab 257), truncated and padded to max_length.

    LRA has no IMDb validation set and evaluates on the test split; so do we: ``validation`` and
    ``test`` are both TFDS ``test``, and best-on-validation selection is test-set selection (lra.md §7.3).
    """

    name = "tfds_imdb"  # config.data.name (LRA Text)

    vocab_size = common.BYTE_VOCAB_SIZE
    num_classes = 2
    TFDS_SPLITS = {"train": "train", "validation": "test", "test": "test"}

    def __init__(self, split: str, *, max_length: int = 1000, data_dir: str = ""):
        super().__init__(split, dict(max_length=int(max_length)), dict(data_dir=data_dir))
        self.max_length = int(max_length)
        self.records = load_tfds("imdb_reviews", self.TFDS_SPLITS[split], data_dir)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        text = record["text"]
        text = text.encode("utf-8") if isinstance(text, str) else text
        inputs = common.pad_ids(common.byte_ids(text), self.max_length)
        return common.classification_example(inputs, int(record["label"]))


class TfdsCifar10(common.Source):
    """CIFAR-10 as 1024 grayscale pixel tokens, id = pixel + 1 (vocab 257).

    LRA used the pixel itself as the id, so every black pixel was padding and masked out of
    attention (lra.md §7.7). Shifting by one keeps every pixel visible; that bias is not reproduced.
    Splits follow LRA: train = TFDS train[:90%], validation = train[90%:], test = test.
    """

    name = "tfds_cifar10"  # config.data.name (LRA Image)

    vocab_size = 256 + 1  # pixel + 1
    num_classes = 10
    max_length = 1024
    TFDS_SPLITS = {"train": "train[:90%]", "validation": "train[90%:]", "test": "test"}

    def __init__(self, split: str, *, data_dir: str = ""):
        super().__init__(split, {}, dict(data_dir=data_dir))
        self.records = load_tfds("cifar10", self.TFDS_SPLITS[split], data_dir)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        return common.classification_example(grayscale(record["image"]).reshape(-1) + 1, int(record["label"]))


def grayscale(image: np.ndarray) -> np.ndarray:
    """uint8 RGB [..., 3] to int32 luma 0-255, rounded to the nearest integer.

    TF's rgb_to_grayscale converts back to uint8 by truncating luma * 255.5 / 255 instead, so LRA's
    pixels can be one level lower than ours.
    """
    return np.clip(np.rint(image @ GRAY_WEIGHTS), 0, 255).astype(np.int32)
