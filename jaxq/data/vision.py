"""Image classification loaders: ``load_dataset("mnist" | "fashion_mnist" | "digits", split)``.

For MNIST and Fashion-MNIST, ``source="auto"`` tries, in order:

1. ``"local"``: IDX files in ``data_dir`` (or ``data_dir/<name>``), else in
   ``$JAXQ_DATA_DIR/<name>``;
2. ``"tfds"``: an already prepared ``tensorflow_datasets`` copy (never downloads);
3. ``"download"``: the cache ``$JAXQ_CACHE_DIR/<name>`` (default ``~/.cache/jaxq/<name>``),
   fetching missing files from the canonical mirrors if ``allow_download``.

``"digits"`` is scikit-learn's bundled 8x8 digits and needs no files.
"""

from __future__ import annotations

import os

import numpy as np

from jaxq.data import sources
from jaxq.data.dataset import Dataset, check_split
from jaxq.data.digits import load_digits
from jaxq.data.errors import DatasetNotFoundError, DownloadError
from jaxq.data.paths import setup_hint
from jaxq.data.registry import IDX_DATASETS

__all__ = ["DATASET_NAMES", "SOURCES", "load_dataset", "load_mnist", "load_fashion_mnist"]

DATASET_NAMES = ("mnist", "fashion_mnist", "digits")
SOURCES = ("auto", "local", "tfds", "download")

PathLike = str | os.PathLike[str]


def _load_idx_arrays(
    name: str,
    split: str,
    data_dir: PathLike | None,
    source: str,
    allow_download: bool,
    cache_dir: PathLike | None,
) -> tuple[np.ndarray, np.ndarray]:
    spec = IDX_DATASETS[name]
    hint = setup_hint(name, spec.homepage, cache_dir)
    attempts = {
        "local": lambda: sources.from_local(spec, split, data_dir),
        "tfds": lambda: sources.from_tfds(spec, split),
        "download": lambda: sources.from_download(spec, split, cache_dir, allow_download),
    }
    order = list(attempts) if source == "auto" else [source]
    reasons = []
    for which in order:
        try:
            return attempts[which]()
        except sources.SourceUnavailable as e:
            reasons.append(str(e))
        except DownloadError as e:
            if source != "auto":
                raise DownloadError(f"{e}\n{hint}") from e
            reasons.append(f"download: {e}")
    raise DatasetNotFoundError(
        f"Could not load {name!r} split {split!r} (source={source!r}). Tried:\n"
        + "\n".join(f"  - {r}" for r in reasons)
        + "\n"
        + hint
    )


def load_dataset(
    name: str,
    split: str = "train",
    data_dir: PathLike | None = None,
    source: str = "auto",
    *,
    allow_download: bool = True,
    cache_dir: PathLike | None = None,
) -> Dataset:
    """Load one split of an image classification dataset.

    Args:
      name: ``"mnist"``, ``"fashion_mnist"`` or ``"digits"``.
      split: ``"train"`` or ``"test"``.
      data_dir: folder holding the IDX files (or its parent, with a ``<name>/`` subfolder);
        default ``$JAXQ_DATA_DIR/<name>``.
      source: ``"auto"`` (local, then TFDS, then download cache), or one of
        ``"local"``, ``"tfds"``, ``"download"``. Ignored for ``"digits"`` (always bundled).
      allow_download: let the ``"download"`` source fetch missing files. Tests should pass False.
      cache_dir: download cache root (default ``$JAXQ_CACHE_DIR`` or ``~/.cache/jaxq``).

    Returns:
      A :class:`Dataset` with float32 images ``(N, H, W, 1)`` in ``[0, 1]`` and int32 labels.

    Raises:
      ValueError: unknown name, split or source.
      DatasetNotFoundError: no source had the data; the message lists what was tried and
        where to put the files.
      DownloadError: with ``source="download"``, fetching failed (e.g. offline).
      IDXFormatError: a file was found but is truncated or corrupt.
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"Unknown dataset {name!r}: expected one of {DATASET_NAMES}.")
    check_split(split)
    if source not in SOURCES:
        raise ValueError(f"Unknown source {source!r}: expected one of {SOURCES}.")
    if name == "digits":
        return load_digits(split)
    images, labels = _load_idx_arrays(name, split, data_dir, source, allow_download, cache_dir)
    spec = IDX_DATASETS[name]
    return Dataset.from_uint8(images, labels, name=name, class_names=spec.class_names, split=split)


def load_mnist(
    split: str = "train",
    source: str = "auto",
    *,
    data_dir: PathLike | None = None,
    allow_download: bool = True,
    cache_dir: PathLike | None = None,
) -> Dataset:
    """Load MNIST (28x28 digits, 60000 train / 10000 test). See :func:`load_dataset`."""
    return load_dataset("mnist", split, data_dir, source, allow_download=allow_download, cache_dir=cache_dir)


def load_fashion_mnist(
    split: str = "train",
    source: str = "auto",
    *,
    data_dir: PathLike | None = None,
    allow_download: bool = True,
    cache_dir: PathLike | None = None,
) -> Dataset:
    """Load Fashion-MNIST (28x28 clothing, 60000 train / 10000 test). See :func:`load_dataset`."""
    return load_dataset(
        "fashion_mnist", split, data_dir, source, allow_download=allow_download, cache_dir=cache_dir
    )
