"""Accuracy floors on real MNIST (MLP 784-128-10, 60k train / 10k test), from the shipped recipes.

One float model is trained with the recipes' shared `train:` settings (never
loaded from a checkpoint, so training regressions show), then each floor
recipe's strategy is applied to it exactly as `jaxq run` applies it:

=====================  ===========================================
float                  accuracy >= 97.5 %
int8 PTQ               within 0.2 points of float
int4 per-channel PTQ   within 1.0 point of float (MSE clip search)
W4A8 QAT               within 0.3 points of float
W2 QAT                 >= 96 %
=====================  ===========================================

Needs JAXQ_DATA_DIR with mnist/ in it (CI: /work/shared/data); about 2-3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from jaxq import flow
from jaxq.recipe import EvalConfig, Recipe, StrategyConfig, load_recipe

pytestmark = pytest.mark.slow

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
DATA_DIR = os.environ.get("JAXQ_DATA_DIR")


def _has_mnist() -> bool:
    return bool(DATA_DIR) and (Path(DATA_DIR) / "mnist").is_dir()


if not _has_mnist():
    pytest.skip(
        "MNIST floors need the real data: set JAXQ_DATA_DIR to a folder with mnist/ "
        f"(IDX files); JAXQ_DATA_DIR={DATA_DIR!r}",
        allow_module_level=True,
    )


def _recipe(name: str) -> Recipe:
    r = load_recipe(CONFIGS / f"{name}.yaml")
    fast_eval = EvalConfig(batch_size=1000, latency_iters=2, latency_warmup=1)
    return r.replace(model=dataclasses.replace(r.model, checkpoint=None), eval=fast_eval)


def _strategy(recipe: Recipe, name: str) -> StrategyConfig:
    return next(s for s in recipe.strategies if s.name == name)


@pytest.fixture(scope="module")
def mnist():
    recipe = _recipe("mnist_int8_ptq")
    train, test = flow.load_data(recipe)
    assert (len(train), len(test)) == (60000, 10000)
    from jaxq.models.classifiers import build_classifier

    model = build_classifier("mlp", 10, hidden=recipe.model.hidden)
    params, _ = flow.float_params(recipe, model, train, retrain=True, progress=False, log=print)
    base = flow.evaluate("float", model, {"params": params}, test, recipe, strategy=None, float_nbytes=None,
                        progress=False)
    return recipe, model, params, train, test, base


def _accuracy(mnist, config: str, strategy: str) -> tuple[float, float]:
    _, model, params, train, test, base = mnist
    recipe = _recipe(config)
    # The floor recipes must all describe the float model this fixture trained.
    assert (recipe.data, recipe.model, recipe.train) == (mnist[0].data, mnist[0].model, mnist[0].train)
    s = _strategy(recipe, strategy)
    variables, _ = flow.apply_strategy(s, model, params, train, seed=recipe.train.seed, progress=False)
    r = flow.evaluate(s.name, model, variables, test, recipe, strategy=s, float_nbytes=None, progress=False)
    print(f"{config}/{strategy}: {100 * r.accuracy:.2f}% (float {100 * base.accuracy:.2f}%)")
    return r.accuracy, base.accuracy


def test_float_mlp_reaches_97_5(mnist):
    base = mnist[5]
    print(f"float: {100 * base.accuracy:.2f}%")
    assert base.accuracy >= 0.975


def test_int8_ptq_within_0_2_points(mnist):
    acc, base = _accuracy(mnist, "mnist_int8_ptq", "int8")
    assert acc >= base - 0.002


def test_int4_per_channel_ptq_within_1_point(mnist):
    acc, base = _accuracy(mnist, "mnist_int4_ptq", "int4")
    assert _strategy(_recipe("mnist_int4_ptq"), "int4").granularity == "per_channel"
    assert acc >= base - 0.010


def test_w4a8_qat_within_0_3_points(mnist):
    acc, base = _accuracy(mnist, "mnist_w4a8_qat", "w4a8-qat")
    assert acc >= base - 0.003


def test_w2_qat_reaches_96(mnist):
    acc, _ = _accuracy(mnist, "mnist_w2_qat", "w2-qat")
    assert acc >= 0.96
