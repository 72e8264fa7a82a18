"""Block-by-block (sequential) calibration of a transformer, as in GPTQ/AWQ's reference code.

The model is ``embed -> block_0 ... block_{L-1} -> head`` (the protocol of :mod:`jaxq.algorithms.protocol`).
Starting from the embedded calibration tokens ``h`` (``[B, T, D]``), for each block ``i``:

1. (AWQ, SmoothQuant) collect input statistics of every Dense on the *float* block, search one
   scale ``s`` per input group and apply it exactly: kernel rows ``* s``, ``1/s`` folded into
   the norm or Dense before (see :mod:`jaxq.algorithms.layouts`);
2. for each input group in forward order, collect its input statistics by running the block —
   with the groups before it already quantized (``true_sequential``) — on ``h``, then quantize
   its Dense kernels with the recipe's method (RTN, MSE clip, GPTQ, AWQ clip search,
   SmoothQuant W8A8), optionally correcting biases. GPTQ's target is the float model's output
   for that layer (``Recipe.gptq_float_target``): a second stream ``h_f`` runs the float
   blocks, and the cross moment of the two streams' inputs turns the target into a
   least-squares weight;
3. ``h <- block_q(h)``: the *quantized* block's output feeds the next block, so later blocks
   calibrate on the inputs they will really see (W8A8 recipes also fake-quantize activations
   per token in this forward).

Only one block's parameters (float and quantized) and the calibration activations ``h`` (and
``h_f``) of one block boundary are live at a time, plus a ``[K, K]`` Hessian (and cross moment)
per input group; the statistics
are accumulated over micro-batches of ``batch_size`` sequences, so the captured Dense inputs
never exceed one micro-batch. Blocks can be produced lazily (``blocks`` may be a function of
the block index), so the float model never needs to be materialised whole.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import time
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import flax
import jax
import jax.numpy as jnp
from flax import traverse_util

from jaxq.algorithms import layouts as L
from jaxq.algorithms import protocol as P
from jaxq.algorithms import _common as C
from jaxq.algorithms.awq import awq, awq_scale, awq_scales, weight_mean
from jaxq.algorithms.baseline import mse_clip, rtn
from jaxq.algorithms.bias_correction import bias_correction
from jaxq.algorithms.gptq import float_target, gptq
from jaxq.algorithms.smoothquant import PER_TOKEN_INT8, smoothquant
from jaxq.algorithms.stats import CalibStats, init_stats, scale_stats, update_cross_moment, update_stats
from jaxq.policy import Policy
from jaxq.qarray import QArray
from jaxq.spec import QuantSpec, as_spec

METHODS = ("rtn", "mse", "gptq", "awq", "smoothquant")
Params = Any


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What the sequential driver does to each Dense kernel.

    Attributes:
      method: ``"rtn"``, ``"mse"``, ``"gptq"``, ``"awq"`` or ``"smoothquant"``.
      spec: weight spec (``"int4-g128"``, a :class:`QuantSpec`, ...).
      act_spec: activation spec for W8A8 (recorded in the QArrays and simulated in the
        calibration forward); a format name such as ``"int8"`` means dynamic per-token.
        ``"smoothquant"`` defaults to dynamic per-token int8.
      block_size, percdamp, act_order: GPTQ options.
      gptq_mse: GPTQ picks each scale group's range by the MSE clip search (the reference
        GPTQ quantizer's ``mse`` option) instead of ``spec.range_method``. On by default: on
        TinyStories-656K at int4 g128 it cuts GPTQ's perplexity increase from +2.9 to +1.3
        (BENCHMARKS.md section 8).
      gptq_float_target: GPTQ fits the *float* model's layer output on the float model's own
        inputs, ``min ||X_f W - X Q||``, instead of ``min ||X W - X Q||`` on the quantized
        model's inputs ``X`` (asymmetric calibration, as GPTAQ). Exactly, that is GPTQ on the
        least-squares target ``W* = (H + lam I)^{-1} (X^T X_f W / n + lam W)``, so later layers
        also undo the error that earlier ones let through. Costs one float block forward per
        input group and a ``K x K`` solve. On by default: on char-GPT W4 g64 it cuts GPTQ's KL
        from float by 26%, on TinyStories-656K W4 g128 by 14% (BENCHMARKS.md section 8).
      awq_grid, awq_clip, awq_duo: AWQ's ``alpha`` grid size, whether to search clip ratios, and
        whether to also search the weight-aware (duo) scale form.
      awq_objective: ``"layer"`` scores AWQ's scale candidates by the group's own Dense outputs
        (exact, from the Hessian); ``"block"`` by the whole block's output on the calibration
        inputs with that group's kernels rounded (the reference AWQ scores q/k/v on the
        attention module's output), at one block forward per candidate.
      alpha: SmoothQuant migration strength.
      true_sequential: re-collect each input group's statistics after the groups before it in
        the block were quantized (GPTQ's ``--true-sequential``).
      bias_correction: correct the biases of Dense layers that have one.
      skip: regex on ``"layers_{i}/attn/q_proj"``; matching Dense layers stay float.
      fit_groups: when ``spec``'s group size does not divide a kernel's input axis (128 on a
        576-wide model), use that kernel's largest divisor below it that is a multiple of 32
        (else of 8) instead of failing: :meth:`spec_for` says what each width gets.
      policy: per-kernel weight specs (e.g. from :func:`jaxq.auto_policy`), looked up with the
        kernel's path in the model's parameter tree, ``"layers_3/attn/q_proj/kernel"``; it
        overrides ``spec``, and a kernel it leaves unmatched or at ``weight=None`` stays float.
        Kernels of one input group with different formats are quantized apart (GPTQ: one run
        per format on the group's shared Hessian). RTN, MSE clip and GPTQ only.
    """

    method: str = "gptq"
    spec: QuantSpec | str = "int4-g128"
    act_spec: QuantSpec | None = None
    block_size: int = 128
    percdamp: float = 0.01
    act_order: bool = True
    gptq_mse: bool = True
    gptq_float_target: bool = True
    awq_grid: int = 20
    awq_clip: bool = True
    awq_duo: bool = True
    awq_objective: str = "layer"
    alpha: float = 0.5
    true_sequential: bool = True
    bias_correction: bool = False
    skip: str | None = None
    fit_groups: bool = False
    policy: Policy | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {METHODS}")
        if self.awq_objective not in ("layer", "block"):
            raise ValueError(f"awq_objective must be 'layer' or 'block', got {self.awq_objective!r}")
        object.__setattr__(self, "spec", as_spec(self.spec))
        act = self.act_spec
        if isinstance(act, str):  # a format name means dynamic per-token activations
            act = QuantSpec(format=act, granularity="per_token")
        if act is None and self.method == "smoothquant":
            act = PER_TOKEN_INT8
        object.__setattr__(self, "act_spec", act)
        if self.skip is not None:
            re.compile(self.skip)
        if self.policy is not None:
            if not isinstance(self.policy, Policy):
                raise TypeError(f"Recipe.policy must be a jaxq.Policy, got {type(self.policy).__name__}")
            if self.method not in ("rtn", "mse", "gptq"):
                raise ValueError(f"a per-kernel policy works with methods 'rtn', 'mse' and 'gptq', not "
                                 f"{self.method!r} (its scale search needs one format per input group)")

    def spec_for(self, k: int) -> QuantSpec:
        """The weight spec for kernels with ``k`` input rows (see ``fit_groups``)."""
        return self.spec.fit_group(k) if self.fit_groups else self.spec

    def spec_at(self, path: str, k: int) -> QuantSpec | None:
        """The weight spec of the kernel at ``path`` with ``k`` input rows (``None``: stays float)."""
        if self.policy is None:
            return self.spec_for(k)
        spec = self.policy.weight_spec(path, 2)
        if spec is None or spec.fmt.kind == "none":
            return None
        return spec.fit_group(k) if self.fit_groups else spec

    @property
    def needs_hessian(self) -> bool:
        return self.method in ("gptq", "awq")

    @property
    def needs_stats(self) -> bool:
        return self.method in ("gptq", "awq", "smoothquant") or self.bias_correction


