"""`LM`: a loaded language model (config, params, tokenizer) with its jitted forward."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxq.models.decoder import Decoder
from jaxq.models.decoder_config import DecoderConfig
from jaxq.qarray import QArray
from jaxq.quantize import tree_nbytes


@functools.lru_cache(maxsize=16)
def _jitted_apply(module: Decoder):
    return jax.jit(lambda params, tokens: module.apply({"params": params}, tokens))


@dataclasses.dataclass(frozen=True)
class LM:
    """A decoder-only language model.

    Attributes:
      config: the architecture (:class:`~jaxq.models.decoder_config.DecoderConfig`).
      params: the Flax parameter tree of :class:`~jaxq.models.decoder.Decoder`; quantized
        leaves are :class:`jaxq.QArray`.
      tokenizer: a ``tokenizers.Tokenizer``.
      dtype: compute dtype of the activations (``None``: float32).
      source: where it was loaded from (for messages and reports).
    """

    config: DecoderConfig
    params: Any
    tokenizer: Any
    dtype: Any = None
    source: str = ""

    @property
    def module(self) -> Decoder:
        """The Flax module (``module.apply({'params': params}, tokens)``)."""
        return Decoder(self.config, dtype=self.dtype)

    def apply(self, params: Any, tokens: jax.Array) -> jax.Array:
        """``int32 [B, T]`` tokens -> float32 logits ``[B, T, V]`` (jitted, one compile per shape)."""
        return _jitted_apply(self.module)(params, jnp.asarray(tokens, jnp.int32))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return self.apply(self.params, tokens)

    def replace(self, **changes: Any) -> "LM":
        return dataclasses.replace(self, **changes)

    # --- text -------------------------------------------------------------------------------
    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; BOS is prepended when the model wants it and the tokenizer did not."""
        ids = list(self.tokenizer.encode(text).ids)
        bos = self.config.bos_token_id
        want = self.config.add_bos if add_bos is None else add_bos
        if want and bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` without special tokens (BOS, EOS, chat markers)."""
        special = {i for i, tok in self.tokenizer.get_added_tokens_decoder().items() if tok.special}
        special |= {i for i in (self.config.bos_token_id, *self.config.eos_token_ids) if i is not None}
        return self.tokenizer.decode([int(i) for i in ids if int(i) not in special], skip_special_tokens=False)

    # --- size -------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes of the parameter tree as stored (codes, scales and zero points included)."""
        return tree_nbytes(self.params)

    def bits_per_weight(self) -> float:
        """Stored bits per element over the weight matrices (scales and zero points included)."""
        bits, count = 0, 0
        for leaf in jax.tree.leaves(self.params, is_leaf=lambda x: isinstance(x, QArray)):
            if len(leaf.shape) < 2:
                continue
            bits += 8 * (leaf.nbytes if isinstance(leaf, QArray) else int(np.prod(leaf.shape)) * leaf.dtype.itemsize)
            count += math.prod(leaf.shape)
        return bits / max(count, 1)
