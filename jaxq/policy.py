"""Policies: which parameters get quantized, and how.

A :class:`Policy` is an ordered tuple of :class:`Rule` objects. Each rule matches
parameter paths (``"params/Dense_0/kernel"``) with a regular expression; the first
rule that matches a leaf decides its weight spec and, for the Flax layers, the
activation spec. Everything is frozen and validated when built. Preset names
(``"int8"``, ``"int4-g128"``, ...) may be passed wherever a policy is expected.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Literal, Sequence

import jax

from jaxq.spec import QuantSpec, as_spec

ActivationMode = Literal["dynamic", "static"]


@dataclasses.dataclass(frozen=True)
class Rule:
    """One policy rule.

    Attributes:
      pattern: regular expression searched in the ``/``-joined parameter path.
      weight: spec for matched weights, a short name such as ``"int4-g128"``, or
        ``None`` to leave them untouched.
      activation: spec for the activations that meet these weights in a matmul
        (used by the Flax integration), or ``None`` for weight-only.
      activation_mode: ``"dynamic"`` (scale computed per call) or ``"static"``
        (scale calibrated once and frozen).
      min_rank: leaves of lower rank (biases, norm scales, scalars) are not matched.
      floats_only: skip non-float leaves silently instead of raising (presets set
        this; hand-written rules raise so that mistakes are seen).
    """

    pattern: str
    weight: QuantSpec | str | None = None
    activation: QuantSpec | str | None = None
    activation_mode: ActivationMode = "dynamic"
    min_rank: int = 2
    floats_only: bool = False

    def __post_init__(self):
        if not isinstance(self.pattern, str):
            raise TypeError(f"rule pattern must be a regular expression string, got {type(self.pattern).__name__} "
                            f"{self.pattern!r}; e.g. Rule(r'Dense_0/kernel$', 'int8')")
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise ValueError(f"rule pattern {self.pattern!r} is not a valid regular expression: {e}") from None
        object.__setattr__(self, "weight", as_spec(self.weight))
        object.__setattr__(self, "activation", as_spec(self.activation))
        if self.activation_mode not in ("dynamic", "static"):
            raise ValueError(f"activation_mode must be 'dynamic' or 'static', got {self.activation_mode!r}")

    def matches(self, path: str, ndim: int) -> bool:
        return ndim >= self.min_rank and re.search(self.pattern, path) is not None


@dataclasses.dataclass(frozen=True)
class Policy:
    """An ordered set of rules; the first match wins."""

    rules: tuple[Rule, ...]
    name: str = "custom"

    def __post_init__(self):
        rules = tuple(self.rules)
        for r in rules:
            if not isinstance(r, Rule):
                raise TypeError(f"Policy rules must be Rule objects, got {type(r).__name__}")
        object.__setattr__(self, "rules", rules)

    def match(self, path: str, ndim: int) -> Rule | None:
        for rule in self.rules:
            if rule.matches(path, ndim):
                return rule
        return None

    def weight_spec(self, path: str, ndim: int) -> QuantSpec | None:
        rule = self.match(path, ndim)
        return None if rule is None else rule.weight


# Presets skip biases (even rank-2 ones of DenseGeneral) and embedding tables: a
# lookup is not a matmul, and Flax's Embed indexes its table directly.
PRESET_PATTERN = r"^(?!(?:.*/)?(?:bias|embedding)$)"


def _preset_rule(weight: str | QuantSpec | None, activation: str | QuantSpec | None = None) -> Rule:
    return Rule(PRESET_PATTERN, weight=weight, activation=activation, floats_only=True)


_A8 = QuantSpec("int8", granularity="per_token")

# GGUF's block formats (blocks of 32 along the input axis, fp16 scales): a tree quantized with
# these presets exports to GGUF without requantization (jaxq.lm.gguf.save_gguf_params).
_GGUF_Q8_0 = QuantSpec("int8", granularity="per_group", group_size=32, scale_dtype="float16")
_GGUF_Q4_0 = QuantSpec("int4", granularity="per_group", group_size=32, full_range=True, scale_dtype="float16")
_GGUF_Q4_1 = QuantSpec("int4", granularity="per_group", group_size=32, symmetric=False,
                       zero_point_domain="value", scale_dtype="float16")

PRESETS: dict[str, Policy] = {
    name: Policy((rule,), name=name)
    for name, rule in {
        "int8": _preset_rule("int8"),
        "int4": _preset_rule("int4"),
        "int4-g32": _preset_rule("int4-g32"),
        "int4-g64": _preset_rule("int4-g64"),
        "int4-g128": _preset_rule("int4-g128"),
        "int3-g64": _preset_rule("int3-g64"),
        "int2": _preset_rule("int2"),
        "nf4-g64": _preset_rule("nf4-g64"),
        "fp8": _preset_rule("fp8_e4m3"),
        "fp8_e5m2": _preset_rule("fp8_e5m2"),
        "bf16": _preset_rule("bf16"),
        "fp16": _preset_rule("fp16"),
        "fp32": _preset_rule(None),
        "w8a8": _preset_rule("int8", _A8),
        "w4a8": _preset_rule("int4", _A8),
        "w4a8-g128": _preset_rule("int4-g128", _A8),
        "q8_0": _preset_rule(_GGUF_Q8_0),
        "q4_0": _preset_rule(_GGUF_Q4_0),
        "q4_1": _preset_rule(_GGUF_Q4_1),
    }.items()
}


def as_policy(policy: Policy | str | Rule | Sequence[Rule] | None) -> Policy:
    """Normalises a policy argument: a Policy, a preset name, a rule or rules, or None (int8)."""
    if policy is None:
        return PRESETS["int8"]
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, Rule):
        return Policy((policy,))
    if isinstance(policy, str):
        if policy in PRESETS:
            return PRESETS[policy]
        raise ValueError(f"unknown policy preset {policy!r}; choose one of {sorted(PRESETS)} or build a jaxq.Policy")
    if isinstance(policy, (list, tuple)):
        return Policy(tuple(policy))
    raise TypeError(f"expected a Policy, a preset name or rules, got {type(policy).__name__}")


def path_str(path: Sequence[Any]) -> str:
    """``/``-joined form of a JAX key path: ``params/Dense_0/kernel``."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            parts.append(str(k.key))
        else:
            parts.append(str(k))
    return "/".join(parts)


def is_float_dtype(dtype: Any) -> bool:
    return bool(jax.numpy.issubdtype(dtype, jax.numpy.floating))
