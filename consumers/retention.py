"""Retention (D2, K2): how long every table keeps its rows. :data:`POLICIES` is the retention table, the one
place that says which rows of which table each period governs; the periods are
:class:`consumers.settings.RetentionSettings` (AIMA_RETENTION_*: raw 24 h; hourly rollups 7 days, daily 30
days, monthly 1 year, yearly forever; costs, budgets, alerts, anomalies, dead letters, the notification
log, the audit log and ended silences as documented there). The running sink applies it on a schedule
(AIMA_SINK_RETENTION_EVERY_S), `aima-metrics db retention` on demand.

Plain PostgreSQL: a daily partition is dropped when its whole range ends at or before ``now - keep``; rows
older than ``now - keep`` are deleted from DEFAULT partitions and from tables that are not partitioned
(rollups per tier by ``bucket_end``, costs per kind by ``period_end``, ...). Raw rows therefore live
between 24 and 48 hours, never less.
TimescaleDB: hypertables are trimmed by their retention policies (drop_chunks) and rollups by the
aima_rollup_retention job, which this reports; a hypertable without a policy gets drop_chunks here. The
scheduled run (``scheduled=True``) leaves whatever TimescaleDB trims alone, so the two never race.
A dry run changes nothing and lists what would go.

With the archive on (D5, AIMA_ARCHIVE_*), the raw tables and rollup tiers it names go another way
(consumers/archive/drop.py): each UTC day that has wholly expired is archived to the S3 store and then
dropped (partition), deleted (rows) or dropped (chunks) in one transaction, so such rows go by whole days,
and a day whose archive fails keeps its rows until a later run archives it. In TimescaleDB mode the
retention policies of those hypertables and the rollup job are switched off first, so that TimescaleDB
never drops what is not archived.

The ``retention_policies`` table keeps, for the SQL side (aima_ensure_partitions, the TimescaleDB rollup
job), the periods of the raw tables and rollup tiers; each run writes the configured ones into it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Literal

import psycopg
from psycopg import sql

from consumers.settings import RAW_TABLES, ArchiveSettings, RetentionSettings

if TYPE_CHECKING:
    from consumers.archive.archiver import Archiver
    from consumers.archive.metrics import ArchiveMetrics

log = logging.getLogger(__name__)

__all__ = ["KEPT_FOREVER", "POLICIES", "RAW_TABLES", "Action", "Policy", "apply_retention", "summary"]

ActionKind = Literal["drop_partition", "delete_rows", "drop_chunk", "policy", "skipped", "held_back"]
LOCK_TIMEOUT = "5s"
"""How long a drop waits for its table lock; a dashboard query holding the table makes the drop give up
(and retry at the next run) rather than queue every insert behind it."""


_EPISODE_UNRESOLVED = """NOT EXISTS (SELECT 1 FROM alert_history r
                        WHERE r.fingerprint = t.fingerprint AND r.starts_at = t.starts_at
                          AND r.status = 'resolved')"""


@dataclass(frozen=True)
class Policy:
    """One line of the retention table: the rows of ``relation`` (those whose ``subset`` column holds the
    given value, when set) older than the period of ``setting`` by ``time_column`` expire."""

    relation: str
    time_column: str
    setting: str
    """The field of RetentionSettings that holds the period."""
    subset: tuple[str, str] | None = None
    """(column, value): the rows this line governs (a rollup tier, a cost kind); None: every row."""
    unless: str = ""
    """SQL over the row (alias t) that keeps an expired row, e.g. the firing row of an unresolved alert."""

    @property
    def tier(self) -> str:
        """The subset's value ('' for a whole table), as retention_policies and Action name it."""
        return self.subset[1] if self.subset else ""


POLICIES: tuple[Policy, ...] = (
    *(Policy(table, "time", "raw") for table in RAW_TABLES),
    *(Policy("rollups", "bucket_end", tier, ("tier", tier)) for tier in ("hour", "day", "month", "year")),
    Policy("costs", "period_end", "costs", ("kind", "gpu_hours")),
    Policy("costs", "period_end", "costs", ("kind", "job_cost")),
    Policy("job_placements", "time", "costs"),
    Policy("costs", "period_end", "budgets", ("kind", "budget")),
    Policy("gpu_energy", "period_end", "energy"),
    Policy(
        "alert_history",
        "event_time",
        "alert_history",
        unless=f"t.status = 'firing' AND {_EPISODE_UNRESOLVED}",
    ),
    Policy("anomalies", "time", "anomalies"),
    Policy("dead_letters", "time", "dead_letters"),
    Policy(
        "notification_log",
        "updated_at",
        "notification_log",
        unless=f"""EXISTS (SELECT 1 FROM alert_history a
                            WHERE a.fingerprint = t.fingerprint AND a.starts_at = t.starts_at
                              AND a.status = 'firing')
                   AND {_EPISODE_UNRESOLVED}""",
    ),
    Policy("audit_log", "time", "audit_log"),
    Policy("silences", "ends_at", "silences"),
)
"""The retention table: every table of the schema is here or in :data:`KEPT_FOREVER`."""

