"""A small character-level GPT (GPT-2 style, pre-LayerNorm) and its trainer, for Tiny Shakespeare.

Same conventions as :mod:`jaxq.models.llama`: every weight matmul is a
:class:`jaxq.models.layers.Dense` that receives ``dense_kwargs``; the model is
``embed -> layers_i -> head`` with ``embed``/``head`` methods, ``block_module()`` and
``num_blocks()`` for block-by-block use (see :mod:`jaxq.models.blocks`), and Dense inputs are
captured by making the ``'dense_inputs'`` collection mutable.

Parameter tree::

    embed_tokens/embedding [V, D], embed_positions/embedding [C, D]
    layers_{i}/attn_norm/{scale,bias}, layers_{i}/attn/{q,k,v,o}_proj/{kernel,bias}
    layers_{i}/mlp_norm/{scale,bias},  layers_{i}/mlp/up_proj [D, 4D], mlp/down_proj [4D, D]
    norm/{scale,bias}, lm_head/{kernel,bias} [D, V]
"""

from __future__ import annotations

import dataclasses
import functools
from collections import Counter
from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxq.algorithms.layouts import char_gpt_layout
from jaxq.data.text import CharTokenizer  # shared char tokenizer (sorted distinct chars)
from jaxq.models.layers import Dtype, causal_attention, make_dense

__all__ = [
    "CharGPT",
    "CharGPTConfig",
    "CharTokenizer",
    "char_lm_loss",
    "eval_char_gpt_loss",
    "sample_windows",
    "train_char_gpt",
    "unigram_entropy",
]

Params = Any


@dataclasses.dataclass(frozen=True)
class CharGPTConfig:
    """Char-GPT hyper-parameters. ``vocab_size`` must cover the tokenizer's characters."""

    vocab_size: int = 65
    context_length: int = 128
    num_layers: int = 4
    hidden_size: int = 128
    num_heads: int = 4
    mlp_ratio: int = 4
    use_bias: bool = True


class _Base(nn.Module):
    config: CharGPTConfig
    dtype: Dtype | None = None  # compute dtype
    param_dtype: Dtype = jnp.float32
    dense_kwargs: Mapping[str, Any] = flax.core.FrozenDict()  # splatted into every Dense

    def _dense(self, features: int, name: str) -> nn.Dense:
        return make_dense(
            features,
            name=name,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            dense_kwargs=self.dense_kwargs,
            use_bias=self.config.use_bias,
        )

    def _norm(self, name: str | None = None) -> nn.LayerNorm:
        return nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, param_dtype=self.param_dtype, name=name)


class GPTAttention(_Base):
    """Multi-head causal self-attention with learned-position inputs (no RoPE)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        b, t, d = x.shape
        heads = lambda y: y.reshape(b, t, c.num_heads, d // c.num_heads)  # noqa: E731
        q = heads(self._dense(d, "q_proj")(x))
        k = heads(self._dense(d, "k_proj")(x))
        v = heads(self._dense(d, "v_proj")(x))
        return self._dense(d, "o_proj")(causal_attention(q, k, v).reshape(b, t, d))


class GPTMLP(_Base):
    """``down_proj(gelu(up_proj(x)))``."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        hidden = self._dense(c.mlp_ratio * c.hidden_size, "up_proj")(x)
        return self._dense(c.hidden_size, "down_proj")(nn.gelu(hidden))


class GPTBlock(_Base):
    """Pre-LN block: ``h + attn(ln(h))`` then ``h + mlp(ln(h))``."""

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        sub = dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype,
                   dense_kwargs=self.dense_kwargs)
        h = h + GPTAttention(**sub, name="attn")(self._norm("attn_norm")(h))
        return h + GPTMLP(**sub, name="mlp")(self._norm("mlp_norm")(h))


class CharGPT(_Base):
    """Char-level GPT: ``tokens [B, T] (T <= context_length) -> logits [B, T, V] float32``."""

    def setup(self) -> None:
        c = self.config
        if c.hidden_size % c.num_heads:
            raise ValueError("hidden_size must be divisible by num_heads")
        emb = dict(dtype=self.dtype, param_dtype=self.param_dtype,
                   embedding_init=nn.initializers.normal(0.02))
        self.embed_tokens = nn.Embed(c.vocab_size, c.hidden_size, **emb)
        self.embed_positions = nn.Embed(c.context_length, c.hidden_size, **emb)
        self.layers = [
            GPTBlock(c, self.dtype, self.param_dtype, self.dense_kwargs) for _ in range(c.num_layers)
        ]
        self.norm = self._norm()
        self.lm_head = self._dense(c.vocab_size, "lm_head")

    def embed(self, tokens: jax.Array) -> jax.Array:
        """Token ids ``[B, T]`` -> block-0 input (token + position embeddings) ``[B, T, D]``."""
        return self.embed_tokens(tokens) + self.embed_positions(jnp.arange(tokens.shape[1]))[None]

    def head(self, h: jax.Array) -> jax.Array:
        """Last block's output ``[B, T, D]`` -> float32 logits ``[B, T, V]``."""
        return self.lm_head(self.norm(h)).astype(jnp.float32)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        h = self.embed(tokens)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)

    @nn.nowrap
    def block_module(self, i: int = 0) -> GPTBlock:
        """An unbound :class:`GPTBlock` with this model's settings (every layer has the same)."""
        return GPTBlock(self.config, self.dtype, self.param_dtype, self.dense_kwargs, parent=None)

    @nn.nowrap
    def block_layout(self, i: int = 0) -> tuple:
        """Input groups and scale folds of a block (see :mod:`jaxq.algorithms.layouts`)."""
        return char_gpt_layout()

    @nn.nowrap
    def num_blocks(self) -> int:
        """Number of blocks (``params['layers_0'] ... ['layers_{n-1}']``)."""
        return self.config.num_layers


