"""Character-level language modelling data: Tiny Shakespeare, a char tokenizer, LM batches."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np

from jaxq.data.errors import DatasetNotFoundError
from jaxq.data.paths import DATA_DIR_ENV

__all__ = ["load_tiny_shakespeare", "CharTokenizer", "train_val_split", "sample_windows"]

TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


def load_tiny_shakespeare(data_dir: str | os.PathLike[str] | None = None) -> str:
    """Return the text of Tiny Shakespeare (1,115,394 characters).

    Args:
      data_dir: folder holding ``input.txt`` (or its parent, with a ``tinyshakespeare/``
        subfolder); default ``$JAXQ_DATA_DIR/tinyshakespeare``.

    Raises:
      DatasetNotFoundError: ``input.txt`` was not found; the message says where to put it.
    """
    if data_dir is not None:
        base = Path(data_dir).expanduser()
        candidates = [base / "input.txt", base / "tinyshakespeare" / "input.txt"]
    elif os.environ.get(DATA_DIR_ENV):
        candidates = [Path(os.environ[DATA_DIR_ENV]).expanduser() / "tinyshakespeare" / "input.txt"]
    else:
        candidates = []
    for path in candidates:
        if path.is_file():
            return path.read_text(encoding="utf-8")
    looked = f"looked in {' and '.join(map(str, candidates))}" if candidates else f"no data_dir given and {DATA_DIR_ENV} is not set"
    raise DatasetNotFoundError(
        f"Tiny Shakespeare not found ({looked}). Put input.txt (from {TINY_SHAKESPEARE_URL}) "
        f"in <DATA>/tinyshakespeare/ and set {DATA_DIR_ENV}=<DATA>, or pass data_dir."
    )


class CharTokenizer:
    """Maps each distinct character of a text to an id, in sorted character order."""

    def __init__(self, chars: Iterable[str]) -> None:
        """Build the vocabulary from an iterable of characters (usually the whole text)."""
        self.chars: tuple[str, ...] = tuple(sorted(set(chars)))
        if not self.chars:
            raise ValueError("CharTokenizer needs at least one character.")
        self._index = {c: i for i, c in enumerate(self.chars)}
        # Fast path for texts whose characters all fit in one byte (e.g. ASCII).
        self._lut: np.ndarray | None = None
        if all(ord(c) < 256 for c in self.chars):
            lut = np.full(256, -1, dtype=np.int32)
            lut[[ord(c) for c in self.chars]] = np.arange(len(self.chars), dtype=np.int32)
            self._lut = lut

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """Vocabulary = the distinct characters of ``text``."""
        return cls(text)

    @property
    def vocab_size(self) -> int:
        """Number of distinct characters."""
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        """Ids of the characters of ``text`` as an int32 array; raises on unknown characters."""
        if self._lut is not None:
            try:
                raw = np.frombuffer(text.encode("latin-1"), dtype=np.uint8)
            except UnicodeEncodeError:
                raw = None
            if raw is not None:
                ids = self._lut[raw]
                if (ids >= 0).all():
                    return ids
        try:
            return np.fromiter((self._index[c] for c in text), dtype=np.int32, count=len(text))
        except KeyError as e:
            raise ValueError(f"Character {e.args[0]!r} is not in the tokenizer's vocabulary.") from None

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """The text whose characters have the given ids."""
        return "".join(self.chars[int(i)] for i in np.asarray(ids).reshape(-1))


def train_val_split(tokens: np.ndarray, val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Split a token sequence into a leading train part and a trailing validation part."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    tokens = np.asarray(tokens)
    cut = len(tokens) - int(round(len(tokens) * val_fraction))
    return tokens[:cut], tokens[cut:]


def sample_windows(
    tokens: np.ndarray, batch: int, seq_len: int, rng: np.random.Generator | int
) -> tuple[np.ndarray, np.ndarray]:
    """Sample ``batch`` random windows for next-token prediction.

    Args:
      tokens: 1-D token sequence.
      batch: number of windows.
      seq_len: window length.
      rng: a numpy ``Generator`` (advanced in place) or an int seed.

    Returns:
      ``(x, y)`` int32 arrays of shape ``(batch, seq_len)`` with ``y[:, t] == x[:, t + 1]``
      in the underlying sequence (``y`` is ``x`` shifted left by one token).
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or len(tokens) < seq_len + 1:
        raise ValueError(f"Need a 1-D sequence of at least seq_len + 1 = {seq_len + 1} tokens, got shape {tokens.shape}.")
    if batch <= 0 or seq_len <= 0:
        raise ValueError(f"batch and seq_len must be positive, got {batch} and {seq_len}.")
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    starts = rng.integers(0, len(tokens) - seq_len, size=batch)
    offsets = starts[:, None] + np.arange(seq_len)[None, :]
    return tokens[offsets].astype(np.int32), tokens[offsets + 1].astype(np.int32)
