"""`method: auto` strategies in recipes: parsing, named errors, and a `jaxq run` on the digits set.

The run trains a tiny MLP once for the module (a few seconds on 2 cores) and checks the
quantized model against the report: bits per weight computed here from the saved kernels'
``jaxq.tree_nbytes`` must fit the budget and equal what the report says.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import yaml

import jaxq
from jaxq import cli
from jaxq.qarray import is_qarray
from jaxq.recipe import AUTO_CANDIDATES, RecipeError, load_recipe, parse_recipe

ROOT = Path(__file__).resolve().parent.parent
AUTO = {"method": "auto", "budget_bits": 4.0}


def _error(strategy: dict) -> RecipeError:
    with pytest.raises(RecipeError) as info:
        parse_recipe({"strategies": ["int8", strategy]})
    return info.value


def test_auto_strategy_parses_with_defaults_and_round_trips():
    r = parse_recipe({"strategies": ["int2", {"method": "auto", "budget_bits": 2.5}]})
    auto = r.strategies[1]
    assert auto.name == "auto-2.5" and auto.bits == 2.5
    assert auto.candidates == AUTO_CANDIDATES == ("int8", "int4", "int3", "int2")
    assert auto.estimator == "estimated" and auto.objective == "kl" and auto.calibration_batches == 8
    assert [c.label for c in auto.auto_candidates()] == list(AUTO_CANDIDATES)
    assert parse_recipe(r.to_dict()) == r
    other = parse_recipe({"strategy": {"method": "auto", "budget_bits": "3", "estimator": "measured",
                                       "objective": "loss", "candidates": ["int8", "int4-g32", "float"]}})
    s = other.strategies[0]
    assert s.name == "auto-3-measured-loss" and s.candidates == ("int8", "int4-g32", "float")
    assert [c.spec for c in s.auto_candidates()][-1] is None  # float: keep the layer


def test_shipped_auto_recipe():
    r = load_recipe(ROOT / "configs" / "mnist_auto.yaml")
    assert r.data.dataset == "mnist" and r.model.hidden == (128,)
    autos = [s for s in r.strategies if s.method == "auto"]
    assert [s.budget_bits for s in autos] == [2.5, 3.0, 3.5]
    assert {"fp32", "int2"} <= {s.name for s in r.strategies}


@pytest.mark.parametrize(
    "strategy, key, needle",
    [
        ({"method": "auto"}, "budget_bits", "needs a budget"),
        ({**AUTO, "budget_bits": 0}, "budget_bits", "> 0"),
        ({**AUTO, "budget_bits": -2.5}, "budget_bits", "> 0"),
        ({**AUTO, "budget_bits": float("inf")}, "budget_bits", "finite"),
        ({**AUTO, "budget_bits": "lots"}, "budget_bits", "expected a number"),
        ({**AUTO, "budget_bits": 1.5}, "budget_bits", "smallest candidate"),
        ({"method": "auto", "budget": 2.5}, "budget", "budget_bits"),
        ({**AUTO, "candidate": ["int4", "int2"]}, "candidate", "candidates"),
        ({**AUTO, "candidates": []}, "candidates", "int8, int4, int3, int2"),
        ({**AUTO, "candidates": "int4"}, "candidates", "a list"),
        ({**AUTO, "candidates": ["int4"]}, "candidates", "at least two"),
        ({**AUTO, "candidates": ["int4", "int4"]}, "candidates", "twice"),
        ({**AUTO, "candidates": ["int4", "int9"]}, "candidates[1]", "int4-g32"),
        ({**AUTO, "candidates": ["w8a8", "int4"]}, "candidates[0]", "activations"),
        ({**AUTO, "candidates": ["int4", 2]}, "candidates[1]", "format name"),
        ({**AUTO, "estimator": "fisher"}, "estimator", "measured, estimated"),
        ({**AUTO, "objective": "mse"}, "objective", "kl, loss"),
        ({**AUTO, "precision": "int4"}, "precision", "candidates"),
        ({**AUTO, "activations": "int8"}, "activations", "not used by method 'auto'"),
        ({**AUTO, "qat": {"epochs": 3}}, "qat", "not used by method 'auto'"),
        ({"method": "autopilot"}, "method", "ptq, qat, auto"),
        ({"precision": "int4", "budget_bits": 2.5}, "budget_bits", "method: auto"),
        ({"precision": "int4", "candidates": ["int4", "int2"]}, "candidates", "method: auto"),
        ({"precision": "int4", "method": "qat", "estimator": "measured"}, "estimator", "method: auto"),
    ],
)
def test_bad_auto_keys_name_the_key(strategy, key, needle):
    e = _error(strategy)
    assert e.key == f"strategies[1].{key}"
    assert str(e).startswith(f"strategies[1].{key}:")
    assert needle in e.reason


# --- a run on the bundled digits ---------------------------------------------------------------
SMALL = {
    "name": "auto_small",
    "data": {"dataset": "digits"},
    "model": {"arch": "mlp", "hidden": [32]},
    "train": {"epochs": 8, "batch_size": 64, "learning_rate": 0.01},
    "eval": {"batch_size": 360, "latency_iters": 2, "latency_warmup": 1},
}
BUDGET = 4.0


def _run(tmp: Path, raw: dict, name: str) -> tuple[int, str, str]:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["run", str(path), "-o", str(tmp / name), "-q"])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("auto")
    raw = dict(SMALL, model=dict(SMALL["model"], checkpoint=str(tmp / "mlp.jaxq")),
               output={"save_models": True}, strategies=[
                   "int2",
                   {"name": "auto", "method": "auto", "budget_bits": BUDGET, "calibration_batches": 4},
                   {"method": "auto", "budget_bits": BUDGET, "estimator": "measured", "objective": "loss",
                    "candidates": ["int8", "int4", "int2", "float"], "calibration_batches": 2},
               ])
    code, stdout, stderr = _run(tmp, raw, "out")
    assert code == 0, stderr
    return tmp, raw, stdout, json.loads((tmp / "out" / "report.json").read_text())


def _kernel_bits(tree) -> tuple[float, dict[str, str]]:
    """Bits per weight of the kernels (bytes from jaxq.tree_nbytes) and each kernel's format."""
    kernels = {name: layer["kernel"] for name, layer in tree["params"].items()}
    nbytes = sum(jaxq.tree_nbytes(k) for k in kernels.values())
    count = sum(math.prod(k.shape) for k in kernels.values())
    formats = {n: k.format if is_qarray(k) else "float" for n, k in kernels.items()}
    return 8 * nbytes / count, formats