KEPT_FOREVER = {
    "api_tokens": "credentials' state: a token is revoked or expires by its own expires_at, never deleted",
    "retention_policies": "this table's copy for the SQL side",
    "reader_relations": "what the dashboards' read-only roles may read (migration 0012)",
    "schema_migrations": "the migrations applied",
}
"""Tables no retention touches, and why."""


def _periods(settings: RetentionSettings) -> list[tuple[Policy, timedelta | None]]:
    return [(policy, getattr(settings, policy.setting)) for policy in POLICIES]


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    table: str
    """The table a policy applies to (the parent of a partition or chunk)."""
    target: str
    """What was (or would be) dropped or trimmed: a partition, chunk or table name."""
    tier: str
    """The policy's subset: a rollup tier, a cost kind; '' for a whole table."""
    cutoff: datetime | None
    rows: int | None
    """Rows deleted, or that a dry run would delete; None for dropped partitions and chunks."""
    done: bool
    detail: str = ""


def apply_retention(
    conn: psycopg.Connection,
    now: datetime | None = None,
    dry_run: bool = False,
    *,
    settings: RetentionSettings | None = None,
    scheduled: bool = False,
    archive: ArchiveSettings | None = None,
    archive_metrics: ArchiveMetrics | None = None,
) -> list[Action]:
    """Apply every line of :data:`POLICIES` in the connection's schema (its search_path) as of ``now``, with
    the periods of ``settings`` (default: the environment's). ``scheduled``: the sink's run, which leaves
    the tables TimescaleDB's own policies and jobs trim to them. ``archive`` (default: the environment's
    AIMA_ARCHIVE_*): when on, what it names is archived before it is dropped (consumers/archive/drop.py),
    and nothing whose archive failed is dropped."""
    now = now or datetime.now(UTC)
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    periods = _periods(settings or RetentionSettings())
    mode = _mode(conn)
    if not dry_run:
        _record(conn, periods)
    if mode == "postgres" and not dry_run:
        with conn.transaction():
            conn.execute("SELECT aima_ensure_partitions(%s)", (now,))
    hypertables = _hypertables(conn) if mode == "timescaledb" else set()
    archive = archive if archive is not None else ArchiveSettings()
    archiver = _archiver(archive, archive_metrics)
    archived = {
        (p.relation, p.tier)
        for p, keep in periods
        if keep is not None and archive.archived(p.relation, p.tier)
    }
    if mode == "timescaledb" and archived and not dry_run:
        _take_over_from_timescale(conn, {relation for relation, _ in archived}, hypertables)
    left_to_timescale = set()
    if mode == "timescaledb" and scheduled:
        left_to_timescale = _trimmed_by_timescale(conn, hypertables)
    actions: list[Action] = []
    for policy, keep in periods:
        if keep is None or policy.relation in left_to_timescale:
            continue
        cutoff = now - keep
        if archiver is not None and (policy.relation, policy.tier) in archived:
            from consumers.archive.drop import archive_then_drop

            hypertable = policy.relation in hypertables
            actions += archive_then_drop(
                conn,
                archiver,
                policy,
                cutoff,
                partitions=None if hypertable else _partitions(conn, policy.relation),
                hypertable=hypertable,
                dry_run=dry_run,
            )
            continue
        if policy.relation in hypertables:
            actions += _timescale(conn, policy.relation, cutoff, dry_run)
            continue
        partitions = _partitions(conn, policy.relation)
        if partitions is None:
            actions.append(_delete(conn, policy, policy.relation, cutoff, dry_run))
            continue
        for name, is_default, upper in partitions:
            if is_default:
                actions.append(_delete(conn, policy, name, cutoff, dry_run))
            elif upper is not None and upper <= cutoff:
                actions.append(_drop_partition(conn, policy.relation, name, policy.tier, cutoff, dry_run))
    for action in actions:
        if action.kind != "policy" and (action.rows or action.kind != "delete_rows"):
            log.info(
                "retention",
                extra={
                    "action": action.kind,
                    "target": action.target,
                    "tier": action.tier,
                    "rows": action.rows,
                    "done": action.done,
                },
            )
    return actions


