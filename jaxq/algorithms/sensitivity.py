"""How much each layer's quantization hurts a model: the table :func:`jaxq.auto_policy` solves over.

A *layer* is a quantizable leaf of a parameter tree (a float array of rank >= 2 that the preset
pattern accepts, i.e. not a bias or an embedding table); an *item* is one layer or a group of
layers that must share a format. For every item and candidate format the table holds the exact
storage bytes (codes, scales and zero points, from ``jax.eval_shape``) and a sensitivity, the
increase of the objective when only that item is quantized:

* ``objective="kl"``: ``fn(params, batch)`` returns logits ``[..., classes]``; the objective is the
  mean over positions of ``KL(float model || quantized model)`` of the softmax distributions.
* ``objective="loss"``: ``fn(params, batch)`` returns a scalar loss; the objective is its mean over
  the batches, and the sensitivity its increase over the float model's.

Two estimators:

* ``"measured"`` quantizes one item to one candidate, everything else float, and evaluates the
  objective on every calibration batch: exact, one forward pass per batch per (item, candidate).
* ``"estimated"`` is the second-order Taylor term ``1/2 sum_ij F_ij (Q(W) - W)_ij^2`` with ``F``
  the diagonal Fisher information of the objective, from per-example gradients on the same
  batches (for ``"kl"`` the labels are sampled from the float model, so ``F`` is the true Fisher
  and the KL's Hessian at the float point; for ``"loss"`` it is the empirical Fisher). One
  backward pass per example, then only elementwise work per (item, candidate).
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxq.policy import PRESET_PATTERN, PRESETS, is_float_dtype, path_str
from jaxq.progress import Progress
from jaxq.qarray import QArray, is_qarray, quantize_array
from jaxq.spec import QuantSpec, as_spec

OBJECTIVES = ("kl", "loss")
ESTIMATORS = ("measured", "estimated")
KEEP_FLOAT = ("float", "fp32", "keep", "keep float")
PyTree = Any


class Candidate(NamedTuple):
    """A format a layer may take: its label and spec (``None``: the layer stays as it is)."""

    label: str
    spec: QuantSpec | None


def _label(spec: QuantSpec) -> str:
    name = spec.format + (f"-g{spec.group_size}" if spec.group_size else "")
    if spec.granularity == "per_tensor":
        name += "-tensor"
    if not spec.symmetric:
        name += "-asym"
    return name


def as_candidates(candidates: Iterable[QuantSpec | str | None]) -> tuple[Candidate, ...]:
    """Normalises candidate formats: preset names (``"int8"``, ``"int4-g128"``, ``"bf16"``), short
    spec names (``"int2-g32"``), :class:`QuantSpec` objects, and ``"float"`` / ``None`` (keep)."""
    out: list[Candidate] = []
    for c in candidates:
        if c is None or (isinstance(c, str) and c.lower() in KEEP_FLOAT):
            cand = Candidate("float", None)
        elif isinstance(c, QuantSpec):
            cand = Candidate(_label(c), None if c.fmt.kind == "none" else c)
        elif isinstance(c, str):
            if c in PRESETS:
                rule = PRESETS[c].rules[0]
                if rule.activation is not None:
                    raise ValueError(f"candidate {c!r} quantizes activations too; candidates are weight formats "
                                     f"(e.g. 'int8', 'int4-g128', 'bf16', 'float')")
                spec = rule.weight
            else:
                try:
                    spec = as_spec(c)
                except ValueError as e:
                    raise ValueError(f"unknown candidate {c!r}: {e}. Use a preset ({', '.join(sorted(PRESETS))}), "
                                     "a name like 'int3-g64', a QuantSpec, or 'float'") from None
            cand = Candidate(c, None if spec is None or spec.fmt.kind == "none" else spec)
        else:
            raise TypeError(f"a candidate is a format name, a QuantSpec or None, got {type(c).__name__}")
        if any(cand.label == o.label for o in out):
            raise ValueError(f"candidate {cand.label!r} is listed twice")
        out.append(cand)
    if not out:
        raise ValueError("candidates is empty; list the formats a layer may take, e.g. "
                         "('int8', 'int4-g128', 'int3-g64')")
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class Layer:
    path: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def float_bytes(self) -> int:
        return self.size * np.dtype(self.dtype).itemsize


def quantizable_layers(params: PyTree, include: str | None = None) -> list[Layer]:
    """The leaves auto-allocation decides: float, rank >= 2, path searched by ``include`` (default:
    the presets' pattern, which leaves biases and embedding tables out). QArray leaves (already
    quantized) are skipped."""
    pattern = re.compile(PRESET_PATTERN if include is None else include)
    out = []
    for kp, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_qarray)[0]:
        if is_qarray(leaf) or leaf is None or not hasattr(leaf, "shape"):
            continue
        path = path_str(kp)
        if len(leaf.shape) >= 2 and is_float_dtype(leaf.dtype) and pattern.search(path):
            out.append(Layer(path, tuple(int(d) for d in leaf.shape), np.dtype(leaf.dtype)))
    if not out:
        raise ValueError(f"no quantizable leaves in this tree (float, rank >= 2, path matching "
                         f"{pattern.pattern!r}); pass include= a pattern that matches your kernels")
    return out


def resolve_groups(layers: Sequence[Layer], groups: Sequence[str | Sequence[str]] | None) -> list[tuple[Layer, ...]]:
    """Items in tree order: each group (a regex, or a list of exact paths or regexes, all matching
    with ``re.fullmatch``) becomes one item; every other layer is an item of its own."""
    by_path = {layer.path: layer for layer in layers}
    owner: dict[str, int] = {}
    for gi, g in enumerate(groups or ()):
        entries = [g] if isinstance(g, str) else list(g)
        if not entries:
            raise ValueError(f"group {gi} is empty")
        for e in entries:
            if e in by_path:
                hits = [e]
            else:
                try:
                    rx = re.compile(e)
                except re.error:
                    hits = []
                else:
                    hits = [p for p in by_path if rx.fullmatch(p)]
            if not hits:
                sample = list(by_path)[:6]
                raise ValueError(f"group {gi} names {e!r}, which is not a quantizable parameter path (nor a pattern "
                                 f"matching one); quantizable paths look like {sample}")
            for p in hits:
                if owner.get(p, gi) != gi:
                    raise ValueError(f"{p} is in groups {owner[p]} and {gi}; a layer can belong to one group only")
                owner[p] = gi
    items: list[tuple[Layer, ...]] = []
    seen: dict[int, int] = {}
    for layer in layers:
        gi = owner.get(layer.path)
        if gi is None:
            items.append((layer,))
        elif gi in seen:
            items[seen[gi]] = items[seen[gi]] + (layer,)
        else:
            seen[gi] = len(items)
            items.append((layer,))
    return items


def leaf_spec(spec: QuantSpec, layer: Layer) -> QuantSpec:
    """``spec`` fitted to one leaf: a group size that does not divide the grouped axis becomes the
    largest divisor below it (see :meth:`QuantSpec.fit_group`); raises if the spec cannot tile it."""
    if spec.granularity == "per_group":
        spec = spec.fit_group(layer.shape[spec.group_axis])
    spec.tiling(layer.shape, layer.path)
    return spec


def quantized_nbytes(spec: QuantSpec | None, layer: Layer) -> int:
    """Exact storage bytes of ``layer`` quantized with ``spec`` (``None``: its float bytes)."""
    if spec is None:
        return layer.float_bytes
    out = jax.eval_shape(lambda x: quantize_array(x, spec, where=layer.path),
                         jax.ShapeDtypeStruct(layer.shape, layer.dtype))
    return out.nbytes if isinstance(out, QArray) else layer.float_bytes


@dataclasses.dataclass(frozen=True)
class SensitivityTable:
    """Costs and sensitivities of every (item, candidate).

    Attributes:
      items: the layers of each item (one, or a group's members).
      candidates: the candidate formats, in the order given.
      specs: ``specs[i][c]``: item ``i``'s per-layer specs for candidate ``c`` (fitted group
        sizes), or ``None`` where the candidate cannot tile one of its layers.
      costs: ``int64 [items, candidates]`` exact bytes (-1 where not applicable).
      values: ``float64 [items, candidates]`` sensitivities (NaN where not applicable).
      objective, estimator: what ``values`` measure and how.
      baseline: the float model's objective (0 for ``"kl"``).
      seconds: wall time of the sensitivity pass.
    """

    items: tuple[tuple[Layer, ...], ...]
    candidates: tuple[Candidate, ...]
    specs: tuple[tuple[tuple[QuantSpec | None, ...] | None, ...], ...]
    costs: np.ndarray
    values: np.ndarray
    objective: str
    estimator: str
    baseline: float
    seconds: float

    @property
    def num_params(self) -> int:
        return int(sum(layer.size for item in self.items for layer in item))

    def item_name(self, i: int) -> str:
        item = self.items[i]
        return item[0].path if len(item) == 1 else f"{item[0].path} (+{len(item) - 1})"

    def replace(self, **changes: Any) -> "SensitivityTable":
        return dataclasses.replace(self, **changes)


def _options(items, candidates):
    specs, costs = [], []
    for item in items:
        row_s, row_c = [], []
        for cand in candidates:
            try:
                per = tuple(None if cand.spec is None else leaf_spec(cand.spec, layer) for layer in item)
            except ValueError:
                row_s.append(None)
                row_c.append(-1)
                continue
            row_s.append(per)
            row_c.append(sum(quantized_nbytes(s, layer) for s, layer in zip(per, item)))
        if all(s is None for s in row_s):
            layer = item[0]
            raise ValueError(f"{layer.path} (shape {layer.shape}): no candidate can quantize it "
                             f"({', '.join(c.label for c in candidates)}); add 'float' or a per-channel format")
        specs.append(tuple(row_s))
        costs.append(row_c)
    return tuple(specs), np.asarray(costs, np.int64)


@jax.jit
def _mean_kl(ref_logp: jax.Array, logits: jax.Array) -> jax.Array:
    logq = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.mean(jnp.sum(jnp.exp(ref_logp) * (ref_logp - logq), axis=-1))


_fake_quant = jax.jit(lambda x, spec: quantize_array(x, spec).dequantize(x.dtype), static_argnums=1)


class _Tree:
    """A parameter tree flattened once, with leaves replaced by path."""

    def __init__(self, params: PyTree):
        flat, self.treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_qarray)
        self.paths = [path_str(kp) for kp, _ in flat]
        self.leaves = [leaf for _, leaf in flat]
        self.index = {p: i for i, p in enumerate(self.paths)}

    def get(self, path: str) -> Any:
        return self.leaves[self.index[path]]

    def with_leaves(self, new: dict[str, Any]) -> PyTree:
        leaves = list(self.leaves)
        for p, v in new.items():
            leaves[self.index[p]] = v
        return jax.tree_util.tree_unflatten(self.treedef, leaves)


class Evaluator:
    """The objective of a parameter tree on the calibration batches (float references cached)."""

    def __init__(self, fn: Callable[[PyTree, Any], jax.Array], params: PyTree, batches: Sequence[Any], objective: str):
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        self.batches = list(batches)
        if not self.batches:
            raise ValueError("calib_batches is empty; pass at least one batch")
        self.objective = objective
        self._fn = jax.jit(fn)
        self.refs = None
        if objective == "kl":
            self.refs = []
            for b in self.batches:
                out = self._fn(params, b)
                if not hasattr(out, "ndim") or out.ndim < 1 or out.shape[-1] < 2:
                    raise ValueError(f"objective='kl' needs fn(params, batch) to return logits [..., classes]; "
                                     f"got {getattr(out, 'shape', type(out).__name__)}. For a scalar loss use "
                                     "objective='loss'")
                self.refs.append(jax.nn.log_softmax(out.astype(jnp.float32), axis=-1))
        self.baseline = 0.0 if objective == "kl" else self(params)

    def __call__(self, params: PyTree) -> float:
        total = 0.0
        for i, b in enumerate(self.batches):
            out = self._fn(params, b)
            if self.objective == "kl":
                total += float(_mean_kl(self.refs[i], out))
            else:
                if np.shape(out) != ():
                    raise ValueError(f"objective='loss' needs fn(params, batch) to return a scalar, got shape "
                                     f"{np.shape(out)}; for logits use objective='kl'")
                total += float(out)
        return total / len(self.batches)

    def increase(self, params: PyTree) -> float:
        """The objective of ``params`` minus the float model's."""
        return self(params) - self.baseline


