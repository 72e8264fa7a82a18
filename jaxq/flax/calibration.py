"""Static activation scales: a calibration pass keyed by module path, then frozen.

The jaxq linen layers sow statistics of their input into the ``"quant_stats"``
collection whenever that collection is mutable::

    quant_stats/Dense_0/act_absmax   (max |x| of this call)
    quant_stats/Dense_0/act_pct      (the given percentile of |x|)

:func:`calibrate` runs a model over a few batches with the collection mutable,
reduces the statistics per layer (``"minmax"``: the largest ``max |x|`` seen;
``"percentile"``: the mean over batches of the per-batch percentile of
``|x|``), keeps the layers whose weights the policy quantizes with an
activation spec (W8A8), and returns the frozen scales::

    stats = jaxq.flax.calibrate(model.apply, variables, batches, "w8a8")
    # {"Dense_0": {"act_scale": f32[]}, "Conv_0": {...}, ...}
    y = model.apply({"params": qparams, "quant_stats": stats}, x)

Because the tree mirrors module paths, a scale can never be applied to the
wrong layer when the call order changes, and it is plain data (save it with
``jaxq.save``).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxq.numerics import codec
from jaxq.policy import Policy, Rule, as_policy, path_str
from jaxq.qarray import QArray, is_qarray
from jaxq.spec import QuantSpec

STATS = "quant_stats"
"""Name of the Flax collection holding calibration statistics and frozen scales."""

DEFAULT_PERCENTILE = 99.99
CalibrationMethod = Literal["minmax", "percentile"]

_PERCENTILE: contextvars.ContextVar[float] = contextvars.ContextVar("jaxq_calib_percentile",
                                                                    default=DEFAULT_PERCENTILE)


@contextlib.contextmanager
def calibration_percentile(p: float) -> Iterator[None]:
    """Within this context, layers record the ``p``-th percentile of ``|x|`` as ``act_pct``."""
    if not 0.0 < p <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {p}")
    token = _PERCENTILE.set(float(p))
    try:
        yield
    finally:
        _PERCENTILE.reset(token)


def activation_stats(x: jax.Array) -> dict[str, jax.Array]:
    """Per-call statistics of one layer input: ``act_absmax`` and ``act_pct`` (float32 scalars)."""
    a = jnp.abs(jax.lax.stop_gradient(x)).astype(jnp.float32)
    return {"act_absmax": jnp.max(a), "act_pct": jnp.percentile(a, _PERCENTILE.get())}


def record_activation_stats(module: Any, x: jax.Array) -> None:
    """Sows :func:`activation_stats` of ``x`` into ``module``'s ``"quant_stats"`` (linen)."""
    for name, value in activation_stats(x).items():
        module.sow(STATS, name, value)


def scale_from_range(r: jax.Array | float, spec: QuantSpec) -> jax.Array:
    """The symmetric activation scale that maps ``[-r, r]`` onto ``spec``'s codes."""
    r = jnp.asarray(r, jnp.float32)
    scale, _ = codec.scale_and_zero_point(-r, r, spec.fmt, True)
    return scale


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from _flatten(v, prefix + (str(k),))
        else:
            yield prefix + (str(k),), v


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _kernel_leaves(variables: Any) -> dict[tuple[str, ...], tuple[str, Any]]:
    """Module path -> (policy path of its kernel, kernel leaf) for every ``kernel`` param."""
    has_params = isinstance(variables, Mapping) and "params" in variables
    tree = variables["params"] if has_params else variables
    out = {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_qarray)[0]:
        parts = tuple(path_str([k]) for k in key_path)
        if parts and parts[-1] == "kernel":
            full = ("params",) + parts if has_params else parts
            out[parts[:-1]] = ("/".join(full), leaf)
    return out


def _act_spec_for(kernel_path: str, leaf: Any, policy: Policy | None) -> QuantSpec | None:
    if isinstance(leaf, QArray):
        return leaf.meta.act_spec
    if policy is None:
        return None
    rule = policy.match(kernel_path, len(np.shape(leaf)))
    if rule is None or rule.weight is None or rule.weight.fmt.kind == "none":
        return None
    return rule.activation


