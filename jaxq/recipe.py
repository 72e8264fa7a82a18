"""Recipes: the YAML schema of ``jaxq run`` / ``jaxq compare``, as frozen dataclasses.

A recipe says where the data comes from, which float model to train (or load),
which quantization strategies to apply to it, and where the report goes::

    name: quickstart
    data:     {dataset: digits}
    model:    {arch: mlp, hidden: [64]}
    train:    {epochs: 30, batch_size: 64, learning_rate: 0.003}
    strategies: [fp32, bf16, int8, int4, int2]     # or one `strategy:` mapping
    output:   {dir: runs/quickstart}

A strategy with ``method: auto`` lets :func:`jaxq.auto_policy` choose every layer's weight
format from ``candidates`` under an average of ``budget_bits`` bits per weight (scales
included), e.g. ``{method: auto, budget_bits: 2.5, candidates: [int8, int4, int3, int2]}``.

Validation is strict and happens once, when the recipe is parsed: an unknown
key or a bad value raises :class:`RecipeError` naming the full dotted path of the
key (``strategies[2].precision``) and the values that would be accepted. Every
section is a frozen dataclass, so a parsed recipe cannot drift while it runs.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, Mapping, Sequence

import yaml

from jaxq.algorithms.sensitivity import ESTIMATORS, OBJECTIVES, Candidate, as_candidates
from jaxq.policy import PRESETS, Policy, Rule
from jaxq.spec import QuantSpec

__all__ = [
    "ACTIVATIONS",
    "ARCHS",
    "AUTO_CANDIDATES",
    "DATASETS",
    "GRANULARITIES",
    "METHODS",
    "PRECISIONS",
    "RANGE_METHODS",
    "SHORTHANDS",
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "OutputConfig",
    "QatConfig",
    "Recipe",
    "RecipeError",
    "StrategyConfig",
    "TrainConfig",
    "load_recipe",
    "parse_recipe",
    "parse_strategy",
]

DATASETS = ("mnist", "fashion_mnist", "digits")
ARCHS = ("mlp", "cnn")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine")
PRECISIONS = ("fp32", "bf16", "fp16", "int8", "int4", "int2")
INT_PRECISIONS = ("int8", "int4", "int2")
METHODS = ("ptq", "qat", "auto")
ACTIVATIONS = ("float", "int8")
ACTIVATION_MODES = ("dynamic", "static")
GRANULARITIES = ("per_tensor", "per_channel", "per_group")
RANGE_METHODS = ("absmax", "minmax", "percentile", "mse")
SOURCES = ("auto", "local", "tfds", "download")
AUTO_CANDIDATES = ("int8", "int4", "int3", "int2")  # per-channel absmax, like the int shorthands
# Examples for the error message of a bad candidate (any jaxq format name works).
_CANDIDATE_EXAMPLES = "int8, int4, int3, int2, int4-g32, int3-g64, nf4-g64, bf16, fp8, float (keep the layer)"

# Strings accepted where a strategy mapping is expected (PTQ with default settings).
SHORTHANDS: dict[str, dict[str, Any]] = {
    **{p: {"precision": p} for p in PRECISIONS},
    "w8a8": {"precision": "int8", "activations": "int8"},
    "w4a8": {"precision": "int4", "activations": "int8"},
}


class RecipeError(ValueError):
    """A recipe key is unknown or its value is invalid.

    Attributes:
      key: full dotted path of the offending key, e.g. ``"strategies[1].precision"``.
      reason: what is wrong, including the allowed values.
    """

    def __init__(self, key: str, reason: str):
        self.key = key
        self.reason = reason
        super().__init__(f"{key}: {reason}" if key else reason)

    def under(self, prefix: str) -> "RecipeError":
        """The same error with ``prefix`` prepended to its key."""
        if not prefix:
            return self
        key = prefix if not self.key else (f"{prefix}{self.key}" if self.key.startswith("[") else f"{prefix}.{self.key}")
        return RecipeError(key, self.reason)


# --- value checks --------------------------------------------------------------------------
# Each check takes (value, key) and returns the normalised value or raises RecipeError.
Check = Callable[[Any, str], Any]


def _choice(choices: Sequence[str], optional: bool = False) -> Check:
    def check(v: Any, key: str) -> Any:
        if v is None and optional:
            return None
        if not isinstance(v, str) or v not in choices:
            extra = " or null" if optional else ""
            raise RecipeError(key, f"got {v!r}; allowed values: {', '.join(choices)}{extra}")
        return v

    return check


def _int(lo: int | None = None, hi: int | None = None, optional: bool = False) -> Check:
    def check(v: Any, key: str) -> Any:
        if v is None and optional:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            raise RecipeError(key, f"got {v!r}; expected an integer{_bounds(lo, hi)}{' or null' if optional else ''}")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise RecipeError(key, f"got {v}; allowed values: integers{_bounds(lo, hi)}")
        return v

    return check


def _float(lo: float | None = None, hi: float | None = None, open_lo: bool = False, optional: bool = False) -> Check:
    def check(v: Any, key: str) -> Any:
        if v is None and optional:
            return None
        if isinstance(v, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                v = float(v)
            except ValueError:
                pass
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise RecipeError(key, f"got {v!r}; expected a number{_bounds(lo, hi, open_lo)}")
        v = float(v)
        too_low = lo is not None and (v <= lo if open_lo else v < lo)
        if too_low or (hi is not None and v > hi):
            raise RecipeError(key, f"got {v}; allowed values: numbers{_bounds(lo, hi, open_lo)}")
        return v

    return check


def _bounds(lo: float | None, hi: float | None, open_lo: bool = False) -> str:
    if lo is not None and hi is not None:
        return f" in {'(' if open_lo else '['}{lo}, {hi}]"
    if lo is not None:
        return f" {'>' if open_lo else '>='} {lo}"
    if hi is not None:
        return f" <= {hi}"
    return ""


def _bool(v: Any, key: str) -> bool:
    if not isinstance(v, bool):
        raise RecipeError(key, f"got {v!r}; allowed values: true, false")
    return v


def _optional_bool(v: Any, key: str) -> bool | None:
    if v is not None and not isinstance(v, bool):
        raise RecipeError(key, f"got {v!r}; allowed values: true, false, null")
    return v


def _str(optional: bool = False) -> Check:
    def check(v: Any, key: str) -> Any:
        if v is None and optional:
            return None
        if isinstance(v, os.PathLike):
            v = os.fspath(v)
        if not isinstance(v, str) or not v:
            raise RecipeError(key, f"got {v!r}; expected a non-empty string{' or null' if optional else ''}")
        return v

    return check


def _file_name(optional: bool = False) -> Check:
    """A name that becomes part of a file name (report, saved model): no folders, no ``..``."""
    base = _str(optional)

    def check(v: Any, key: str) -> Any:
        v = base(v, key)
        if v is not None and ("/" in v or "\\" in v or v in (".", "..") or v.startswith(".")):
            raise RecipeError(key, f"got {v!r}; names become file names in the output folder, so they may not "
                              "contain '/' or '\\' or start with '.' (e.g. 'mnist_int4')")
        return v

    return check


def _int_list(lo: int = 1) -> Check:
    def check(v: Any, key: str) -> tuple[int, ...]:
        if isinstance(v, int) and not isinstance(v, bool):
            v = [v]
        if not isinstance(v, (list, tuple)) or not v:
            raise RecipeError(key, f"got {v!r}; expected a non-empty list of integers >= {lo}")
        return tuple(_int(lo)(x, f"{key}[{i}]") for i, x in enumerate(v))

    return check


def _candidate_list(v: Any, key: str) -> tuple[str, ...] | None:
    """Weight formats an auto strategy may give a layer: at least two distinct jaxq format names."""
    if v is None:
        return None
    if not isinstance(v, (list, tuple)) or not v:
        raise RecipeError(key, f"got {v!r}; expected a list of at least two weight formats, "
                          f"e.g. [{', '.join(AUTO_CANDIDATES)}]")
    for i, c in enumerate(v):
        if not isinstance(c, str) or not c:
            raise RecipeError(f"{key}[{i}]", f"got {c!r}; expected a format name: {_CANDIDATE_EXAMPLES}")
        if c in PRESETS and PRESETS[c].rules[0].activation is not None:
            raise RecipeError(f"{key}[{i}]", f"{c!r} quantizes activations too; candidates are weight formats: "
                              f"{_CANDIDATE_EXAMPLES}")
        try:
            as_candidates([c])
        except (ValueError, TypeError):
            raise RecipeError(f"{key}[{i}]", f"unknown weight format {c!r}; allowed values: {_CANDIDATE_EXAMPLES} "
                              "(any jaxq format, optionally with -g<group size>)") from None
    try:
        labels = [cand.label for cand in as_candidates(v)]
    except ValueError as e:  # the same format listed twice (e.g. float and fp32)
        raise RecipeError(key, f"{e}; list each format once") from None
    if len(labels) < 2:
        raise RecipeError(key, f"got {list(v)!r}; method 'auto' needs at least two formats to choose between "
                          "(for one format everywhere use method: ptq with that precision)")
    return tuple(v)


def _field(default: Any, check: Check, doc: str = "") -> Any:
    return dataclasses.field(default=default, metadata={"check": check, "doc": doc})


class _Section:
    """Mixin: re-checks every field on construction, so direct construction is validated too."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            check = f.metadata.get("check")
            if check is not None:
                object.__setattr__(self, f.name, check(getattr(self, f.name), f.name))
        self._validate()

    def _validate(self) -> None:
        """Cross-field checks (override)."""


