"""Tree transforms: quantize and dequantize whole parameter trees.

Both are pure functions of the tree. They work eagerly, under ``jax.jit``, and on
abstract trees through ``jax.eval_shape``. Eager calls also check that weights are
finite and keep each leaf's ``NamedSharding`` (the scales get the matching
sharding with the reduced axes replicated).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxq.policy import Policy, Rule, as_policy, is_float_dtype, path_str
from jaxq.qarray import QArray, is_qarray, quantize_array

PyTree = Any


try:  # public in JAX 0.10/0.11; jax.core keeps shrinking, so fall back to its home
    _Tracer = jax.core.Tracer
except AttributeError:  # pragma: no cover
    from jax._src.core import Tracer as _Tracer


def _is_concrete(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray)) and not isinstance(x, _Tracer)


@functools.partial(jax.jit, static_argnums=(1, 4))
def _quantize_compiled(x: jax.Array, spec: Any, scale: Any, zero_point: Any, act_spec: Any) -> Any:
    # One fused computation per (shape, dtype, spec): eager op-by-op quantization writes a
    # full-size float temporary for every step (divide, round, clip, cast), several times the
    # tensor's bytes at peak, which is what bounds quantize-at-load memory on large tensors.
    return quantize_array(x, spec, scale=scale, zero_point=zero_point, act_spec=act_spec)


def _check_finite(x: Any, path: str) -> None:
    finite = np.asarray(jnp.isfinite(x))
    if not finite.all():
        bad = int(finite.size - finite.sum())
        xs = np.asarray(x)
        n_nan = int(np.isnan(xs).sum())
        raise ValueError(
            f"{path}: weight of shape {tuple(x.shape)} has {bad} non-finite values "
            f"({n_nan} NaN, {bad - n_nan} Inf); quantization would spread them over whole "
            "scale groups. Fix the checkpoint, or exclude this path with Rule(pattern, weight=None)."
        )


def _scale_spec(spec: PartitionSpec, x_shape: tuple[int, ...], scale_shape: tuple[int, ...]) -> PartitionSpec:
    """The value sharding with axes that were reduced (size 1 in the scale) replicated."""
    parts = tuple(spec) + (None,) * (len(x_shape) - len(spec))
    return PartitionSpec(*(p if s == n else (p if s > 1 else None) for p, s, n in zip(parts, scale_shape, x_shape)))


def _keep_sharding(q: QArray, x: jax.Array) -> QArray:
    sharding = getattr(x, "sharding", None)
    if not isinstance(sharding, NamedSharding):
        return q
    mesh, spec = sharding.mesh, sharding.spec

    def fits(arr, pspec):
        for dim, p in zip(arr.shape, tuple(pspec) + (None,) * arr.ndim):
            if p is None:
                continue
            names = p if isinstance(p, tuple) else (p,)
            size = int(np.prod([mesh.shape[n] for n in names]))
            if dim % size:
                return False
        return True

    values_spec = spec if fits(q.values, spec) else PartitionSpec()
    values = jax.device_put(q.values, NamedSharding(mesh, values_spec))

    def put(a):
        if a is None:
            return None
        s = _scale_spec(spec, tuple(x.shape), tuple(a.shape))
        return jax.device_put(a, NamedSharding(mesh, s if fits(a, s) else PartitionSpec()))

    return QArray(values, put(q.scale), put(q.zero_point), q.meta)


def _lookup_scale(scales: Mapping[str, Any] | None, path: str):
    if scales is None or path not in scales:
        return None, None
    s = scales[path]
    if isinstance(s, tuple):
        return s
    return s, None


def quantize(
    params: PyTree,
    policy: Policy | str | Rule | None = None,
    *,
    strict: bool = False,
    scales: Mapping[str, Any] | None = None,
    check_finite: bool = True,
) -> PyTree:
    """Quantizes the leaves of ``params`` chosen by ``policy``.

    Args:
      params: any pytree of arrays (e.g. a Flax ``{"params": ...}`` dict).
      policy: a :class:`Policy`, a preset name (``"int8"``, ``"int4"``,
        ``"int4-g128"``, ``"nf4-g64"``, ``"fp8"``, ``"bf16"``, ...), rules, or
        ``None`` for int8 symmetric per-output-channel on every float leaf of
        rank >= 2 (biases, norms and scalars stay as they are; presets also
        leave leaves named ``bias`` or ``embedding`` in float).
      strict: raise if a rule of the policy matched no leaf (catches typos).
      scales: optional ``{path: scale}`` or ``{path: (scale, zero_point)}`` of
        precomputed scales, e.g. learned by quantization-aware training.
      check_finite: on concrete inputs, raise if a matched weight has NaN/Inf.

    Returns:
      A tree of the same structure with matched leaves replaced by :class:`QArray`
      (plain arrays for fp32). Leaves that are already QArrays are returned
      unchanged, so quantizing twice is a no-op.

    Raises:
      ValueError / TypeError: with the parameter path, shape and what would work.
    """
    policy = as_policy(policy)
    used: set[int] = set()
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_qarray)
    out = []
    seen_paths: set[str] = set()
    for key_path, leaf in leaves:
        path = path_str(key_path)
        seen_paths.add(path)
        if is_qarray(leaf):  # already quantized: a no-op, but the rule that matches it counts as used
            hit = next((i for i, r in enumerate(policy.rules) if r.matches(path, len(leaf.shape))), None)
            if hit is not None:
                used.add(hit)
            out.append(leaf)
            continue
        if leaf is None:
            out.append(leaf)
            continue
        shape = tuple(np.shape(leaf))
        rule_index = next((i for i, r in enumerate(policy.rules) if r.matches(path, len(shape))), None)
        if rule_index is None:
            out.append(leaf)
            continue
        rule = policy.rules[rule_index]
        dtype = leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
        if not is_float_dtype(dtype):
            if rule.floats_only:
                out.append(leaf)
                continue
            raise TypeError(
                f"{path}: rule {rule.pattern!r} matched a {np.dtype(dtype).name} leaf of shape {shape}; "
                "only floating-point tensors can be quantized. Narrow the pattern, or add "
                f"Rule({path!r}, weight=None) before it."
            )
        used.add(rule_index)
        if rule.weight is None:
            out.append(leaf)
            continue
        if check_finite and _is_concrete(leaf):
            _check_finite(leaf, path)
        scale, zp = _lookup_scale(scales, path)
        try:
            if _is_concrete(leaf) and rule.weight.fmt.kind != "none" and scale is None:
                rule.weight.tiling(shape, path)  # layout errors name the path before compiling
                q = _quantize_compiled(leaf, rule.weight, scale, zp, rule.activation)
            else:
                q = quantize_array(
                    leaf, rule.weight, where=path, scale=scale, zero_point=zp, act_spec=rule.activation
                )
        except ValueError as e:
            msg = str(e)
            raise ValueError(msg if path in msg else f"{path} (shape {shape}): {msg}") from None
        if isinstance(q, QArray) and isinstance(leaf, jax.Array) and _is_concrete(leaf):
            q = _keep_sharding(q, leaf)
        out.append(q)
    if scales:
        unmatched = sorted(set(scales) - seen_paths)
        if unmatched:
            raise ValueError(f"scales= has paths that match no leaf of this tree: {unmatched[:8]}; paths here look "
                             f"like {sorted(seen_paths)[:6]} (learned scales would otherwise be silently dropped)")
    if strict:
        unused = [r.pattern for i, r in enumerate(policy.rules) if i not in used]
        if unused:
            sample = [path_str(p) for p, _ in leaves[:8]]
            raise ValueError(
                f"strict=True: rule pattern(s) {unused} matched no leaf of rank >= min_rank. "
                f"Some paths in this tree: {sample}"
            )
    return jax.tree_util.tree_unflatten(treedef, out)


def dequantize(tree: PyTree, dtype: Any = None) -> PyTree:
    """Replaces every :class:`QArray` leaf by its real-valued array (in ``dtype`` if given)."""
    return jax.tree_util.tree_map(
        lambda x: x.dequantize(dtype) if is_qarray(x) else x, tree, is_leaf=is_qarray
    )


def tree_nbytes(tree: PyTree) -> int:
    """Storage bytes of a tree: QArrays count their packed codes and scales."""
    total = 0
    for leaf in jax.tree_util.tree_leaves(tree, is_leaf=is_qarray):
        if is_qarray(leaf):
            total += leaf.nbytes
        elif hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            total += int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
    return total


def summarize(tree: PyTree) -> str:
    """A plain-text table: path, format, shape, bytes (for logs and the command line)."""
    rows = [("path", "format", "shape", "bytes")]
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_qarray)[0]:
        if is_qarray(leaf):
            fmt, shape, nb = leaf.format, tuple(leaf.shape), leaf.nbytes
        elif hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            shape = tuple(leaf.shape)
            fmt, nb = np.dtype(leaf.dtype).name, int(np.prod(shape)) * np.dtype(leaf.dtype).itemsize
        else:  # Python scalars, strings, ... (config values kept in a tree)
            fmt, shape, nb = type(leaf).__name__, (), 0
        rows.append((path_str(key_path), fmt, str(shape), f"{nb:,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)
