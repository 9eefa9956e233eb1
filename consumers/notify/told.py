"""What was told where: the notification log in PostgreSQL, and this process's own memory of it.

A notification is owed once per alert state (fingerprint, status, starts_at) and receiver channel. The
deliverer asks both before sending: the log knows what earlier processes told; the memory (:class:`Told`)
knows what this process told but could not log yet (PostgreSQL away), and which deliveries are in progress
on other threads, so that a record read again (a rebalance, a replayed batch) is never sent twice by the
process that sent it.

Rows of the log: ``sending`` (an intent, written before the first attempt: the notification may have
reached the receiver), then ``delivered`` or ``dead_lettered`` once settled.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Collection, Iterable
from datetime import datetime

import psycopg
from psycopg_pool import ConnectionPool

from consumers.notify.model import Alert, Notification

__all__ = ["SENDING", "SETTLED", "Key", "LogUnavailable", "NotificationLog", "Scoped", "Told", "key_of"]

log = logging.getLogger(__name__)

Key = tuple[str, str, datetime]
"""(fingerprint, status, starts_at): one state of one alert episode."""
Scoped = tuple[str, str, str, str, datetime]
"""(receiver, channel, fingerprint, status, starts_at): one state told on one receiver channel."""

SENDING = "sending"
SETTLED = frozenset({"delivered", "dead_lettered"})
"""Outcomes after which the state is never sent again on that channel (repeats aside)."""


def key_of(alert: Alert, status: str | None = None) -> Key:
    return (alert.fingerprint, status or alert.status, alert.starts_at)


class LogUnavailable(Exception):
    """The notification log could not be read or written (PostgreSQL away, the pool exhausted)."""


class NotificationLog:
    """The ``notification_log`` table: one row per (fingerprint, status, starts_at, channel, receiver).
    Every call raises :class:`LogUnavailable` when the database does not answer; the caller decides
    whether to wait."""

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool
        self._intents = True

    def lookup(self, receiver: str, channel: str, keys: Collection[Key]) -> dict[Key, str]:
        """The logged outcome of each of ``keys`` on the channel (absent: never attempted)."""
        if not keys:
            return {}
        try:
            with self._pool.connection() as conn:
                rows = conn.execute(
                    """SELECT l.fingerprint, l.status, l.starts_at, l.outcome
                         FROM notification_log l
                         JOIN unnest(%s::text[], %s::text[], %s::timestamptz[])
                              AS k(fingerprint, status, starts_at)
                           ON (l.fingerprint, l.status, l.starts_at) = (k.fingerprint, k.status, k.starts_at)
                        WHERE l.channel = %s AND l.receiver = %s""",
                    ([k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys], channel, receiver),
                ).fetchall()
        except psycopg.Error as exc:  # the pool's PoolTimeout is an OperationalError
            raise LogUnavailable(f"notification log lookup: {exc}") from exc
        return {(f, s, t): outcome for f, s, t, outcome in rows}

    def intend(self, notification: Notification, at: datetime) -> None:
        """Intent rows before the first attempt, so that a successor of a process killed between the
        receiver's answer and :meth:`record` knows the notification may have arrived. A row already
        there (settled, or an earlier intent) is left as it is."""
        if not self._intents:
            return
        rows = [
            (a.fingerprint, a.status, a.starts_at, notification.channel, notification.receiver,
             notification.group_key, SENDING, at)
            for a in notification.alerts
        ]  # fmt: skip
        try:
            with self._pool.connection() as conn, conn.cursor() as cur:
                cur.executemany(
                    """INSERT INTO notification_log (fingerprint, status, starts_at, channel, receiver,
                           group_key, outcome, updated_at)
                       VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
                       ON CONFLICT (fingerprint, status, starts_at, channel, receiver) DO NOTHING""",
                    rows,
                )
        except psycopg.errors.CheckViolation as exc:
            # A database without migration 0011: deliveries go on, without intents.
            self._intents = False
            log.error("the notification log takes no intent rows (migration 0011 missing): %s", exc)
        except psycopg.Error as exc:
            raise LogUnavailable(f"notification log intent: {exc}") from exc

    def record(
        self,
        notification: Notification,
        *,
        outcome: str,
        attempts: int,
        reason: str | None,
        delivered_at: datetime | None,
        at: datetime,
    ) -> None:
        rows = [
            (a.fingerprint, a.status, a.starts_at, notification.channel, notification.receiver,
             notification.group_key, delivered_at, attempts, outcome, reason, at)
            for a in notification.alerts
        ]  # fmt: skip
        try:
            with self._pool.connection() as conn, conn.cursor() as cur:
                cur.executemany(
                    """INSERT INTO notification_log (fingerprint, status, starts_at, channel, receiver,
                           group_key, delivered_at, attempts, outcome, reason, updated_at)
                       VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
                       ON CONFLICT (fingerprint, status, starts_at, channel, receiver) DO UPDATE SET
                           group_key = EXCLUDED.group_key,
                           delivered_at = COALESCE(EXCLUDED.delivered_at, notification_log.delivered_at),
                           attempts = notification_log.attempts + EXCLUDED.attempts,
                           outcome = EXCLUDED.outcome,
                           reason = EXCLUDED.reason,
                           updated_at = EXCLUDED.updated_at""",
                    rows,
                )
        except psycopg.Error as exc:
            raise LogUnavailable(f"notification log write: {exc}") from exc


class Told:
    """This process's memory of what it told, and of the deliveries in progress. Thread-safe.

    An entry told but not yet logged is kept until :meth:`logged`; logged ones are kept too, the newest
    ``keep`` of them, so that a record read again while the database is away needs no lookup."""

    def __init__(self, keep: int = 100_000) -> None:
        self._cond = threading.Condition()
        self._unlogged: dict[Scoped, str] = {}
        self._recent: OrderedDict[Scoped, str] = OrderedDict()
        self._claimed: set[Scoped] = set()
        self._keep = keep

    def claim(self, keys: Collection[Scoped], stop: threading.Event) -> bool:
        """Hold ``keys`` against deliveries of them on other threads, waiting while one holds any of
        them; False when ``stop`` is set first. Each claim is released with :meth:`release`."""
        with self._cond:
            while not self._claimed.isdisjoint(keys):
                if stop.is_set():
                    return False
                self._cond.wait(0.2)
            self._claimed.update(keys)
            return True

    def release(self, keys: Iterable[Scoped]) -> None:
        with self._cond:
            self._claimed.difference_update(keys)
            self._cond.notify_all()

    def outcomes(self, keys: Iterable[Scoped]) -> dict[Scoped, str]:
        with self._cond:
            found = {}
            for key in keys:
                outcome = self._unlogged.get(key) or self._recent.get(key)
                if outcome is not None:
                    found[key] = outcome
            return found

    def remember(self, keys: Iterable[Scoped], outcome: str) -> None:
        """Told (delivered or dead-lettered), not logged yet."""
        with self._cond:
            for key in keys:
                self._unlogged[key] = outcome

    def logged(self, keys: Iterable[Scoped]) -> None:
        with self._cond:
            for key in keys:
                outcome = self._unlogged.pop(key, None)
                if outcome is not None:
                    self._recent[key] = outcome
                    self._recent.move_to_end(key)
            while len(self._recent) > self._keep:
                self._recent.popitem(last=False)

    def unlogged(self) -> int:
        with self._cond:
            return len(self._unlogged)
