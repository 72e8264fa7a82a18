"""The three places an IDX dataset can come from: a local folder, TFDS, the download cache.

Each ``from_*`` function returns ``(images uint8 (N, H, W[, 1]), labels)`` or raises
:class:`SourceUnavailable` with a one-line reason. Corrupt files raise
:class:`~jaxq.data.errors.IDXFormatError` instead: they are never skipped silently.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from jaxq.data import download
from jaxq.data.errors import DatasetNotFoundError, IDXFormatError
from jaxq.data.idx import read_idx_images, read_idx_labels
from jaxq.data.paths import DATA_DIR_ENV, cache_dir_for, find_file, find_idx_pair, local_dirs_for
from jaxq.data.registry import IDXSpec, idx_file_names

__all__ = ["SourceUnavailable", "read_idx_pair", "from_local", "from_tfds", "from_download"]


class SourceUnavailable(DatasetNotFoundError):
    """This source cannot provide the dataset; ``str(e)`` says why."""


def read_idx_pair(images_path: Path, labels_path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Read and cross-check an (images, labels) pair of IDX files."""
    images, labels = read_idx_images(images_path), read_idx_labels(labels_path)
    if images.shape[0] != labels.shape[0]:
        raise IDXFormatError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds "
            f"{labels.shape[0]} labels; expected the same count. Are the files from the same split?"
        )
    if labels.size and labels.max() >= num_classes:
        raise IDXFormatError(f"{labels_path}: expected labels in [0, {num_classes}), found {labels.max()}.")
    return images, labels


def from_local(spec: IDXSpec, split: str, data_dir: str | os.PathLike[str] | None) -> tuple[np.ndarray, np.ndarray]:
    """Read ``split`` from a local folder (``data_dir`` or ``$JAXQ_DATA_DIR/<name>``)."""
    folders = local_dirs_for(spec.name, data_dir)
    if not folders:
        raise SourceUnavailable(f"local: no data_dir given and {DATA_DIR_ENV} is not set")
    for folder in folders:
        pair = find_idx_pair(folder, split)
        if pair is not None:
            return read_idx_pair(*pair, num_classes=len(spec.class_names))
    stems = ", ".join(idx_file_names(split))
    raise SourceUnavailable(f"local: no {stems} (.gz or raw) in {' or '.join(map(str, folders))}")


def from_tfds(spec: IDXSpec, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Read ``split`` from an already prepared ``tensorflow_datasets`` copy (never downloads)."""
    try:
        import tensorflow_datasets as tfds  # optional dependency: pip install 'jaxq[data]'
    except ImportError:
        raise SourceUnavailable("tfds: tensorflow_datasets is not installed") from None
    try:
        images, labels = tfds.as_numpy(
            tfds.load(spec.tfds_name, split=split, batch_size=-1, as_supervised=True, download=False)
        )
    except Exception as e:  # noqa: BLE001 - TFDS raises many kinds of "not prepared" errors
        raise SourceUnavailable(f"tfds: {spec.tfds_name!r} is not prepared ({type(e).__name__}: {e})") from None
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim != 4 or images.shape[-1] != 1 or labels.shape != images.shape[:1]:
        raise SourceUnavailable(f"tfds: unexpected shapes images {images.shape}, labels {labels.shape}")
    return images, labels


def from_download(
    spec: IDXSpec,
    split: str,
    cache_dir: str | os.PathLike[str] | None,
    allow_download: bool,
    connect_timeout: float = download.DEFAULT_CONNECT_TIMEOUT,
) -> tuple[np.ndarray, np.ndarray]:
    """Read ``split`` from the download cache, fetching missing files when ``allow_download``.

    Raises:
      SourceUnavailable: files are missing and ``allow_download`` is False.
      DownloadError: a missing file could not be fetched (offline, bad checksum).
    """
    folder = cache_dir_for(spec.name, cache_dir)
    paths = []
    for stem in idx_file_names(split):
        path = find_file(folder, stem)
        if path is None:
            if not allow_download:
                raise SourceUnavailable(f"download: {stem} is not in the cache {folder} and allow_download=False")
            path = download.fetch_file(
                f"{stem}.gz",
                spec.mirrors,
                folder,
                sha256=spec.sha256.get(stem),
                connect_timeout=connect_timeout,
            )
        paths.append(path)
    return read_idx_pair(*paths, num_classes=len(spec.class_names))
