"""The job SDK (producers/sdk): aggregation, intervals, pseudonyms, timers, lifecycle, stats.

The publisher here is a fake that checks and encodes every record exactly as the real one does before
keeping it; tests/integration/test_sdk_kafka.py runs the SDK against a real broker."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from bus import sketch
from bus.codec import Codec
from bus.settings import Settings
from bus.validation import check
from producers.sdk import JobReporter, Pseudonymiser, PseudonymKeyMissing, QueueSampler
from producers.sdk.pseudonym import load_key
from producers.sdk.timings import TimingAggregator

KEY = "test-key-0123456789abcdef"
RAW_USER = "alice.smith@example.org"
T0 = datetime(2025, 3, 14, 9, 0, tzinfo=UTC)
CODEC = Codec()


class FakePublisher:
    """Publisher's surface: publish (never blocks; False when refused), poll, flush, and its counters."""

    def __init__(self, accept: bool = True) -> None:
        self.accept = accept
        self.records: list[tuple[str, str, str, dict[str, Any], bytes]] = []
        self.delivered = self.dropped = self.invalid = self.failed = 0
        self.flushes = 0

    def publish(self, topic_key: str, key: str, record_name: str, value: dict[str, Any]) -> bool:
        check(record_name, value)
        data = CODEC.encode(record_name, value)
        if not self.accept:
            self.dropped += 1
            return False
        self.records.append((topic_key, key, record_name, value, data))
        return True

    def poll(self, timeout_s: float = 0.0) -> int:
        return 0

    def flush(self, timeout_s: float = 30.0) -> int:
        self.flushes += 1
        self.delivered = len(self.records)
        return 0

    def values(self, record_name: str) -> list[dict[str, Any]]:
        return [value for _, _, name, value, _ in self.records if name == record_name]


class Clock:
    def __init__(self, at: datetime = T0) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at

    def advance(self, seconds: float) -> None:
        self.at += timedelta(seconds=seconds)


def job(publisher: FakePublisher, **kwargs: Any) -> JobReporter:
    options: dict[str, Any] = {
        "project": "news", "user": RAW_USER, "model": "yolov8x", "queue": "default", "host": "gpu-node-1",
        "gpu_model": "NVIDIA L4", "provider": "gcp", "pricing": "spot", "interval_s": 3600.0,
        "pseudonym_key": KEY, "torch": False,
    }  # fmt: skip
    options.update(kwargs)
    return JobReporter(Settings(), "job-1", publisher=publisher, **options)


# -- aggregation ----------------------------------------------------------------------------------------


def test_aggregation_is_exact_per_series() -> None:
    clock = Clock()
    aggregator = TimingAggregator(job_id="j", project="p", model="m", host="h", clock=clock)
    for seconds in (0.5, 0.25, 0.125, 1.0):
        aggregator.observe("frame", seconds)
    aggregator.observe("data_transfer", 0.01, direction="h2d", nbytes=1000)
    aggregator.observe("data_transfer", 0.03, direction="h2d", nbytes=500)
    aggregator.observe("data_transfer", 0.02, direction="d2h", nbytes=7)
    aggregator.observe("cuda_kernel", 0.002, kernel="gemm")
    aggregator.observe("cuda_kernel", 0.004, kernel="softmax")
    clock.advance(10)
    records = {(r["kind"], r["kernel"], r["direction"]): r for r in aggregator.drain()}
    assert set(records) == {
        ("frame", None, None), ("data_transfer", None, "h2d"), ("data_transfer", None, "d2h"),
        ("cuda_kernel", "gemm", None), ("cuda_kernel", "softmax", None),
    }  # fmt: skip
    frame = records[("frame", None, None)]
    assert (frame["count"], frame["sum_seconds"], frame["min_seconds"], frame["max_seconds"]) == (
        4, 1.875, 0.125, 1.0,
    )  # fmt: skip
    assert frame["bytes"] is None
    assert (frame["interval_start"], frame["time"]) == (T0, T0 + timedelta(seconds=10))
    assert sketch.from_avro(frame["sketch"]).count == 4
    h2d = records[("data_transfer", None, "h2d")]
    assert (h2d["count"], h2d["bytes"], h2d["sum_seconds"]) == (2, 1500, pytest.approx(0.04))
    assert records[("data_transfer", None, "d2h")]["bytes"] == 7
    for record in records.values():
        check("JobTimings", record)
        CODEC.encode("JobTimings", record)
    # The next interval starts where this one ended, empty.
    assert aggregator.drain() == []
    aggregator.observe("batch", 0.2)
    clock.advance(5)
    (batch,) = aggregator.drain()
    assert batch["interval_start"] == T0 + timedelta(seconds=10)
    assert batch["time"] == T0 + timedelta(seconds=15)


