"""The ``audit_log`` table (A3, migrations 0005 and 0013) as it is written: one :class:`Entry` per API
request for data (``api/audit.py`` fills it) and one per change made by a command (token create and
revoke, silence add and rm: :func:`record_event`, inside the change's transaction, so that neither commits
without the other).

No entry holds a token's secret: the Authorization header is never read here, and a token pasted into a
query parameter is kept as its recognisable id prefix only (:func:`clean`)."""

from __future__ import annotations

import os
import pwd
import re
import socket
import uuid
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any, Literal, get_args

import psycopg
from psycopg.types.json import Jsonb

__all__ = ["ACTIONS", "OUTCOMES", "Action", "Entry", "Origin", "Outcome", "clean", "insert", "record_event"]

Action = Literal["read", "silence.create", "silence.expire", "token.create", "token.revoke"]
Outcome = Literal["allowed", "unauthenticated", "denied", "invalid", "failed"]
ACTIONS: tuple[str, ...] = get_args(Action)
OUTCOMES: tuple[str, ...] = get_args(Outcome)
MAX_TEXT = 500

# The token format of api/auth.py: aima_<12 hex digits of its id>_<secret>.
_TOKEN_TEXT = re.compile(r"(aima_[0-9a-f]{12}_)[A-Za-z0-9_-]+")


def clean(text: str) -> str:
    """Text fit for the table: cut to ``MAX_TEXT``; NUL and lone surrogates (which PostgreSQL's text and
    jsonb cannot hold) replaced; a token's secret replaced by ``<redacted>``."""
    cut = text[:MAX_TEXT].replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")
    return _TOKEN_TEXT.sub(r"\1<redacted>", cut)


@dataclass
class Entry:
    """One row. ``outcome`` None: the database derives it from ``status`` (``audit_outcome``)."""

    endpoint: str
    """The request's path, or for a command its name (``aima-metrics token create``)."""
    action: Action = "read"
    time: datetime = field(default_factory=lambda: datetime.now(UTC))
    method: str | None = None
    status: int | None = None
    outcome: Outcome | None = None
    reason: str | None = None
    actor: str | None = None
    target: str | None = None
    token_id: str | None = None
    role: str | None = None
    metric: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    row_count: int | None = None
    duration_ms: float | None = None
    client: str | None = None


_COLUMNS = [f.name for f in fields(Entry)]
_INSERT = "INSERT INTO audit_log ({}) VALUES ({})".format(
    ", ".join(_COLUMNS),
    ", ".join(
        "COALESCE(%(outcome)s, audit_outcome(%(status)s::integer))" if name == "outcome" else f"%({name})s"
        for name in _COLUMNS
    ),
)


def insert(conn: psycopg.Connection[Any], entry: Entry) -> None:
    values = {name: getattr(entry, name) for name in _COLUMNS}
    values["token_id"] = uuid.UUID(entry.token_id) if entry.token_id else None
    values["parameters"] = Jsonb(entry.parameters)
    conn.execute(_INSERT, values)


@dataclass(frozen=True)
class Origin:
    """Who runs a command, as its rows name them: ``actor`` in words, ``client`` the login and host."""

    actor: str
    client: str

    @classmethod
    def local(cls, by: str | None = None) -> Origin:
        """This process's user: ``cli:<by>`` (a name the caller gave, e.g. with ``--by``) or
        ``cli:<login>``; the client is ``<login>@<host>`` either way."""
        try:
            login = pwd.getpwuid(os.getuid()).pw_name
        except KeyError:  # a container's uid without a passwd entry
            login = f"uid-{os.getuid()}"
        return cls(actor=clean(f"cli:{by or login}"), client=clean(f"{login}@{socket.gethostname()}"))


def record_event(
    conn: psycopg.Connection[Any],
    action: Action,
    *,
    endpoint: str,
    origin: Origin,
    outcome: Outcome = "allowed",
    reason: str | None = None,
    target: str | None = None,
    parameters: dict[str, Any] | None = None,
) -> None:
    """The row of a change made by a command (no HTTP method or status). Call it inside the change's
    transaction: if the row cannot be written, the change is not made either."""
    insert(
        conn,
        Entry(
            endpoint=endpoint,
            action=action,
            outcome=outcome,
            reason=reason,
            actor=origin.actor,
            client=origin.client,
            target=clean(target) if target is not None else None,
            parameters={clean(k): _clean_value(v) for k, v in (parameters or {}).items()},
        ),
    )


def _clean_value(value: Any) -> Any:
    if isinstance(value, str):
        return clean(value)
    if isinstance(value, list | tuple):
        return [_clean_value(v) for v in value]
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    return value
