"""The layers import one way: core <- catalog <- audit <- proxy <- ops <- cli.

`core` is pure (no mitmproxy, no I/O libraries); each layer may import only the
layers below it. A new module that breaks the direction fails here, naming the
import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "addons" / "residency_gate"
ORDER = ["core", "catalog", "audit", "proxy", "ops", "cli"]
LEAVES = {"fileio"}  # leaf helpers at the package root, importing nothing of ours
FORBIDDEN_IN_CORE = {"mitmproxy", "asyncio", "socket", "subprocess", "yaml", "jsonschema",
                     "cryptography", "prometheus_client", "os"}


def imports(path: Path) -> list[tuple[str, int]]:
    """(absolute module, line) of every import in a module of the package."""
    tree = ast.parse(path.read_text(), str(path))
    package = path.relative_to(PKG.parent).with_suffix("").parts[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((a.name, node.lineno) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            out.append((mod, node.lineno))
    return out


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "residency_gate" or len(parts) < 2:
        return None
    return parts[1]


MODULES = sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PKG)))
def test_imports_point_down(path: Path) -> None:
    rel = path.relative_to(PKG)
    own = rel.parts[0] if len(rel.parts) > 1 else rel.stem
    for module, line in imports(path):
        target = layer_of(module)
        if own in ORDER and target in ORDER:
            assert ORDER.index(target) <= ORDER.index(own), (
                f"{rel}:{line} imports {module}: {own} may not import {target}")
        if own == "core":
            top = module.split(".")[0]
            assert top not in FORBIDDEN_IN_CORE, f"{rel}:{line}: core imports {module}"
        if own in LEAVES:
            assert target is None, f"{rel}:{line}: a leaf module imports {module}"


def test_every_module_is_in_a_layer() -> None:
    stray = [p.relative_to(PKG) for p in MODULES if len(p.relative_to(PKG).parts) == 1
             and p.stem not in {"__init__", "__main__", *LEAVES}]
    assert stray == [], "modules beside the layers: put each in the layer that owns it"


def test_packaging_lists_every_layer() -> None:
    """A layer missing from pyproject's package list would be left out of `pip install .`."""
    import tomllib

    listed = set(tomllib.loads((PKG.parents[1] / "pyproject.toml").read_text())
                 ["tool"]["setuptools"]["packages"])
    assert {f"residency_gate.{layer}" for layer in ORDER} <= listed
