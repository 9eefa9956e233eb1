"""What the peers of bench/peers.py share: reading the project's Avro records, one hourly rollup
aggregate, and the result file bench/peers.py checks.

Imported by bench/peers_quix.py, which runs in its own virtual environment without the project installed,
and by bench/peers_faust.py: so it needs nothing but the standard library, fastavro and ddsketch (the
bench-peers dependency group of pyproject.toml), and never imports the project.

The job description is a JSON file bench/peers.py writes (``Job``): the topic, the writer schema the
project writes with and its single-object header, the GpuSample fields to roll up, how many records to
read, and where to write. A record is framed as the project's codec writes it without a registry
(bus/codec.py): ``C3 01`` + the schema's 8-byte CRC-64-AVRO fingerprint + the Avro body.
"""

from __future__ import annotations

import io
import json
import os
import resource
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from math import ceil, log
from pathlib import Path
from typing import Any

import fastavro
from ddsketch.mapping import LogarithmicMapping

HOUR_MS = 3_600_000
P95 = 0.95


@dataclass(frozen=True)
class Job:
    bootstrap: str
    topic: str
    group: str
    """The peer's own consumer group / application id."""
    schema_json: str
    """The writer schema exactly as the project writes GpuSamples."""
    header_hex: str
    """``C3 01`` + fingerprint of ``schema_json``: a record with another header is an error, not skipped."""
    fields: list[str]
    """The GpuSample fields to roll up (the catalogue's GPU gauges), one series per (message key, field)."""
    partitions: int
    """The topic's partitions (faust makes its table's changelog with as many)."""
    records: int
    """Stop after this many records (every record the bench published)."""
    relative_accuracy: float
    out: str
    """Result file: JSON lines, one per (key, field, hour), then a last line with ``summary``."""
    state_dir: str
    timeout_s: float

    @classmethod
    def read(cls, path: str) -> Job:
        return cls(**json.loads(Path(path).read_text()))

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)))


def isolate() -> None:
    """Take bench/ (a peer script's own directory, ``sys.path[0]``) out of ``sys.path`` once this module is
    imported: bench/streams.py and the other benches would shadow packages of the same name."""
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]


class Decoder:
    """Bytes of one record -> dict, with ``time`` as epoch milliseconds (the schema's timestamp-millis is
    read as the plain long it is on the wire, so no datetime is built for it)."""

    def __init__(self, job: Job) -> None:
        schema = json.loads(job.schema_json)
        for field in schema["fields"]:
            if field["name"] == "time" and isinstance(field["type"], dict):
                field["type"] = {k: v for k, v in field["type"].items() if k != "logicalType"}
        self.schema = fastavro.parse_schema(schema)
        self.header = bytes.fromhex(job.header_hex)

    def __call__(self, value: bytes) -> dict[str, Any]:
        if value[: len(self.header)] != self.header:
            raise ValueError(f"not a GpuSample of the project's writer schema: header {value[:10].hex()}")
        return fastavro.schemaless_reader(io.BytesIO(value[len(self.header) :]), self.schema, None)


class Rollup:
    """One series' hour: count, sum, min, max and a DDSketch (``ddsketch.LogarithmicMapping`` bins, values
    it cannot index counted as zeros), as a JSON-able list ``[count, sum, min, max, zeros, bins]`` with the
    bin keys as strings, since the peers' state stores (Quix's RocksDB, Faust's changelog) keep JSON."""

    def __init__(self, relative_accuracy: float) -> None:
        self.mapping = LogarithmicMapping(relative_accuracy)
        self._multiplier = self.mapping._multiplier
        self._min = self.mapping.min_possible

    def start(self) -> list[Any]:
        return [0, 0, None, None, 0, {}]

    def add(self, state: list[Any], x: float) -> list[Any]:
        state[0] += 1
        state[1] += x
        if state[2] is None or x < state[2]:
            state[2] = x
        if state[3] is None or x > state[3]:
            state[3] = x
        if x > self._min:
            key = str(ceil(log(x, 2) * self._multiplier))  # LogarithmicMapping.key, inlined
            bins = state[5]
            bins[key] = bins.get(key, 0) + 1
        else:
            state[4] += 1
        return state

    def result(self, state: list[Any]) -> dict[str, Any]:
        count, total, low, high, zeros, bins = state
        return {"count": count, "min": low, "max": high, "mean": total / count, "p95": self.p95(zeros, bins)}

    def p95(self, zeros: int, bins: Mapping[str, int]) -> float:
        """DDSketch's answer (``get_quantile_value``): the first bin whose running count exceeds the rank
        ``q * (n - 1)``."""
        rank = P95 * (zeros + sum(bins.values()) - 1)
        if rank < zeros:
            return 0.0
        running = zeros
        for key in sorted(bins, key=int):
            running += bins[key]
            if running > rank:
                return float(self.mapping.value(int(key)))
        raise AssertionError("the rank is below the total count")


def rollup_values(record: Mapping[str, Any], fields: Iterable[str]) -> Iterable[tuple[str, float]]:
    """The (field, value) pairs a record carries: a fast and a slow GpuSample carry different fields,
    the others null."""
    for field in fields:
        value = record.get(field)
        if value is not None:
            yield field, value


class Clock:
    """Wall and CPU seconds (this process, all threads) from the first record to the last."""

    def __init__(self) -> None:
        self.first_wall: float | None = None
        self.first_cpu = 0.0
        self.seen = 0

    @staticmethod
    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def tick(self, n: int = 1) -> int:
        if self.first_wall is None:
            self.first_wall, self.first_cpu = time.perf_counter(), self.cpu()
        self.seen += n
        return self.seen

    def summary(self, peer: str, version: str) -> dict[str, Any]:
        first = self.first_wall if self.first_wall is not None else time.perf_counter()
        return {
            "peer": peer,
            "version": version,
            "records": self.seen,
            "seconds": time.perf_counter() - first,
            "cpu_seconds": self.cpu() - self.first_cpu,
        }


def write_results(
    job: Job, rows: Iterable[tuple[str, str, int, list[Any]]], rollup: Rollup, summary: dict[str, Any]
) -> None:
    """``rows``: (key, field, hour start in epoch ms, state). Written to a temporary name and renamed, so
    bench/peers.py never reads half a file."""
    tmp = f"{job.out}.tmp"
    with open(tmp, "w") as out:
        for key, field, hour, state in rows:
            if not state[0]:
                continue  # a window that saw the key but not this field (a fast record has no slow fields)
            out.write(json.dumps({"key": key, "field": field, "hour": hour, **rollup.result(state)}) + "\n")
        out.write(json.dumps({"summary": summary}) + "\n")
    os.replace(tmp, job.out)


def watchdog(seconds: float, stop: Callable[[], None]) -> None:
    """Calls ``stop`` after ``seconds`` from a daemon thread, so a peer that never reaches its count still
    writes what it has and bench/peers.py reports the shortfall instead of hanging."""
    import threading

    timer = threading.Timer(seconds, stop)
    timer.daemon = True
    timer.start()