class BlockReport(NamedTuple):
    """Per-block record: wall seconds, and each input group's algorithm loss (GPTQ/AWQ only)."""

    index: int
    seconds: float
    losses: dict[str, float]


# --- param tree helpers -------------------------------------------------------------------
def _flat(tree: Params) -> dict[tuple[str, ...], Any]:
    return traverse_util.flatten_dict(flax.core.unfreeze(tree))


def _get(tree: Mapping[str, Any], path: Sequence[str]) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def _fake_quant_dot_general(act_spec: QuantSpec) -> Callable[..., jax.Array]:
    """A ``dot_general`` for Flax's hook that fake-quantizes the activations (lhs) first."""
    from jaxq.ste import fake_quant

    def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kw):
        return jax.lax.dot_general(fake_quant(lhs, act_spec), rhs, dimension_numbers, precision, preferred_element_type, **kw)

    return dot_general


class _BlockRunner:
    """Jitted block forwards and statistics collection for one model (compiled once per block kind)."""

    def __init__(self, model: Any, act_spec: QuantSpec | None, batch_size: int):
        self.batch_size = batch_size
        fwd = model
        if act_spec is not None:
            kwargs = dict(getattr(model, "dense_kwargs", {}) or {})
            kwargs["dot_general"] = _fake_quant_dot_general(act_spec)
            fwd = model.clone(dense_kwargs=flax.core.FrozenDict(kwargs))
        self._model = fwd
        self._compiled: dict[Any, Callable] = {}
        self._run = self.block(0)

    def block(self, i: int) -> Callable:
        """The compiled forward of block ``i``: ``(bp, h) -> (h_out, Dense inputs)``.

        One compiled function per block module (blocks of one kind compare equal) serves both the
        forward and the statistics: it returns the block output and every Dense input of the
        micro-batch (sown before any activation fake-quant, i.e. the float inputs); statistics
        are updated outside, by a jitted update compiled once per input width.
        """
        module = P.block_module(self._model, i)
        if module not in self._compiled:
            self._compiled[module] = jax.jit(functools.partial(P.apply_block, module, capture_inputs=True))
        return self._compiled[module]

    def at(self, i: int) -> "_BlockRunner":
        """This runner, running block ``i``'s module."""
        self._run = self.block(i)
        return self

    def chunks(self, h: jax.Array):
        b = self.batch_size
        for i in range(0, h.shape[0], b):
            yield h[i : i + b]

    def forward(self, bp: Params, h: jax.Array) -> jax.Array:
        return jnp.concatenate([self._run(bp, c)[0] for c in self.chunks(h)], axis=0)

    def dense_paths(self, bp: Params, h: jax.Array) -> list[tuple[str, ...]]:
        """Paths of the block's Dense layers (from the capture tree; sorted, not call order)."""
        xs = jax.eval_shape(self._run, bp, h[: self.batch_size])[1]
        flat = traverse_util.flatten_dict(flax.core.unfreeze(xs))
        return [tuple(k) for k in flat]

    def collect(
        self, bp: Params, h: jax.Array, groups: Sequence[L.InputGroup], hessian: bool
    ) -> dict[str, CalibStats]:
        """Statistics of each group's input (the first Dense's input), over all of ``h``."""
        stats = {}
        for g in groups:
            k = int(_get(bp, g.denses[0])["kernel"].shape[0])
            stats[g.name] = init_stats(k, hessian=hessian)
        for c in self.chunks(h):
            xs = self._run(bp, c)[1]
            for g in groups:
                stats[g.name] = update_stats(stats[g.name], _get(xs, g.denses[0]), name=g.name)
        return stats

    def collect_cross(
        self, bp: Params, h: jax.Array, bp_ref: Params, h_ref: jax.Array, group: L.InputGroup
    ) -> tuple[CalibStats, jax.Array]:
        """Statistics of ``group``'s input in ``bp`` on ``h``, and ``X^T X_ref / n``: its cross
        moment with the same Dense's input in the reference (float) block on ``h_ref``."""
        k = int(_get(bp, group.denses[0])["kernel"].shape[0])
        stats = init_stats(k, hessian=True)
        cross = jnp.zeros((k, k), jnp.float32)
        # The float block runs again for every group: keeping its captures of all groups from one
        # pass would hold every Dense input of the whole calibration set at once.
        for c, c_ref in zip(self.chunks(h), self.chunks(h_ref)):
            x = _get(self._run(bp, c)[1], group.denses[0])
            x_ref = _get(self._run(bp_ref, c_ref)[1], group.denses[0])
            stats = update_stats(stats, x, name=group.name)
            cross = update_cross_moment(cross, x, x_ref)
        return stats, cross / jnp.maximum(stats.count, 1.0)