@pytest.mark.parametrize(
    ("kind", "seconds", "extra"),
    [
        ("frame", -0.001, {}),
        ("frame", float("nan"), {}),
        ("nap", 1.0, {}),
        ("data_transfer", 1.0, {"direction": "up"}),
    ],
)
def test_bad_observations_raise(kind: str, seconds: float, extra: dict[str, Any]) -> None:
    metrics = job(FakePublisher())
    with pytest.raises(ValueError):
        metrics.observe(kind, seconds, **extra)
    metrics.close()


def test_observe_is_thread_safe() -> None:
    import threading

    aggregator = TimingAggregator(job_id="j", project="p")
    threads = [
        threading.Thread(target=lambda: [aggregator.observe("frame", 0.001) for _ in range(5_000)])
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    (frame,) = aggregator.drain()
    assert frame["count"] == 20_000
    assert frame["sum_seconds"] == pytest.approx(20.0)


# -- intervals ------------------------------------------------------------------------------------------


def test_background_thread_publishes_each_interval() -> None:
    publisher = FakePublisher()
    metrics = job(publisher, interval_s=0.05)
    metrics.observe("frame", 0.01)
    deadline = time.monotonic() + 5
    while not publisher.values("JobTimings") and time.monotonic() < deadline:
        time.sleep(0.01)
    (first,) = publisher.values("JobTimings")
    assert first["count"] == 1
    metrics.observe("frame", 0.02)
    metrics.observe("frame", 0.03)
    while len(publisher.values("JobTimings")) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    second = publisher.values("JobTimings")[1]
    assert second["count"] == 2
    assert second["interval_start"] == first["time"]
    metrics.close()
    assert publisher.flushes == 1
    assert all(key == "job-1" for topic, key, *_ in publisher.records)


def test_close_publishes_the_last_partial_interval() -> None:
    publisher = FakePublisher()
    metrics = job(publisher)
    with metrics.frame():
        pass
    assert publisher.values("JobTimings") == []  # the job thread itself publishes nothing
    metrics.close()
    metrics.close()  # idempotent
    assert [r["kind"] for r in publisher.values("JobTimings")] == ["frame"]


# -- timers ---------------------------------------------------------------------------------------------


def test_context_managers_and_decorators_record_their_kinds() -> None:
    publisher = FakePublisher()
    metrics = job(publisher)

    @metrics.timed("frame")
    def process(x: int) -> int:
        time.sleep(0.002)
        return x * 2

    @metrics.timed("inference")
    async def infer() -> str:
        return "done"

    assert process(21) == 42
    assert process.__name__ == "process"
    assert asyncio.run(infer()) == "done"
    with pytest.raises(RuntimeError), metrics.frame():
        raise RuntimeError("a failing frame still took time")
    with metrics.batch():
        time.sleep(0.004)
    with metrics.inference(steps=4):
        time.sleep(0.008)
    with metrics.model_load():
        pass
    with metrics.data_transfer("d2h", bytes=4096):
        pass
    with metrics.cuda_kernel("gemm"):
        pass
    metrics.observe("cuda_kernel", 0.5, kernel="gemm")
    metrics.emit()
    records = {(r["kind"], r["kernel"], r["direction"]): r for r in publisher.values("JobTimings")}
    assert records[("frame", None, None)]["count"] == 2
    assert records[("frame", None, None)]["max_seconds"] >= 0.002
    assert records[("batch", None, None)]["min_seconds"] >= 0.004
    # inference records the mean per step: about 8 ms over 4 steps.
    inference = records[("inference", None, None)]
    assert inference["count"] == 2
    assert 0.002 <= inference["max_seconds"] < 0.008
    assert records[("model_load", None, None)]["count"] == 1
    assert records[("data_transfer", None, "d2h")]["bytes"] == 4096
    assert records[("cuda_kernel", "gemm", None)]["count"] == 2
    assert records[("cuda_kernel", "gemm", None)]["max_seconds"] == 0.5
    metrics.close()


class FakeEvent:
    """torch.cuda.Event's surface; elapsed_time answers from the fake GPU's timeline (milliseconds)."""

    log: list[str] = []
    clock_ms = 0.0

    def __init__(self, enable_timing: bool = False) -> None:
        assert enable_timing
        self.at_ms: float | None = None

    def record(self) -> None:
        FakeEvent.log.append("record")
        FakeEvent.clock_ms += 2.5
        self.at_ms = FakeEvent.clock_ms

    def synchronize(self) -> None:
        FakeEvent.log.append("synchronize")

    def elapsed_time(self, end: FakeEvent) -> float:
        assert self.at_ms is not None and end.at_ms is not None
        return end.at_ms - self.at_ms


class FakeTorch:
    class cuda:  # the shape of torch.cuda
        Event = FakeEvent

        @staticmethod
        def is_available() -> bool:
            return True


def test_cuda_kernels_use_events_and_synchronise_only_at_interval_end() -> None:
    FakeEvent.log.clear()
    publisher = FakePublisher()
    metrics = job(publisher, torch=FakeTorch)
    for _ in range(3):
        with metrics.cuda_kernel("flash_attention"):
            pass
    assert "synchronize" not in FakeEvent.log  # the job thread never waits for the GPU
    metrics.emit()
    assert FakeEvent.log.count("synchronize") == 3
    (kernel,) = publisher.values("JobTimings")
    assert (kernel["kind"], kernel["kernel"], kernel["count"]) == ("cuda_kernel", "flash_attention", 3)
    assert kernel["sum_seconds"] == pytest.approx(3 * 0.0025)
    metrics.close()


# -- pseudonyms -----------------------------------------------------------------------------------------


def test_pseudonym_is_keyed_stable_and_shaped() -> None:
    first, again, other = Pseudonymiser(KEY), Pseudonymiser(KEY.encode()), Pseudonymiser(KEY + "x")
    pseudonym = first(RAW_USER)
    assert pseudonym == again(RAW_USER)
    assert pseudonym != other(RAW_USER)
    assert pseudonym != first("bob")
    assert pseudonym.startswith("u_") and len(pseudonym) == 18
    int(pseudonym[2:], 16)
    assert KEY not in repr(first)


def test_raw_user_id_never_leaves_the_process() -> None:
    publisher = FakePublisher()
    with job(publisher) as metrics:
        metrics.observe("frame", 0.01)
    assert metrics.user == Pseudonymiser(KEY)(RAW_USER)
    assert RAW_USER not in repr(vars(metrics))
    assert publisher.records
    for _, key, _, value, data in publisher.records:
        assert RAW_USER not in json.dumps(value, default=str)
        assert RAW_USER.encode() not in data
        assert RAW_USER not in key
    assert {value["user"] for value in publisher.values("JobEvent")} == {metrics.user}


def test_without_a_key_the_sdk_refuses_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIMA_PSEUDONYM_KEY", raising=False)
    monkeypatch.delenv("AIMA_PSEUDONYM_KEY_FILE", raising=False)
    publisher = FakePublisher()
    with pytest.raises(PseudonymKeyMissing, match="AIMA_PSEUDONYM_KEY"):
        job(publisher, pseudonym_key=None)
    assert publisher.records == []
    with pytest.raises(PseudonymKeyMissing, match="at least 16"):
        load_key("short")


def test_key_from_environment_or_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AIMA_PSEUDONYM_KEY", KEY)
    assert load_key() == KEY.encode()
    monkeypatch.delenv("AIMA_PSEUDONYM_KEY")
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    monkeypatch.setenv("AIMA_PSEUDONYM_KEY_FILE", str(key_file))
    assert load_key() == KEY.encode()
    monkeypatch.setenv("AIMA_PSEUDONYM_KEY_FILE", str(tmp_path / "missing"))
    with pytest.raises(PseudonymKeyMissing, match="cannot read"):
        load_key()


# -- lifecycle ------------------------------------------------------------------------------------------


def test_lifecycle_reports_queue_wait() -> None:
    publisher, clock = FakePublisher(), Clock()
    metrics = job(publisher, clock=clock)
    metrics.queued()
    clock.advance(42.5)
    metrics.started()
    metrics.observe("frame", 0.04)
    clock.advance(600)
    metrics.finished(media_minutes=12.5)
    metrics.finished()  # a second end is ignored, not raised into the job
    metrics.close()
    queued, started, finished = publisher.values("JobEvent")
    assert [e["event"] for e in (queued, started, finished)] == ["queued", "started", "finished"]
    assert queued["host"] is None and queued["time"] == T0
    assert started["queue_wait_seconds"] == 42.5 and started["host"] == "gpu-node-1"
    assert (finished["media_minutes"], finished["time"]) == (12.5, T0 + timedelta(seconds=642.5))
    assert {e["pricing"] for e in (queued, started, finished)} == {"spot"}
    # The timings up to the end go out before the end event.
    kinds = [name for _, _, name, _, _ in publisher.records]
    assert kinds == ["JobEvent", "JobEvent", "JobTimings", "JobEvent"]


def test_started_with_a_known_queue_time_and_unknown_wait() -> None:
    publisher, clock = FakePublisher(), Clock()
    metrics = job(publisher, clock=clock)
    metrics.started(queued_at=T0 - timedelta(seconds=90))
    other = job(publisher, clock=clock)
    other.started()
    metrics.close()
    other.close()
    waits = [e["queue_wait_seconds"] for e in publisher.values("JobEvent")]
    assert waits == [90.0, None]


def test_context_manager_sends_started_then_failed_and_reraises() -> None:
    publisher = FakePublisher()
    with pytest.raises(ZeroDivisionError), job(publisher) as metrics:
        metrics.observe("frame", 0.01)
        1 / 0  # noqa: B018
    events = publisher.values("JobEvent")
    assert [e["event"] for e in events] == ["started", "failed"]
    assert events[1]["error"].startswith("ZeroDivisionError")
    assert publisher.flushes == 1


def test_context_manager_sends_finished() -> None:
    publisher = FakePublisher()
    with job(publisher):
        pass
    assert [e["event"] for e in publisher.values("JobEvent")] == ["started", "finished"]


# -- when Kafka is away ---------------------------------------------------------------------------------


def test_drops_are_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    publisher = FakePublisher(accept=False)
    metrics = job(publisher)
    metrics.started()
    for _ in range(3):
        metrics.observe("frame", 0.01)
        metrics.emit()
    with caplog.at_level(logging.WARNING, logger="producers.sdk.job"):
        metrics.close()
        metrics.emit()
    stats = metrics.stats()
    assert stats["sent"] == 0
    assert stats["not_sent"] == stats["dropped"] == 4
    assert stats["delivered"] == 0 and stats["invalid"] == 0
    assert any("dropped" in record.message for record in caplog.records)


def test_a_publisher_that_raises_never_crashes_the_job() -> None:
    class Broken(FakePublisher):
        def publish(self, *args: Any) -> bool:
            raise RuntimeError("librdkafka exploded")

    metrics = job(Broken())
    metrics.started()
    with metrics.frame():
        pass
    metrics.finished()
    metrics.close()
    assert metrics.stats()["not_sent"] == 3


def test_constructor_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="pricing"):
        job(FakePublisher(), pricing="reserved")
    with pytest.raises(ValueError, match="interval_s"):
        job(FakePublisher(), interval_s=0)


# -- queue sampler --------------------------------------------------------------------------------------


def test_queue_sampler_publishes_lengths_and_survives_a_failing_source() -> None:
    publisher, lengths = FakePublisher(), iter([3, 5])

    def length() -> int:
        return next(lengths)

    sampler = QueueSampler(Settings(), "gpu-large", length, interval_s=0.02, publisher=publisher)  # type: ignore[arg-type]
    with sampler:
        deadline = time.monotonic() + 5
        while len(publisher.values("QueueSample")) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)  # the source is now exhausted and raises; the sampler keeps going
    samples = publisher.values("QueueSample")
    assert [s["length_jobs"] for s in samples] == [3, 5]
    assert {(s["queue"], s["source"]) for s in samples} == {("gpu-large", "queue")}
    assert all(key == "gpu-large" for _, key, *_ in publisher.records)
    assert sampler.sample() is None
