"""Reader and writer for IDX files, the format of MNIST and Fashion-MNIST.

An IDX file is a big-endian header followed by raw array data:

* bytes 0-1: zero; byte 2: element type code; byte 3: number of dimensions ``ndim``;
* ``ndim`` uint32 sizes;
* ``prod(sizes)`` elements of the given type.

Read as one big-endian uint32, the first four bytes are the "magic number": 2051
(``0x00000803``) for uint8 images of shape ``(N, rows, cols)`` and 2049 (``0x00000801``)
for uint8 labels of shape ``(N,)``. Files may be gzip-compressed; compression is
detected from the content, not the file name.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from jaxq.data.errors import IDXFormatError

__all__ = [
    "IMAGES_MAGIC",
    "LABELS_MAGIC",
    "read_idx",
    "read_idx_images",
    "read_idx_labels",
    "write_idx",
]

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049

# IDX element type code -> big-endian numpy dtype.
_TYPE_CODES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path) -> bytes:
    """Return the (decompressed) content of ``path``."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"IDX file not found: {path}") from None
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as e:
        raise IDXFormatError(
            f"{path}: the gzip stream is truncated or corrupt ({e}); "
            "delete the file and fetch it again."
        ) from None


def read_idx(path: str | os.PathLike[str], *, expected_magic: int | None = None) -> np.ndarray:
    """Read an IDX file (raw or gzip-compressed) into a native-endian numpy array.

    Args:
      path: the file to read.
      expected_magic: if given, the required magic number (e.g. :data:`IMAGES_MAGIC`).

    Returns:
      An array of shape given by the header, in native byte order.

    Raises:
      FileNotFoundError: the file does not exist.
      IDXFormatError: bad magic number, unknown type code, or a data size that does not
        match the header (truncated file or trailing bytes). The message names the file,
        what was expected, and what was found.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise IDXFormatError(
            f"{path}: file too short for an IDX header: expected at least 4 bytes, found {len(data)}."
        )
    (magic,) = struct.unpack(">I", data[:4])
    if expected_magic is not None and magic != expected_magic:
        raise IDXFormatError(
            f"{path}: bad IDX magic number: expected {expected_magic} (0x{expected_magic:08x}), "
            f"found {magic} (0x{magic:08x}). Is this the right file (images vs labels), "
            "and is it an IDX file at all?"
        )
    zero, type_code, ndim = data[0:2], data[2], data[3]
    if zero != b"\x00\x00" or type_code not in _TYPE_CODES or ndim == 0:
        raise IDXFormatError(
            f"{path}: not an IDX file: expected a magic number 0x0000TTDD with a known type code "
            f"TT in {sorted(hex(c) for c in _TYPE_CODES)} and DD >= 1 dimensions, "
            f"found 0x{magic:08x}."
        )
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise IDXFormatError(
            f"{path}: truncated IDX header: expected {header_len} bytes for {ndim} dimensions, "
            f"found {len(data)}."
        )
    shape = struct.unpack(f">{ndim}I", data[4:header_len])
    dtype = _TYPE_CODES[type_code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    found = len(data) - header_len
    if found != expected:
        what = "truncated" if found < expected else "has trailing bytes"
        raise IDXFormatError(
            f"{path}: IDX file {what}: the header says shape {tuple(shape)} of {dtype.name} "
            f"= {expected} data bytes, found {found}. Delete the file and fetch it again."
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=False) if dtype.itemsize > 1 else arr


def read_idx_images(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX image file (magic 2051): uint8 array of shape ``(N, rows, cols)``."""
    arr = read_idx(path, expected_magic=IMAGES_MAGIC)
    if arr.ndim != 3:  # guaranteed by the magic number; kept as a sanity check
        raise IDXFormatError(f"{path}: expected 3 dimensions (N, rows, cols), found {arr.shape}.")
    return arr


def read_idx_labels(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX label file (magic 2049): uint8 array of shape ``(N,)``."""
    return read_idx(path, expected_magic=LABELS_MAGIC)


def write_idx(
    path: str | os.PathLike[str], array: np.ndarray, *, compress: bool | None = None
) -> Path:
    """Write ``array`` as an IDX file (gzip-compressed when ``compress``).

    Args:
      path: destination file.
      array: any array whose dtype is uint8, int8, int16, int32, float32 or float64.
      compress: gzip the output; ``None`` means "if the name ends with ``.gz``".

    Returns:
      The path written.
    """
    path = Path(path)
    array = np.asarray(array)
    if array.ndim == 0 or array.ndim > 255:
        raise ValueError(f"write_idx: expected an array with 1-255 dimensions, got shape {array.shape}.")
    for code, dtype in _TYPE_CODES.items():
        if array.dtype.kind == dtype.kind and array.dtype.itemsize == dtype.itemsize:
            break
    else:
        raise ValueError(
            f"write_idx: unsupported dtype {array.dtype}; use uint8, int8, int16, int32, float32 or float64."
        )
    header = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + np.ascontiguousarray(array, dtype=dtype).tobytes()
    if compress is None:
        compress = path.suffix == ".gz"
    if compress:
        payload = gzip.compress(payload, mtime=0)
    path.write_bytes(payload)
    return path
