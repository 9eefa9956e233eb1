"""Web-UI push: the alert history as a live feed for server-sent events.

The database sink writes every alert state change into ``alert_history``; a trigger there (migration
0010) announces each written row with ``pg_notify('aima_alerts', ...)``. :func:`alert_stream` LISTENs on
that channel and yields one :class:`PushEvent` per row; the API serves :func:`sse_stream` at
``GET /alerts/stream`` (``text/event-stream``). A feed starts with a ``ready`` event once it listens, and
sends a heartbeat comment every ``heartbeat_s`` so proxies keep the connection open.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

__all__ = ["CHANNEL", "PushEvent", "alert_stream", "sse_stream"]

CHANNEL = "aima_alerts"
log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PushEvent:
    id: int
    """Position in this feed (1, 2, ...); 0 for ``ready`` and heartbeats."""
    event: str
    """``ready``, ``alert`` or ``heartbeat``."""
    data: dict[str, Any] = field(default_factory=dict)
    """For ``alert``: ``{"op": "INSERT"|"UPDATE", "truncated": bool, "alert": <the alert_history row>}``."""

    def sse(self) -> str:
        """The event in the text/event-stream format; a heartbeat is a comment line."""
        if self.event == "heartbeat":
            return ": heartbeat\n\n"
        head = f"id: {self.id}\n" if self.id else ""
        data = json.dumps(self.data, separators=(",", ":"), default=str)
        return f"{head}event: {self.event}\ndata: {data}\n\n"


async def alert_stream(
    dsn: str, schema: str | None = None, *, heartbeat_s: float | None = 15.0
) -> AsyncIterator[PushEvent]:
    """Alert rows as they are written, from now on. ``schema``: the schema whose alert_history to follow
    (and whose triggers to ensure); None follows every schema of the database. Ends when the caller stops
    iterating (the connection closes with it); a lost connection raises ``psycopg.OperationalError``."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        if schema is not None:
            await conn.execute(sql.SQL("SET search_path TO {}, public").format(sql.Identifier(schema)))
        following = schema or (await (await conn.execute("SELECT current_schema()")).fetchone() or [None])[0]
        await _ensure_trigger(conn)
        await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(CHANNEL)))
        yield PushEvent(0, "ready", {"schema": following if schema else None})
        seq = 0
        while True:
            async for notify in conn.notifies(timeout=heartbeat_s):
                try:
                    payload = json.loads(notify.payload)
                except ValueError:
                    log.warning("push: a notification on %s is not JSON; skipped", CHANNEL)
                    continue
                if schema is not None and payload.get("schema") != schema:
                    continue
                seq += 1
                yield PushEvent(
                    seq,
                    "alert",
                    {
                        "op": payload.get("op", "INSERT"),
                        "truncated": bool(payload.get("truncated", False)),
                        "alert": payload.get("alert", {}),
                    },
                )
            if heartbeat_s is not None:
                yield PushEvent(0, "heartbeat")


async def sse_stream(dsn: str, schema: str | None = None, *, heartbeat_s: float = 15.0) -> AsyncIterator[str]:
    """:func:`alert_stream` as text/event-stream chunks, ready for a streaming HTTP response."""
    async for event in alert_stream(dsn, schema, heartbeat_s=heartbeat_s):
        yield event.sse()


async def _ensure_trigger(conn: psycopg.AsyncConnection[Any]) -> None:
    """alert_history may have been created after migration 0010 ran; make sure its triggers exist."""
    try:
        async with conn.transaction():
            exists = await (
                await conn.execute("SELECT to_regprocedure('aima_ensure_alert_trigger()') IS NOT NULL")
            ).fetchone()
            if exists and exists[0]:
                done = await (await conn.execute("SELECT aima_ensure_alert_trigger()")).fetchone()
                if not (done and done[0]):
                    log.warning("push: no alert_history table yet; the feed stays silent until it exists")
            else:
                log.warning("push: migration 0010 is not applied; run `aima-metrics db migrate`")
    except psycopg.Error as exc:
        log.warning("push: cannot ensure the alert_history trigger: %s", exc)
