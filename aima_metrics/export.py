"""Exports of stored metrics (D4): the samples of one catalogue metric over a time range, read from its view
(``consumers/migrations/*_metric_views.sql``), written as JSON or CSV, or pushed to a Prometheus
remote-write endpoint.

Remote write is version 1.0 of the protocol: a protobuf ``prometheus.WriteRequest`` (TimeSeries of Labels
and Samples, ``prompb/remote.proto`` and ``types.proto``), snappy block-compressed, POSTed with
``Content-Encoding: snappy``, ``Content-Type: application/x-protobuf`` and
``X-Prometheus-Remote-Write-Version: 0.1.0``. The three messages are encoded here by hand (a dozen lines
of protobuf wire format) rather than through generated code. Series are named as the GPU exporter names
them: ``aima_`` + the catalogue name, ``_total`` for counters.

Prometheus takes a sample only if it is newer than the newest it holds for that series, and (without an
out-of-order window, ``storage.tsdb.out_of_order_time_window``) only within about the last hour of its
head block; it answers 400 otherwise, which is reported as RemoteWriteError and never retried. So remote
write suits recent ranges, sent once; older history belongs in the JSON/CSV exports or the archive.

Time ranges are half-open, ``start <= time < end``; times are UTC.
"""

from __future__ import annotations

import csv
import json
import math
import re
import struct
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import IO, Any

import cramjam
import httpx
import psycopg
from psycopg import sql

from bus.catalogue import Metric, UnknownMetric
from bus.catalogue import get as get_metric
from bus.settings import Settings
from producers.gpu.exporter import PREFIX

__all__ = [
    "FORMATS",
    "ExportError",
    "ExportRow",
    "RemoteWriteError",
    "encode_write_request",
    "export_command",
    "export_rows",
    "parse_labels",
    "parse_time",
    "prometheus_name",
    "remote_write",
    "write_csv",
    "write_json",
]

FORMATS = ("json", "csv", "remote-write")
REMOTE_WRITE_HEADERS = {
    "Content-Encoding": "snappy",
    "Content-Type": "application/x-protobuf",
    "X-Prometheus-Remote-Write-Version": "0.1.0",
    "User-Agent": "aima-metrics-export",
}


class ExportError(ValueError):
    """A request the export cannot serve (unknown metric or label, bad range or format); the message says
    what to change."""


class RemoteWriteError(RuntimeError):
    """The remote-write endpoint refused a request or stayed unreachable."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class ExportRow:
    time: datetime
    """UTC."""
    metric: str
    value: float
    labels: dict[str, str]
    """The metric's labels that have a value in this row (a null label is left out)."""


# -- reading ---------------------------------------------------------------------------------------------


def _metric(name: str) -> Metric:
    try:
        return get_metric(name)
    except UnknownMetric as exc:
        raise ExportError(str(exc)) from None


def _check_range(start: datetime, end: datetime) -> None:
    for name, moment in (("start", start), ("end", end)):
        if moment.tzinfo is None:
            raise ExportError(f"{name} {moment.isoformat()} has no time zone; give UTC times")
    if start >= end:
        raise ExportError(f"empty range: start {start.isoformat()} is not before end {end.isoformat()}")


def _check_labels(metric: Metric, labels: Mapping[str, str]) -> None:
    unknown = sorted(set(labels) - set(metric.labels))
    if unknown:
        raise ExportError(
            f"{metric.name} has no label {', '.join(unknown)}; its labels: {', '.join(metric.labels)}"
        )