def _fill(items, candidates, specs, score: Callable[[tuple[Layer, ...], tuple[QuantSpec, ...]], float],
          bar: Progress | None = None) -> np.ndarray:
    """``[items, candidates]``: ``score(item, per-layer specs)`` where the candidate applies, 0 for
    keeping float, NaN where it cannot tile the item."""
    values = np.full((len(items), len(candidates)), np.nan)
    for i, item in enumerate(items):
        for c, cand in enumerate(candidates):
            per = specs[i][c]
            if per is not None:
                values[i, c] = 0.0 if cand.spec is None else score(item, per)
        if bar is not None:
            bar.step(i)
    return values


def measured_values(ev: Evaluator, tree: _Tree, items, candidates, specs, progress: bool) -> np.ndarray:
    """Objective increase with only item ``i`` quantized to candidate ``c`` (everything else float)."""

    def score(item, per):
        new = {layer.path: _fake_quant(tree.get(layer.path), s) for layer, s in zip(item, per)}
        return ev.increase(tree.with_leaves(new))

    bar = Progress(len(items), "sensitivity (measured)", progress, unit="layer")
    try:
        return _fill(items, candidates, specs, score, bar)
    finally:
        bar.close()


def fisher_diagonal(
    fn: Callable[[PyTree, Any], jax.Array],
    params: PyTree,
    batches: Sequence[Any],
    paths: Sequence[str],
    objective: str,
    *,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, jax.Array]:
    """Diagonal Fisher of the objective w.r.t. the leaves at ``paths`` (float32, same shapes).

    Per example (one row of each batch leaf, kept as a batch of one): for ``"kl"``, labels ``y``
    are drawn from the float model's own distribution and ``g = grad mean_t -log p(y_t)``; the
    Fisher of the *mean* KL over ``T`` positions per example is then ``T * E[g^2]`` (the cross
    terms between positions vanish in expectation). For ``"loss"``, ``g = grad fn(params, example)``
    and the empirical Fisher is ``E[g^2]``.
    """
    tree = _Tree(params)
    index = [tree.index[p] for p in paths]
    sel = [tree.leaves[i] for i in index]

    def loss_one(sel_leaves, leaves, ex, key):
        leaves = list(leaves)
        for i, v in zip(index, sel_leaves):
            leaves[i] = v
        out = fn(jax.tree_util.tree_unflatten(tree.treedef, leaves), ex)
        if objective == "loss":
            return out, jnp.float32(1.0)
        logits = out.astype(jnp.float32)
        y = jax.random.categorical(key, jax.lax.stop_gradient(logits), axis=-1)
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, y[..., None], axis=-1)
        return jnp.mean(nll), jnp.float32(nll.size)

    # The tree goes in as an argument (not a closure), so that no weight becomes a constant of
    # the compiled function.
    @jax.jit
    def batch_sq_grads(acc, sel_leaves, leaves, batch, key):
        n = jax.tree.leaves(batch)[0].shape[0]

        def body(i, carry):
            ex = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, i, 1, axis=0), batch)
            g, positions = jax.grad(loss_one, has_aux=True)(sel_leaves, leaves, ex, jax.random.fold_in(key, i))
            return [a + positions * jnp.square(b.astype(jnp.float32)) for a, b in zip(carry, g)]

        return jax.lax.fori_loop(0, n, body, acc)

    acc = [jnp.zeros(v.shape, jnp.float32) for v in sel]
    count = 0
    key = jax.random.key(seed)
    bar = Progress(len(batches), "sensitivity (Fisher)", progress, unit="batch")
    try:
        for bi, b in enumerate(batches):
            n = jax.tree.leaves(b)[0].shape[0]
            acc = batch_sq_grads(acc, sel, tree.leaves, b, jax.random.fold_in(key, bi))
            count += n
            bar.step(bi)
    finally:
        bar.close()
    return {p: a / count for p, a in zip(paths, acc)}


