"""Training loops for the classifiers: float training and quantization-aware fine-tuning.

Both are thin wrappers around :func:`fit`, a jitted optax loop over
:func:`jaxq.data.batches` with a tqdm bar. QAT trains the *float* weights (and,
with LSQ, the quantization scales) through :func:`jaxq.flax.qat_params`, so the
model definition is the same one that serves the float and the quantized params.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jaxq import flax as jflax
from jaxq.data import Dataset, batches, num_batches
from jaxq.policy import Policy

__all__ = ["FitResult", "cross_entropy", "fit", "make_optimizer", "train_float", "train_qat"]

PyTree = Any
LossFn = Callable[[PyTree, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class FitResult:
    """Trained state and the mean training loss of every epoch."""

    state: PyTree
    epoch_losses: tuple[float, ...]


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy against integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()


def make_optimizer(
    name: str,
    learning_rate: float,
    total_steps: int,
    *,
    schedule: str = "constant",
    weight_decay: float = 0.0,
) -> optax.GradientTransformation:
    """An optax optimizer by name (``adam``, ``adamw``, ``sgd`` with momentum 0.9).

    ``schedule="cosine"`` decays the learning rate from ``learning_rate`` to 0
    over ``total_steps``.
    """
    lr: Any = learning_rate
    if schedule == "cosine":
        lr = optax.cosine_decay_schedule(learning_rate, max(1, total_steps))
    elif schedule != "constant":
        raise ValueError(f"unknown schedule {schedule!r}; choose 'constant' or 'cosine'")
    if name == "adam":
        return optax.adam(lr)
    if name == "adamw":
        return optax.adamw(lr, weight_decay=weight_decay)
    if name == "sgd":
        return optax.sgd(lr, momentum=0.9)
    raise ValueError(f"unknown optimizer {name!r}; choose 'adam', 'adamw' or 'sgd'")


def fit(
    loss_fn: LossFn,
    state: PyTree,
    dataset: Dataset,
    optimizer: optax.GradientTransformation,
    *,
    epochs: int,
    batch_size: int,
    seed: int = 0,
    progress: bool = False,
    desc: str = "train",
) -> FitResult:
    """Minimises ``loss_fn(state, x, y)`` over ``epochs`` shuffled passes of ``dataset``.

    The step is jitted once (the remainder batch is dropped so shapes stay
    static); epoch ``e`` is shuffled with seed ``seed + e``.

    Args:
      loss_fn: scalar loss of a batch.
      state: the trainable pytree (params, or params and scales).
      dataset: training examples.
      optimizer: an optax transformation.
      epochs: passes over the data.
      batch_size: examples per step (capped at the dataset size).
      seed: shuffling seed.
      progress: show a tqdm bar (steps, running loss).
      desc: the bar's label.

    Returns:
      The final state and the mean loss of each epoch.
    """
    batch_size = min(batch_size, len(dataset))
    steps_per_epoch = num_batches(dataset, batch_size, drop_remainder=True)
    opt_state = optimizer.init(state)

    @jax.jit
    def step(state, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(state, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, state)
        return optax.apply_updates(state, updates), opt_state, loss

    losses = []
    bar = tqdm(total=epochs * steps_per_epoch, desc=desc, disable=not progress, unit="step", leave=False)
    try:
        for epoch in range(epochs):
            total = jnp.zeros((), jnp.float32)
            for x, y in batches(dataset, batch_size, shuffle=True, seed=seed + epoch, drop_remainder=True):
                state, opt_state, loss = step(state, opt_state, x, y)
                total = total + loss
                bar.update(1)
            mean = float(total) / max(1, steps_per_epoch)
            if not np.isfinite(mean):
                raise FloatingPointError(
                    f"{desc}: training loss became {mean} in epoch {epoch + 1}; lower the learning rate"
                )
            losses.append(mean)
            bar.set_postfix(epoch=epoch + 1, loss=f"{mean:.4f}")
    finally:
        bar.close()
    return FitResult(state, tuple(losses))


def train_float(
    model: nn.Module,
    dataset: Dataset,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    optimizer: str = "adam",
    schedule: str = "constant",
    weight_decay: float = 0.0,
    seed: int = 0,
    params: PyTree | None = None,
    progress: bool = False,
) -> FitResult:
    """Trains ``model`` (a classifier returning logits) with cross-entropy.

    Args:
      model: a Flax linen module.
      dataset: training split.
      params: starting params (default: ``model.init`` with ``seed``).
      others: see :func:`make_optimizer` and :func:`fit`.

    Returns:
      ``FitResult`` whose state is the trained ``params`` (the inner dict,
      without the ``"params"`` collection key).
    """
    if params is None:
        params = init_params(model, dataset, seed)
    steps = epochs * num_batches(dataset, min(batch_size, len(dataset)), drop_remainder=True)
    opt = make_optimizer(optimizer, learning_rate, steps, schedule=schedule, weight_decay=weight_decay)

    def loss_fn(p, x, y):
        return cross_entropy(model.apply({"params": p}, x), y)

    return fit(loss_fn, params, dataset, opt, epochs=epochs, batch_size=batch_size, seed=seed,
               progress=progress, desc="train float")


def init_params(model: nn.Module, dataset: Dataset, seed: int = 0) -> PyTree:
    """``model.init`` on one example of ``dataset``; returns the inner params dict.

    Jitted (one compilation), with an ``rbg`` key: XLA:CPU takes seconds to
    compile threefry for some kernel shapes (10 s for a 3x3x4x8 conv kernel),
    the RngBitGenerator-based ``rbg`` well under one. Same seed, same params.
    """
    x = jnp.zeros((1, *dataset.image_shape), jnp.float32)
    return jax.jit(model.init)(jax.random.key(seed, impl="rbg"), x)["params"]


def train_qat(
    model: nn.Module,
    params: PyTree,
    dataset: Dataset,
    policy: Policy,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    scale_learning_rate: float | None = None,
    learn_scales: bool = True,
    seed: int = 0,
    progress: bool = False,
) -> tuple[PyTree, PyTree | None, tuple[float, ...]]:
    """Quantization-aware fine-tuning of float ``params`` under ``policy``.

    Every step runs the model on :func:`jaxq.flax.qat_params` of the current
    float weights: the forward pass sees the quantized values (and, for W8A8
    policies, quantized activations), the backward pass uses straight-through
    gradients. With ``learn_scales`` the scales start from
    :func:`jaxq.flax.init_qat_scales` and are learned with LSQ. Adam with a
    cosine decay to 0 over the run.

    Returns:
      ``(params, scales, epoch_losses)``: fine-tuned float params and the learned
      scales (``None`` without ``learn_scales``), to be passed to
      ``jaxq.quantize(params, policy, scales=scales)`` for serving.
    """
    batch_size = min(batch_size, len(dataset))
    steps = epochs * num_batches(dataset, batch_size, drop_remainder=True)
    w_lr = optax.cosine_decay_schedule(learning_rate, max(1, steps))
    if learn_scales:
        scales = jax.jit(lambda p: jflax.init_qat_scales({"params": p}, policy))(params)
        s_lr = optax.cosine_decay_schedule(scale_learning_rate or learning_rate, max(1, steps))
        opt = optax.multi_transform(
            {"params": optax.adam(w_lr), "scales": optax.adam(s_lr)},
            {"params": "params", "scales": "scales"},
        )
        state = {"params": params, "scales": scales}
    else:
        opt = optax.adam(w_lr)
        state = {"params": params, "scales": None}

    def loss_fn(s, x, y):
        fq = jflax.qat_params({"params": s["params"]}, policy, scales=s["scales"])
        return cross_entropy(model.apply(fq, x), y)

    result = fit(loss_fn, state, dataset, opt, epochs=epochs, batch_size=batch_size, seed=seed + 1000,
                 progress=progress, desc=f"qat {policy.name}")
    return result.state["params"], result.state["scales"], result.epoch_losses
