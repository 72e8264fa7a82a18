"""The `jaxq` command end to end on the bundled digits set (no files, no network).

The quickstart recipe runs once for the module (~30 s on 2 cores, most of it
compilation); other cases use smaller settings.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from jaxq import cli
from jaxq.recipe import parse_recipe

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART_ROWS = ["fp32", "bf16", "int8", "int4", "int2"]


def table_rows(stdout: str) -> list[str]:
    """First column of the table's rows (after the header and its rule, up to a blank line)."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("strategy")) + 2
    rows = []
    for line in lines[start:]:
        if not line.strip():
            break
        rows.append(line.split()[0])
    return rows


def run_main(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("quickstart")
    code, stdout, stderr = run_main(["run", str(ROOT / "configs" / "quickstart.yaml"), "-o", str(out_dir)])
    return code, stdout, stderr, out_dir


def test_quickstart_runs_and_prints_the_table(quickstart):
    code, stdout, stderr, _ = quickstart
    assert code == 0, stderr
    header = next(line for line in stdout.splitlines() if line.startswith("strategy"))
    for col in ("bits", "acc %", "prec %", "rec %", "F1 %", "size", "ratio", "ms/batch"):
        assert col in header
    assert table_rows(stdout) == QUICKSTART_ROWS
    assert "[jaxq] training float mlp" in stderr  # messages go to stderr, the table to stdout


def test_quickstart_writes_json_and_png(quickstart):
    code, _, _, out_dir = quickstart
    assert code == 0
    report = json.loads((out_dir / "report.json").read_text())
    results = {r["name"]: r for r in report["results"]}
    assert list(results) == QUICKSTART_ROWS
    base = report["baseline"]
    assert base["accuracy"] > 0.93
    for r in results.values():
        for k in ("accuracy", "precision", "recall", "f1"):
            assert 0.0 <= r[k] <= 1.0
        assert r["latency_ms"] > 0 and r["nbytes"] > 0
    assert results["fp32"]["accuracy"] == base["accuracy"]
    assert abs(results["int8"]["accuracy"] - base["accuracy"]) <= 0.01
    assert results["int4"]["accuracy"] >= base["accuracy"] - 0.03
    assert results["bf16"]["compression"] == pytest.approx(base["nbytes"] / results["bf16"]["nbytes"])
    assert results["int8"]["compression"] > 3.4 and results["int4"]["compression"] > 6.0
    assert report["recipe"]["name"] == "quickstart" and report["info"]["dataset"] == "digits"
    png = (out_dir / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def _write(tmp_path: Path, raw: dict, name: str = "r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(raw))
    return p


SMALL = {
    "data": {"dataset": "digits", "train_limit": 512},
    "model": {"arch": "cnn", "channels": [4, 8], "hidden": [16]},
    "train": {"epochs": 2, "batch_size": 64, "learning_rate": 0.01},
    "eval": {"batch_size": 360, "latency_iters": 2, "latency_warmup": 1},
    "output": {"plot": None},
}


def test_cnn_qat_static_and_checkpoint_reuse(tmp_path):
    ckpt = tmp_path / "models" / "cnn.jaxq"
    raw = dict(SMALL, name="small", model=dict(SMALL["model"], checkpoint=str(ckpt)), strategies=[
        "w8a8",
        {"precision": "int8", "activations": "int8", "activation_mode": "static", "calibration_batches": 2},
        {"precision": "int4", "method": "qat", "qat": {"epochs": 1, "batch_size": 128, "learning_rate": 0.001}},
    ])
    code, stdout, stderr = run_main(["run", str(_write(tmp_path, raw)), "-o", str(tmp_path / "out"), "-q"])
    assert code == 0, stderr
    assert stderr == ""  # --quiet
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    names = [r["name"] for r in report["results"]]
    assert names == ["w8a8", "w8a8-static", "int4-qat"]
    assert table_rows(stdout) == ["float", *names]
    qat = report["results"][2]
    assert qat["method"] == "qat" and len(qat["extra"]["qat_losses"]) == 1
    assert report["info"]["float_model"]["source"] == "trained" and ckpt.is_file()
    assert not (tmp_path / "out" / "report.png").exists()  # output.plot: null

    # A second run reuses the float checkpoint instead of training.
    raw2 = dict(raw, strategies=["fp32"])
    code, _, stderr = run_main(["run", str(_write(tmp_path, raw2, "r2.yaml")), "-o", str(tmp_path / "out2")])
    assert code == 0, stderr
    assert "loaded float model" in stderr and "training" not in stderr
    again = json.loads((tmp_path / "out2" / "report.json").read_text())
    assert again["baseline"]["accuracy"] == report["baseline"]["accuracy"]

    # A checkpoint of another architecture is refused, naming the key.
    raw3 = dict(raw2, model={"arch": "mlp", "hidden": [32], "checkpoint": str(ckpt)})
    code, _, stderr = run_main(["run", str(_write(tmp_path, raw3, "r3.yaml")), "-q"])
    assert code == 2 and "model.checkpoint" in stderr and "--retrain" in stderr


@pytest.mark.parametrize(
    "raw, needle",
    [
        ({"data": {"dataset": "cifar"}}, "data.dataset: got 'cifar'; allowed values: mnist, fashion_mnist, digits"),
        ({"strategies": ["int8", {"precision": "int3"}]}, "strategies[1].precision: got 'int3'; allowed values"),
        ({"strategy": {"method": "qat", "qat": {"epoch": 1}}}, "strategy.qat.epoch: unknown key; allowed keys: epochs"),
        ({"model": {"arch": "mlp", "layers": 3}}, "model.layers: unknown key"),
    ],
)
def test_bad_recipes_give_named_errors(tmp_path, raw, needle):
    code, stdout, stderr = run_main(["run", str(_write(tmp_path, raw)), "-q"])
    assert code == 2 and stdout == ""
    assert stderr.startswith("jaxq: error: invalid recipe: ")
    assert needle in stderr


def test_set_overrides_are_validated(tmp_path):
    code, _, stderr = run_main(["run", "quickstart", "--set", "train.optimiser=adam", "-q"])
    assert code == 2 and "train.optimiser: unknown key" in stderr
    code, _, stderr = run_main(["run", "quickstart", "--set", "train.epochs", "-q"])
    assert code == 2 and "KEY=VALUE" in stderr
    recipe = cli.load_with_overrides(ROOT / "configs" / "quickstart.yaml", ["train.epochs=2", "data.train_limit=100"])
    assert recipe.train.epochs == 2 and recipe.data.train_limit == 100 and recipe.name == "quickstart"


def test_unknown_recipe_name_lists_the_known_ones():
    code, _, stderr = run_main(["run", "no_such_recipe", "-q"])
    assert code == 2 and "no_such_recipe" in stderr and "quickstart" in stderr


def test_compare_sweep_selection():
    single = parse_recipe({"strategy": {"precision": "int4", "method": "qat"}})
    names = [s.name for s in cli.with_sweep(single, None).strategies]
    assert names == [*cli.COMPARE_SWEEP, "int4-qat"]
    listed = parse_recipe({"strategies": ["int8", "int4"]})
    assert cli.with_sweep(listed, None) is listed
    assert [s.name for s in cli.with_sweep(listed, ["fp32", "w4a8"]).strategies] == ["fp32", "w4a8"]


def test_compare_runs_one_model_and_one_table(tmp_path):
    raw = dict(SMALL, name="cmp", model={"arch": "mlp", "hidden": [32]}, strategy="int8")
    code, stdout, stderr = run_main(["compare", str(_write(tmp_path, raw)), "--strategies", "fp32,int4,w8a8",
                                     "-o", str(tmp_path / "out"), "-q"])
    assert code == 0, stderr
    assert stdout.count("strategy  ") == 1  # one table
    assert table_rows(stdout) == ["fp32", "int4", "w8a8"]


def test_python_dash_m_validate():
    proc = subprocess.run([sys.executable, "-m", "jaxq", "validate", "configs/quickstart.yaml",
                           "configs/mnist_w2_qat.yaml"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "quickstart.yaml: ok" in proc.stdout and "mnist_w2_qat.yaml: ok" in proc.stdout


def test_report_metrics_match_scikit_learn():
    import numpy as np
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    from jaxq.eval import classification_metrics

    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 500)
    p = np.where(rng.random(500) < 0.7, y, rng.integers(0, 5, 500))
    p[p == 4] = 3  # class 4 never predicted: its precision is 0/0 -> 0
    m = classification_metrics(y, p, 5)
    prec, rec, f1, _ = precision_recall_fscore_support(y, p, labels=range(5), average="macro", zero_division=0)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, p))
    assert (m["precision"], m["recall"], m["f1"]) == pytest.approx((prec, rec, f1))