@jax.jit
def _weighted_error(fisher: jax.Array, w: jax.Array, wq: jax.Array) -> jax.Array:
    return 0.5 * jnp.sum(fisher * jnp.square(wq.astype(jnp.float32) - w.astype(jnp.float32)))


def estimated_values(fisher: dict[str, jax.Array], tree: _Tree, items, candidates, specs) -> np.ndarray:
    """``1/2 sum F (Q(W) - W)^2`` per (item, candidate), summed over a group's layers."""

    def score(item, per):
        total = 0.0
        for layer, s in zip(item, per):
            w = tree.get(layer.path)
            total += float(_weighted_error(fisher[layer.path], w, _fake_quant(w, s)))
        return total

    return _fill(items, candidates, specs, score)


def sensitivity_table(
    fn: Callable[[PyTree, Any], jax.Array],
    params: PyTree,
    calib_batches: Iterable[Any],
    *,
    candidates: Sequence[QuantSpec | str | None],
    objective: str = "kl",
    estimator: str = "estimated",
    groups: Sequence[str | Sequence[str]] | None = None,
    include: str | None = None,
    seed: int = 0,
    progress: bool = False,
) -> SensitivityTable:
    """Costs and sensitivities of every quantizable layer (or group) for every candidate.

    Args:
      fn: ``fn(params, batch)``: logits ``[..., classes]`` (``objective="kl"``) or a scalar loss.
      params: the float parameter tree.
      calib_batches: batches (pytrees whose leaves share a leading example axis).
      candidates: formats a layer may take (see :func:`as_candidates`).
      objective: ``"kl"`` or ``"loss"``.
      estimator: ``"measured"`` or ``"estimated"`` (module docstring).
      groups: paths (or patterns) that must share one format.
      include: pattern selecting the quantizable leaves (default: the presets').
      seed: labels sampled for the Fisher of ``"kl"``.
      progress: a progress bar (plain lines when stderr is not a terminal).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    cands = as_candidates(candidates)
    batches = list(calib_batches)
    items = resolve_groups(quantizable_layers(params, include), groups)
    specs, costs = _options(items, cands)
    t0 = time.perf_counter()
    tree = _Tree(params)
    if estimator == "measured":
        ev = Evaluator(fn, params, batches, objective)
        values, baseline = measured_values(ev, tree, items, cands, specs, progress), ev.baseline
    else:
        if not batches:
            raise ValueError("calib_batches is empty; pass at least one batch")
        paths = [layer.path for item in items for layer in item]
        fisher = fisher_diagonal(fn, params, batches, paths, objective, seed=seed, progress=progress)
        values, baseline = estimated_values(fisher, tree, items, cands, specs), float("nan")
    return SensitivityTable(tuple(items), cands, specs, costs, values, objective, estimator, baseline,
                            time.perf_counter() - t0)


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation over the entries finite in both (ties get average ranks)."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    if a.size < 2:
        raise ValueError("rank correlation needs at least two common entries")

    def ranks(x):
        order = np.argsort(x, kind="stable")
        r = np.empty(x.size)
        r[order] = np.arange(x.size, dtype=np.float64)
        for v in np.unique(x):  # ties: average rank
            m = x == v
            if m.sum() > 1:
                r[m] = r[m].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / den) if den > 0 else 0.0