def export_rows(
    conn: psycopg.Connection,
    metric: str,
    start: datetime,
    end: datetime,
    labels: Mapping[str, str] | None = None,
) -> Iterator[ExportRow]:
    """The metric's samples with ``start <= time < end`` whose labels equal ``labels``, ordered by time,
    then labels. Streams from the server: the connection is busy until the iterator is exhausted."""
    entry = _metric(metric)
    _check_range(start, end)
    wanted = dict(labels or {})
    _check_labels(entry, wanted)
    columns = [sql.Identifier(label) for label in entry.labels]
    conditions = [sql.SQL("time >= %s"), sql.SQL("time < %s")]
    params: list[Any] = [start, end]
    for label, value in wanted.items():
        conditions.append(sql.SQL("{} = %s").format(sql.Identifier(label)))
        params.append(value)
    query = sql.SQL("SELECT time, value{} FROM {} WHERE {} ORDER BY time{}").format(
        sql.SQL("").join(sql.SQL(", {}").format(c) for c in columns),
        sql.Identifier(entry.name),
        sql.SQL(" AND ").join(conditions),
        sql.SQL("").join(sql.SQL(", {} NULLS FIRST").format(c) for c in columns),
    )
    with conn.cursor() as cursor:
        for row in cursor.stream(query, params):
            found = {k: str(v) for k, v in zip(entry.labels, row[2:], strict=True) if v is not None}
            yield ExportRow(row[0].astimezone(UTC), entry.name, float(row[1]), found)


# -- files -----------------------------------------------------------------------------------------------


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _number(value: float) -> float | str:
    """JSON has no NaN or infinity: those become Prometheus' spellings, as strings."""
    if math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else ("+Inf" if value > 0 else "-Inf")


def write_json(rows: Iterable[ExportRow], out: IO[str]) -> int:
    """A JSON array of ``{"time", "metric", "value", "labels"}`` objects, written as the rows come;
    returns how many."""
    count = 0
    out.write("[")
    for row in rows:
        item = {"time": _iso(row.time), "metric": row.metric, "value": _number(row.value)}
        item["labels"] = row.labels
        out.write(("\n  " if count == 0 else ",\n  ") + json.dumps(item, ensure_ascii=False))
        count += 1
    out.write("\n]\n" if count else "]\n")
    return count


def write_csv(rows: Iterable[ExportRow], out: IO[str], labels: Sequence[str] | None = None) -> int:
    """CSV with the header ``time,metric,value,<label>...``; a label without a value is an empty field.
    ``labels`` defaults to the catalogue labels of the first row's metric. Returns the row count."""
    writer = csv.writer(out, lineterminator="\n")
    iterator = iter(rows)
    first = next(iterator, None)
    if labels is None:
        labels = _metric(first.metric).labels if first is not None else ()
    writer.writerow(["time", "metric", "value", *labels])
    if first is None:
        return 0
    count = 0
    for row in _chain(first, iterator):
        values = [row.labels.get(label, "") for label in labels]
        writer.writerow([_iso(row.time), row.metric, repr(row.value), *values])
        count += 1
    return count


def _chain(first: ExportRow, rest: Iterator[ExportRow]) -> Iterator[ExportRow]:
    yield first
    yield from rest


# -- Prometheus remote write -------------------------------------------------------------------------------


def prometheus_name(metric: Metric) -> str:
    """The series name in Prometheus, as the GPU exporter exposes it."""
    name = f"{PREFIX}{metric.name}"
    return f"{name}_total" if metric.type == "counter" else name


