"""Automatic per-layer formats on the MNIST MLP: ``method: auto`` against uniform int2 / int3 / int4.

Runs ``configs/mnist_auto.yaml`` through :func:`jaxq.flow.run_recipe` (real MNIST from
``$JAXQ_DATA_DIR`` or ``--data-dir``; the float model is the recipes' shared checkpoint, trained
if missing). Uniform per-channel int3 is not a recipe precision, so its row is added here with
the same flow pieces (:func:`jaxq.flow.quantize_jit`, :func:`jaxq.flow.evaluate`) on the same
float model. Writes per strategy its bits per weight (stored bytes of the quantized kernels,
scales included, over their parameter count), test accuracy and, for auto strategies, the
per-layer choices and the seconds of the sensitivity pass.

Usage::

    JAXQ_DATA_DIR=/path/to/data python benchmarks/auto_mnist.py [--json benchmarks/results/auto_mnist.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine_line, markdown_table  # noqa: E402

DEFAULT_RECIPE = ROOT / "configs" / "mnist_auto.yaml"
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "auto_mnist.json"


def _row(r: Any, source: str) -> dict[str, Any]:
    """One strategy's numbers from its :class:`jaxq.eval.StrategyResult`."""
    row = {"name": r.name, "method": r.method, "bits_per_weight": r.extra.get("bits_per_weight", 32.0),
           "accuracy": r.accuracy, "nbytes": r.nbytes, "source": source}
    auto = r.extra.get("auto_policy")
    if auto is not None:
        row["budget_bits"] = auto["budget_bits"]
        row["layers"] = [{k: layer[k] for k in ("path", "params", "choice", "bits_per_weight")}
                         for layer in auto["layers"]]
        row["sensitivity_s"] = auto["seconds"]["sensitivity"]
        row["estimator"], row["objective"] = auto["estimator"], auto["objective"]
        row["predicted"], row["measured"] = auto["predicted"], auto["measured"]
    return row


def _uniform_int3(recipe: Any, data_dir: str | None) -> Any:
    """Uniform per-channel absmax int3 on the run's float model, evaluated like a recipe strategy."""
    import jaxq
    from jaxq import flow
    from jaxq.models.classifiers import build_classifier
    from jaxq.policy import Policy, Rule

    train, test = flow.load_data(recipe, data_dir)
    m = recipe.model
    model = build_classifier(m.arch, train.num_classes, hidden=m.hidden, channels=m.channels)
    params, info = flow.float_params(recipe, model, train, retrain=False, progress=False, log=lambda _: None)
    assert info["source"] == "checkpoint", "the run's float model should have been saved"
    policy = Policy((Rule(".*", weight=jaxq.QuantSpec("int3"), floats_only=True),), name="int3")
    t0 = time.perf_counter()
    variables = flow.quantize_jit({"params": params}, policy)
    quantize_s = time.perf_counter() - t0
    extra = {"bits_per_weight": flow.weight_bits(variables, {"params": params})}
    r = flow.evaluate("int3", model, variables, test, recipe, strategy=None,
                      float_nbytes=jaxq.tree_nbytes({"params": params}), progress=False, quantize_s=quantize_s,
                      extra=extra)
    # strategy=None labels the row as the float baseline; it is a PTQ int3 row.
    return dataclasses.replace(r, precision_name="int3", bits=3, method="ptq")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default=str(DEFAULT_RECIPE))
    ap.add_argument("--data-dir", default=None, help="default: $JAXQ_DATA_DIR")
    ap.add_argument("--json", default=str(DEFAULT_JSON))
    args = ap.parse_args(argv)

    from jaxq import flow
    from jaxq.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    if recipe.model.checkpoint is None:  # the int3 row needs the run's float model back
        ckpt = os.path.join(tempfile.mkdtemp(prefix="auto_mnist-"), "float.jaxq")
        recipe = recipe.replace(model=dataclasses.replace(recipe.model, checkpoint=ckpt))
    out_dir = tempfile.mkdtemp(prefix="auto_mnist-run-")
    t0 = time.perf_counter()
    report = flow.run_recipe(recipe, data_dir=args.data_dir, output_dir=out_dir,
                             log=lambda msg: print(f"[auto_mnist] {msg}", file=sys.stderr, flush=True))
    rows = [_row(r, "recipe") for r in report.results]
    rows.append(_row(_uniform_int3(recipe, args.data_dir), "benchmark (int3 is not a recipe precision)"))
    rows.sort(key=lambda r: r["bits_per_weight"])

    result = {
        "benchmark": "auto_mnist",
        "recipe": os.path.relpath(args.recipe, ROOT) if Path(args.recipe).is_relative_to(ROOT) else args.recipe,
        "dataset": report.info["dataset"], "n_train": report.info["n_train"], "n_test": report.info["n_test"],
        "float_accuracy": report.baseline.accuracy,
        "float_model": {k: v for k, v in report.info["float_model"].items() if k != "losses"},
        "strategies": rows,
        "total_s": time.perf_counter() - t0,
        "machine": machine_line(),
        "date": datetime.date.today().isoformat(),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")

    table = [[r["name"], f"{r['bits_per_weight']:.3f}", f"{100 * r['accuracy']:.2f}",
              ", ".join(f"{layer['path'].split('/')[-2]} {layer['choice']}" for layer in r.get("layers", [])) or "-",
              f"{r['sensitivity_s']:.2f}" if "sensitivity_s" in r else "-"] for r in rows]
    print(markdown_table(["strategy", "bits/weight", "test acc %", "per-layer formats", "sensitivity s"], table))
    print(f"\n{result['machine']}; {result['date']}; wrote {args.json}")


if __name__ == "__main__":
    main()