def _section(cls: type) -> Check:
    return lambda v, key: v if isinstance(v, cls) else _build(cls, v, key)


# --- sections ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DataConfig(_Section):
    """Where the data comes from.

    Attributes:
      dataset: ``mnist``, ``fashion_mnist`` or ``digits`` (bundled with scikit-learn).
      data_dir: folder with the IDX files (or its parent); default ``$JAXQ_DATA_DIR``.
      source: ``auto`` (local, TFDS, download cache), ``local``, ``tfds`` or ``download``.
      allow_download: let ``auto``/``download`` fetch missing files.
      train_limit: use only the first N training examples (null: all).
      test_limit: use only the first N test examples (null: all).
    """

    dataset: str = _field("digits", _choice(DATASETS))
    data_dir: str | None = _field(None, _str(optional=True))
    source: str = _field("auto", _choice(SOURCES))
    allow_download: bool = _field(True, _bool)
    train_limit: int | None = _field(None, _int(1, optional=True))
    test_limit: int | None = _field(None, _int(1, optional=True))


@dataclasses.dataclass(frozen=True)
class ModelConfig(_Section):
    """The float model.

    Attributes:
      arch: ``mlp`` (flatten, hidden Dense+ReLU layers, Dense to the classes) or
        ``cnn`` (Conv+ReLU+max-pool blocks, then a hidden Dense and the classifier).
      hidden: widths of the hidden Dense layers (MLP: ``[128]`` gives 784-128-10).
      channels: output channels of the CNN's conv blocks (ignored by the MLP).
      checkpoint: a ``jaxq.save`` file of float params. If it exists it is loaded
        and training is skipped (unless ``--retrain``); otherwise the trained
        params are saved there.
    """

    arch: str = _field("mlp", _choice(ARCHS))
    hidden: tuple[int, ...] = _field((128,), _int_list())
    channels: tuple[int, ...] = _field((16, 32), _int_list())
    checkpoint: str | None = _field(None, _str(optional=True))


