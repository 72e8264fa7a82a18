"""The ``jaxq`` command: parse arguments and recipes, then hand over to :mod:`jaxq.flow`.

::

    jaxq run configs/quickstart.yaml            # or: jaxq run quickstart ; python -m jaxq run
    jaxq compare configs/mnist_int8_ptq.yaml    # sweep strategies on one trained model
    jaxq validate configs/*.yaml                # check recipes without running them
    jaxq lm generate|quantize|eval MODEL ...    # real language models (see jaxq.lm.cli)

A run loads the data (``--data-dir``, else the recipe's ``data.data_dir``, else
``$JAXQ_DATA_DIR``), trains the float classifier or loads it from
``model.checkpoint``, applies every strategy of the recipe to that one model
(PTQ, or QAT fine-tuning from it; static activation scales are calibrated on
training batches), evaluates each on the test set, and reports accuracy, macro
precision/recall/F1, bytes, compression and jitted latency per batch as a
terminal table, a JSON file and a PNG plot in the output folder.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml

from jaxq.data import DatasetNotFoundError
from jaxq.lm import cli as lm_cli
from jaxq.io import CheckpointError
from jaxq.flow import apply_strategy, report_table, run_recipe
from jaxq.recipe import SHORTHANDS, Recipe, RecipeError, load_recipe, parse_recipe, parse_strategy

__all__ = ["COMPARE_SWEEP", "apply_strategy", "main", "report_table", "resolve_recipe", "run_recipe"]

COMPARE_SWEEP = ("fp32", "bf16", "int8", "int4", "int2", "w8a8")
"""Strategies ``jaxq compare`` adds when the recipe names only one."""

DEFAULT_RECIPE = "quickstart"


# --- recipes on the command line ------------------------------------------------------------
def resolve_recipe(name: str) -> Path:
    """A recipe path: an existing file, else ``configs/<name>[.yaml]`` here or in the jaxq checkout."""
    p = Path(name)
    if p.is_file():
        return p
    stem = name if name.endswith((".yaml", ".yml")) else f"{name}.yaml"
    roots = [Path.cwd() / "configs", Path(__file__).resolve().parent.parent / "configs"]
    for root in roots:
        if (root / Path(stem).name).is_file():
            return root / Path(stem).name
    known = sorted({f.stem for r in roots if r.is_dir() for f in r.glob("*.yaml")})
    raise FileNotFoundError(f"no recipe {name!r}: not a file, and not in {[str(r) for r in roots]}; "
                            f"known recipes: {', '.join(known) or 'none'}")


def _apply_set(raw: dict[str, Any], assignment: str) -> None:
    key, sep, value = assignment.partition("=")
    if not sep or not key:
        raise RecipeError("--set", f"expected KEY=VALUE (e.g. train.epochs=3), got {assignment!r}")
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise RecipeError(".".join(parts[: i + 1]), f"--set {key}: this key is not a mapping")
        node = child
    node[parts[-1]] = yaml.safe_load(value)


def load_with_overrides(path: str | os.PathLike[str], sets: Sequence[str] = ()) -> Recipe:
    """Loads a recipe file and applies ``--set KEY=VALUE`` overrides (validated like the file)."""
    if not sets:
        return load_recipe(path)
    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f) or {}
    for s in sets:
        _apply_set(raw, s)
    try:
        recipe = parse_recipe(raw)
    except RecipeError as e:
        raise RecipeError(e.key, f"{e.reason} (in {path} with --set overrides)") from None
    if "name" not in raw:
        recipe = recipe.replace(name=Path(path).stem)
    return recipe


def with_sweep(recipe: Recipe, names: Sequence[str] | None) -> Recipe:
    """The recipe's strategies for ``compare``: ``names`` if given; else its list, or the sweep."""
    if names:
        strategies = [parse_strategy(n, f"--strategies[{i}]") for i, n in enumerate(names)]
    elif len(recipe.strategies) > 1:
        return recipe
    else:
        strategies = [parse_strategy(n) for n in COMPARE_SWEEP]
        own = recipe.strategies[0]
        if own.name not in {s.name for s in strategies}:
            strategies.append(own)
    return recipe.replace(strategies=tuple(strategies))


# --- argument parsing ---------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxq", description="jaxq: quantize a classifier from a YAML recipe.")
    from jaxq import __version__

    p.add_argument("--version", action="version", version=f"jaxq {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="{run,compare,validate,lm}")

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("recipe", nargs="?", default=DEFAULT_RECIPE,
                        help=f"recipe file, or a name in configs/ (default: {DEFAULT_RECIPE})")
        sp.add_argument("--data-dir", help="folder with the dataset files (default: recipe data.data_dir, "
                                           "then $JAXQ_DATA_DIR)")
        sp.add_argument("--output-dir", "-o", help="where the JSON and PNG go (default: recipe output.dir, "
                                                   "then runs/<name>)")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe value, e.g. --set train.epochs=3 (repeatable)")
        sp.add_argument("--retrain", action="store_true", help="train even if model.checkpoint exists")
        sp.add_argument("--quiet", "-q", action="store_true", help="no progress bars or messages (table only)")

    common(sub.add_parser("run", help="run a recipe: train or load, quantize, evaluate, report"))
    cp = sub.add_parser("compare", help="sweep strategies on one trained model and print one table")
    common(cp)
    cp.add_argument("--strategies", help=f"comma-separated strategy names ({', '.join(SHORTHANDS)}); "
                                         f"default: the recipe's list, or {','.join(COMPARE_SWEEP)} plus its own")
    vp = sub.add_parser("validate", help="check recipes without running them")
    vp.add_argument("recipes", nargs="+")
    lm_cli.add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``jaxq`` console script. Returns the exit status."""
    args = _parser().parse_args(argv)
    def err(msg: str) -> int:
        print(f"jaxq: error: {msg}", file=sys.stderr)
        return 2

    if args.command == "lm":
        try:
            return lm_cli.run(args)
        except (FileNotFoundError, PermissionError, CheckpointError, ValueError) as e:
            return err(str(e))
    try:
        if args.command == "validate":
            for name in args.recipes:
                r = load_recipe(resolve_recipe(name))
                print(f"{name}: ok ({r.name}: {r.model.arch} on {r.data.dataset}; "
                      f"strategies {', '.join(s.name for s in r.strategies)})")
            return 0
        recipe = load_with_overrides(resolve_recipe(args.recipe), args.set)
        if args.command == "compare":
            names = [n.strip() for n in args.strategies.split(",") if n.strip()] if args.strategies else None
            recipe = with_sweep(recipe, names)
        quiet = args.quiet
        progress = not quiet and sys.stderr.isatty()
        log = None if quiet else (lambda msg: print(f"[jaxq] {msg}", file=sys.stderr, flush=True))
        report = run_recipe(recipe, data_dir=args.data_dir, output_dir=args.output_dir, retrain=args.retrain,
                            progress=progress, log=log)
    except RecipeError as e:
        return err(f"invalid recipe: {e}")
    except (FileNotFoundError, DatasetNotFoundError, CheckpointError) as e:
        return err(str(e))
    print(report_table(report))
    files = report.info.get("files", {})
    if files:
        print("\n" + "\n".join(f"{k}: {v}" for k, v in files.items()))
    print(f"total {report.info['total_s']:.1f}s")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
