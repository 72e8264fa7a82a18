"""The package layers import downward only (numerics -> ... -> algorithms -> models -> lm / CLI).

Checked statically on every ``import`` / ``from ... import`` in the sources (including those
inside functions), so a lazy upward import is caught too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "jaxq"

# A module of the key's layer may not import any of the listed packages.
FORBIDDEN = {
    "numerics": ("jaxq.qarray", "jaxq.policy", "jaxq.quantize", "jaxq.ops", "jaxq.kernels", "jaxq.flax",
                 "jaxq.algorithms", "jaxq.models", "jaxq.lm", "jaxq.cli"),
    "ops": ("jaxq.flax", "jaxq.algorithms", "jaxq.models", "jaxq.lm", "jaxq.cli"),
    "kernels": ("jaxq.flax", "jaxq.algorithms", "jaxq.models", "jaxq.lm", "jaxq.cli"),
    "flax": ("jaxq.algorithms", "jaxq.models", "jaxq.lm", "jaxq.cli"),
    "algorithms": ("jaxq.models", "jaxq.lm", "jaxq.cli", "jaxq.flow", "jaxq.recipe"),
    "models": ("jaxq.lm", "jaxq.cli", "jaxq.flow"),
}


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_upward_imports(layer):
    bad = []
    for f in sorted((ROOT / layer).glob("*.py")):
        for name in _imports(f):
            if any(name == p or name.startswith(p + ".") for p in FORBIDDEN[layer]):
                bad.append(f"{f.relative_to(ROOT.parent)} imports {name}")
    assert not bad, "\n".join(bad)