@dataclasses.dataclass(frozen=True)
class TrainConfig(_Section):
    """Float training.

    Attributes:
      epochs: passes over the training set.
      batch_size: examples per step.
      learning_rate: peak learning rate.
      optimizer: ``adam``, ``adamw`` or ``sgd`` (with momentum 0.9).
      weight_decay: decoupled weight decay (``adamw`` only).
      schedule: ``constant`` or ``cosine`` (decays to 0 over the run).
      seed: seed of the initialisation and of the shuffling.
    """

    epochs: int = _field(5, _int(0))
    batch_size: int = _field(128, _int(1))
    learning_rate: float = _field(1e-3, _float(0.0, open_lo=True))
    optimizer: str = _field("adam", _choice(OPTIMIZERS))
    weight_decay: float = _field(0.0, _float(0.0))
    schedule: str = _field("constant", _choice(SCHEDULES))
    seed: int = _field(0, _int(0))

    def _validate(self) -> None:
        if self.weight_decay and self.optimizer != "adamw":
            raise RecipeError("weight_decay", f"is only used by optimizer 'adamw', not {self.optimizer!r}; "
                              "set optimizer: adamw or weight_decay: 0")


@dataclasses.dataclass(frozen=True)
class QatConfig(_Section):
    """Quantization-aware fine-tuning, started from the float model.

    Attributes:
      epochs: fine-tuning passes over the training set.
      batch_size: examples per step.
      learning_rate: peak learning rate of the weights (cosine decay to 0).
      scale_learning_rate: learning rate of the LSQ scales (null: same as the weights).
      learn_scales: learn the quantization scales (LSQ); false keeps the range
        method's scales, recomputed from the weights at every step.
    """

    epochs: int = _field(2, _int(1))
    batch_size: int = _field(128, _int(1))
    learning_rate: float = _field(1e-4, _float(0.0, open_lo=True))
    scale_learning_rate: float | None = _field(None, _float(0.0, open_lo=True, optional=True))
    learn_scales: bool = _field(True, _bool)


