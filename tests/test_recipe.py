"""Recipe schema: parsing, defaults, shorthands, policies, and strict errors that name the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from jaxq.recipe import (
    PRECISIONS,
    Recipe,
    RecipeError,
    StrategyConfig,
    load_recipe,
    parse_recipe,
    parse_strategy,
)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _error(raw) -> RecipeError:
    with pytest.raises(RecipeError) as info:
        parse_recipe(raw)
    return info.value


def test_defaults_and_frozen():
    r = parse_recipe({})
    assert isinstance(r, Recipe)
    assert r.data.dataset == "digits" and r.model.arch == "mlp" and r.model.hidden == (128,)
    assert [s.name for s in r.strategies] == ["int8"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.train.epochs = 3  # type: ignore[misc]


def test_strategy_and_strategies_forms():
    one = parse_recipe({"strategy": {"precision": "int4", "method": "qat", "activations": "int8"}})
    assert [s.name for s in one.strategies] == ["w4a8-qat"]
    many = parse_recipe({"strategies": ["fp32", "w8a8", {"precision": "int2", "range_method": "mse"}]})
    assert [s.name for s in many.strategies] == ["fp32", "w8a8", "int2-mse"]
    assert many.strategies[1].activations == "int8" and many.strategies[1].precision == "int8"


def test_yaml_scientific_notation_string_is_a_number():
    r = parse_recipe({"train": {"learning_rate": "1e-3"}})
    assert r.train.learning_rate == pytest.approx(1e-3)


@pytest.mark.parametrize(
    "raw, key, allowed",
    [
        ({"dataset": "mnist"}, "dataset", "data, model, train, strategies"),
        ({"data": {"datset": "mnist"}}, "data.datset", "dataset, data_dir"),
        ({"data": {"dataset": "cifar10"}}, "data.dataset", "mnist, fashion_mnist, digits"),
        ({"model": {"arch": "resnet"}}, "model.arch", "mlp, cnn"),
        ({"model": {"hidden": [128, 0]}}, "model.hidden[1]", ">= 1"),
        ({"train": {"optimizer": "rmsprop"}}, "train.optimizer", "adam, adamw, sgd"),
        ({"train": {"epochs": -1}}, "train.epochs", ">= 0"),
        ({"train": {"learning_rate": 0}}, "train.learning_rate", "> 0"),
        ({"train": {"batch_size": True}}, "train.batch_size", "integer"),
        ({"strategies": ["int8", {"precision": "int5"}]}, "strategies[1].precision", ", ".join(PRECISIONS)),
        ({"strategies": ["int8", "int3"]}, "strategies[1]", "w8a8"),
        ({"strategies": [{"qat": {"epochs": 2, "lr": 1}}]}, "strategies[0].qat.lr", "learning_rate"),
        ({"strategy": {"granularity": "per_row"}}, "strategy.granularity", "per_tensor, per_channel, per_group"),
        ({"strategy": {"range_method": "max"}}, "strategy.range_method", "absmax, minmax, percentile, mse"),
        ({"strategy": {"activations": "int4"}}, "strategy.activations", "float, int8"),
        ({"eval": {"latency_iters": 0}}, "eval.latency_iters", ">= 1"),
        ({"output": {"save_models": "yes"}}, "output.save_models", "true, false"),
    ],
)
def test_bad_key_or_value_names_the_full_path_and_allowed_values(raw, key, allowed):
    e = _error(raw)
    assert e.key == key
    assert str(e).startswith(f"{key}:")
    assert allowed in str(e)


@pytest.mark.parametrize(
    "strategy, key",
    [
        ({"precision": "bf16", "method": "qat"}, "strategies[0].method"),
        ({"precision": "fp16", "activations": "int8"}, "strategies[0].activations"),
        ({"precision": "int8", "activation_mode": "static"}, "strategies[0].activation_mode"),
        ({"precision": "int4", "granularity": "per_group"}, "strategies[0].group_size"),
        ({"precision": "int4", "group_size": 32}, "strategies[0].group_size"),
        ({"precision": "int4", "method": "qat", "symmetric": False}, "strategies[0].symmetric"),
    ],
)
def test_cross_field_errors_name_the_key(strategy, key):
    assert _error({"strategies": [strategy]}).key == key


def test_other_structural_errors():
    assert _error({"strategy": "int8", "strategies": ["int4"]}).key == "strategy"
    assert _error({"strategies": ["int8", "int8"]}).key == "strategies"
    assert _error({"strategies": []}).key == "strategies"
    assert _error({"data": ["mnist"]}).key == "data"
    assert _error({"train": {"weight_decay": 0.1}}).key == "train.weight_decay"
    with pytest.raises(RecipeError):
        parse_recipe(["not", "a", "mapping"])  # type: ignore[arg-type]


def test_direct_construction_is_validated_too():
    with pytest.raises(RecipeError) as info:
        StrategyConfig(precision="int5")
    assert info.value.key == "precision"
    assert StrategyConfig(precision="int4", granularity="per_group", group_size=32).name == "int4-g32"


def test_policy_of_a_strategy():
    p = parse_strategy("w4a8").policy()
    (rule,) = p.rules
    assert rule.weight.format == "int4" and rule.weight.granularity == "per_channel"
    assert rule.activation.format == "int8" and rule.activation.granularity == "per_token"
    assert rule.floats_only and rule.min_rank == 2
    static = parse_strategy({"precision": "int8", "activations": "int8", "activation_mode": "static"}).policy()
    assert static.rules[0].activation.granularity == "per_tensor"
    assert parse_strategy("fp32").policy().rules[0].weight is None
    assert parse_strategy("bf16").policy().rules[0].weight.format == "bf16"
    mse = parse_strategy({"precision": "int4", "range_method": "mse"}).policy()
    assert mse.rules[0].weight.range_method == "mse"
    assert mse.rules[0].weight.full_range  # jaxq's default at 4 bits
    ternary = parse_strategy({"precision": "int2", "full_range": False})
    assert not ternary.policy().rules[0].weight.full_range and ternary.name == "int2-narrow"
    with pytest.raises(RecipeError, match="full_range"):
        parse_strategy({"precision": "int4", "full_range": "yes"})


def test_load_recipe_file_errors_mention_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  dataset: mnist\n  shuffle: true\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(bad)
    assert info.value.key == "data.shuffle" and "bad.yaml" in str(info.value)
    broken = tmp_path / "broken.yaml"
    broken.write_text("data: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(broken)
    unnamed = tmp_path / "my_run.yaml"
    unnamed.write_text("strategy: int4\n")
    assert load_recipe(unnamed).name == "my_run"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    r = load_recipe(path)
    assert r.name == path.stem
    assert r.strategies


def test_to_dict_round_trips():
    r = parse_recipe({"name": "x", "strategies": ["int8", {"precision": "int4", "method": "qat"}]})
    again = parse_recipe(r.to_dict())
    assert again == r


# Input shapes of the shipped datasets: enough to build each recipe's model abstractly.
_IMAGE_SHAPES = {"digits": (8, 8, 1), "mnist": (28, 28, 1), "fashion_mnist": (28, 28, 1)}


@pytest.mark.parametrize("path", sorted(Path(__file__).parent.parent.glob("configs/*.yaml")), ids=lambda p: p.name)
def test_every_shipped_strategy_fits_its_model(path):
    """Each strategy's policy quantizes the recipe's model (abstractly: nothing is computed)."""
    import jax
    import jax.numpy as jnp

    import jaxq
    from jaxq.models.classifiers import build_classifier

    recipe = load_recipe(path)
    model = build_classifier(recipe.model.arch, 10, hidden=recipe.model.hidden, channels=recipe.model.channels)
    x = jax.ShapeDtypeStruct((1, *_IMAGE_SHAPES[recipe.data.dataset]), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.key(0), x)
    for strategy in recipe.strategies:
        jax.eval_shape(lambda p, s=strategy: jaxq.quantize(p, s.policy()), params)