# ----------------------------------------------------------------------------- training


def unigram_entropy(text: str) -> float:
    """Entropy (nats/char) of the character distribution of ``text``: the loss of a model that
    ignores context, i.e. the bar a trained LM must clearly beat."""
    counts = np.array(list(Counter(text).values()), dtype=np.float64)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def char_lm_loss(model: CharGPT, params: Params, windows: jax.Array) -> jax.Array:
    """Mean next-char cross-entropy (nats) on ``windows`` ``[B, T + 1]``."""
    logits = model.apply({"params": params}, windows[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:]).mean()


def sample_windows(key: jax.Array, data: jax.Array, batch: int, length: int) -> jax.Array:
    """``batch`` random contiguous windows ``[batch, length]`` of the 1-D id array ``data``."""
    starts = jax.random.randint(key, (batch,), 0, data.shape[0] - length + 1)
    return jax.vmap(lambda s: jax.lax.dynamic_slice_in_dim(data, s, length))(starts)


def _encode(text: str, cfg: CharGPTConfig, tokenizer: CharTokenizer | None) -> jax.Array:
    if tokenizer is None:
        tokenizer = CharTokenizer.from_text(text)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.vocab_size} characters but cfg.vocab_size={cfg.vocab_size}"
        )
    ids = jnp.asarray(tokenizer.encode(text), jnp.int32)
    if ids.shape[0] < cfg.context_length + 1:
        raise ValueError(f"text is shorter than context_length + 1 = {cfg.context_length + 1}")
    return ids


def train_char_gpt(
    text: str,
    cfg: CharGPTConfig,
    steps: int = 1000,
    batch: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    *,
    tokenizer: CharTokenizer | None = None,
    progress: bool = True,
) -> Params:
    """Train a :class:`CharGPT` on random ``context_length`` windows of ``text``; returns params.

    AdamW (weight decay 0.01, grad-norm clip 1) with linear warmup and cosine decay to lr/10.
    ``tokenizer`` defaults to ``CharTokenizer.from_text(text)``; pass one built from the full
    corpus when training on a slice, so ids agree with later evaluation.
    """
    data = _encode(text, cfg, tokenizer)
    opt, step = _trainer(cfg, steps, batch, lr)
    key_init, key_data = jax.random.split(jax.random.key(seed))
    params = _init_fn(cfg)(key_init)
    opt_state = opt.init(params)

    from tqdm.auto import tqdm

    bar = tqdm(range(steps), desc="train char-gpt", disable=not progress)
    for i in bar:
        params, opt_state, loss = step(params, opt_state, data, jax.random.fold_in(key_data, i))
        if progress and (i % 25 == 0 or i == steps - 1):
            bar.set_postfix(loss=f"{float(loss):.3f}")  # syncs the device only every 25 steps
    return params


# The jitted functions below are cached: XLA:CPU compiles take seconds, and repeated runs with
# the same settings (tests, sweeps) should pay them once.


@functools.lru_cache(maxsize=8)
def _init_fn(cfg: CharGPTConfig) -> Any:
    """Jitted ``key -> params`` for ``CharGPT(cfg)``."""
    tokens = jnp.zeros((1, cfg.context_length), jnp.int32)
    return jax.jit(lambda key: CharGPT(cfg).init(key, tokens)["params"])


@functools.lru_cache(maxsize=8)
def _trainer(cfg: CharGPTConfig, steps: int, batch: int, lr: float) -> tuple[Any, Any]:
    """``(optimizer, jitted step_fn)`` for these settings."""
    model = CharGPT(cfg)
    warmup = max(1, min(100, steps // 10))
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), lr / 10)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b2=0.99, weight_decay=0.01))

    # ``data`` is an argument, not a closure constant, so a large corpus is not baked into HLO.
    @jax.jit
    def step(
        params: Params, opt_state: Any, data: jax.Array, key: jax.Array
    ) -> tuple[Params, Any, jax.Array]:
        windows = sample_windows(key, data, batch, cfg.context_length + 1)
        loss, grads = jax.value_and_grad(lambda p: char_lm_loss(model, p, windows))(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return opt, step


def eval_char_gpt_loss(
    params: Params,
    text: str,
    cfg: CharGPTConfig,
    *,
    tokenizer: CharTokenizer | None = None,
    batch: int = 32,
    num_batches: int = 4,
    seed: int = 1234,
) -> float:
    """Mean next-char loss (nats) of ``params`` on ``num_batches`` random windows of ``text``."""
    data = _encode(text, cfg, tokenizer)
    keys = jax.random.split(jax.random.key(seed), num_batches)
    loss_fn = _eval_loss_fn(cfg, batch)
    return float(np.mean([loss_fn(params, data, k) for k in keys]))


@functools.lru_cache(maxsize=16)
def _eval_loss_fn(cfg: CharGPTConfig, batch: int) -> Any:
    """Jitted ``(params, data, key) -> loss`` on one random batch of windows."""
    model, length = CharGPT(cfg), cfg.context_length + 1
    return jax.jit(lambda p, d, k: char_lm_loss(model, p, sample_windows(k, d, batch, length)))
