"""Fetch a gzipped file from a list of mirrors into a cache folder, safely.

* Each connection attempt (DNS included) is bounded by ``connect_timeout`` seconds, so an
  offline machine fails within seconds rather than minutes.
* Data is written to a temporary file in the destination folder and moved into place
  with :func:`os.replace` only after the sha256 of the *decompressed* content matched,
  so the cache never holds a partial or wrong file.
* Tests replace :data:`_urlopen` (the only function that touches the network).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tempfile
import threading
import time
import urllib.request
import zlib
from pathlib import Path
from typing import IO, Any, Callable, Sequence

from jaxq.data.errors import DownloadError

__all__ = ["fetch_file", "sha256_decompressed", "DEFAULT_CONNECT_TIMEOUT", "DEFAULT_READ_TIMEOUT"]

DEFAULT_CONNECT_TIMEOUT = 3.0  # seconds per connection attempt, DNS included
DEFAULT_READ_TIMEOUT = 30.0  # seconds without data before a transfer is abandoned
_CHUNK = 1 << 20

# The network entry point; monkeypatch this in tests. Same signature as urlopen(url, timeout=...).
_urlopen: Callable[..., Any] = urllib.request.urlopen


def _open_url(url: str, connect_timeout: float, read_timeout: float) -> IO[bytes]:
    """Open ``url``, giving up after ``connect_timeout`` seconds even if DNS hangs."""
    box: list[Any] = []
    lock = threading.Lock()
    done = threading.Event()
    abandoned = False

    def worker() -> None:
        try:
            resp = _urlopen(url, timeout=read_timeout)
        except BaseException as e:  # noqa: BLE001 - handed to the caller below
            box.append(e)
            done.set()
            return
        with lock:
            if abandoned:
                resp.close()
                return
            box.append(resp)
        done.set()

    threading.Thread(target=worker, name="jaxq-download", daemon=True).start()
    if not done.wait(connect_timeout):
        with lock:
            if not box:
                abandoned = True
                raise TimeoutError(f"no answer within {connect_timeout:g} s")
    result = box[0]
    if isinstance(result, BaseException):
        raise result
    return result


def sha256_decompressed(path: str | os.PathLike[str]) -> str:
    """sha256 hex digest of a file's content, decompressed first if it is gzipped."""
    path = Path(path)
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    h = hashlib.sha256()
    with (gzip.open(path, "rb") if gzipped else open(path, "rb")) as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _fetch_one(url: str, dest: Path, sha256: str | None, connect_timeout: float, read_timeout: float) -> None:
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            resp = _open_url(url, connect_timeout, read_timeout)
            with resp:
                shutil.copyfileobj(resp, out, _CHUNK)
        if sha256 is not None:
            try:
                found = sha256_decompressed(tmp)
            except (EOFError, OSError, zlib.error) as e:
                raise DownloadError(f"{url}: the download is not a valid gzip file ({e})") from None
            if found != sha256:
                raise DownloadError(
                    f"{url}: checksum mismatch of the decompressed content: expected sha256 {sha256}, "
                    f"found {found}"
                )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def fetch_file(
    file_name: str,
    mirrors: Sequence[str],
    dest_dir: str | os.PathLike[str],
    *,
    sha256: str | None = None,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    read_timeout: float = DEFAULT_READ_TIMEOUT,
) -> Path:
    """Download ``<mirror><file_name>`` into ``dest_dir/file_name``, trying mirrors in order.

    Args:
      file_name: name of the file on the mirrors and in ``dest_dir``.
      mirrors: base URLs ending with ``/``.
      dest_dir: destination folder, created if missing.
      sha256: expected sha256 of the decompressed content; ``None`` skips the check.
      connect_timeout: seconds allowed per connection attempt, DNS lookup included.
      read_timeout: seconds without data before a transfer is abandoned.

    Returns:
      The path of the verified file.

    Raises:
      DownloadError: every mirror failed; the message lists each mirror's reason.
    """
    dest_dir = Path(dest_dir)
    dest = dest_dir / file_name
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"Cannot create the download folder {dest_dir}: {e}") from None
    failures = []
    start = time.monotonic()
    for base in mirrors:
        url = base + file_name
        try:
            _fetch_one(url, dest, sha256, connect_timeout, read_timeout)
            return dest
        except Exception as e:  # noqa: BLE001 - any failure means "try the next mirror"
            failures.append(f"    {url}: {type(e).__name__}: {e}")
    raise DownloadError(
        f"Could not download {file_name} (tried {len(mirrors)} mirror(s) in "
        f"{time.monotonic() - start:.1f} s; are you offline?):\n" + "\n".join(failures)
    )
