"""`db retention`'s last line counts what was dropped and deleted, never TimescaleDB's policy lines, drops
skipped for a lock, or tables with nothing expired (the issue: "dropped 11 item(s)" when nothing was)."""

from __future__ import annotations

from datetime import UTC, datetime

from consumers.retention import Action, summary

CUTOFF = datetime(2026, 1, 1, tzinfo=UTC)


def test_policy_lines_and_empty_deletes_count_as_nothing() -> None:
    actions = [
        *(Action("policy", f"t{i}", f"t{i}", "", CUTOFF, None, False, "retention policy") for i in range(8)),
        Action("delete_rows", "anomalies", "anomalies", "", CUTOFF, 0, True),
    ]
    assert summary(actions) == "nothing has expired"


def test_drops_and_deleted_rows_are_counted_apart() -> None:
    actions = [
        Action("policy", "gpu_samples", "gpu_samples", "", CUTOFF, None, False, "retention policy"),
        Action("drop_partition", "gpu_samples", "gpu_samples_p20251230", "", CUTOFF, None, True),
        Action("drop_chunk", "job_events", "_hyper_1_2_chunk", "", CUTOFF, None, True),
        Action("delete_rows", "rollups", "rollups", "hour", CUTOFF, 7, True),
        Action("delete_rows", "audit_log", "audit_log", "", CUTOFF, 2, True),
        Action("skipped", "pod_status", "pod_status_p20251230", "", CUTOFF, None, False, "lock timeout"),
    ]
    assert summary(actions) == (
        "dropped 2 partition(s) or chunk(s), deleted 9 row(s); 1 drop(s) skipped (lock timeout), retried "
        "at the next run"
    )
    planned = [Action(a.kind, a.table, a.target, a.tier, a.cutoff, a.rows, False) for a in actions[:5]]
    assert summary(planned, dry_run=True) == "would drop 2 partition(s) or chunk(s), would delete 9 row(s)"
