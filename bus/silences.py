"""Silences: label matchers that mute matching alerts for a while. Stored in the ``silences`` table (migration
0010), created and listed through the command line and the API, read by the notifier before every
notification: all three call the functions here, so a silence is checked, stored and matched one way. A
silence is pending before ``starts_at``, active until ``ends_at``, then expired; deleting one expires it,
so the record of who muted what stays.

Every function takes an open psycopg connection whose search_path reaches the table; each runs in its own
transaction (or savepoint)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import psycopg
from psycopg.rows import dict_row

from bus.matchers import InvalidMatcher, Matcher, matchers_of, matches_all

__all__ = [
    "InvalidSilence",
    "Silence",
    "active_silences",
    "create_silence",
    "delete_silence",
    "get_silence",
    "list_silences",
    "silenced_by",
]

State = Literal["pending", "active", "expired"]
_COLUMNS = "id, matchers, starts_at, ends_at, created_by, comment, created_at"


class InvalidSilence(ValueError):
    """A silence that cannot be stored: no matchers, a bad matcher, an end before its start, a bad id."""


@dataclass(frozen=True)
class Silence:
    id: str
    matchers: tuple[Matcher, ...]
    starts_at: datetime
    ends_at: datetime
    created_by: str
    comment: str
    created_at: datetime

    def state(self, now: datetime | None = None) -> State:
        now = now or datetime.now(UTC)
        if now < self.starts_at:
            return "pending"
        return "active" if now < self.ends_at else "expired"

    def active(self, now: datetime) -> bool:
        return self.starts_at <= now < self.ends_at

    def matches(self, labels: Mapping[str, str]) -> bool:
        return matches_all(self.matchers, labels)

    def to_json(self, now: datetime | None = None) -> dict[str, Any]:
        """The API's representation."""
        return {
            "id": self.id,
            "matchers": [m.to_json() for m in self.matchers],
            "starts_at": self.starts_at.astimezone(UTC).isoformat(),
            "ends_at": self.ends_at.astimezone(UTC).isoformat(),
            "created_by": self.created_by,
            "comment": self.comment,
            "created_at": self.created_at.astimezone(UTC).isoformat(),
            "state": self.state(now),
        }


def create_silence(
    conn: psycopg.Connection,
    matchers: Iterable[Matcher | Mapping[str, Any] | str],
    *,
    created_by: str,
    comment: str = "",
    starts_at: datetime | None = None,
    ends_at: datetime | None = None,
    duration: timedelta | None = None,
    now: datetime | None = None,
) -> Silence:
    """Store a silence. ``matchers``: ``Matcher`` objects, ``{"name", "op", "value"}`` mappings or texts
    such as ``"host=~gpu-.*"`` or ``'{host="a", gpu="0"}'``. The end is ``ends_at`` or ``starts_at +
    duration`` (one of them is required); ``starts_at`` defaults to now. Times must be tz-aware."""
    now = now or datetime.now(UTC)
    try:
        parsed = matchers_of(matchers)
    except InvalidMatcher as exc:
        raise InvalidSilence(f"matchers: {exc}") from None
    if not parsed:
        raise InvalidSilence("matchers: a silence needs at least one matcher")
    if all(m.matches({}) for m in parsed):
        raise InvalidSilence(
            "matchers: they all match an alert without those labels, so would mute every alert"
        )
    if not created_by.strip():
        raise InvalidSilence("created_by is required")
    start = _aware(starts_at) if starts_at is not None else now
    if (ends_at is None) == (duration is None):
        raise InvalidSilence("ends_at/duration: give exactly one of them")
    try:
        end = _aware(ends_at) if ends_at is not None else start + duration  # type: ignore[operator]
    except OverflowError:
        raise InvalidSilence("duration: the silence would end outside the range of times") from None
    if end <= start:
        raise InvalidSilence(f"ends_at {end.isoformat()} is not after starts_at {start.isoformat()}")
    if end <= now:
        raise InvalidSilence(f"ends_at {end.isoformat()} has already passed")
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            f"""INSERT INTO silences (matchers, starts_at, ends_at, created_by, comment)
                VALUES (%s, %s, %s, %s, %s) RETURNING {_COLUMNS}""",
            (json.dumps([m.to_json() for m in parsed]), start, end, created_by, comment),
        )
        row = cur.fetchone()
    assert row is not None
    return _silence(row)


def list_silences(
    conn: psycopg.Connection,
    *,
    state: State | None = None,
    now: datetime | None = None,
    limit: int | None = None,
) -> list[Silence]:
    """Every silence (newest first), or only those in ``state``; at most ``limit``."""
    now = now or datetime.now(UTC)
    where, params = {
        None: ("TRUE", ()),
        "pending": ("starts_at > %s", (now,)),
        "active": ("starts_at <= %s AND ends_at > %s", (now, now)),
        "expired": ("ends_at <= %s", (now,)),
    }[state]
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            f"SELECT {_COLUMNS} FROM silences WHERE {where} ORDER BY created_at DESC, id LIMIT %s",
            (*params, limit),
        )
        return [_silence(row) for row in cur.fetchall()]


def active_silences(conn: psycopg.Connection, now: datetime | None = None) -> list[Silence]:
    return list_silences(conn, state="active", now=now)


def get_silence(conn: psycopg.Connection, silence_id: str) -> Silence | None:
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        cur.execute(f"SELECT {_COLUMNS} FROM silences WHERE id = %s", (_uuid(silence_id),))
        row = cur.fetchone()
    return _silence(row) if row else None


def delete_silence(conn: psycopg.Connection, silence_id: str, *, now: datetime | None = None) -> bool:
    """Expire a silence now (a pending one ends before it began). False when no such silence is still
    pending or active."""
    now = now or datetime.now(UTC)
    with conn.transaction():
        cur = conn.execute(
            """UPDATE silences SET ends_at = %s, starts_at = LEAST(starts_at, %s)
               WHERE id = %s AND ends_at > %s""",
            (now, now, _uuid(silence_id), now),
        )
        return cur.rowcount > 0


def silenced_by(
    silences: Sequence[Silence], labels: Mapping[str, str], now: datetime | None = None
) -> Silence | None:
    """The first active silence that mutes an alert with these labels."""
    now = now or datetime.now(UTC)
    for silence in silences:
        if silence.active(now) and silence.matches(labels):
            return silence
    return None


def _silence(row: Mapping[str, Any]) -> Silence:
    raw = row["matchers"]
    return Silence(
        id=str(row["id"]),
        matchers=matchers_of(json.loads(raw) if isinstance(raw, str) else raw),
        starts_at=row["starts_at"],
        ends_at=row["ends_at"],
        created_by=row["created_by"],
        comment=row["comment"],
        created_at=row["created_at"],
    )


def _uuid(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(str(value))
    except ValueError:
        raise InvalidSilence(f"{value!r} is not a silence id (a UUID)") from None


def _aware(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise InvalidSilence(f"{moment.isoformat()} has no time zone; give UTC or an offset")
    return moment
