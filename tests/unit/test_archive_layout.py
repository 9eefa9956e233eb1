"""The archive's object layout and manifest (consumers/archive/layout.py), and what its settings accept."""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest

from bus.settings import SettingsError
from consumers.archive.layout import Column, DayKey, Manifest, Part, day_bounds, parse_manifest_key
from consumers.retention import POLICIES, RAW_TABLES
from consumers.settings import ARCHIVABLE, ArchiveSettings


def test_keys_of_a_raw_day_and_a_rollup_tier() -> None:
    raw = DayKey("gpu_samples", "", date(2026, 12, 1), "prod/")
    assert raw.manifest_key() == "prod/gpu_samples/day=2026-12-01/manifest.json"
    assert raw.part_key("ab12") == "prod/gpu_samples/day=2026-12-01/part-ab12.parquet"
    hour = DayKey("rollups", "hour", date(2026, 1, 31))
    assert hour.manifest_key() == "rollups/tier=hour/day=2026-01-31/manifest.json"
    assert DayKey.table_prefix("", "rollups", "hour") == "rollups/tier=hour/"
    assert DayKey.table_prefix("prod", "gpu_samples") == "prod/gpu_samples/"


@pytest.mark.parametrize(
    "key",
    [
        DayKey("gpu_samples", "", date(2026, 12, 1), "prod"),
        DayKey("rollups", "month", date(2026, 2, 1)),
        DayKey("job_events", "", date(2025, 12, 31), "a/b"),
    ],
)
def test_a_manifest_key_names_its_day(key: DayKey) -> None:
    assert parse_manifest_key(key.manifest_key()) == key


@pytest.mark.parametrize(
    "key",
    [
        "gpu_samples/day=2026-12-01/part-ab12.parquet",
        "gpu_samples/day=2026-12-1/manifest.json",
        "gpu_samples/manifest.json",
        "Foreign/day=2026-12-01/manifest.json",
    ],
)
def test_other_keys_are_not_manifests(key: str) -> None:
    assert parse_manifest_key(key) is None


def test_a_manifest_survives_its_json() -> None:
    manifest = Manifest(
        table="rollups",
        tier="hour",
        day=date(2026, 12, 1),
        time_column="bucket_end",
        rows=48,
        min_time=datetime(2026, 12, 1, 0, 0, tzinfo=UTC),
        max_time=datetime(2026, 12, 1, 23, 0, tzinfo=UTC),
        columns=(Column("series", "text"), Column("bucket_end", "timestamp with time zone")),
        parts=(Part("rollups/tier=hour/day=2026-12-01/part-x.parquet", 48, 1234, "0" * 64),),
        archived_at=datetime(2026, 12, 9, 1, 2, 3, tzinfo=UTC),
        key_columns=("series", "tier", "bucket_start"),
        source="public",
    )
    text = manifest.to_json()
    assert b'"compression": "zstd"' in text and b'"format": "parquet"' in text
    assert Manifest.from_json(text) == manifest
    assert manifest.bytes == 1234


def test_a_manifest_of_another_format_version_is_refused() -> None:
    with pytest.raises(ValueError, match="version"):
        Manifest.from_json(b'{"version": 99}')


def test_day_bounds_are_utc() -> None:
    start, end = day_bounds(date(2026, 3, 29))
    assert start == datetime(2026, 3, 29, tzinfo=UTC)
    assert (end - start).total_seconds() == 86400


def test_archivable_is_the_raw_tables_and_every_rollup_tier() -> None:
    tiers = [f"rollups:{p.tier}" for p in POLICIES if p.relation == "rollups"]
    assert (*RAW_TABLES, *tiers) == ARCHIVABLE


def test_archive_is_off_without_a_bucket_and_names_what_it_keeps() -> None:
    off = ArchiveSettings.from_environ({})
    assert not off.enabled and not off.archived("gpu_samples")
    on = ArchiveSettings.from_environ({"AIMA_ARCHIVE_BUCKET": "b"})
    assert on.archived("gpu_samples") and on.archived("rollups", "hour") and not on.archived("costs")
    some = ArchiveSettings.from_environ(
        {"AIMA_ARCHIVE_BUCKET": "b", "AIMA_ARCHIVE_TABLES": "rollups, pod_status"}
    )
    assert (
        some.archived("rollups", "day") and some.archived("pod_status") and not some.archived("gpu_samples")
    )


def test_an_unknown_table_to_archive_names_the_variable() -> None:
    with pytest.raises(SettingsError, match="AIMA_ARCHIVE_TABLES"):
        ArchiveSettings.from_environ({"AIMA_ARCHIVE_TABLES": "gpu_samples,costs"})