def reduce_stats(per_batch: Iterable[Mapping[str, Any]], method: CalibrationMethod) -> dict[tuple[str, ...], float]:
    """Combines sown statistics of several calls: module path -> activation range."""
    if method not in ("minmax", "percentile"):
        raise ValueError(f"method must be 'minmax' or 'percentile', got {method!r}")
    key = "act_absmax" if method == "minmax" else "act_pct"
    seen: dict[tuple[str, ...], list[float]] = {}
    for stats in per_batch:
        for path, values in _flatten(stats):
            if path[-1] != key:
                continue
            vals = values if isinstance(values, tuple) else (values,)
            seen.setdefault(path[:-1], []).extend(float(v) for v in vals)
    reduce = max if method == "minmax" else (lambda v: float(np.mean(v)))
    return {path: reduce(v) for path, v in seen.items()}


def calibrate(
    apply_fn: Callable[..., Any],
    variables: Any,
    batches: Iterable[Any],
    policy: Policy | str | Rule | None = None,
    *,
    method: CalibrationMethod = "minmax",
    percentile: float = DEFAULT_PERCENTILE,
    jit: bool = True,
) -> dict[str, Any]:
    """Calibrates static activation scales for a linen model built from :mod:`jaxq.flax.linen`.

    Args:
      apply_fn: ``model.apply`` (called as ``apply_fn(variables, batch, mutable=["quant_stats"])``;
        wrap it in a lambda if your model takes more arguments).
      variables: ``{"params": ...}`` (float or already quantized) or the bare params.
      batches: an iterable of model inputs (a few hundred examples usually suffice).
      policy: the serving policy; layers whose kernel it quantizes with an
        activation spec get a scale. Kernels that are QArrays use their own
        ``meta.act_spec`` (the policy may then be ``None``).
      method: ``"minmax"`` (largest ``|x|`` seen) or ``"percentile"`` (mean over
        batches of the ``percentile``-th percentile of ``|x|``; clips outliers).
      percentile: used by ``method="percentile"``.
      jit: run the calibration forward pass under ``jax.jit``.

    Returns:
      The frozen ``"quant_stats"`` collection, nested by module path:
      ``{"Dense_0": {"act_scale": f32[]}, ...}``. Pass it to ``apply`` next to
      the params to serve with static activation scales.

    Raises:
      ValueError: no batches, an unknown method, or no layer to calibrate.
    """
    policy = None if policy is None else as_policy(policy)
    if isinstance(variables, Mapping) and "params" in variables:
        run_vars = {k: v for k, v in variables.items() if k != STATS}
    else:
        run_vars = {"params": variables}

    def sown(v, batch):
        _, state = apply_fn(v, batch, mutable=[STATS])
        return state.get(STATS, {})

    per_batch = []
    with calibration_percentile(percentile):
        fn = jax.jit(sown) if jit else sown
        for batch in batches:
            per_batch.append(jax.device_get(fn(run_vars, batch)))
    if not per_batch:
        raise ValueError("calibrate got no batches")
    ranges = reduce_stats(per_batch, method)
    kernels = _kernel_leaves(variables)
    out: dict[str, Any] = {}
    for module_path, r in sorted(ranges.items()):
        if module_path not in kernels:
            continue
        kernel_path, leaf = kernels[module_path]
        spec = _act_spec_for(kernel_path, leaf, policy)
        if spec is None:
            continue
        _set(out, module_path + ("act_scale",), scale_from_range(r, spec))
    if not out:
        layers = ["/".join(p) for p in ranges] or ["none recorded (are the layers from jaxq.flax.linen?)"]
        raise ValueError(
            f"calibrate found no layer to calibrate: policy {getattr(policy, 'name', None)!r} gives no "
            f"activation spec to any kernel of the recorded layers {layers}. Use a W8A8 policy "
            "(e.g. 'w8a8') or rules with activation=..."
        )
    return out