def summary(actions: list[Action], dry_run: bool = False) -> str:
    """What a run dropped and deleted (or would): partitions and chunks dropped, rows deleted. Policy lines
    (TimescaleDB's own jobs) and skipped drops are not counted."""
    dropped = sum(1 for a in actions if a.kind in ("drop_partition", "drop_chunk") and (a.done or dry_run))
    deleted = sum(a.rows or 0 for a in actions if a.kind == "delete_rows" and (a.done or dry_run))
    skipped = sum(1 for a in actions if a.kind == "skipped")
    held = sum(1 for a in actions if a.kind == "held_back")
    if not dropped and not deleted:
        text = "nothing has expired"
    else:
        verb = ("would drop", "would delete") if dry_run else ("dropped", "deleted")
        text = f"{verb[0]} {dropped} partition(s) or chunk(s), {verb[1]} {deleted} row(s)"
    if skipped:
        text += f"; {skipped} drop(s) skipped (lock timeout), retried at the next run"
    if held:
        text += f"; {held} drop(s) held back (their archive failed), retried at the next run"
    return text


def _record(conn: psycopg.Connection, periods: list[tuple[Policy, timedelta | None]]) -> None:
    """Write the configured periods into retention_policies for the lines it holds (raw tables, rollup
    tiers), which aima_ensure_partitions and the TimescaleDB rollup job read."""
    with conn.transaction():
        for policy, keep in periods:
            conn.execute(
                "UPDATE retention_policies SET keep = %s WHERE relation = %s AND tier = %s "
                "AND keep IS DISTINCT FROM %s::interval",
                (keep, policy.relation, policy.tier, keep),
            )


def _archiver(archive: ArchiveSettings, metrics: ArchiveMetrics | None) -> Archiver | None:
    if not archive.enabled:
        return None
    from consumers.archive.archiver import Archiver
    from consumers.archive.store import open_store

    return Archiver(open_store(archive), metrics)


def _take_over_from_timescale(conn: psycopg.Connection, archived: set[str], hypertables: set[str]) -> None:
    """With the archive on, TimescaleDB must not drop what is archived first: the retention policies of
    archived hypertables are removed and the rollup retention job paused, and this module archives and
    drops those rows itself (then also when the archive is turned off again: a hypertable without a
    policy gets drop_chunks here, and a paused job leaves the rollups to this module). What TimescaleDB
    dropped before the first such run (its jobs' first runs come seconds after the migration) was not
    archived. Tested when the database has TimescaleDB (tests/integration/test_archive.py); CI runs plain
    PostgreSQL."""
    with conn.transaction():
        for table in sorted(archived & hypertables):
            conn.execute("SELECT remove_retention_policy(%s::regclass, if_exists => true)", (table,))
        if "rollups" in archived:
            conn.execute(
                """SELECT alter_job(job_id, scheduled => false) FROM timescaledb_information.jobs
                    WHERE proc_name = 'aima_rollup_retention' AND proc_schema = current_schema()
                      AND scheduled"""
            )


def _trimmed_by_timescale(conn: psycopg.Connection, hypertables: set[str]) -> set[str]:
    """The relations a TimescaleDB job of this schema trims: hypertables with a retention policy, and
    rollups when the aima_rollup_retention job exists."""
    rows = conn.execute(
        """SELECT hypertable_name FROM timescaledb_information.jobs
            WHERE proc_name = 'policy_retention' AND hypertable_schema = current_schema()"""
    ).fetchall()
    trimmed = {name for (name,) in rows} & hypertables
    if conn.execute(
        """SELECT 1 FROM timescaledb_information.jobs
            WHERE proc_name = 'aima_rollup_retention' AND proc_schema = current_schema() AND scheduled"""
    ).fetchone():
        trimmed.add("rollups")
    return trimmed


def _mode(conn: psycopg.Connection) -> str:
    """The mode this schema was migrated in (schema_migrations records it)."""
    row = conn.execute("SELECT mode FROM schema_migrations ORDER BY version DESC LIMIT 1").fetchone()
    if row is None:
        raise RuntimeError("the schema is not migrated (schema_migrations is empty)")
    return str(row[0])


def _hypertables(conn: psycopg.Connection) -> set[str]:
    rows = conn.execute(
        """SELECT hypertable_name FROM timescaledb_information.hypertables
            WHERE hypertable_schema = current_schema()"""
    ).fetchall()
    return {name for (name,) in rows}


