"""The committed metric views match the catalogue, and every record field has a column to land in."""

from __future__ import annotations

import re
from dataclasses import replace

from bus import schemas
from bus.catalogue import METRICS
from consumers.gen_views import generated_part, latest_views_migration, render, view_source
from consumers.tables import BY_RECORD, TABLES


def test_committed_view_migration_matches_the_catalogue() -> None:
    committed = latest_views_migration()
    assert generated_part(committed.read_text()) == render(), (
        f"{committed.name} is stale: the catalogue changed. Generate a new migration: "
        "python -m consumers.gen_views --write consumers/migrations/NNNN_metric_views.sql"
    )


def test_a_catalogue_change_shows() -> None:
    renamed = (replace(METRICS[0], name="gpu_busy_percent"), *METRICS[1:])
    assert render(renamed) != generated_part(latest_views_migration().read_text())


def test_one_view_per_metric_with_its_labels() -> None:
    text = render()
    created = re.findall(r"^CREATE VIEW (\w+) AS$", text, flags=re.MULTILINE)
    assert created == [m.name for m in METRICS] + ["metrics_long"]
    for metric in METRICS:
        table, _, labels = view_source(metric)
        assert table.record == metric.record
        assert [label for label, _ in labels] == list(metric.labels)
        assert f"'{metric.name}'::text AS metric" in text


def test_item_metrics_read_their_item_tables() -> None:
    disk = next(m for m in METRICS if m.name == "host_disk_used_bytes")
    table, value, labels = view_source(disk)
    assert (table.name, value.name) == ("system_disk_samples", "used_bytes")
    assert [c.name for _, c in labels] == ["host", "mountpoint"]


def test_every_avro_field_has_a_column() -> None:
    """Nothing a record carries is dropped silently by the sink."""
    for record, tables in BY_RECORD.items():
        sources = {c.source for t in tables for c in t.columns}
        items = {t.items for t in tables if t.items}
        for field in schemas.raw(record)["fields"]:
            name = field["name"]
            if name in items:
                assert any(s.startswith(f"{name}[].") for s in sources), (record, name)
            else:
                assert name in sources, (record, name)


def test_natural_keys_end_with_time_for_partitioned_tables() -> None:
    """Unique indexes on partitioned tables and hypertables must include the time column."""
    raw = {"gpu_samples", "system_samples", "system_disk_samples", "system_network_samples"}
    raw |= {"job_timings", "job_events", "queue_samples", "pod_status"}
    for table in TABLES:
        if table.name in raw:
            assert table.key[-1] == "time", table.name