@functools.lru_cache(maxsize=8)
def _runner(model: Any, act_spec: QuantSpec | None, batch_size: int) -> _BlockRunner:
    """Runners are cached so that repeated calibrations of one model reuse compiled blocks."""
    return _BlockRunner(model, act_spec, batch_size)


def _apply_scale(bp: dict, group: L.InputGroup, s: jax.Array) -> None:
    """In place on a mutable block tree: kernel rows ``* s``; ``1/s`` folded into the fold target."""
    s32 = s.astype(jnp.float32)
    for p in group.denses:
        d = _get(bp, p)
        d["kernel"] = (d["kernel"].astype(jnp.float32) * s32[:, None]).astype(d["kernel"].dtype)
    target = _get(bp, group.fold.path)
    if isinstance(group.fold, L.NormFold):
        for name in ("scale", "bias"):
            if name in target:
                t = target[name].astype(jnp.float32)
                t = (1.0 + t) / s32 - 1.0 if name == "scale" and group.fold.plus_one else t / s32
                target[name] = t.astype(target[name].dtype)
    else:
        t = group.fold.target_scale(s32)  # tied channels (GQA) map to one v_proj column
        target["kernel"] = (target["kernel"].astype(jnp.float32) / t[None, :]).astype(target["kernel"].dtype)
        if "bias" in target:
            target["bias"] = (target["bias"].astype(jnp.float32) / t).astype(target["bias"].dtype)