@dataclasses.dataclass(frozen=True)
class StrategyConfig(_Section):
    """One way to quantize the float model.

    Attributes:
      name: label in the report (default: derived, e.g. ``w4a8-qat``).
      precision: weight format: ``fp32``, ``bf16``, ``fp16``, ``int8``, ``int4`` or ``int2``.
      activations: ``float`` (weight-only) or ``int8`` (W8A8 / W4A8: int8 activations
        meet the integer weights in an int8 x int8 -> int32 matmul).
      activation_mode: ``dynamic`` (activation scale per call) or ``static``
        (calibrated once on training batches, then frozen).
      method: ``ptq`` (quantize the trained weights), ``qat`` (fine-tune with
        fake quantization first, see ``qat``) or ``auto`` (each layer's format chosen by
        :func:`jaxq.auto_policy` from ``candidates`` under ``budget_bits``).
      granularity: ``per_channel``, ``per_tensor`` or ``per_group`` (int formats).
      group_size: elements per group for ``per_group``.
      range_method: how weight ranges are chosen: ``absmax``, ``minmax``,
        ``percentile`` or ``mse`` (clip search minimising the round-trip error).
      symmetric: symmetric codes (no zero point).
      full_range: symmetric int grid with every code (``[-8, 7]`` for int4) or the narrow one
        (``[-7, 7]``; int2 is then ternary); ``null`` = jaxq's default (full at <= 4 bits).
      calibration_batches: training batches used to calibrate static activation scales,
        and (``method: auto``) to measure the layers' sensitivities.
      qat: fine-tuning settings (``method: qat`` only).
      budget_bits: ``method: auto`` only (required): average stored bits per quantizable
        weight, scales included, e.g. ``2.5``.
      candidates: ``method: auto`` only: formats a layer may take (jaxq format names such as
        ``int8``, ``int3``, ``int4-g32``, or ``float``); default ``[int8, int4, int3, int2]``.
      estimator: ``method: auto`` only: ``estimated`` (Fisher, default) or ``measured``.
      objective: ``method: auto`` only: ``kl`` (of the logits from the float model's, default)
        or ``loss`` (cross-entropy on the calibration labels).

    ``method: auto`` picks weight formats only, so the other weight settings (``precision``,
    ``granularity``, ...), int8 activations and ``qat`` keep their defaults there.
    """

    name: str | None = _field(None, _file_name(optional=True))
    precision: str = _field("int8", _choice(PRECISIONS))
    activations: str = _field("float", _choice(ACTIVATIONS))
    activation_mode: str = _field("dynamic", _choice(ACTIVATION_MODES))
    method: str = _field("ptq", _choice(METHODS))
    granularity: str = _field("per_channel", _choice(GRANULARITIES))
    group_size: int | None = _field(None, _int(2, optional=True))
    range_method: str = _field("absmax", _choice(RANGE_METHODS))
    symmetric: bool = _field(True, _bool)
    full_range: bool | None = _field(None, _optional_bool)
    calibration_batches: int = _field(8, _int(1))
    qat: QatConfig = dataclasses.field(default_factory=QatConfig, metadata={"check": _section(QatConfig)})
    budget_bits: float | None = _field(None, _float(0.0, open_lo=True, optional=True))
    candidates: tuple[str, ...] | None = _field(None, _candidate_list)
    estimator: str | None = _field(None, _choice(ESTIMATORS, optional=True))
    objective: str | None = _field(None, _choice(OBJECTIVES, optional=True))

    def _validate(self) -> None:
        if self.method == "auto":
            self._validate_auto()
        else:
            for key in _AUTO_KEYS:
                if getattr(self, key) is not None:
                    raise RecipeError(key, f"is only used with method 'auto', not {self.method!r}; "
                                      "remove it or set method: auto")
        is_int = self.precision in INT_PRECISIONS
        if self.method == "qat" and not is_int:
            raise RecipeError("method", f"'qat' needs an integer precision ({', '.join(INT_PRECISIONS)}), "
                              f"got precision {self.precision!r}; use method: ptq")
        if self.activations == "int8" and not is_int:
            raise RecipeError("activations", f"'int8' needs an integer weight precision ({', '.join(INT_PRECISIONS)}), "
                              f"got precision {self.precision!r}; allowed values here: float")
        if self.activation_mode == "static" and self.activations == "float":
            raise RecipeError("activation_mode", "'static' needs activations: int8; allowed values here: dynamic")
        if (self.granularity == "per_group") != (self.group_size is not None):
            if self.group_size is None:
                raise RecipeError("group_size", "granularity 'per_group' needs a group_size (an integer >= 2)")
            raise RecipeError("group_size", f"is only used with granularity 'per_group', not {self.granularity!r}; "
                              "remove it or set granularity: per_group")
        if self.method == "qat" and self.qat.learn_scales and not self.symmetric:
            raise RecipeError("symmetric", "QAT with learned scales (qat.learn_scales) supports symmetric: true only")
        if self.name is None:
            object.__setattr__(self, "name", self.default_name())

    def _validate_auto(self) -> None:
        """``method: auto``: a finite budget the candidates can meet; defaults filled in; no unused keys."""
        for f in dataclasses.fields(self):
            if f.name in _AUTO_UNUSED and getattr(self, f.name) != _default(f):
                raise RecipeError(f.name, "is not used by method 'auto' (it picks each layer's weight format "
                                  "from `candidates`); remove it")
        if self.budget_bits is None:
            raise RecipeError("budget_bits", "method 'auto' needs a budget: average bits per weight, scales "
                              "included (a number > 0, e.g. budget_bits: 2.5)")
        if not math.isfinite(self.budget_bits):
            raise RecipeError("budget_bits", f"got {self.budget_bits}; expected a finite number > 0, e.g. 2.5")
        if self.candidates is None:
            object.__setattr__(self, "candidates", AUTO_CANDIDATES)
        if self.estimator is None:
            object.__setattr__(self, "estimator", "estimated")
        if self.objective is None:
            object.__setattr__(self, "objective", "kl")
        specs = [c.spec for c in self.auto_candidates()]
        if None not in specs:  # codes alone take this many bits; scales only add to it
            least = min(s.bits for s in specs)
            if self.budget_bits < least:
                raise RecipeError("budget_bits", f"got {self.budget_bits:g}; the smallest candidate takes {least} "
                                  f"bits per weight before its scales, so allowed values are above {least} "
                                  "(or add a smaller candidate)")

    def auto_candidates(self) -> tuple[Candidate, ...]:
        """``method: auto``: the candidate formats as ``(label, QuantSpec or None)`` pairs."""
        if self.method != "auto":
            raise ValueError(f"strategy {self.name!r}: candidates exist for method 'auto' only")
        return as_candidates(self.candidates or AUTO_CANDIDATES)

    @property
    def bits(self) -> float:
        """Bits per weight element (``method: auto``: the budget; the run reports what it achieved)."""
        if self.method == "auto":
            return float(self.budget_bits)  # type: ignore[arg-type]
        return {"fp32": 32, "bf16": 16, "fp16": 16, "int8": 8, "int4": 4, "int2": 2}[self.precision]

    @property
    def is_float(self) -> bool:
        """Whether this strategy leaves the model untouched (fp32 PTQ)."""
        return self.precision == "fp32"

    def policy(self) -> Policy:
        """The :class:`jaxq.Policy` of this strategy: one rule on every float weight of rank >= 2.

        Biases stay float. ``activations: int8`` adds an int8 activation spec
        (per token when dynamic, per tensor when static), carried by the
        quantized params into the Flax layers.

        ``method: auto``: the real policy depends on the model and the data and comes from
        :func:`jaxq.auto_policy` in :func:`jaxq.flow.apply_strategy`; this returns only the
        upper end of its search (every weight at the first candidate), e.g. for shape checks.
        """
        if self.method == "auto":
            first = self.auto_candidates()[0]
            return Policy((Rule(".*", weight=first.spec, floats_only=True),), name=self.name or self.default_name())
        if self.precision == "fp32":
            weight = None
        elif self.precision in INT_PRECISIONS:
            weight = QuantSpec(self.precision, granularity=self.granularity, group_size=self.group_size,
                               symmetric=self.symmetric, range_method=self.range_method,
                               full_range=self.full_range)
        else:
            weight = QuantSpec(self.precision)
        act = None
        if self.activations == "int8":
            act = QuantSpec("int8", granularity="per_tensor" if self.activation_mode == "static" else "per_token")
        rule = Rule(".*", weight=weight, activation=act, activation_mode=self.activation_mode, floats_only=True)
        return Policy((rule,), name=self.name or self.default_name())

    def default_name(self) -> str:
        """``int8``, ``w4a8-qat``, ``int4-g64-mse``, ``auto-2.5``, ... (what differs from the defaults)."""
        if self.method == "auto":
            parts = [f"auto-{self.budget_bits:g}"]
            if self.estimator == "measured":
                parts.append("measured")
            if self.objective == "loss":
                parts.append("loss")
            return "-".join(parts)
        if self.precision not in INT_PRECISIONS:
            return self.precision
        base = f"w{self.precision[3:]}a8" if self.activations == "int8" else self.precision
        parts = [base]
        if self.granularity == "per_group":
            parts.append(f"g{self.group_size}")
        elif self.granularity == "per_tensor":
            parts.append("pt")
        if self.range_method != "absmax":
            parts.append(self.range_method)
        if not self.symmetric:
            parts.append("asym")
        elif self.full_range is not None and self.full_range != QuantSpec(self.precision).full_range:
            parts.append("full" if self.full_range else "narrow")
        if self.activation_mode == "static":
            parts.append("static")
        if self.method == "qat":
            parts.append("qat")
        return "-".join(parts)


