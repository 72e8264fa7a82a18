"""Datasets for the ``data -> train -> quantize -> evaluate`` flow.

Images::

    from jaxq.data import load_dataset, batches
    train = load_dataset("mnist", "train")       # $JAXQ_DATA_DIR/mnist, TFDS, or download
    for x, y in batches(train, 128, shuffle=True, seed=epoch, drop_remainder=True):
        ...

``load_dataset("digits", ...)`` needs no files (scikit-learn's bundled 8x8 digits).

Text::

    from jaxq.data import load_tiny_shakespeare, CharTokenizer, train_val_split, sample_windows
"""

from jaxq.data.batching import batches, num_batches
from jaxq.data.dataset import SPLITS, Dataset
from jaxq.data.digits import load_digits
from jaxq.data.errors import DatasetNotFoundError, DownloadError, IDXFormatError
from jaxq.data.idx import read_idx, read_idx_images, read_idx_labels, write_idx
from jaxq.data.paths import CACHE_DIR_ENV, DATA_DIR_ENV
from jaxq.data.text import CharTokenizer, load_tiny_shakespeare, sample_windows, train_val_split
from jaxq.data.vision import DATASET_NAMES, load_dataset, load_fashion_mnist, load_mnist

__all__ = [
    "CACHE_DIR_ENV",
    "DATA_DIR_ENV",
    "DATASET_NAMES",
    "SPLITS",
    "CharTokenizer",
    "Dataset",
    "DatasetNotFoundError",
    "DownloadError",
    "IDXFormatError",
    "batches",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_mnist",
    "load_tiny_shakespeare",
    "num_batches",
    "read_idx",
    "read_idx_images",
    "read_idx_labels",
    "sample_windows",
    "train_val_split",
    "write_idx",
]