def _block_awq_scale(
    runner: _BlockRunner,
    bp: dict,
    h: jax.Array,
    y_ref: jax.Array,
    group: L.InputGroup,
    stats: CalibStats,
    recipe: Recipe,
    name: str,
) -> jax.Array:
    """AWQ's input scale for ``group`` chosen by the block's output error (``awq_objective='block'``).

    Each candidate ``s`` (plain and, with ``awq_duo``, weight-aware forms over the alpha grid) is
    folded into a copy of the float block, the group's kernels are rounded to nearest, and the
    candidate with the smallest mean squared block output error on ``h`` wins (``s = 1`` first,
    so ties keep plain rounding).
    """
    ws = [_get(bp, p)["kernel"] for p in group.denses]
    k = int(ws[0].shape[0])
    spec = recipe.spec_for(k)
    tie, slots = C.check_tie(name, group.tie(k), k)
    cat, _ = C.concat_kernels(ws)
    w_mean = weight_mean(cat, C.weight_layout(spec, cat.shape, name))
    mean_abs = stats.abs_sum / jnp.maximum(stats.count, 1.0)
    alphas = [i / recipe.awq_grid for i in range(recipe.awq_grid)]
    cands = [(a, False) for a in alphas] + ([(a, True) for a in alphas[1:]] if recipe.awq_duo else [])
    best_err, best_s = None, None
    for a, duo in cands:
        s = awq_scales(mean_abs, a, tie, slots, w_mean if duo else None)
        trial = _copy_tree(bp)
        _apply_scale(trial, group, s)
        for p in group.denses:
            d = _get(trial, p)
            d["kernel"] = rtn(d["kernel"], spec, name=name).dequantize(d["kernel"].dtype)
        err = float(jnp.mean(jnp.square(runner.forward(trial, h).astype(jnp.float32) - y_ref)))
        if best_err is None or err < best_err:
            best_err, best_s = err, s
    return best_s


# One compiled decode per kernel shape and format, instead of one per primitive (the int3 and int4
# unpacking is a dozen shifts, slices and casts when run op by op).
_dequantize = jax.jit(QArray.dequantize, static_argnums=1)


def _copy_tree(tree: Params) -> dict:
    return traverse_util.unflatten_dict(dict(_flat(tree)))