@pytest.mark.parametrize("index, name", [(1, "auto"), (2, "auto-4-measured-loss")])
def test_auto_run_fits_the_budget_and_matches_the_report(run, index, name):
    tmp, _, _, report = run
    row = report["results"][index]
    assert row["name"] == name and row["method"] == "auto" and row["precision_name"] == "auto"
    bits, formats = _kernel_bits(jaxq.load(tmp / "out" / f"{name}.jaxq"))
    info = row["extra"]["auto_policy"]
    assert bits <= BUDGET
    assert bits == pytest.approx(row["extra"]["bits_per_weight"], abs=1e-9)
    assert bits == pytest.approx(info["bits_per_weight"], abs=1e-9)
    assert row["bits"] == pytest.approx(bits, abs=1e-3)  # where the plot places the point
    # The per-layer choices are in the report and are what the saved model holds.
    layers = {layer["path"]: layer for layer in info["layers"]}
    assert set(layers) == {"params/Dense_0/kernel", "params/Dense_1/kernel"}
    cands = report["recipe"]["strategies"][index]["candidates"]
    for dense, fmt in formats.items():
        layer = layers[f"params/{dense}/kernel"]
        assert layer["choice"] in cands and set(layer["sensitivity"]) == set(cands)
        assert fmt == {"float": "float"}.get(layer["choice"], layer["choice"])
    assert info["measured"] is not None and info["seconds"]["sensitivity"] > 0
    assert row["accuracy"] > 0.5


def test_auto_run_report_table_and_uniform_rows(run):
    tmp, _, stdout, report = run
    assert "auto: per-layer formats" in stdout and "params/Dense_0/kernel" in stdout
    int2 = report["results"][0]
    bits, _ = _kernel_bits(jaxq.load(tmp / "out" / "int2.jaxq"))
    assert int2["bits"] == 2 and int2["extra"]["bits_per_weight"] == pytest.approx(bits)  # nominal vs stored
    assert (tmp / "out" / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_unreachable_budget_is_a_named_error(run):
    tmp, raw, _, _ = run
    bad = dict(raw, output={"plot": None, "json": None}, strategies=[
        "int4", {"method": "auto", "budget_bits": 30.0, "candidates": ["int8", "int2"], "calibration_batches": 1}])
    code, stdout, stderr = _run(tmp, bad, "bad")
    assert code == 2 and stdout == ""
    assert "invalid recipe: strategies[1].budget_bits:" in stderr and "above the largest" in stderr
