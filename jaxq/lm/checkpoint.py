"""jaxq language-model checkpoints: one file with the params, the architecture and the tokenizer.

Written by ``jaxq lm quantize`` (and :func:`save`) through :func:`jaxq.save`, so the file is
atomic and checksummed and the quantized leaves stay packed. The architecture config and the
tokenizer JSON ride along as byte arrays (covered by the checksums), so the file loads alone.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from jaxq.io import CheckpointError, load as load_tree, save as save_tree
from jaxq.lm.model import LM
from jaxq.models.decoder_config import DecoderConfig

KIND = "jaxq-lm"
VERSION = 1


def _bytes(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8).copy()


def _text(a: Any) -> str:
    return np.asarray(a, np.uint8).tobytes().decode("utf-8")


def save(lm: LM, path: str | os.PathLike) -> None:
    """Writes ``lm`` (params, config, tokenizer) to one jaxq checkpoint file, atomically."""
    tree = {
        "kind": KIND,
        "version": VERSION,
        "config": _bytes(lm.config.to_json()),
        "tokenizer": _bytes(lm.tokenizer.to_str()),
        "params": lm.params,
    }
    save_tree(path, tree)


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file that starts with the jaxq checkpoint magic."""
    from jaxq.io import MAGIC

    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def load(path: str | os.PathLike) -> LM:
    """Reads a checkpoint written by :func:`save`.

    Raises:
      CheckpointError: the file is damaged, or is a jaxq checkpoint of something else than an LM.
    """
    from tokenizers import Tokenizer

    tree = load_tree(path)
    if not isinstance(tree, dict) or tree.get("kind") != KIND:
        raise CheckpointError(f"{path}: a jaxq checkpoint, but not of a language model (no kind={KIND!r}); "
                              "load it with jaxq.load")
    if tree.get("version") != VERSION:
        raise CheckpointError(f"{path}: language-model checkpoint version {tree.get('version')}, "
                              f"this jaxq reads version {VERSION}")
    try:
        config = DecoderConfig.from_dict(json.loads(_text(tree["config"])))
        tokenizer = Tokenizer.from_str(_text(tree["tokenizer"]))
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: bad model config or tokenizer in the checkpoint ({e})") from None
    return LM(config, tree["params"], tokenizer, source=os.fspath(path))
