"""Real language models: load HF safetensors folders, GGUF files and jaxq checkpoints; generate
with a KV cache; quantize block by block; evaluate; export to GGUF.

::

    lm = jaxq.lm.load("SmolLM2-135M-Instruct.Q4_1.gguf")          # or an HF folder, or a .jaxq file
    print(jaxq.lm.generate(lm, "The capital of France is", 16)[0])
    qlm, _ = jaxq.lm.quantize_lm(lm, Recipe("gptq", "int4-g128"))
    print(jaxq.lm.evaluate(qlm, text, reference=lm))                 # ppl, kl, top1, bytes, bits_per_weight
    jaxq.lm.save(qlm, "smollm2-int4.jaxq"); jaxq.lm.save_gguf(qlm_q4_0, "smollm2-q4_0.gguf")
    policy, report = jaxq.lm.lm_auto_policy(lm, jaxq.BitsPerWeight(4.5))  # per-kernel formats
    qlm, _ = jaxq.lm.quantize_lm(lm, Recipe("gptq", policy=policy))

Architectures: Llama 2/3 (and SmolLM, TinyLlama, Mistral without sliding window), Qwen2/2.5,
Qwen3, Gemma 2 and Gemma 3, all through one :class:`~jaxq.models.decoder.Decoder`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from jaxq.lm.auto import lm_auto_policy, lm_sensitivity
from jaxq.lm.checkpoint import is_checkpoint
from jaxq.lm.checkpoint import load as _load_checkpoint
from jaxq.lm.checkpoint import save
from jaxq.lm.evaluate import evaluate
from jaxq.lm.generate import generate, generate_ids
from jaxq.lm.model import LM
from jaxq.lm.quantize import calibration_tokens, quantize_lm, weight_spec

GGUF_MAGIC = b"GGUF"


def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def load(path: str | os.PathLike, *, dtype: Any = None, quantize: Any = None) -> LM:
    """Loads a language model.

    Args:
      path: a Hugging Face folder (``config.json``, ``model.safetensors`` or sharded files with
        ``model.safetensors.index.json``, ``tokenizer.json``), a ``.gguf`` file, or a jaxq
        checkpoint written by ``jaxq lm quantize`` / :func:`save`.
      dtype: cast float parameters to this dtype (e.g. ``jnp.bfloat16``).
      quantize: a :class:`jaxq.Policy` or preset name applied tensor by tensor while loading, so
        the float model is never whole in memory (native GGUF Q8_0/Q4_0/Q4_1 tensors stay as
        they are).

    Raises:
      FileNotFoundError: nothing at ``path``, or a folder without ``config.json``.
      ValueError: an unsupported architecture, a missing or misshapen tensor (the message names it).
    """
    p = Path(path)
    if p.is_dir():
        from jaxq.lm.hf import load_hf

        cfg, params, tok = load_hf(p, dtype=dtype, quantize=quantize)
        return LM(cfg, params, tok, source=str(p))
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or folder; give a Hugging Face folder, a .gguf file or a "
                                "jaxq checkpoint")
    if is_checkpoint(p):
        lm = _load_checkpoint(p)
        if dtype is not None or quantize is not None:
            from jaxq.quantize import quantize as quantize_tree

            params = lm.params if dtype is None else _cast(lm.params, dtype)
            if quantize is not None:
                params = quantize_tree(params, quantize)
            lm = lm.replace(params=params)
        return lm
    if _is_gguf(p):
        from jaxq.lm.gguf import load_gguf

        cfg, params, tok = load_gguf(p, dtype=dtype, quantize=quantize)
        return LM(cfg, params, tok, source=str(p))
    raise ValueError(f"{p}: not a GGUF file (no GGUF magic) nor a jaxq checkpoint; give a Hugging Face folder, "
                     "a .gguf file or a file written by `jaxq lm quantize`")


def _cast(params: Any, dtype: Any) -> Any:
    import jax
    import jax.numpy as jnp

    from jaxq.qarray import QArray

    def cast(x):
        if isinstance(x, QArray) or not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        return x.astype(dtype)

    return jax.tree.map(cast, params, is_leaf=lambda x: isinstance(x, QArray))


def save_gguf(lm: LM, path: str | os.PathLike) -> None:
    """Writes ``lm`` as a GGUF file (architecture and tokenizer metadata; QArrays as Q8_0/Q4_0/Q4_1).

    Raises:
      ValueError: a quantized tensor whose layout has no GGUF type; the message names the tensor
        and the layouts that fit (quantize with ``jaxq.lm.weight_spec(..., target="gguf")``).
    """
    from jaxq.lm.gguf import save_gguf_params

    save_gguf_params(path, lm.config, lm.params, lm.tokenizer)


__all__ = [
    "LM",
    "calibration_tokens",
    "evaluate",
    "generate",
    "generate_ids",
    "lm_auto_policy",
    "lm_sensitivity",
    "load",
    "quantize_lm",
    "save",
    "save_gguf",
    "weight_spec",
]
