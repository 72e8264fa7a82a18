"""Quantization-aware training as a tree transform: float params -> QAT params.

:func:`qat_params` maps a float parameter tree to one whose quantized leaves
are :class:`~jaxq.flax.qat_weight.QatWeight` (the fake-quantized weight with a
straight-through gradient, plus the rule's activation spec). Feed the result to
a model built from :mod:`jaxq.flax.linen` / :mod:`jaxq.flax.nnx` layers (or
stock Flax layers given the jaxq hooks) and differentiate through the
transform: the gradient reaches the float master weights (clipped STE) and,
with LSQ, the scales::

    policy = jaxq.as_policy("w8a8")
    scales = jaxq.flax.init_qat_scales(variables, policy)      # optional (LSQ)

    def loss_fn(variables, scales, x, y):
        logits = model.apply(jaxq.flax.qat_params(variables, policy, scales), x)
        return cross_entropy(logits, y)

    # after training: the serving tree, with the learned scales
    served = jaxq.quantize(variables, policy, scales=scales)

Paths are the ``/``-joined key paths of the tree you pass (``params/Dense_0/kernel``
for a Flax variables dict), the same ones :func:`jaxq.quantize` matches, so pass
the same tree to all three functions.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np

from jaxq.policy import Policy, Rule, as_policy, is_float_dtype, path_str
from jaxq.qarray import is_qarray
from jaxq.spec import QuantSpec
from jaxq.ste import fake_quant, fake_quant_lsq, initial_scale
from jaxq.flax.qat_weight import QatMeta, QatWeight, is_qat_weight

PyTree = Any
Scales = Mapping[str, Any]


def _matched_rule(policy: Policy, path: str, leaf: Any) -> Rule | None:
    """The rule deciding ``leaf`` exactly as :func:`jaxq.quantize` decides it (or None)."""
    shape = tuple(np.shape(leaf))
    rule = policy.match(path, len(shape))
    if rule is None or rule.weight is None:
        return None
    dtype = leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
    if not is_float_dtype(dtype):
        if rule.floats_only:
            return None
        raise TypeError(
            f"{path}: rule {rule.pattern!r} matched a {np.dtype(dtype).name} leaf of shape {shape}; "
            f"only floating-point tensors can be quantized. Narrow the pattern, or add Rule({path!r}, weight=None)."
        )
    if rule.weight.fmt.kind == "none":
        return None
    return rule


def _split_scale(entry: Any) -> tuple[Any, Any]:
    if isinstance(entry, tuple):
        return entry
    return entry, None


def qat_params(params: PyTree, policy: Policy | str | Rule | None = None, scales: Scales | None = None) -> PyTree:
    """Maps float params to QAT params (fake-quantized weights that carry their activation spec).

    Args:
      params: a float parameter tree (e.g. ``{"params": ...}`` from ``model.init``).
      policy: the policy that will later serve the model (a :class:`jaxq.Policy`,
        preset name or rules; ``None`` is int8 weight-only).
      scales: optional ``{path: scale}`` (or ``{path: (scale, zero_point)}``)
        from :func:`init_qat_scales`. Paths found here use LSQ
        (:func:`jaxq.fake_quant_lsq`, gradient to the scale); other matched
        weights use :func:`jaxq.fake_quant` with the rule's range method.

    Returns:
      A tree of the same structure; weights the policy quantizes become
      :class:`QatWeight` leaves, everything else is returned as is. The
      transform is differentiable with respect to ``params`` and ``scales``.
    """
    policy = as_policy(policy)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: is_qarray(x) or is_qat_weight(x))
    out = []
    for key_path, leaf in leaves:
        if leaf is None or is_qarray(leaf) or is_qat_weight(leaf):
            out.append(leaf)
            continue
        path = path_str(key_path)
        rule = _matched_rule(policy, path, leaf)
        if rule is None:
            out.append(leaf)
            continue
        spec: QuantSpec = rule.weight
        learned = scales is not None and path in scales
        if learned:
            scale, zp = _split_scale(scales[path])
            zp = None if zp is None else jax.lax.stop_gradient(zp)
            value = fake_quant_lsq(leaf, scale, spec, zero_point=zp)
        else:
            value = fake_quant(leaf, spec)
        out.append(QatWeight(value, QatMeta(spec, rule.activation, learned)))
    return jax.tree_util.tree_unflatten(treedef, out)


def init_qat_scales(params: PyTree, policy: Policy | str | Rule | None = None) -> dict[str, Any]:
    """Initial learnable (LSQ) scales for every integer-format weight the policy quantizes.

    Args:
      params: the float parameter tree that :func:`qat_params` will see.
      policy: the serving policy.

    Returns:
      ``{path: scale}`` for symmetric specs and ``{path: (scale, zero_point)}``
      for asymmetric ones, in the stored scale shape of each weight's spec (what
      the rule's range method picks now). Train it alongside the params; pass it
      to :func:`qat_params` and, after training, to ``jaxq.quantize(scales=...)``.
      Non-integer formats (fp8, nf4, bf16) get no entry (they train with the STE).
    """
    policy = as_policy(policy)
    out: dict[str, Any] = {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_qarray)[0]:
        if leaf is None or is_qarray(leaf):
            continue
        path = path_str(key_path)
        rule = _matched_rule(policy, path, leaf)
        if rule is None or rule.weight.fmt.kind != "int":
            continue
        scale, zp = initial_scale(leaf, rule.weight)
        out[path] = scale if zp is None else (scale, zp)
    return out