# Keys of method 'auto' only, and the keys it leaves at their defaults (it picks weight formats only).
_AUTO_KEYS = ("budget_bits", "candidates", "estimator", "objective")
_AUTO_UNUSED = ("precision", "activations", "activation_mode", "granularity", "group_size", "range_method",
                "symmetric", "full_range", "qat")


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]


@dataclasses.dataclass(frozen=True)
class EvalConfig(_Section):
    """Evaluation and latency measurement.

    Attributes:
      batch_size: examples per evaluation batch; also the batch whose jitted
        latency is reported.
      latency_iters: timed calls of the jitted model (the median is reported).
      latency_warmup: untimed calls before timing (the first one compiles).
    """

    batch_size: int = _field(256, _int(1))
    latency_iters: int = _field(30, _int(1))
    latency_warmup: int = _field(3, _int(1))


@dataclasses.dataclass(frozen=True)
class OutputConfig(_Section):
    """Where the report goes.

    Attributes:
      dir: output folder (created); default ``runs/<recipe name>``.
      json: file name of the JSON report inside ``dir`` (null: none).
      plot: file name of the PNG plot inside ``dir`` (null: none).
      save_models: also save every quantized tree as ``<strategy>.jaxq`` in ``dir``.
    """

    dir: str | None = _field(None, _str(optional=True))
    json: str | None = _field("report.json", _str(optional=True))
    plot: str | None = _field("report.png", _str(optional=True))
    save_models: bool = _field(False, _bool)


