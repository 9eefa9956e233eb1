"""Where archived rows live in the bucket, and the manifest that says what a day holds (pure: no I/O).

One unit per (table, rollup tier, UTC day of the time column retention goes by)::

    <prefix>/<table>/[tier=<tier>/]day=<YYYY-MM-DD>/part-<uuid>.parquet
    <prefix>/<table>/[tier=<tier>/]day=<YYYY-MM-DD>/manifest.json

The manifest is written after its part(s), so it is the commit point: a part no manifest names (a run that
died between the two writes) is ignored by `archive list` and `archive restore`. When a day is archived
again (rows that arrived late, rows restored and expired again), its rows are merged into one new part and
the manifest is replaced; the old part is deleted afterwards.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

__all__ = ["MANIFEST", "Column", "DayKey", "Manifest", "Part", "day_bounds", "parse_manifest_key"]

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_MANIFEST_KEY = re.compile(
    r"^(?:(?P<prefix>.*)/)?(?P<table>[a-z_][a-z0-9_]*)/(?:tier=(?P<tier>[a-z]+)/)?"
    r"day=(?P<day>\d{4}-\d{2}-\d{2})/" + re.escape(MANIFEST) + "$"
)


def day_bounds(day: date) -> tuple[datetime, datetime]:
    """The UTC day as [start, end)."""
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    return start, start + timedelta(days=1)


@dataclass(frozen=True, order=True)
class DayKey:
    """One archived unit: a table's (a rollup tier's) rows of one UTC day."""

    table: str
    tier: str
    day: date
    prefix: str = ""

    def folder(self) -> str:
        parts = [self.prefix.strip("/")] if self.prefix.strip("/") else []
        parts.append(self.table)
        if self.tier:
            parts.append(f"tier={self.tier}")
        parts.append(f"day={self.day.isoformat()}")
        return "/".join(parts)

    def manifest_key(self) -> str:
        return f"{self.folder()}/{MANIFEST}"

    def part_key(self, part_id: str) -> str:
        return f"{self.folder()}/part-{part_id}.parquet"

    @staticmethod
    def table_prefix(prefix: str, table: str, tier: str = "") -> str:
        """The key prefix under which every day of ``table`` (of ``tier``) lies, for a listing."""
        head = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
        return f"{head}{table}/" + (f"tier={tier}/" if tier else "")


def parse_manifest_key(key: str) -> DayKey | None:
    """The unit a manifest's key names; None for any other key (a part, a foreign object)."""
    match = _MANIFEST_KEY.match(key)
    if match is None:
        return None
    return DayKey(
        match["table"], match["tier"] or "", date.fromisoformat(match["day"]), match["prefix"] or ""
    )


@dataclass(frozen=True)
class Column:
    name: str
    pg_type: str
    """As format_type() writes it (``timestamp with time zone``, ``text[]``, ``jsonb``): restore creates and
    checks against it."""


@dataclass(frozen=True)
class Part:
    key: str
    rows: int
    bytes: int
    sha256: str
    """Of the object's bytes; restore checks it."""


@dataclass(frozen=True)
class Manifest:
    table: str
    tier: str
    day: date
    time_column: str
    rows: int
    min_time: datetime | None
    max_time: datetime | None
    columns: tuple[Column, ...]
    parts: tuple[Part, ...]
    archived_at: datetime
    key_columns: tuple[str, ...] = ()
    """The natural key of the table: merging a day archived again keeps one row per key."""
    source: str = ""
    """The schema the rows came from."""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        body = asdict(self)
        body.update(
            format="parquet",
            compression="zstd",
            version=FORMAT_VERSION,
            day=self.day.isoformat(),
            min_time=_iso(self.min_time),
            max_time=_iso(self.max_time),
            archived_at=_iso(self.archived_at),
        )
        return json.dumps(body, indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        body = json.loads(data)
        if body.get("version") != FORMAT_VERSION:
            raise ValueError(f"manifest version {body.get('version')!r} is not {FORMAT_VERSION}")
        return cls(
            table=body["table"],
            tier=body["tier"],
            day=date.fromisoformat(body["day"]),
            time_column=body["time_column"],
            rows=int(body["rows"]),
            min_time=_time(body["min_time"]),
            max_time=_time(body["max_time"]),
            columns=tuple(Column(**c) for c in body["columns"]),
            parts=tuple(Part(**p) for p in body["parts"]),
            archived_at=_time(body["archived_at"]) or datetime.now(UTC),
            key_columns=tuple(body.get("key_columns", ())),
            source=body.get("source", ""),
            extra=body.get("extra", {}),
        )

    @property
    def bytes(self) -> int:
        return sum(p.bytes for p in self.parts)


def _iso(moment: datetime | None) -> str | None:
    return moment.astimezone(UTC).isoformat() if moment is not None else None


def _time(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None
