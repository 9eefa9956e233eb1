"""The layering of ARCHITECTURE.md: producers, streams, consumers and api meet only in bus, Kafka and the
database; bus depends on no package of ours; only aima_metrics composes them all. Inside streams, the
runtime imports no processor family and the families (rooms) import the runtime, never each other; only
streams/main.py and streams/settings.py compose them (docs/layering.md)."""

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


# -- inside streams: the runtime and one room per processor family -----------------------------------------

STREAMS = REPO_ROOT / "streams"
RUNTIME = "runtime"
COMPOSITION = {"__init__.py", "main.py", "settings.py"}
"""The modules at streams/'s top level: the package, the worker that wires the rooms, their settings."""
ROOMS = sorted(p.name for p in STREAMS.iterdir() if (p / "__init__.py").exists() and p.name != RUNTIME)
STREAMS_ALLOWED = {RUNTIME: {RUNTIME}, **{room: {RUNTIME, room} for room in ROOMS}}
"""Of streams' parts, what each may import (besides bus and third-party packages)."""


def _streams_parts(source: str, filename: str = "<source>") -> set[str]:
    """The parts of streams (``runtime``, a room, or a top-level module) that ``source`` imports: from
    ``import streams.x.y``, ``from streams.x import y`` and ``from streams import x``, wherever they stand
    (inside functions, under TYPE_CHECKING); relative imports resolve to nothing here (none are used)."""
    found = set()
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
            if node.module == "streams":
                modules = [f"streams.{alias.name}" for alias in node.names]
        else:
            continue
        for module in modules:
            parts = module.split(".")
            if parts[0] == "streams" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_the_import_reader_sees_every_form() -> None:
    source = """
from typing import TYPE_CHECKING
import streams.costs.jobs
from streams import anomaly
from streams.runtime.state import BatchState
if TYPE_CHECKING:
    from streams.alerts.settings import AlertSettings
def later():
    from streams.rollups.merge import RollupMerger
"""
    assert _streams_parts(source) == {"costs", "anomaly", "runtime", "alerts", "rollups"}


def test_streams_has_a_runtime_rooms_and_only_the_composition_at_its_top() -> None:
    assert (STREAMS / RUNTIME / "__init__.py").exists()
    assert ROOMS == ["alerts", "anomaly", "costs", "rollups"]
    top = sorted(p.name for p in STREAMS.glob("*.py"))
    assert set(top) <= COMPOSITION, f"streams/ keeps only {sorted(COMPOSITION)} at its top: move {top}"


@pytest.mark.parametrize("part", sorted(STREAMS_ALLOWED))
def test_the_runtime_imports_no_room_and_rooms_import_no_other_room(part: str) -> None:
    wrong = {
        str(path.relative_to(REPO_ROOT)): sorted(bad)
        for path in (STREAMS / part).rglob("*.py")
        if (bad := _streams_parts(path.read_text(), str(path)) - STREAMS_ALLOWED[part])
    }
    assert wrong == {}, f"streams/{part} may import only {sorted(STREAMS_ALLOWED[part])} of streams"
