"""Retention's path for what is archived (D5): each expired UTC day is archived and then dropped in one
database transaction, so a day whose archive failed keeps its rows.

A unit is one day of one place: a daily partition (plain PostgreSQL; dropped), the rows of a DEFAULT
partition or of a table that is not partitioned (rollups of a tier; deleted), or the chunks of a hypertable
(TimescaleDB; drop_chunks). A day is expired when all of it lies before the cutoff, so deletes go by whole
days. Each unit runs at REPEATABLE READ: the rows deleted are the rows archived (a row updated meanwhile
makes the transaction fail and the next run try again); a partition is locked against writes (SHARE) from
before its rows are read until it is dropped. Hypertable chunks are not locked (that would stop every insert
into the table for the upload): a row written into a day-old chunk during its upload is lost with it.

The first failing day stops the table's run: it and the later days are held back (a warning, the metrics
aima_archive_failures_total and aima_archive_held_back_drops) and retried at the next run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import psycopg
from psycopg import sql
from psycopg.pq import TransactionStatus

from consumers.archive.archiver import Archiver
from consumers.archive.layout import day_bounds
from consumers.archive.store import ArchiveError
from consumers.retention import LOCK_TIMEOUT, Action, Policy

log = logging.getLogger(__name__)

__all__ = ["archive_then_drop", "day_floor"]


def day_floor(moment: datetime) -> datetime:
    """The start of ``moment``'s UTC day."""
    start, _ = day_bounds(moment.astimezone(UTC).date())
    return start


@dataclass(frozen=True)
class _Unit:
    day: date
    target: str
    """The partition, or the table whose rows of the day go."""
    kind: str
    """drop_partition, delete_rows or drop_chunk."""


def archive_then_drop(
    conn: psycopg.Connection,
    archiver: Archiver,
    policy: Policy,
    cutoff: datetime,
    *,
    partitions: list[tuple[str, bool, datetime | None]] | None,
    hypertable: bool,
    dry_run: bool = False,
) -> list[Action]:
    """Retention of one line of POLICIES whose rows are archived: every UTC day before ``cutoff``'s day is
    archived, then dropped. ``partitions``: (name, is DEFAULT, upper bound) of a partitioned table, else
    None."""
    horizon = day_floor(cutoff)
    units = _units(conn, policy, horizon, partitions, hypertable)
    actions: list[Action] = []
    for index, unit in enumerate(units):
        if dry_run:
            actions.append(_would(conn, policy, unit, horizon))
            continue
        try:
            actions.append(_archive_and_drop(conn, archiver, policy, unit, horizon))
        except psycopg.errors.LockNotAvailable:
            actions.append(
                Action(
                    "skipped", policy.relation, unit.target, policy.tier, horizon, None, False, "lock timeout"
                )
            )
        except ArchiveError as exc:
            held = len(units) - index
            archiver.failed(policy.relation, policy.tier, exc)
            archiver.held_back(policy.relation, policy.tier, held)
            log.warning(
                "archive failed; drop held back",
                extra={
                    "table": policy.relation,
                    "tier": policy.tier,
                    "day": unit.day.isoformat(),
                    "reason": exc.reason,
                    "code": exc.code,
                    "error": str(exc),
                    "held_back_days": held,
                },
            )
            actions += [
                Action(
                    "held_back",
                    policy.relation,
                    u.target,
                    policy.tier,
                    horizon,
                    None,
                    False,
                    f"{u.day}: {exc}",
                )
                for u in units[index:]
            ]
            return actions
    if not dry_run:
        archiver.held_back(policy.relation, policy.tier, 0)
    return actions


