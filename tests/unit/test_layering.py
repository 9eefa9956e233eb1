"""The layering of ARCHITECTURE.md: producers, streams, consumers and api meet only in bus, Kafka and the
database; bus depends on no package of ours; only aima_metrics composes them all."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from bus.settings import REPO_ROOT

OURS = {"bus", "producers", "streams", "consumers", "api", "aima_metrics"}
ALLOWED = {
    "bus": {"bus"},
    "producers": {"bus", "producers"},
    "streams": {"bus", "streams"},
    "consumers": {"bus", "consumers"},
    "api": {"bus", "api"},
}


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & OURS


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_what_its_layer_may(package: str) -> None:
    wrong = {
        str(path.relative_to(REPO_ROOT)): sorted(bad)
        for path in (REPO_ROOT / package).rglob("*.py")
        if (bad := _imports(path) - ALLOWED[package])
    }
    assert wrong == {}, f"{package} may import only {sorted(ALLOWED[package])}"
