"""Schema evolution without a registry (T3, T6), through the real broker: a reader deployed with the old
schema files reads the records of a writer whose schema added an optional field, and a reader deployed with
the new schema reads an old writer's records with the field's default. Writer and reader are separate
processes (tests/integration/schema_peer.py), each with its own schema folder (AIMA_SCHEMA_DIR); neither
knows the other's schema except through the schemas topic."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bus import schemas
from bus.settings import REPO_ROOT, Settings

pytestmark = pytest.mark.integration

N = 200


def _schema_folder(root: Path, *, with_priority: bool) -> Path:
    """A copy of avro/ without its history (so the schemas topic is the only way to learn another
    version), QueueSample with the optional ``priority`` field when asked."""
    folder = root / ("new" if with_priority else "old")
    shutil.copytree(schemas.schema_dir(), folder, ignore=shutil.ignore_patterns("history"))
    if with_priority:
        schema = schemas.raw("QueueSample")
        schema["fields"].append(
            {
                "name": "priority",
                "type": ["null", "string"],
                "default": None,
                "doc": "Queue priority; unit: none",
            }
        )
        (folder / "QueueSample.avsc").write_text(json.dumps(schema, indent=2), encoding="utf-8")
    return folder


def _env(settings: Settings, folder: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIMA_")}
    return {
        **env,
        "AIMA_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "AIMA_TOPIC_PREFIX": settings.topic_prefix,
        "AIMA_STATE_DIR": str(settings.state_dir),
        "AIMA_SCHEMA_DIR": str(folder),
        "AIMA_METRICS_PORT": "0",
    }


def _peer(settings: Settings, folder: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.integration.schema_peer", *args],
        cwd=REPO_ROOT, env=_env(settings, folder), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _run(writer_folder: Path, reader_folder: Path, settings: Settings) -> list[dict[str, Any]]:
    """Start the reader first (it waits for records), then the writer; the reader's lines."""
    reader = _peer(settings, reader_folder, "read", str(N))
    writer = _peer(settings, writer_folder, "write", str(N))
    written, writer_err = writer.communicate(timeout=300)
    assert writer.returncode == 0, writer_err
    assert json.loads(written.splitlines()[-1]) == {"delivered": N, "invalid": 0, "left": 0}, writer_err
    out, reader_err = reader.communicate(timeout=300)
    assert reader.returncode == 0, reader_err
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == N, reader_err
    return lines


def test_an_old_reader_reads_a_newer_writer_through_the_schemas_topic(
    topics: Settings, tmp_path: Path
) -> None:
    old, new = _schema_folder(tmp_path, with_priority=False), _schema_folder(tmp_path, with_priority=True)
    lines = _run(new, old, topics)
    dead = [line for line in lines if "dead_letter" in line]
    assert dead == []  # before the schemas topic: N times UnknownFingerprint
    values = sorted((line["value"] for line in lines), key=lambda v: v["length_jobs"])
    assert [v["length_jobs"] for v in values] == list(range(N))
    assert all(set(v) == {"time", "queue", "length_jobs", "source"} for v in values)  # its own fields
    assert not any(line["native"] for line in lines)  # another fingerprint: decoded one by one


def test_a_new_reader_sees_the_default_in_an_old_writers_records(topics: Settings, tmp_path: Path) -> None:
    old, new = _schema_folder(tmp_path, with_priority=False), _schema_folder(tmp_path, with_priority=True)
    lines = _run(old, new, topics)
    assert [line for line in lines if "dead_letter" in line] == []
    assert sorted(line["value"]["length_jobs"] for line in lines) == list(range(N))
    assert {line["value"]["priority"] for line in lines} == {None}  # the new field's default


def test_readers_of_the_same_schema_still_read_natively(topics: Settings, tmp_path: Path) -> None:
    new = _schema_folder(tmp_path, with_priority=True)
    lines = _run(new, new, topics)
    assert [line for line in lines if "dead_letter" in line] == []
    priorities = {line["value"]["length_jobs"]: line["value"]["priority"] for line in lines}
    assert priorities == {i: "high" if i % 2 == 0 else None for i in range(N)}
    assert any(line["native"] for line in lines)