def _partitions(conn: psycopg.Connection, relation: str) -> list[tuple[str, bool, datetime | None]] | None:
    """(name, is DEFAULT, upper bound) of each partition, or None when the table is not partitioned."""
    partitioned = conn.execute(
        """SELECT 1 FROM pg_partitioned_table
            WHERE partrelid = to_regclass(format('%%I.%%I', current_schema(), %s::text))""",
        (relation,),
    ).fetchone()
    if not partitioned:
        return None
    # The bound reads FROM ('<lower>') TO ('<upper>') in the session's time zone, offset included.
    rows = conn.execute(
        """SELECT c.relname,
                  pg_get_expr(c.relpartbound, c.oid) = 'DEFAULT',
                  (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'TO \\(''([^'']+)''\\)'))[1]::timestamptz
             FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
            WHERE i.inhparent = to_regclass(format('%%I.%%I', current_schema(), %s::text))
            ORDER BY c.relname""",
        (relation,),
    ).fetchall()
    return [(name, bool(is_default), upper) for name, is_default, upper in rows]


def _drop_partition(
    conn: psycopg.Connection, table: str, partition: str, tier: str, cutoff: datetime, dry_run: bool
) -> Action:
    if not dry_run:
        try:
            with conn.transaction():
                conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(LOCK_TIMEOUT)))
                conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(partition)))
        except psycopg.errors.LockNotAvailable:
            return Action("skipped", table, partition, tier, cutoff, None, False, "lock timeout")
    return Action("drop_partition", table, partition, tier, cutoff, None, not dry_run)


def _delete(conn: psycopg.Connection, policy: Policy, target: str, cutoff: datetime, dry_run: bool) -> Action:
    condition = sql.SQL("{} < %s").format(sql.Identifier(policy.time_column))
    params: list[object] = [cutoff]
    if policy.subset:
        condition = sql.SQL("{} = %s AND ").format(sql.Identifier(policy.subset[0])) + condition
        params.insert(0, policy.subset[1])
    if policy.unless:
        # A constant of POLICIES, never user input.
        condition += sql.SQL(" AND NOT (") + sql.SQL(policy.unless) + sql.SQL(")")  # type: ignore[arg-type]
    target_sql = sql.SQL("{} AS t WHERE ").format(sql.Identifier(target))
    if dry_run:
        row = conn.execute(sql.SQL("SELECT count(*) FROM ") + target_sql + condition, params).fetchone()
        would = int(row[0]) if row else 0
        return Action("delete_rows", policy.relation, target, policy.tier, cutoff, would, False)
    with conn.transaction():
        cursor = conn.execute(sql.SQL("DELETE FROM ") + target_sql + condition, params)
    return Action("delete_rows", policy.relation, target, policy.tier, cutoff, cursor.rowcount, True)


def _timescale(conn: psycopg.Connection, table: str, cutoff: datetime, dry_run: bool) -> list[Action]:
    policy = conn.execute(
        """SELECT config->>'drop_after', schedule_interval::text FROM timescaledb_information.jobs
            WHERE proc_name = 'policy_retention' AND hypertable_schema = current_schema()
              AND hypertable_name = %s""",
        (table,),
    ).fetchone()
    actions: list[Action] = []
    if policy is not None:
        detail = f"retention policy: drop_after {policy[0]}, every {policy[1]}"
        actions.append(Action("policy", table, table, "", cutoff, None, False, detail))
    if dry_run or policy is None:
        query = "SELECT show_chunks(%s::regclass, older_than => %s)::text"
        if not dry_run:
            query = "SELECT drop_chunks(%s::regclass, older_than => %s)::text"
        with conn.transaction():
            chunks = [name for (name,) in conn.execute(query, (table, cutoff)).fetchall()]
        actions += [Action("drop_chunk", table, c, "", cutoff, None, not dry_run) for c in chunks]
    return actions


def main(argv: list[str] | None = None) -> int:
    """``python -m consumers.retention [--dry-run] [--schema S]``: apply retention once and list it."""
    import argparse

    from bus.settings import Settings

    parser = argparse.ArgumentParser(description="Apply the retention policies (D2) once.")
    parser.add_argument("--dry-run", action="store_true", help="change nothing; list what would go")
    parser.add_argument("--schema", help="schema to work in (default: the database's search_path)")
    args = parser.parse_args(argv)
    with psycopg.connect(Settings().database_dsn(), autocommit=True) as conn:
        if args.schema:
            conn.execute(sql.SQL("SET search_path TO {}, public").format(sql.Identifier(args.schema)))
        actions = apply_retention(conn, dry_run=args.dry_run)
        for a in actions:
            rows = "" if a.rows is None else f" {a.rows} rows"
            verb = "would" if args.dry_run else ("did" if a.done else "-")
            print(f"{verb:>5} {a.kind:<14} {a.target:<36} cutoff {a.cutoff}{rows} {a.detail}".rstrip())
        print(summary(actions, args.dry_run))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
