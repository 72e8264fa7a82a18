"""Saving and loading quantized trees.

File layout (one file, little-endian)::

    b"JAXQCKPT"  | u32 version | u64 header length | header (JSON, utf-8) | payload

The header holds the tree structure (nested dicts/lists/tuples), each array's
dtype, shape, byte offset and SHA-256, each QArray's metadata, and the payload
length. Codes stay quantized on disk (int4 packed two per byte). Writes go to a
temporary file in the same folder, are fsync'ed, then atomically renamed over the
target, so a crash mid-save leaves any previous checkpoint intact. Loading checks
the magic, lengths and every checksum, and raises :class:`CheckpointError` rather
than return damaged weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
import tempfile
from typing import Any

import jax
import numpy as np

from jaxq.numerics.formats import get_format
from jaxq.numerics.tiling import Tiling
from jaxq.qarray import QArray, QMeta
from jaxq.spec import QuantSpec

MAGIC = b"JAXQCKPT"
VERSION = 1
_PREFIX = struct.Struct("<8sIQ")


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupted or not a jaxq checkpoint."""


def _dtype_name(dtype: Any) -> str:
    return np.dtype(dtype).name


def _dtype_from_name(name: str) -> np.dtype:
    try:
        return np.dtype(name)
    except TypeError:
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, name))


class _Writer:
    def __init__(self):
        self.chunks: list[bytes] = []
        self.offset = 0

    def array(self, a: Any) -> dict:
        arr = np.asarray(jax.device_get(a))
        if not arr.flags.c_contiguous:  # (np.ascontiguousarray would turn 0-d into 1-d)
            arr = arr.copy(order="C")
        data = arr.tobytes()
        entry = {
            "dtype": _dtype_name(arr.dtype),
            "shape": list(arr.shape),
            "offset": self.offset,
            "nbytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        self.chunks.append(data)
        self.offset += len(data)
        return entry

    def encode(self, node: Any) -> Any:
        if isinstance(node, QArray):
            m = node.meta
            return {
                "__qarray__": {
                    "format": m.format,
                    "dtype": _dtype_name(m.dtype),
                    "symmetric": m.symmetric,
                    "pack_axis": m.pack_axis,
                    "channel_axes": list(m.tiling.channel_axes),
                    "group_axis": m.tiling.group_axis,
                    "group_size": m.tiling.group_size,
                    "act_spec": None if m.act_spec is None else dataclasses.asdict(m.act_spec),
                    "zero_point_domain": m.zero_point_domain,
                    "values": self.array(node.values),
                    "scale": None if node.scale is None else self.array(node.scale),
                    "zero_point": None if node.zero_point is None else self.array(node.zero_point),
                }
            }
        if isinstance(node, dict) or hasattr(node, "items") and not hasattr(node, "shape"):
            for k in node:
                if not isinstance(k, str):
                    raise TypeError(f"checkpoint dict keys must be strings, got {k!r}")
            return {"__dict__": {k: self.encode(v) for k, v in node.items()}}
        if isinstance(node, (list, tuple)):
            return {"__list__" if isinstance(node, list) else "__tuple__": [self.encode(v) for v in node]}
        if node is None:
            return None
        if isinstance(node, (bool, int, float, str)) and not hasattr(node, "shape"):
            return {"__scalar__": node}
        if hasattr(node, "shape") and hasattr(node, "dtype"):
            return {"__array__": self.array(node)}
        raise TypeError(f"cannot save a leaf of type {type(node).__name__}; save arrays, QArrays and dict/list/tuple trees")


def save(path: str | os.PathLike, tree: Any) -> None:
    """Saves a (quantized) tree atomically.

    Args:
      path: target file. Its folder must exist. An existing file is replaced only
        after the new one is completely written and flushed.
      tree: nested dicts/lists/tuples of arrays, QArrays, scalars and None.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot save to {path!r}: folder {folder!r} does not exist; create it first")
    writer = _Writer()
    structure = writer.encode(tree)
    header = json.dumps({"tree": structure, "payload_nbytes": writer.offset}).encode()
    fd, tmp = tempfile.mkstemp(prefix=".jaxq-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_PREFIX.pack(MAGIC, VERSION, len(header)))
            f.write(header)
            for chunk in writer.chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load(path: str | os.PathLike) -> Any:
    """Loads a tree written by :func:`save`, verifying its integrity.

    Raises:
      FileNotFoundError: no such file.
      CheckpointError: the file is not a jaxq checkpoint, is truncated, or a
        checksum does not match (it names the array).
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        blob = f.read()
    if len(blob) < _PREFIX.size:
        raise CheckpointError(f"{path}: {len(blob)} bytes is too short to be a jaxq checkpoint (truncated?)")
    magic, version, header_len = _PREFIX.unpack_from(blob)
    if magic != MAGIC:
        raise CheckpointError(f"{path}: not a jaxq checkpoint (bad magic {magic!r})")
    if version != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {version}, this jaxq reads version {VERSION}")
    start = _PREFIX.size
    if len(blob) < start + header_len:
        raise CheckpointError(f"{path}: truncated inside the header ({len(blob)} bytes)")
    try:
        header = json.loads(blob[start : start + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: header is corrupted ({e})") from None
    payload = memoryview(blob)[start + header_len :]
    if len(payload) != header["payload_nbytes"]:
        raise CheckpointError(
            f"{path}: payload has {len(payload)} bytes, header says {header['payload_nbytes']} (truncated or padded)"
        )

    def array(entry: dict, where: str) -> np.ndarray:
        data = payload[entry["offset"] : entry["offset"] + entry["nbytes"]]
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise CheckpointError(f"{path}: checksum mismatch in {where or 'array'}; the file is corrupted")
        return np.frombuffer(data, dtype=_dtype_from_name(entry["dtype"])).reshape(tuple(entry["shape"])).copy()

    def decode(node: Any, where: str) -> Any:
        if node is None:
            return None
        if "__qarray__" in node:
            q = node["__qarray__"]
            tiling = Tiling(tuple(q["channel_axes"]), q["group_axis"], q["group_size"])
            get_format(q["format"])
            act = q.get("act_spec")
            if act is not None:
                act = QuantSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in act.items()})
            domain = q.get("zero_point_domain", "code")  # absent from checkpoints written before it existed
            if domain not in ("code", "value"):
                raise CheckpointError(f"{path}: unknown zero_point_domain {domain!r} at {where!r}")
            meta = QMeta(q["format"], _dtype_from_name(q["dtype"]), tiling, q["symmetric"], q["pack_axis"], act,
                         domain)
            return QArray(
                array(q["values"], where + "/values"),
                None if q["scale"] is None else array(q["scale"], where + "/scale"),
                None if q["zero_point"] is None else array(q["zero_point"], where + "/zero_point"),
                meta,
            )
        if "__dict__" in node:
            return {k: decode(v, f"{where}/{k}") for k, v in node["__dict__"].items()}
        if "__list__" in node:
            return [decode(v, f"{where}/{i}") for i, v in enumerate(node["__list__"])]
        if "__tuple__" in node:
            return tuple(decode(v, f"{where}/{i}") for i, v in enumerate(node["__tuple__"]))
        if "__scalar__" in node:
            return node["__scalar__"]
        if "__array__" in node:
            return array(node["__array__"], where)
        raise CheckpointError(f"{path}: unknown node in header at {where!r}")

    return decode(header["tree"], "")
