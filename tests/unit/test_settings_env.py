"""Only the settings models read ``AIMA_*`` variables: an AST scan of every production module for reads of
the environment (``os.environ``, ``os.getenv``, ``environ`` imported from os, click's ``envvar=``), as
tests/unit/test_layering.py scans imports. A read outside the models would be a setting with no type, no
validation naming it at start and no line in the README."""

from __future__ import annotations

import ast
from pathlib import Path

from bus.settings import REPO_ROOT

PACKAGES = ("bus", "producers", "streams", "consumers", "api", "aima_metrics")

ALLOWED = {
    "consumers/notify/config.py": "secrets named by the routing file (hmac_key_env: ...), any name it gives",
    "aima_metrics/stack.py": "passes this process's environment on to the scripts and children it starts",
}
"""Modules that may touch the environment for something else than a setting, and why. Even there a
literal ``AIMA_*`` name is refused (the second check below)."""


def _env_reads(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, what) for every read of the environment. ``os.environ.pop(...)`` as a statement of its own
    removes a variable (for the processes this one starts) and reads nothing."""
    discarded = {
        id(node.value.func.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Call)
        and isinstance(node.value.func, ast.Attribute)
        and node.value.func.attr == "pop"
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in ("environ", "environb", "getenv", "getenvb"):
            if isinstance(node.value, ast.Name) and node.value.id == "os" and id(node) not in discarded:
                found.append((node.lineno, f"os.{node.attr}"))
        elif isinstance(node, ast.ImportFrom) and node.module == "os":
            found += [(node.lineno, f"from os import {a.name}") for a in node.names if "env" in a.name]
        elif isinstance(node, ast.keyword) and node.arg in ("envvar", "auto_envvar_prefix"):
            found.append((node.value.lineno, f"click {node.arg}="))
    return found


def _literal_aima_reads(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, name) for ``<mapping>.get("AIMA_...")`` and ``<mapping>["AIMA_..."]`` loads: how a hand
    parser reads a variable, whatever the mapping is called."""
    found = []
    for node in ast.walk(tree):
        key: ast.expr | None = None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
            key = node.args[0] if node.args else None
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load):
            key = node.slice
        if isinstance(key, ast.Constant) and isinstance(key.value, str) and key.value.startswith("AIMA_"):
            found.append((node.lineno, key.value))
        elif isinstance(key, ast.JoinedStr) and any(
            isinstance(part, ast.Constant) and str(part.value).startswith("AIMA_") for part in key.values[:1]
        ):
            found.append((node.lineno, "f'AIMA_...'"))
    return found


def _modules() -> list[Path]:
    return sorted(path for package in PACKAGES for path in (REPO_ROOT / package).rglob("*.py"))


def test_only_the_settings_models_read_the_environment() -> None:
    wrong = {}
    for path in _modules():
        name = str(path.relative_to(REPO_ROOT))
        tree = ast.parse(path.read_text(), name)
        reads = [] if name in ALLOWED else _env_reads(tree)
        reads += _literal_aima_reads(tree)
        if reads:
            wrong[name] = reads
    assert wrong == {}, "read AIMA_* settings through a settings model (bus/settings.py's AimaSettings)"


def test_the_scan_finds_each_way_of_reading() -> None:
    code = """
import os
from os import environ
a = os.environ.get("AIMA_X")
b = os.getenv("AIMA_Y")
c = env["AIMA_Z"]
d = mapping.get(f"AIMA_{name}")
os.environ.pop("AIMA_SUPERVISOR_PID", None)
e = os.environ.pop("AIMA_W", None)
click.option("--n", envvar="AIMA_N")
"""
    tree = ast.parse(code)
    assert sorted(line for line, _ in _env_reads(tree)) == [3, 4, 5, 9, 10]
    assert sorted(what for _, what in _literal_aima_reads(tree)) == ["AIMA_X", "AIMA_Z", "f'AIMA_...'"]
