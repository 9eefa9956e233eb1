"""The documents in docs/ against what they describe: the requirements key names every requirement ID and
only files and tests that exist, the topic table is the topic catalogue, and the layering table is the rule
tests/unit/test_layering.py enforces. A document that drifts from the code fails here, not in a reader's
head."""

from __future__ import annotations

import ast
import re
from datetime import timedelta
from pathlib import Path

import pytest

from bus.topics import TOPICS
from tests.unit.test_layering import ALLOWED, OURS, STREAMS_ALLOWED

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
REQUIREMENTS = ROOT.parent / "shared" / "REQUIREMENTS.md"
"""Kept beside the repository (CI clones have it at ../shared), not in it."""

ID = re.compile(r"[A-Z]\d+")
STATUSES = {"done", "partial", "missing"}
# Backticked text that names a path of this repository: it starts with one of its top-level entries.
TOP_LEVEL = ("aima_metrics/", "api/", "avro/", "bench/", "bus/", "consumers/", "docs/", "infra/")
TOP_LEVEL += ("producers/", "streams/", "tests/", "README.md", "constraints.txt", "pyproject.toml")


def _rows(path: Path) -> list[list[str]]:
    """The cells of every Markdown table row of ``path`` (header and separator rows included), with the
    escaped pipes ``\\|`` inside cells restored."""
    rows = []
    for line in path.read_text().splitlines():
        if line.startswith("|") and line.rstrip().endswith("|"):
            cells = re.split(r"(?<!\\)\|", line.strip()[1:-1])
            rows.append([cell.strip().replace("\\|", "|") for cell in cells])
    return rows


def _requirement_ids(text: str) -> list[str]:
    """IDs as REQUIREMENTS.md writes them: a table row ``| M1 |`` or a list item ``- T1 ...``."""
    return re.findall(r"^(?:\| |- )([A-Z]\d+)\b", text, re.MULTILINE)


def _key_rows() -> dict[str, list[str]]:
    return {row[0]: row for row in _rows(DOCS / "requirements.md") if row and ID.fullmatch(row[0])}


def test_every_requirement_id_has_one_row_in_the_key() -> None:
    if not REQUIREMENTS.exists():
        pytest.skip(f"{REQUIREMENTS} is absent (it lives beside the repository, as in CI's ../shared)")
    wanted = _requirement_ids(REQUIREMENTS.read_text())
    assert len(wanted) > 50, f"found only {wanted} in {REQUIREMENTS}: has its format changed?"
    ids = [row[0] for row in _rows(DOCS / "requirements.md") if row and ID.fullmatch(row[0])]
    assert sorted(set(wanted) - set(ids)) == [], "requirement IDs without a row in docs/requirements.md"
    assert sorted(set(ids) - set(wanted)) == [], "rows in docs/requirements.md for IDs REQUIREMENTS.md lacks"
    assert sorted(i for i in set(ids) if ids.count(i) > 1) == [], "IDs with more than one row"


def test_every_key_row_has_a_status_and_evidence_unless_missing() -> None:
    for requirement, row in _key_rows().items():
        assert len(row) == 5, f"{requirement}: expected ID, status, implemented in, shown by, notes: {row}"
        _, status, modules, tests, notes = row
        assert status in STATUSES, f"{requirement}: status {status!r} is not one of {sorted(STATUSES)}"
        if status == "missing":
            assert notes, f"{requirement}: a missing requirement says what is missing"
        else:
            assert modules and "`tests/" in tests, f"{requirement}: {status} names no module or no test"


def _named_paths(path: Path) -> list[str]:
    return [token for token in re.findall(r"`([^`\s]+)`", path.read_text()) if token.startswith(TOP_LEVEL)]


def _defines(path: Path, dotted: str) -> bool:
    """Whether the Python file ``path`` defines ``dotted`` (``test_x`` or ``TestClass::test_x``)."""
    definitions = ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef
    scope: list[ast.stmt] = ast.parse(path.read_text(), str(path)).body
    for name in dotted.split("::"):
        found = next((n for n in scope if isinstance(n, definitions) and n.name == name), None)
        if found is None:
            return False
        scope = found.body
    return True


@pytest.mark.parametrize("document", ["architecture.md", "layering.md", "recipes.md", "requirements.md"])
def test_every_file_and_test_a_document_names_exists(document: str) -> None:
    missing = []
    for token in _named_paths(DOCS / document):
        file, _, inside = token.partition("::")
        matches = list(ROOT.glob(file)) if "*" in file else [ROOT / file] if (ROOT / file).exists() else []
        if not matches or (inside and not _defines(matches[0], inside)):
            missing.append(token)
    assert missing == [], f"docs/{document} names what does not exist"


def test_the_key_shows_requirements_by_test_functions() -> None:
    """A key row's evidence is named down to the test (path::test_name), so that the check above proves
    the test exists, not only its file."""
    vague = {
        requirement: token
        for requirement, row in _key_rows().items()
        for token in re.findall(r"`([^`\s]+)`", row[3])
        if "::" not in token
    }
    assert vague == {}, "name the test function, not only its file"


def _retention(retention: timedelta | None) -> str:
    if retention is None:
        return "forever (compacted)"
    days, rest = divmod(retention, timedelta(days=1))
    assert not rest, "the table writes retentions in whole days"
    return f"{days} d"


def test_the_topic_table_is_the_topic_catalogue() -> None:
    documented = {}
    for row in _rows(DOCS / "architecture.md"):
        match = re.fullmatch(r"`([a-z0-9.-]+)`( \(internal\))?", row[0]) if len(row) == 7 else None
        if match:
            documented[match[1]] = (row[1], row[2], row[3].strip("`"), row[4].strip("`"), bool(match[2]))
    expected = {
        spec.key: (
            str(spec.partitions),
            _retention(spec.retention),
            spec.message_key,
            spec.schema.rpartition(".")[2] if spec.schema.startswith("aima.") else spec.schema,
            spec.internal,
        )
        for spec in TOPICS
    }
    assert documented == expected


def test_the_layering_table_is_the_layering_test() -> None:
    documented = {}
    for row in _rows(DOCS / "layering.md"):
        if len(row) == 2 and (name := row[0].strip("`")) in OURS:
            documented[name] = row[1]
    assert set(documented) == OURS, "one row per package of ours"
    for package, allowed in documented.items():
        if package in ALLOWED:
            assert set(re.findall(r"`(\w+)`", allowed)) == ALLOWED[package], package
        else:
            assert allowed.startswith("any"), f"{package} is not restricted by the test: say 'any'"


def test_the_streams_table_is_the_rooms_test() -> None:
    documented = {}
    for row in _rows(DOCS / "layering.md"):
        if len(row) == 2 and (match := re.fullmatch(r"`streams/(\w+)`", row[0])):
            documented[match[1]] = set(re.findall(r"`(\w+)`", row[1]))
    assert documented == STREAMS_ALLOWED
