"""Dynamic loss scaling for fp16 training, as an optax transformation.

fp16 gradients underflow unless the loss is multiplied by a large scale ``S``
before differentiation. Dynamic scaling keeps ``S`` as large as possible:

* a step whose (unscaled) gradients contain Inf/NaN is skipped - no parameter
  update, the inner optimizer state is kept - and ``S <- max(S * backoff, min_scale)``;
* after ``growth_interval`` finite steps in a row, ``S <- min(S * growth, max_scale)``.

Usage::

    ls = jaxq.flax.DynamicLossScale()
    opt = jaxq.flax.loss_scaled(optax.adam(1e-3), ls)
    opt_state = opt.init(params)

    def step(params, opt_state, x, y):
        scale = opt_state.loss_scale.scale
        grads = jax.grad(lambda p: loss_fn(p, x, y) * scale)(params)   # scaled gradients in
        updates, opt_state = opt.update(grads, opt_state, params)        # unscaled, checked, maybe skipped
        return optax.apply_updates(params, updates), opt_state

:func:`scaled_train_step` packages exactly these lines.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

PyTree = Any


class LossScaleState(NamedTuple):
    """``scale``: current loss scale (f32); ``good_steps``: finite steps since the last change (i32)."""

    scale: jax.Array
    good_steps: jax.Array


@dataclasses.dataclass(frozen=True)
class DynamicLossScale:
    """Dynamic loss-scale schedule (see module docstring)."""

    initial_scale: float = 2.0**15
    growth_interval: int = 2000
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    min_scale: float = 1.0
    max_scale: float = 2.0**24

    def __post_init__(self):
        if not (self.initial_scale > 0 and self.min_scale > 0 and self.max_scale >= self.min_scale):
            raise ValueError("loss scales must be positive with min_scale <= max_scale")
        if self.growth_interval < 1 or self.growth_factor < 1 or not 0 < self.backoff_factor < 1:
            raise ValueError("need growth_interval >= 1, growth_factor >= 1 and 0 < backoff_factor < 1")

    def init(self) -> LossScaleState:
        return LossScaleState(jnp.asarray(self.initial_scale, jnp.float32), jnp.zeros((), jnp.int32))

    def update(self, state: LossScaleState, finite: jax.Array) -> LossScaleState:
        """The state after a step whose gradients were ``finite`` (bool scalar)."""
        grown = state.good_steps + 1 >= self.growth_interval
        up = jnp.minimum(state.scale * self.growth_factor, self.max_scale)
        down = jnp.maximum(state.scale * self.backoff_factor, self.min_scale)
        scale = jnp.where(finite, jnp.where(grown, up, state.scale), down)
        good = jnp.where(finite & ~grown, state.good_steps + 1, 0).astype(jnp.int32)
        return LossScaleState(scale.astype(jnp.float32), good)


def all_finite(tree: PyTree) -> jax.Array:
    """True when every leaf of ``tree`` is finite."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


class LossScaledState(NamedTuple):
    inner: Any
    loss_scale: LossScaleState


def loss_scaled(inner: optax.GradientTransformation, loss_scale: DynamicLossScale | None = None
                ) -> optax.GradientTransformation:
    """Wraps ``inner`` to take *scaled* gradients: unscale, skip non-finite steps, adapt the scale.

    Args:
      inner: any optax transformation (e.g. ``optax.adam(1e-3)``).
      loss_scale: the schedule (default :class:`DynamicLossScale`).

    Returns:
      An optax transformation whose state is :class:`LossScaledState`; read the
      current scale as ``state.loss_scale.scale``. On a skipped step the updates
      are zero and ``state.inner`` is unchanged.
    """
    ls = loss_scale or DynamicLossScale()

    def init(params):
        return LossScaledState(inner.init(params), ls.init())

    def update(grads, state, params=None):
        grads = jax.tree_util.tree_map(lambda g: (g.astype(jnp.float32) / state.loss_scale.scale).astype(g.dtype)
                                       if jnp.issubdtype(g.dtype, jnp.floating) else g, grads)
        finite = all_finite(grads)
        safe = jax.tree_util.tree_map(lambda g: jnp.where(finite, g, jnp.zeros_like(g)), grads)
        updates, new_inner = inner.update(safe, state.inner, params)
        updates = jax.tree_util.tree_map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), updates)
        new_inner = jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new_inner, state.inner)
        return updates, LossScaledState(new_inner, ls.update(state.loss_scale, finite))

    return optax.GradientTransformation(init, update)


def scaled_train_step(
    loss_fn: Callable[..., jax.Array], optimizer: optax.GradientTransformation, params: PyTree,
    opt_state: LossScaledState, *batch: Any,
) -> tuple[PyTree, LossScaledState, jax.Array, jax.Array]:
    """One step with dynamic loss scaling (jit it). ``optimizer`` must come from :func:`loss_scaled`.

    Returns:
      ``(params, opt_state, loss, finite)``: the (unscaled) loss and whether the step was applied.
    """
    scale = opt_state.loss_scale.scale

    def scaled(p):
        loss = loss_fn(p, *batch)
        return (loss.astype(jnp.float32) * scale), loss

    (_, loss), grads = jax.value_and_grad(scaled, has_aux=True)(params)
    updates, new_state = optimizer.update(grads, opt_state, params)
    finite = all_finite(jax.tree_util.tree_map(lambda g: g / scale, grads))
    return optax.apply_updates(params, updates), new_state, loss, finite