def quantize_block(
    runner: _BlockRunner,
    bp: Params,
    h: jax.Array,
    layout: Sequence[L.InputGroup],
    recipe: Recipe,
    prefix: str = "",
    forward: bool = True,
    h_float: jax.Array | None = None,
) -> tuple[dict, dict, dict[str, float]]:
    """Quantizes one block; returns ``(quantized params, dequantized params for the forward, losses)``.

    With ``forward=False`` (a recipe without statistics whose output nobody runs) the second
    tree keeps the float kernels and nothing is dequantized.
    """
    bp = _copy_tree(bp)
    losses: dict[str, float] = {}

    def spec_of(g: L.InputGroup) -> QuantSpec:
        return recipe.spec_for(int(_get(bp, g.denses[0])["kernel"].shape[0]))

    def skipped(p):
        return recipe.skip is not None and re.search(recipe.skip, f"{prefix}{'/'.join(p)}") is not None

    # Phase 1: scale search on the float block, folded exactly into the preceding op.
    phase1: dict[str, CalibStats] = {}
    if recipe.method in ("awq", "smoothquant"):
        phase1 = runner.collect(bp, h, layout, hessian=recipe.method == "awq")
        y_ref = None
        if recipe.method == "awq" and recipe.awq_objective == "block":
            y_ref = runner.forward(bp, h).astype(jnp.float32)
        for g in layout:
            if not g.can_scale or any(skipped(p) for p in g.denses):
                continue
            ws = [_get(bp, p)["kernel"] for p in g.denses]
            name = f"{prefix}{g.name}"
            tie = g.tie(int(ws[0].shape[0]))
            if y_ref is not None:
                s = _block_awq_scale(runner, bp, h, y_ref, g, phase1[g.name], recipe, name)
            elif recipe.method == "awq":
                s = awq_scale(ws, phase1[g.name], spec_of(g), n_grid=recipe.awq_grid, tie=tie,
                              duo_scaling=recipe.awq_duo, name=name).input_scale
            else:
                s = smoothquant(ws, phase1[g.name], spec_of(g), alpha=recipe.alpha, tie=tie, name=name).act_divisor
            _apply_scale(bp, g, s)
            phase1[g.name] = scale_stats(phase1[g.name], s)

    # Phase 2: quantize group by group; `fwd` holds dequantized kernels of the groups done so far.
    qbp = _copy_tree(bp)
    fwd = _copy_tree(bp)
    stats_all: dict[str, CalibStats] = {}
    if recipe.needs_stats and not recipe.true_sequential:
        stats_all = phase1 if recipe.method == "smoothquant" else runner.collect(bp, h, layout, recipe.needs_hessian)
    for g in layout:
        k = int(_get(bp, g.denses[0])["kernel"].shape[0])
        specs = {p: recipe.spec_at(f"{prefix}{'/'.join(p)}/kernel", k) for p in g.denses if not skipped(p)}
        live = [p for p, sp in specs.items() if sp is not None]
        if not live:
            continue
        st = None
        if recipe.method == "smoothquant":
            st = phase1.get(g.name)
        elif h_float is not None:
            st, cross = runner.collect_cross(fwd, h, bp, h_float, g)
        elif recipe.needs_stats:
            st = runner.collect(fwd, h, [g], recipe.needs_hessian)[g.name] if recipe.true_sequential else stats_all[g.name]
        gname = f"{prefix}{g.name}"
        targets = {p: _get(bp, p)["kernel"] for p in live}
        if h_float is not None:  # GPTQ's target: the float layer's output on the float inputs
            hq = st.xtx / jnp.maximum(st.count, 1.0)
            targets = {p: float_target(kk, hq, cross, recipe.percdamp).astype(kk.dtype) for p, kk in targets.items()}
        # Kernels of one format are quantized together (GPTQ/AWQ treat them as one matrix).
        parts: dict[QuantSpec, list[tuple[str, ...]]] = {}
        for p in live:
            parts.setdefault(specs[p], []).append(p)
        joint: dict[tuple[str, ...], Any] = {}
        for spec, members in parts.items():
            gspec = spec.replace(range_method="mse") if recipe.gptq_mse and spec.fmt.has_scale else spec
            kernels = [targets[p] for p in members]
            if recipe.method == "gptq":
                r = gptq(kernels, st, gspec, block_size=recipe.block_size, percdamp=recipe.percdamp,
                         act_order=recipe.act_order, name=gname)
            elif recipe.method == "awq":
                r = awq(kernels, st, spec, n_grid=1, clip=recipe.awq_clip, name=gname)  # scales folded already
            else:
                continue
            joint.update(zip(members, r.q))
            losses[gname] = losses.get(gname, 0.0) + float(r.loss)
        for p in live:
            d = _get(bp, p)
            w = d["kernel"]
            spec = specs[p]
            name = f"{prefix}{'/'.join(p)}"
            if p in joint:
                q = joint[p]
            elif recipe.method == "mse":
                q = mse_clip(w, spec, name=name)
            else:  # rtn, and smoothquant on its smoothed kernel
                q = rtn(w, spec, name=name)
            if recipe.act_spec is not None and isinstance(q, QArray):
                q = QArray(q.values, q.scale, q.zero_point, dataclasses.replace(q.meta, act_spec=recipe.act_spec))
            _get(qbp, p)["kernel"] = q
            if not (forward or recipe.needs_stats):
                continue
            deq = _dequantize(q, w.dtype) if isinstance(q, QArray) else q
            _get(fwd, p)["kernel"] = deq
            if recipe.bias_correction and "bias" in d and st is not None:
                b = bias_correction(w, deq, st, d["bias"], name=name)
                _get(qbp, p)["bias"] = b
                _get(fwd, p)["bias"] = b
    return qbp, fwd, losses


