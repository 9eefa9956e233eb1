"""The faust-streaming peer of bench/peers.py: hourly rollups (count, min, max, mean, p95) of every GPU gauge
per series, written as faust's documentation teaches: an app, a custom codec registered for the value
serializer, a ``faust.Record`` for the value, a topic, an agent iterating ``stream.items()``, and a table of
value dicts windowed with ``Table(...).tumbling(3600, expires=...).relative_to_field(Sample.time)``, read
and written per key with ``table[key].value()`` / ``table[key] = ...``.

A series is (message key, field): the project keys a GpuSample by ``host/gpu_uuid``, one GPU; the table
is keyed by GPU, its value a dict of each field's aggregate. After the job's count of records the agent
writes the table (every (GPU, hour) window) to the result file and stops the worker with SIGTERM, as an
operator would.

Runs in the project's environment (faust-streaming is a product dependency) but imports nothing of the
project: ``python bench/peers_faust.py JOB.json``, its own app id and data directory (the job's).
"""

from __future__ import annotations

import os
import signal
import sys
import types
from datetime import timedelta
from importlib.metadata import version
from typing import Any, Optional

import peer_rollup as common  # bench/, this script's directory, is sys.path[0]

common.isolate()

import faust  # noqa: E402
from faust.serializers import codecs  # noqa: E402

job = common.Job.read(sys.argv[1])
decode = common.Decoder(job)
rollup = common.Rollup(job.relative_accuracy)
clock = common.Clock()
FIELDS = tuple(job.fields)


class AvroGpuSample(codecs.Codec):
    """The project's single-object Avro -> the fields the Record declares (faust builds the Record from
    the dict, and a Record refuses keys it does not declare)."""

    def _loads(self, s: bytes) -> Any:
        record = decode(s)
        return {"time": record["time"] / 1000, **{field: record[field] for field in FIELDS}}

    def _dumps(self, obj: Any) -> bytes:
        raise NotImplementedError("the peer only reads")


codecs.register("aima_avro", AvroGpuSample())

# A Record with one optional float per rolled-up field, declared from the job's field list (typing's
# Optional: faust reads the annotations and does not know ``float | None``).
Sample = types.new_class(
    "Sample",
    (faust.Record,),
    {"serializer": "aima_avro"},
    lambda ns: ns.update(
        {"__annotations__": {"time": float, **{field: Optional[float] for field in FIELDS}}}  # noqa: UP045
        | dict.fromkeys(FIELDS)
    ),
)

app = faust.App(
    job.group,
    broker=f"kafka://{job.bootstrap}",
    datadir=job.state_dir,
    store="memory://",
    topic_partitions=job.partitions,
    web_enabled=False,
)
topic = app.topic(job.topic, key_serializer="raw", value_type=Sample)
# faust expires windows against the wall clock, and the bench's records are from March 2026: so the
# expiry is longer than their age, else the cleaner would drop hours before the table is written out.
hours = app.Table("rollups", default=dict, partitions=job.partitions)
table = hours.tumbling(3600, expires=timedelta(days=3650)).relative_to_field(Sample.time)


@app.agent(topic)
async def rollups(stream: Any) -> None:
    async for key, sample in stream.items():
        # One table key per GPU (the message key) holding every field's aggregate, as Quix's window per key
        # holds its aggregators: one read and one write (one changelog record) per record. Keyed per
        # (GPU, field) instead, faust read 296 records/s in a first run, one write per field and record.
        states = dict(table[key.decode()].value())
        for field in FIELDS:
            x = getattr(sample, field)
            if x is not None:
                states[field] = rollup.add(states.get(field) or rollup.start(), x)
        table[key.decode()] = states
        if clock.tick() == job.records:
            finish()


def finish() -> None:
    summary = clock.summary("faust-streaming", version("faust-streaming"))
    rows = []
    for (name, (start, _end)), states in hours.data.items():
        rows += [(name, field, round(start * 1000), state) for field, state in states.items()]
    common.write_results(job, sorted(rows), rollup, summary)
    os.kill(os.getpid(), signal.SIGTERM)


def on_timeout() -> None:
    # From the watchdog thread: the file tells bench/peers.py how far it got.
    finish()


if __name__ == "__main__":
    common.watchdog(job.timeout_s, on_timeout)
    sys.argv = [sys.argv[0], "worker", "--loglevel=warn", "--without-web"]
    app.main()
