"""Reference models for jaxq: a Llama that loads TinyStories-656K and a char-level GPT.

All weight matmuls go through ``nn.Dense`` (see :mod:`jaxq.models.layers`) and every model takes
``dense_kwargs`` that is splatted into each Dense, so quantization hooks can be injected.
Block-by-block helpers live in :mod:`jaxq.models.blocks`, decoding in
:mod:`jaxq.models.generate`, LM metrics in :mod:`jaxq.models.lm_eval`.
"""

from jaxq.models.char_gpt import CharGPT, CharGPTConfig, train_char_gpt
from jaxq.models.layers import DENSE_INPUTS, Dense
from jaxq.models.llama import Llama, LlamaBlock, LlamaConfig
from jaxq.models.llama_weights import load_tinystories

__all__ = [
    "DENSE_INPUTS",
    "CharGPT",
    "CharGPTConfig",
    "Dense",
    "Llama",
    "LlamaBlock",
    "LlamaConfig",
    "load_tinystories",
    "train_char_gpt",
]
