"""The Quix Streams peer of bench/peers.py: hourly rollups (count, min, max, mean, p95) of every GPU gauge
per series, written as Quix Streams' documentation teaches (Application, a topic with a custom deserializer
and a timestamp extractor for event time, a StreamingDataFrame, ``tumbling_window(...).agg(...)`` with one
custom ``Aggregator`` per field, as its "Custom Aggregator" section shows, and ``app.run(count=...)``
to stop after the last record).

Windows are per message key (Quix groups every window by the key): the project keys a GpuSample by
``host/gpu_uuid``, one GPU, so a series is (key, field). ``.current()`` emits the window's value after
every record; the last value of each (key, hour) is the rollup written out (``.final()`` would leave each
GPU's last hour unclosed, with no later record to close it). The aggregator's ``result`` hands back its
stored state; mean and p95 are made from it once, when the file is written, not after every record.

Runs in its own virtual environment (.aima/bench-venvs/quix, made by bench/peers.py) since Quix Streams pins
its own confluent-kafka: ``python bench/peers_quix.py JOB.json``.
"""

from __future__ import annotations

import sys
from datetime import timedelta
from importlib.metadata import version
from typing import Any

import peer_rollup as common  # bench/, this script's directory, is sys.path[0]

common.isolate()

from quixstreams import Application  # noqa: E402
from quixstreams.dataframe.windows.aggregations import Aggregator  # noqa: E402
from quixstreams.models.serializers import Deserializer  # noqa: E402


class AvroGpuSample(Deserializer):
    """The project's single-object Avro -> dict (bench/peer_rollup.py's decoder)."""

    def __init__(self, decode: Any) -> None:
        super().__init__()
        self._decode = decode

    def __call__(self, value: bytes, ctx: Any) -> Any:
        return self._decode(value)


class HourRollup(Aggregator):
    """One field's count, sum, min, max and DDSketch bins over the window."""

    def __init__(self, column: str, rollup: Any) -> None:
        super().__init__(column)  # the state key carries the column (Aggregator.state_suffix)
        self._rollup = rollup

    def initialize(self) -> Any:
        return self._rollup.start()

    def agg(self, aggregated: Any, value: Any, timestamp: int) -> Any:
        x = value.get(self.column)
        return aggregated if x is None else self._rollup.add(aggregated, x)

    def result(self, aggregated: Any) -> Any:
        return aggregated


def main() -> None:
    job = common.Job.read(sys.argv[1])
    rollup = common.Rollup(job.relative_accuracy)
    clock = common.Clock()
    latest: dict[tuple[str, int], dict[str, Any]] = {}

    app = Application(
        broker_address=job.bootstrap,
        consumer_group=job.group,
        auto_offset_reset="earliest",
        state_dir=job.state_dir,
        loglevel="WARNING",
    )
    topic = app.topic(
        job.topic,
        value_deserializer=AvroGpuSample(common.Decoder(job)),
        key_deserializer="str",
        timestamp_extractor=lambda value, headers, timestamp, timestamp_type: value["time"],
    )
    sdf = app.dataframe(topic)
    sdf = (
        sdf.tumbling_window(timedelta(hours=1))
        .agg(**{field: HourRollup(field, rollup) for field in job.fields})
        .current()
    )

    def keep(value: dict[str, Any], key: str, timestamp: int, headers: Any) -> None:
        latest[(key, value["start"])] = value
        clock.tick()

    sdf.update(keep, metadata=True)
    # One output per record (.current()), so the documented stop conditions stop it after the last one,
    # or after a minute without records should some be missing.
    app.run(count=job.records, timeout=60, collect=False)
    summary = clock.summary("quixstreams", version("quixstreams"))
    rows = (
        (key, field, start, window[field])
        for (key, start), window in sorted(latest.items())
        for field in job.fields
    )
    common.write_results(job, rows, rollup, summary)


if __name__ == "__main__":
    main()
