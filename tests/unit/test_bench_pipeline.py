"""bench/pipeline.py's parts that decide its figures: the feed's spliced records are the codec's own
records with the new time, the lag's growth and the absorbed rate are least-squares slopes, and the
probe watcher looks for every probe still pending."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta

import fastavro

from bench.pipeline import PROBE_GIVE_UP_S, Drive, Feed, _zigzag, absorbed, due, lag_growth, slope
from bus.codec import Codec


def test_zigzag_is_avros_long_encoding() -> None:
    for value in (0, 1, -1, 63, -64, 64, 2**31, 1_796_655_720_909, -(2**40)):
        out = io.BytesIO()
        fastavro.schemaless_writer(out, "long", value)
        assert _zigzag(value) == out.getvalue()


def test_the_feed_sends_the_simulators_samples_with_the_time_spliced_in() -> None:
    codec = Codec()
    feed = Feed(codec, gpus=16)
    assert feed.gpus == 16
    seen: dict[bytes, int] = {}
    groups = set()
    for i in range(16 * 20):
        gpu, key, data, ms = feed.sample(i)
        record, value = codec.decode(data)
        assert record == "aima.metrics.GpuSample"
        assert int(value["time"].timestamp() * 1000) == ms
        assert value["gpu_uuid"] == feed.uuids[gpu] and key.endswith(value["gpu_uuid"].encode())
        assert ms > seen.get(key, 0)  # strictly later than its GPU's previous sample
        seen[key] = ms
        groups.add(value["interval_group"])
    assert groups == {"fast", "slow"}


def test_absorbed_and_lag_growth_are_least_squares_slopes() -> None:
    assert slope([(0.0, 5.0), (1.0, 7.0), (2.0, 9.0)]) == 2.0
    assert slope([(0.0, 5.0)]) == 0.0
    # Committed offsets in steps (a commit interval) still give the mean rate; the warm-up is not counted.
    samples = [(float(t), {"g": 100 * t % 300}, {"g": 1000 * t - (1000 * t) % 3000}) for t in range(31)]
    phase = Drive(rate=1000.0, seconds=30.0, measured_from=1, lag=[(0.0, {"g": 0}, {"g": 0}), *samples])
    assert abs(absorbed(phase)["g"] - 1000.0) < 50
    assert abs(lag_growth(phase)["g"]) < 300  # a sawtooth, not growth


def test_the_probe_watcher_looks_for_every_pending_probe_oldest_first() -> None:
    start = datetime(2026, 12, 7, tzinfo=UTC)
    sent = {("GPU-0", start + timedelta(milliseconds=i)): 1000.0 + i / 100 for i in range(1200)}
    seen = {key: 0.0 for key in list(sent)[:100]}
    chunks = due(sent, seen, now=1000.0 + 12.0)
    assert [len(c) for c in chunks] == [500, 500, 100]  # the 1,100 unseen, none dropped for being old
    assert chunks[0][0] == ("GPU-0", start + timedelta(milliseconds=100))  # the oldest unseen first
    # One sent longer ago than the give-up is missing, not looked for again.
    late = due(sent, seen, now=1000.0 + PROBE_GIVE_UP_S + 5.0)  # those sent before 1005.0 are given up
    assert late[0][0] == ("GPU-0", start + timedelta(milliseconds=500)) and sum(map(len, late)) == 700
