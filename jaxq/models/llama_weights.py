"""Load HF Llama safetensors checkpoints (e.g. TinyStories-656K) into :class:`Llama` params.

No torch is needed: weights are read with ``safetensors.numpy`` and the tokenizer with the
``tokenizers`` library. The data itself is never part of the repository; its location comes
from an argument or from ``$JAXQ_DATA_DIR`` (the shared data folder, which holds
``tinystories_656k/``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxq.models.llama import LlamaConfig

DATA_DIR_ENV = "JAXQ_DATA_DIR"
TINYSTORIES_DIRNAME = "tinystories_656k"

Params = dict[str, Any]


def data_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """The shared data folder: ``path`` if given, else ``$JAXQ_DATA_DIR``."""
    if path is None:
        path = os.environ.get(DATA_DIR_ENV)
        if not path:
            raise FileNotFoundError(
                f"no data folder given and ${DATA_DIR_ENV} is unset; point it at the folder "
                f"that contains {TINYSTORIES_DIRNAME}/"
            )
    return Path(path)


def tinystories_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """Folder of the TinyStories-656K model.

    ``path`` may be the model folder itself (holding ``config.json``) or the data folder above
    it; with no ``path``, ``$JAXQ_DATA_DIR/tinystories_656k`` is used.
    """
    if path is not None and (Path(path) / "config.json").is_file():
        return Path(path)
    return data_dir(path) / TINYSTORIES_DIRNAME


def hf_llama_to_params(tensors: Mapping[str, np.ndarray], cfg: LlamaConfig) -> Params:
    """Map HF Llama tensor names to the :class:`Llama` param tree (float arrays as numpy).

    HF Linear weights are ``[out, in]``; Flax Dense kernels are ``[in, out]``, hence the
    transposes. With tied embeddings only ``lm_head.weight`` may be stored (as in
    TinyStories-656K); it is used for both ``embed_tokens/embedding`` and ``lm_head/kernel``.
    """

    def get(name: str) -> np.ndarray:
        if name not in tensors:
            raise KeyError(f"checkpoint is missing tensor {name!r}")
        return np.asarray(tensors[name])

    def kernel(name: str) -> dict[str, np.ndarray]:
        return {"kernel": np.ascontiguousarray(get(name).T)}

    if "model.embed_tokens.weight" in tensors:
        embedding = get("model.embed_tokens.weight")
    elif cfg.tie_word_embeddings:
        embedding = get("lm_head.weight")
    else:
        raise KeyError("checkpoint has no model.embed_tokens.weight and embeddings are not tied")
    if "lm_head.weight" in tensors:
        head = get("lm_head.weight")
    elif cfg.tie_word_embeddings:
        head = embedding
    else:
        raise KeyError("checkpoint has no lm_head.weight and embeddings are not tied")

    params: Params = {"embed_tokens": {"embedding": np.array(embedding)}}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        params[f"layers_{i}"] = {
            "attn_norm": {"scale": get(p + "input_layernorm.weight")},
            "attn": {n: kernel(p + f"self_attn.{n}.weight") for n in ("q_proj", "k_proj", "v_proj", "o_proj")},
            "mlp_norm": {"scale": get(p + "post_attention_layernorm.weight")},
            "mlp": {n: kernel(p + f"mlp.{n}.weight") for n in ("gate_proj", "up_proj", "down_proj")},
        }
    params["norm"] = {"scale": get("model.norm.weight")}
    params["lm_head"] = {"kernel": np.ascontiguousarray(head.T)}
    return params


def load_tinystories(
    path: str | os.PathLike[str] | None = None,
) -> tuple[LlamaConfig, Params, Any]:
    """Load TinyStories-656K: ``(cfg, params, tokenizer)``.

    ``params`` is the inner param tree (use ``model.apply({'params': params}, tokens)``) of
    float32 ``jax.Array``. ``tokenizer`` is a ``tokenizers.Tokenizer``; its own post-processor
    already prepends BOS (id 1, ``<|start_story|>``) on ``encode``, as the model card asks, so
    no BOS must be added by hand. Its ``decode`` does *not* drop special tokens (they are
    marked normalized), so strip them by id (see :func:`jaxq.models.generate.decode_ids`).
    """
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    folder = tinystories_dir(path)
    cfg = LlamaConfig.from_hf_config(json.loads((folder / "config.json").read_text()))
    tensors = load_file(str(folder / "model.safetensors"))
    params = jax.tree.map(jnp.asarray, hf_llama_to_params(tensors, cfg))
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    bos = tokenizer.encode("a").ids[:1]
    if bos != [cfg.bos_token_id]:
        raise ValueError(f"tokenizer does not add BOS {cfg.bos_token_id} on encode (got {bos})")
    return cfg, params, tokenizer