def _units(
    conn: psycopg.Connection,
    policy: Policy,
    horizon: datetime,
    partitions: list[tuple[str, bool, datetime | None]] | None,
    hypertable: bool,
) -> list[_Unit]:
    if partitions is None:
        kind = "drop_chunk" if hypertable else "delete_rows"
        return [_Unit(day, policy.relation, kind) for day in _days(conn, policy, policy.relation, horizon)]
    units = []
    for name, is_default, upper in partitions:
        if is_default:
            units += [_Unit(day, name, "delete_rows") for day in _days(conn, policy, name, horizon)]
        elif upper is not None and upper <= horizon:
            # Daily partitions (aima_ensure_partitions): the partition is the day before its upper bound.
            units.append(_Unit((upper.astimezone(UTC) - timedelta(days=1)).date(), name, "drop_partition"))
    return sorted(units, key=lambda u: (u.day, u.target))


def _days(conn: psycopg.Connection, policy: Policy, target: str, horizon: datetime) -> list[date]:
    condition, params = _condition(policy, horizon=horizon)
    rows = conn.execute(
        sql.SQL("SELECT DISTINCT ({} AT TIME ZONE 'UTC')::date AS day FROM {} WHERE {} ORDER BY day").format(
            sql.Identifier(policy.time_column), sql.Identifier(target), condition
        ),
        params,
    ).fetchall()
    return [day for (day,) in rows]


def _condition(
    policy: Policy, *, day: date | None = None, horizon: datetime | None = None
) -> tuple[sql.Composable, tuple[object, ...]]:
    """The rows of ``day`` (or every row before ``horizon``) that the policy governs."""
    column = sql.Identifier(policy.time_column)
    if day is not None:
        start, end = day_bounds(day)
        condition: sql.Composable = sql.SQL("{} >= %s AND {} < %s").format(column, column)
        params: tuple[object, ...] = (start, end)
    else:
        condition, params = sql.SQL("{} < %s").format(column), (horizon,)
    if policy.subset:
        condition = sql.SQL("{} = %s AND ").format(sql.Identifier(policy.subset[0])) + condition
        params = (policy.subset[1], *params)
    return condition, params


def _archive_and_drop(
    conn: psycopg.Connection, archiver: Archiver, policy: Policy, unit: _Unit, horizon: datetime
) -> Action:
    top = conn.info.transaction_status == TransactionStatus.IDLE
    target = sql.Identifier(unit.target)
    with conn.transaction():
        if top:
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(LOCK_TIMEOUT)))
        if unit.kind == "drop_partition":
            # Before the rows are read: no write may land in the partition between the dump and the drop.
            conn.execute(sql.SQL("LOCK TABLE {} IN SHARE MODE").format(target))
            condition, params = sql.SQL("TRUE"), ()
        else:
            condition, params = _condition(policy, day=unit.day)
        archived = archiver.archive_day(
            conn,
            table=policy.relation,
            tier=policy.tier,
            time_column=policy.time_column,
            day=unit.day,
            source=target,
            where=condition,
            params=params,
        )
        rows: int | None = None
        if unit.kind == "drop_partition":
            conn.execute(sql.SQL("DROP TABLE {}").format(target))
        elif unit.kind == "drop_chunk":
            _, end = day_bounds(unit.day)
            conn.execute("SELECT drop_chunks(%s::regclass, older_than => %s)", (unit.target, end))
        else:
            rows = conn.execute(sql.SQL("DELETE FROM {} WHERE ").format(target) + condition, params).rowcount
    verb = "archived" if archived.written else "already archived"
    detail = (
        f"{unit.day}: {verb} {archived.rows} row(s) {archived.url}" if archived.rows else f"{unit.day}: empty"
    )
    return Action(unit.kind, policy.relation, unit.target, policy.tier, horizon, rows, True, detail)  # type: ignore[arg-type]


def _would(conn: psycopg.Connection, policy: Policy, unit: _Unit, horizon: datetime) -> Action:
    rows = None
    if unit.kind == "delete_rows":
        condition, params = _condition(policy, day=unit.day)
        row = conn.execute(
            sql.SQL("SELECT count(*) FROM {} WHERE ").format(sql.Identifier(unit.target)) + condition, params
        ).fetchone()
        rows = int(row[0]) if row else 0
    detail = f"{unit.day}: archived first"
    return Action(unit.kind, policy.relation, unit.target, policy.tier, horizon, rows, False, detail)  # type: ignore[arg-type]