def _varint(number: int) -> bytes:
    if number < 0:  # int64 two's complement: always ten bytes
        number += 1 << 64
    out = bytearray()
    while True:
        low = number & 0x7F
        number >>= 7
        if number:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _field(tag: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2); every tag used here fits one byte."""
    return bytes((tag,)) + _varint(len(payload)) + payload


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MILLISECOND = timedelta(milliseconds=1)

# Field tags (field number << 3 | wire type) of prompb: WriteRequest.timeseries = 1, TimeSeries.labels = 1,
# TimeSeries.samples = 2, Label.name = 1, Label.value = 2 (all length-delimited); Sample.value = 1 (double,
# 64-bit), Sample.timestamp = 2 (int64 varint, milliseconds).
_TAG_1_LEN, _TAG_2_LEN, _TAG_1_DOUBLE, _TAG_2_VARINT = 0x0A, 0x12, 0x09, 0x10


def encode_write_request(
    series: Iterable[tuple[Sequence[tuple[str, str]], Sequence[tuple[int, float]]]],
) -> bytes:
    """A serialized ``prometheus.WriteRequest``: for each series its labels (name, value), which must be
    sorted by name and include ``__name__``, and its samples (timestamp ms, value) in time order."""
    body = bytearray()
    for labels, samples in series:
        message = bytearray()
        for name, value in labels:
            label = _field(_TAG_1_LEN, name.encode()) + _field(_TAG_2_LEN, value.encode())
            message += _field(_TAG_1_LEN, label)
        for timestamp_ms, value in samples:
            sample = bytes((_TAG_1_DOUBLE,)) + struct.pack("<d", value) + bytes((_TAG_2_VARINT,))
            message += _field(_TAG_2_LEN, sample + _varint(timestamp_ms))
        body += _field(_TAG_1_LEN, bytes(message))
    return bytes(body)


def _series(
    rows: Iterable[ExportRow], metric: Metric, extra_labels: Mapping[str, str]
) -> tuple[dict[tuple[tuple[str, str], ...], dict[int, float]], int]:
    """Samples grouped by label set; within a series one sample per millisecond (the later row wins, as
    Prometheus keeps one value per timestamp). Also returns how many rows were read."""
    name = prometheus_name(metric)
    grouped: dict[tuple[tuple[str, str], ...], dict[int, float]] = {}
    count = 0
    for row in rows:
        labels = {**extra_labels, **{k: v for k, v in row.labels.items() if v != ""}, "__name__": name}
        key = tuple(sorted(labels.items()))
        timestamp_ms = (row.time - _EPOCH) // _MILLISECOND
        grouped.setdefault(key, {})[timestamp_ms] = row.value
        count += 1
    return grouped, count


def _batches(
    grouped: Mapping[tuple[tuple[str, str], ...], Mapping[int, float]], max_samples: int
) -> Iterator[list[tuple[Sequence[tuple[str, str]], list[tuple[int, float]]]]]:
    """Requests of at most ``max_samples`` samples; a long series is split across consecutive requests,
    its samples staying in time order."""
    batch: list[tuple[Sequence[tuple[str, str]], list[tuple[int, float]]]] = []
    size = 0
    for labels, samples in grouped.items():
        ordered = sorted(samples.items())
        while ordered:
            room = max_samples - size
            part, ordered = ordered[:room], ordered[room:]
            batch.append((labels, part))
            size += len(part)
            if size >= max_samples:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


def _post(client: httpx.Client, endpoint: str, body: bytes, max_retries: int, backoff_s: float) -> None:
    """One request; 5xx, 429 and transport errors are retried with exponential backoff, any other non-2xx
    answer means the data itself was refused (remote write 1.0: do not retry)."""
    for attempt in range(max_retries + 1):
        try:
            response = client.post(endpoint, content=body, headers=REMOTE_WRITE_HEADERS)
        except httpx.TransportError as exc:
            if attempt == max_retries:
                raise RemoteWriteError(f"remote write to {endpoint} failed: {exc!r}") from exc
        else:
            if response.is_success:
                return
            status, text = response.status_code, response.text.strip()[:500]
            if status < 500 and status != 429:
                raise RemoteWriteError(f"remote write to {endpoint} refused ({status}): {text}", status)
            if attempt == max_retries:
                raise RemoteWriteError(
                    f"remote write to {endpoint} failed ({status}) after {attempt + 1} tries: {text}", status
                )
        time.sleep(backoff_s * 2**attempt)


def remote_write(
    endpoint: str,
    rows: Iterable[ExportRow],
    metric: str,
    *,
    client: httpx.Client | None = None,
    extra_labels: Mapping[str, str] | None = None,
    max_samples_per_request: int = 10_000,
    timeout_s: float = 30.0,
    max_retries: int = 3,
    backoff_s: float = 0.5,
) -> int:
    """Send the rows of ``metric`` to a remote-write endpoint (e.g. Prometheus'
    ``http://host:9090/api/v1/write`` with ``--web.enable-remote-write-receiver``). Returns the number
    of samples sent. ``extra_labels`` are added to every series (a row's own labels win)."""
    entry = _metric(metric)
    if max_samples_per_request < 1:
        raise ExportError("max_samples_per_request must be at least 1")
    grouped, _ = _series(rows, entry, extra_labels or {})
    owned = client is None
    client = client or httpx.Client(timeout=timeout_s)
    sent = 0
    try:
        for batch in _batches(grouped, max_samples_per_request):
            body = bytes(cramjam.snappy.compress_raw(encode_write_request(batch)))
            _post(client, endpoint, body, max_retries, backoff_s)
            sent += sum(len(samples) for _, samples in batch)
    finally:
        if owned:
            client.close()
    return sent


# -- command -----------------------------------------------------------------------------------------------


def parse_labels(text: str | None) -> dict[str, str]:
    """``k=v,k2=v2`` as a dict; every part must be exactly one ``name=value`` with a non-empty name."""
    found: dict[str, str] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        pieces = part.split("=")
        if len(pieces) != 2 or not pieces[0].strip():
            raise ExportError(f"label filter {part!r} is not name=value (use k=v,k2=v2)")
        name, value = pieces[0].strip(), pieces[1].strip()
        if name in found:
            raise ExportError(f"label {name!r} is given twice")
        found[name] = value
    return found


_RELATIVE = re.compile(r"now(?:-(\d+)([smhdw]))?")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """An ISO 8601 time with a zone (``2026-12-01T10:00:00Z``), or ``now`` / ``now-<n><s|m|h|d|w>``."""
    text = text.strip()
    if match := _RELATIVE.fullmatch(text):
        moment = now or datetime.now(UTC)
        if match[1]:
            moment -= timedelta(**{_UNITS[match[2]]: int(match[1])})
        return moment
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ExportError(f"{text!r} is not a time: use ISO 8601 with a zone, or now-1h") from None
    if moment.tzinfo is None:
        raise ExportError(f"{text!r} has no time zone; add Z for UTC")
    return moment.astimezone(UTC)


class _Counted:
    def __init__(self, rows: Iterable[ExportRow]) -> None:
        self._rows = rows
        self.count = 0

    def __iter__(self) -> Iterator[ExportRow]:
        for row in self._rows:
            self.count += 1
            yield row


def export_command(
    settings: Settings,
    metric: str,
    start: datetime,
    end: datetime,
    fmt: str,
    labels: Mapping[str, str] | str | None = None,
    endpoint: str | None = None,
    out: IO[str] | None = None,
) -> int:
    """``aima-metrics export``: reads the metric from the database of ``settings`` and writes it as
    ``json`` or ``csv`` to ``out`` (default stdout), or sends it to ``endpoint`` by ``remote-write``.
    Returns the number of rows exported. Raises ExportError for a bad request, RemoteWriteError when
    the endpoint refuses."""
    fmt = fmt.strip().lower().replace("_", "-")
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    entry = _metric(metric)
    wanted = parse_labels(labels) if isinstance(labels, str) or labels is None else dict(labels)
    _check_labels(entry, wanted)
    _check_range(start, end)
    if fmt == "remote-write" and not endpoint:
        raise ExportError("remote-write needs an endpoint, e.g. http://prometheus:9090/api/v1/write")
    with psycopg.connect(settings.database_dsn(), application_name="aima-export") as conn:
        rows = _Counted(export_rows(conn, entry.name, start, end, wanted))
        if fmt == "json":
            write_json(rows, out or sys.stdout)
        elif fmt == "csv":
            write_csv(rows, out or sys.stdout, entry.labels)
        else:
            assert endpoint is not None
            remote_write(endpoint, rows, entry.name)
    return rows.count
