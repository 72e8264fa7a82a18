"""Where dataset files live: the local data folder, the download cache, and the setup hint."""

from __future__ import annotations

import os
from pathlib import Path

from jaxq.data.registry import idx_file_names

__all__ = [
    "DATA_DIR_ENV",
    "CACHE_DIR_ENV",
    "cache_dir_for",
    "local_dirs_for",
    "find_file",
    "find_idx_pair",
    "setup_hint",
]

DATA_DIR_ENV = "JAXQ_DATA_DIR"
CACHE_DIR_ENV = "JAXQ_CACHE_DIR"


def cache_dir_for(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Download cache folder of dataset ``name``.

    ``<cache_dir>/<name>`` if ``cache_dir`` is given, else ``$JAXQ_CACHE_DIR/<name>``,
    else ``~/.cache/jaxq/<name>``.
    """
    if cache_dir is not None:
        root = Path(cache_dir)
    elif os.environ.get(CACHE_DIR_ENV):
        root = Path(os.environ[CACHE_DIR_ENV])
    else:
        root = Path.home() / ".cache" / "jaxq"
    return root.expanduser() / name


def local_dirs_for(name: str, data_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Folders that may hold the files of dataset ``name``, in the order they are searched.

    With ``data_dir``: the folder itself, then ``data_dir/<name>`` (so both the dataset
    folder and its parent work). Without: ``$JAXQ_DATA_DIR/<name>`` if the variable is set.
    """
    if data_dir is not None:
        base = Path(data_dir).expanduser()
        return [base, base / name]
    env = os.environ.get(DATA_DIR_ENV)
    return [Path(env).expanduser() / name] if env else []


def find_file(folder: Path, stem: str) -> Path | None:
    """``folder/<stem>.gz`` or ``folder/<stem>``, whichever exists first, or None."""
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def find_idx_pair(folder: Path, split: str) -> tuple[Path, Path] | None:
    """The (images, labels) IDX files of ``split`` in ``folder`` (``.gz`` or raw), or None."""
    images_stem, labels_stem = idx_file_names(split)
    images, labels = find_file(folder, images_stem), find_file(folder, labels_stem)
    if images is None or labels is None:
        return None
    return images, labels


def setup_hint(name: str, homepage: str, cache_dir: str | os.PathLike[str] | None = None) -> str:
    """Text telling the user where to put the IDX files of dataset ``name``."""
    files = "  ".join(f"{stem}.gz" for split in ("train", "test") for stem in idx_file_names(split))
    return (
        f"To use local files, put the four IDX files (gzipped or not)\n"
        f"    {files}\n"
        f"in a folder <DATA>/{name}/ and set the environment variable {DATA_DIR_ENV}=<DATA> "
        f"(or pass data_dir='<DATA>/{name}'). Get them from {homepage}. "
        f"Downloads are cached in {cache_dir_for(name, cache_dir)} (set {CACHE_DIR_ENV} to move the cache). "
        f"For a dataset that needs no files at all, use name='digits'."
    )