def _strategy_list(v: Any, key: str) -> tuple[StrategyConfig, ...]:
    if isinstance(v, (str, Mapping, StrategyConfig)):
        v = [v]
    if not isinstance(v, (list, tuple)) or not v:
        raise RecipeError(key, f"got {v!r}; expected a non-empty list of strategies "
                          f"(mappings, or names: {', '.join(SHORTHANDS)})")
    out = tuple(parse_strategy(s, f"{key}[{i}]") for i, s in enumerate(v))
    names = [s.name for s in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise RecipeError(key, f"strategy names must be unique, {dup} appear more than once; set `name:` on them")
    return out


@dataclasses.dataclass(frozen=True)
class Recipe(_Section):
    """A whole recipe: data, float model, training, strategies, evaluation, output.

    Attributes:
      name: the run's name (default output folder ``runs/<name>``).
      data, model, train, eval, output: the sections above.
      strategies: the strategies to apply, in report order. YAML may give one
        ``strategy:`` mapping or a ``strategies:`` list; list items may be names
        (``fp32``, ``bf16``, ``fp16``, ``int8``, ``int4``, ``int2``, ``w8a8``, ``w4a8``).
    """

    name: str = _field("recipe", _file_name())
    data: DataConfig = dataclasses.field(default_factory=DataConfig, metadata={"check": _section(DataConfig)})
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig, metadata={"check": _section(ModelConfig)})
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig, metadata={"check": _section(TrainConfig)})
    strategies: tuple[StrategyConfig, ...] = dataclasses.field(
        default=(StrategyConfig(),), metadata={"check": _strategy_list})
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig, metadata={"check": _section(EvalConfig)})
    output: OutputConfig = dataclasses.field(default_factory=OutputConfig, metadata={"check": _section(OutputConfig)})

    @property
    def output_dir(self) -> str:
        """The output folder: ``output.dir`` or ``runs/<name>``."""
        return self.output.dir or os.path.join("runs", self.name)

    def replace(self, **changes: Any) -> "Recipe":
        """A copy with some top-level fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (lists for tuples), e.g. for the JSON report."""
        return _plain(dataclasses.asdict(self))


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


