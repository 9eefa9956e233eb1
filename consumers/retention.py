"""Retention (D2): raw data 24 h; hourly rollups 7 days, daily 30 days, monthly 1 year, yearly forever, as
the ``retention_policies`` table says.

Plain PostgreSQL: a daily partition is dropped when its whole range ends at or before ``now - keep``; rows
older than ``now - keep`` are deleted from DEFAULT partitions and from tables that are not partitioned
(rollups, per tier by ``bucket_end``). Raw rows therefore live between 24 and 48 hours, never less.
TimescaleDB: hypertables are trimmed by their retention policies (drop_chunks), which this reports; a
hypertable without a policy gets drop_chunks here. A dry run changes nothing and lists what would go.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import psycopg
from psycopg import sql

log = logging.getLogger(__name__)

__all__ = ["Action", "apply_retention"]

ActionKind = Literal["drop_partition", "delete_rows", "drop_chunk", "policy", "skipped"]
LOCK_TIMEOUT = "5s"
"""How long a drop waits for its table lock; a dashboard query holding the table makes the drop give up
(and retry at the next run) rather than queue every insert behind it."""


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    table: str
    """The table a policy applies to (the parent of a partition or chunk)."""
    target: str
    """What was (or would be) dropped or trimmed: a partition, chunk or table name."""
    tier: str
    cutoff: datetime | None
    rows: int | None
    """Rows deleted, or that a dry run would delete; None for dropped partitions and chunks."""
    done: bool
    detail: str = ""


def apply_retention(
    conn: psycopg.Connection, now: datetime | None = None, dry_run: bool = False
) -> list[Action]:
    """Apply every retention policy of the connection's schema (its search_path) as of ``now``."""
    now = now or datetime.now(UTC)
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    mode = _mode(conn)
    if mode == "postgres" and not dry_run:
        with conn.transaction():
            conn.execute("SELECT aima_ensure_partitions(%s)", (now,))
    policies = conn.execute(
        """SELECT relation, tier, time_column, %s::timestamptz - keep AS cutoff
             FROM retention_policies WHERE keep IS NOT NULL ORDER BY relation, tier""",
        (now,),
    ).fetchall()
    hypertables = _hypertables(conn) if mode == "timescaledb" else set()
    actions: list[Action] = []
    for relation, tier, time_column, cutoff in policies:
        if relation in hypertables:
            actions += _timescale(conn, relation, cutoff, dry_run)
            continue
        partitions = _partitions(conn, relation)
        if partitions is None:
            actions.append(_delete(conn, relation, relation, tier, time_column, cutoff, dry_run))
            continue
        for name, is_default, upper in partitions:
            if is_default:
                actions.append(_delete(conn, relation, name, tier, time_column, cutoff, dry_run))
            elif upper is not None and upper <= cutoff:
                actions.append(_drop_partition(conn, relation, name, tier, cutoff, dry_run))
    for action in actions:
        if action.kind != "policy" and (action.rows or action.kind != "delete_rows"):
            log.info(
                "retention",
                extra={
                    "action": action.kind,
                    "target": action.target,
                    "rows": action.rows,
                    "done": action.done,
                },
            )
    return actions


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


def _delete(
    conn: psycopg.Connection,
    table: str,
    target: str,
    tier: str,
    time_column: str,
    cutoff: datetime,
    dry_run: bool,
) -> Action:
    condition = sql.SQL("{} < %s").format(sql.Identifier(time_column))
    params: list[object] = [cutoff]
    if tier:
        condition = sql.SQL("tier = %s AND ") + condition
        params.insert(0, tier)
    if dry_run:
        query = sql.SQL("SELECT count(*) FROM {} WHERE ").format(sql.Identifier(target)) + condition
        row = conn.execute(query, params).fetchone()
        return Action("delete_rows", table, target, tier, cutoff, int(row[0]) if row else 0, False)
    with conn.transaction():
        cursor = conn.execute(
            sql.SQL("DELETE FROM {} WHERE ").format(sql.Identifier(target)) + condition, params
        )
    return Action("delete_rows", table, target, tier, cutoff, cursor.rowcount, True)


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
        for a in apply_retention(conn, dry_run=args.dry_run):
            rows = "" if a.rows is None else f" {a.rows} rows"
            verb = "would" if args.dry_run else ("did" if a.done else "-")
            print(f"{verb:>5} {a.kind:<14} {a.target:<36} cutoff {a.cutoff}{rows} {a.detail}".rstrip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
