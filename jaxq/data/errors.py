"""Exceptions raised by :mod:`jaxq.data`.

Every message names the file or dataset involved and says what to do next.
"""

from __future__ import annotations

__all__ = ["IDXFormatError", "DatasetNotFoundError", "DownloadError"]


class IDXFormatError(ValueError):
    """An IDX file is truncated, corrupt, or not the kind of IDX file expected."""


class DatasetNotFoundError(FileNotFoundError):
    """No source (local folder, TFDS, download cache) could provide a dataset."""


class DownloadError(OSError):
    """Fetching a dataset file failed (offline, every mirror failed, or a checksum mismatch)."""