# --- parsing -------------------------------------------------------------------------------
def _build(cls: type, raw: Any, prefix: str) -> Any:
    """Builds section ``cls`` from a mapping, naming ``prefix.key`` in every error."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise RecipeError(prefix, f"expected a mapping with keys {', '.join(_keys(cls))}, got {raw!r}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in known:
            raise RecipeError(path, f"unknown key; allowed keys: {', '.join(_keys(cls))}")
        check = known[key].metadata.get("check")
        kwargs[key] = check(value, path) if check is not None else value
    try:
        return cls(**kwargs)
    except RecipeError as e:
        raise e.under(prefix) from None


def _keys(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def parse_strategy(raw: Any, key: str = "strategy") -> StrategyConfig:
    """A :class:`StrategyConfig` from a mapping or a shorthand name (``int4``, ``w8a8``, ...)."""
    if isinstance(raw, StrategyConfig):
        return raw
    if isinstance(raw, str):
        if raw not in SHORTHANDS:
            raise RecipeError(key, f"unknown strategy name {raw!r}; allowed names: {', '.join(SHORTHANDS)} "
                              "(or a mapping with keys " + ", ".join(_keys(StrategyConfig)) + ")")
        return StrategyConfig(**SHORTHANDS[raw])
    return _build(StrategyConfig, raw, key)


def parse_recipe(raw: Mapping[str, Any]) -> Recipe:
    """Validates a recipe given as nested mappings (e.g. loaded from YAML).

    ``strategy:`` (one mapping or name) and ``strategies:`` (a list) are both
    accepted, but not together.

    Raises:
      RecipeError: naming the full dotted path of the first bad key and the
        allowed keys or values.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise RecipeError("", f"a recipe must be a mapping at the top level, got {type(raw).__name__}")
    raw = dict(raw)
    if "strategy" in raw:
        if "strategies" in raw:
            raise RecipeError("strategy", "give either `strategy:` (one) or `strategies:` (a list), not both")
        raw["strategies"] = [parse_strategy(raw.pop("strategy"), "strategy")]
    return _build(Recipe, raw, "")


def load_recipe(path: str | os.PathLike[str]) -> Recipe:
    """Reads and validates a YAML recipe file.

    Raises:
      FileNotFoundError: no such file.
      RecipeError: the YAML is malformed, or a key or value is invalid (the
        message starts with the file name and the dotted key).
    """
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RecipeError("", f"{path}: not valid YAML: {e}") from None
    try:
        recipe = parse_recipe(raw)
    except RecipeError as e:
        raise RecipeError(e.key, f"{e.reason} (in {path})") from None
    if raw is not None and "name" not in raw:
        recipe = recipe.replace(name=os.path.splitext(os.path.basename(path))[0])
    return recipe