def quantize_blocks(
    model: Any,
    h: jax.Array,
    blocks: Callable[[int], Params] | Sequence[Params],
    recipe: Recipe,
    *,
    num_blocks: int | None = None,
    batch_size: int = 8,
    layout: Sequence[L.InputGroup] | None = None,
    on_block: Callable[[int, Params], Any] | None = None,
    progress: bool = False,
    propagate: bool = True,
) -> tuple[list[Any], jax.Array | None, list[BlockReport]]:
    """Quantizes a model's blocks one after another, feeding quantized outputs forward.

    Args:
      model: a model with the block protocol (:mod:`jaxq.algorithms.protocol`).
      h: block-0 input of the calibration sequences, ``[B, T, D]`` (``embed`` of the tokens).
      blocks: block params by index: a function ``i -> params['layers_i']`` (lazy) or a list.
      recipe: what to do to each Dense.
      num_blocks: defaults to ``model.num_blocks()``.
      batch_size: sequences per micro-batch for statistics and forwards.
      layout: input groups of a block (default: the model's ``block_layout(i)``, see
        :func:`protocol.block_layout`).
      on_block: called as ``on_block(i, quantized_block_params)``; its return value is stored
        in the result list instead of the params (e.g. return ``None`` to keep nothing).
      progress: print one line per block.
      propagate: run each quantized block on the calibration activations. Recipes that collect
        statistics always do; for RTN and MSE clip (which never look at activations)
        ``propagate=False`` skips every forward, and ``h_out`` is ``None``.

    Returns:
      ``(results, h_out, reports)``: per-block quantized params (or ``on_block``'s values), the
      last block's output on the calibration data, and per-block :class:`BlockReport`.
    """
    propagate = propagate or recipe.needs_stats
    h_float = h if recipe.method == "gptq" and recipe.gptq_float_target else None  # the float stream
    n = model.num_blocks() if num_blocks is None else num_blocks
    get = blocks if callable(blocks) else (lambda i: blocks[i])
    runner = _runner(model, recipe.act_spec, batch_size)
    results, reports = [], []
    for i in range(n):
        t0 = time.perf_counter()
        bp = get(i)
        runner.at(i)
        lay = layout
        if lay is None:
            lay = P.block_layout(model, i, runner.dense_paths(bp, h))
        qbp, fwd, losses = quantize_block(runner, bp, h, lay, recipe, prefix=f"layers_{i}/", forward=propagate,
                                          h_float=h_float)
        if h_float is not None:
            h_float = runner.forward(bp, h_float)
        if propagate:
            h = runner.forward(fwd, h)
            h.block_until_ready()
        del bp, fwd
        results.append(on_block(i, qbp) if on_block is not None else qbp)
        if not propagate:
            jax.block_until_ready(qbp)  # so that the block's seconds are its own
        dt = time.perf_counter() - t0
        reports.append(BlockReport(i, dt, losses))
        if progress:
            print(f"  block {i}: {dt:.2f} s", flush=True)
    return results, (h if propagate else None), reports


def quantize_model(
    model: Any,
    params: Params,
    tokens: jax.Array,
    recipe: Recipe,
    *,
    batch_size: int = 8,
    progress: bool = False,
) -> tuple[Params, list[BlockReport]]:
    """Quantizes every block of ``model`` sequentially on calibration ``tokens [B, T]``.

    Returns the parameter tree with each block's Dense kernels replaced by QArrays (and norms,
    biases and neighbouring kernels changed where AWQ/SmoothQuant folded scales or bias
    correction applied). Embeddings and the LM head stay float. Recipes without statistics
    (RTN, MSE clip) never run the model: ``tokens`` only fix the shapes.
    """
    h = P.embed(model, params, tokens)
    qblocks, _, reports = quantize_blocks(
        model, h, lambda i: P.block_params(params, i), recipe, batch_size=batch_size, progress=progress,
        propagate=False,
    )
    out = dict(flax.core.unfreeze(params)) if not isinstance(params, dict) else dict(params)
    for i, qb in enumerate(qblocks):
        out[f"layers_{i}"] = qb
    return out, reports
