"""The alert processor: the state machine in event time, replays, the no-data policy and ratio rules."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator, MutableMapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from bus.codec import Codec
from streams.alerts.processor import (
    AlertProcessor,
    JobOutcomeForwarder,
    alert_processors,
    alert_processors_from_settings,
)
from streams.alerts.rules import default_rules, parse_rules
from streams.alerts.settings import AlertSettings
from streams.runtime.findings import fingerprint
from streams.runtime.processor import Input, Output, PartitionBatch

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
GPU = "aima.metrics.GpuSample"
JOB = "aima.metrics.JobEvent"
LABELS_A = {"host": "a", "gpu": "0", "gpu_uuid": "GPU-a0", "gpu_model": "NVIDIA H100"}


class Recorder(MutableMapping[str, Any]):
    """A state mapping that counts writes per key, as a Faust table's changelog would."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.writes: dict[str, int] = {}

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.writes[key] = self.writes.get(key, 0) + 1
        self.data[key] = value

    def __delitem__(self, key: str) -> None:
        del self.data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)


class Feed:
    """Builds partition batches with increasing offsets and runs them through a processor."""

    def __init__(self, processor: Any, topic: str = "gpu.samples") -> None:
        self.processor, self.topic = processor, topic
        self.state = Recorder()
        self.offset = 0
        self.watermark: datetime | None = None
        self.batches: list[PartitionBatch] = []

    def batch(self, *records: tuple[str, dict[str, Any]]) -> PartitionBatch:
        inputs = []
        for record_name, value in records:
            inputs.append(Input(self.topic, 0, self.offset, record_name, value, value["time"]))
            self.offset += 1
        previous = self.watermark
        self.watermark = max([value["time"] for _, value in records] + ([previous] if previous else []))
        batch = PartitionBatch(self.topic, 0, inputs, self.watermark, previous)
        self.batches.append(batch)
        return batch

    def run(self, *records: tuple[str, dict[str, Any]]) -> list[Output]:
        return self.apply(self.batch(*records))

    def apply(self, batch: PartitionBatch) -> list[Output]:
        self.state.writes.clear()
        result = self.processor.process(batch, self.state)
        assert all(count == 1 for count in self.state.writes.values()), self.state.writes
        json.dumps(self.state.data)  # the state must be JSON-serialisable
        for output in result.outputs:
            Codec().encode(output.record_name, output.value)  # fits the Avro contract
        return result.outputs


def gpu(at: timedelta, host: str = "a", **metrics: float) -> tuple[str, dict[str, Any]]:
    return GPU, {
        "time": T0 + at,
        "host": host,
        "gpu": 0,
        "gpu_uuid": f"GPU-{host}0",
        "gpu_model": "NVIDIA H100",
        "mig_instance": None,
        "source": "test",
        "interval_group": "fast",
        **metrics,
    }


JOB_IDS = itertools.count()


def job(at: timedelta, event: str, job_id: str | None = None) -> tuple[str, dict[str, Any]]:
    return JOB, {
        "time": T0 + at,
        "job_id": job_id or f"job{next(JOB_IDS)}",
        "event": event,
        "project": "p",
        "gpu_count": 1,
        "source": "test",
    }


def s(seconds: float) -> timedelta:
    return timedelta(seconds=seconds)


def m(minutes: float) -> timedelta:
    return timedelta(minutes=minutes)


def one_rule(text: str) -> AlertProcessor:
    return AlertProcessor(parse_rules(text))


def statuses(outputs: list[Output]) -> list[tuple[str, str]]:
    return [(out.value["rule"], out.value["status"]) for out in outputs]


# -- for: 0, firing and resolved ---------------------------------------------------------------------------


def test_temperature_fires_on_the_first_sample_and_resolves_with_ends_at() -> None:
    feed = Feed(AlertProcessor(default_rules()))
    (firing,) = feed.run(gpu(s(0), temperature_celsius=90.0))
    fp = fingerprint("GpuTemperatureHigh", LABELS_A)
    assert (firing.topic_key, firing.key, firing.record_name) == ("alerts", fp, "aima.metrics.AlertEvent")
    assert firing.value == {
        "fingerprint": fp,
        "rule": "GpuTemperatureHigh",
        "status": "firing",
        "severity": "critical",
        "starts_at": T0,
        "ends_at": None,
        "event_time": T0,
        "value": 90.0,
        "labels": LABELS_A,
        "annotations": {
            "summary": "GPU 0 on a at 90 °C",
            "description": "gpu_temperature_celsius of NVIDIA H100 GPU-a0 on a is 90 °C, above 85 °C. "
            "Expect thermal throttling; check cooling.",
        },
        "channels": ["webhook"],
        "source": "stream",
    }
    assert feed.run(gpu(s(30), temperature_celsius=91.0)) == []
    (resolved,) = feed.run(gpu(s(60), temperature_celsius=80.0), gpu(s(90), temperature_celsius=70.0))
    assert resolved.key == fp
    assert {k: resolved.value[k] for k in ("status", "starts_at", "ends_at", "event_time", "value")} == {
        "status": "resolved",
        "starts_at": T0,
        "ends_at": T0 + s(60),
        "event_time": T0 + s(60),
        "value": 80.0,
    }
    assert resolved.value["annotations"]["summary"] == "GPU 0 on a at 80 °C"


def test_an_inactive_series_costs_no_state_write() -> None:
    feed = Feed(AlertProcessor(default_rules()))
    assert feed.run(gpu(s(0), temperature_celsius=60.0, utilization_percent=50.0)) == []
    assert feed.state.data == {}


def test_each_series_alerts_on_its_own() -> None:
    feed = Feed(AlertProcessor(default_rules()))
    outputs = feed.run(gpu(s(0), "a", temperature_celsius=90.0), gpu(s(0), "b", temperature_celsius=95.0))
    assert [out.value["labels"]["host"] for out in outputs] == ["a", "b"]
    assert outputs[0].key != outputs[1].key
    assert feed.run(gpu(s(10), "b", temperature_celsius=50.0))[0].value["labels"]["host"] == "b"


# -- for: 10m ----------------------------------------------------------------------------------------------


def test_for_10m_is_pending_then_fires_exactly_when_event_time_passes() -> None:
    feed = Feed(AlertProcessor(default_rules()))
    for at in (s(0), m(5), m(9) + s(59)):
        assert feed.run(gpu(at, utilization_percent=96.0)) == []
    fp = fingerprint("GpuUtilizationHigh", LABELS_A)
    assert feed.state.data[f"GpuUtilizationHigh/{fp}"]["status"] == "pending"
    (firing,) = feed.run(gpu(m(10), utilization_percent=97.0))
    assert firing.value["status"] == "firing"
    assert (firing.value["starts_at"], firing.value["event_time"]) == (T0, T0 + m(10))
    assert firing.value["annotations"]["summary"] == "GPU 0 on a busy above 95 % for 10 minutes"


def test_a_false_sample_while_pending_starts_the_wait_again() -> None:
    feed = Feed(AlertProcessor(default_rules()))
    assert feed.run(gpu(s(0), utilization_percent=96.0), gpu(m(5), utilization_percent=90.0)) == []
    assert feed.run(gpu(m(6), utilization_percent=96.0), gpu(m(12), utilization_percent=96.0)) == []
    (firing,) = feed.run(gpu(m(16), utilization_percent=96.0))
    assert firing.value["starts_at"] == T0 + m(6)


def test_queue_backlog_for_30m() -> None:
    feed = Feed(AlertProcessor(default_rules()), topic="queue.samples")

    def queue(at: timedelta, length: int) -> tuple[str, dict[str, Any]]:
        return "aima.metrics.QueueSample", {
            "time": T0 + at,
            "queue": "q1",
            "length_jobs": length,
            "source": "t",
        }

    assert feed.run(queue(s(0), 21), queue(m(29), 25)) == []
    (firing,) = feed.run(queue(m(30), 30))
    assert firing.value["labels"] == {"queue": "q1"}
    assert firing.value["annotations"]["summary"] == "Queue q1 holds 30 jobs"


def test_keep_firing_for() -> None:
    feed = Feed(
        one_rule(
            "- {name: Hot, metric: gpu_temperature_celsius, condition: gt, threshold: 85, severity: info,"
            " keep_firing_for: 2m}"
        )
    )
    assert statuses(feed.run(gpu(s(0), temperature_celsius=90.0))) == [("Hot", "firing")]
    assert feed.run(gpu(m(1), temperature_celsius=80.0)) == []  # cleared at 1m
    assert feed.run(gpu(m(2), temperature_celsius=90.0)) == []  # back: still the same firing alert
    assert feed.run(gpu(m(3), temperature_celsius=80.0), gpu(m(4) + s(59), temperature_celsius=80.0)) == []
    (resolved,) = feed.run(gpu(m(5), temperature_celsius=80.0))
    assert (resolved.value["status"], resolved.value["starts_at"], resolved.value["ends_at"]) == (
        "resolved",
        T0,
        T0 + m(5),
    )


def test_matchers_and_rule_labels() -> None:
    feed = Feed(
        one_rule(
            "- {name: Hot, metric: gpu_temperature_celsius, condition: ge, threshold: 85, severity: info,"
            " match: ['host=~\"a|b\"'], labels: {team: ml}}"
        )
    )
    assert feed.run(gpu(s(0), "c", temperature_celsius=99.0)) == []
    (firing,) = feed.run(gpu(s(0), "b", temperature_celsius=85.0))
    assert firing.value["labels"] == {
        "host": "b",
        "gpu": "0",
        "gpu_uuid": "GPU-b0",
        "gpu_model": "NVIDIA H100",
        "team": "ml",
    }
    assert firing.key == fingerprint("Hot", firing.value["labels"])


def test_a_sample_older_than_the_last_is_ignored() -> None:
    feed = Feed(AlertProcessor(default_rules()))
    assert len(feed.run(gpu(m(1), temperature_celsius=90.0))) == 1
    assert feed.run(gpu(s(0), temperature_celsius=50.0)) == []  # late: describes the past
    assert len(feed.run(gpu(m(2), temperature_celsius=50.0))) == 1


# -- replays and restarts ----------------------------------------------------------------------------------


def test_replaying_the_same_batches_emits_nothing_new() -> None:
    feed = Feed(AlertProcessor(default_rules()))
    first = feed.batch(gpu(s(0), temperature_celsius=90.0, utilization_percent=99.0))
    second = feed.batch(gpu(m(10), temperature_celsius=80.0, utilization_percent=99.0))
    assert statuses(feed.apply(first)) == [("GpuTemperatureHigh", "firing")]
    assert statuses(feed.apply(second)) == [
        ("GpuUtilizationHigh", "firing"),
        ("GpuTemperatureHigh", "resolved"),
    ]
    assert feed.apply(first) == []
    assert feed.apply(second) == []


def test_a_restart_neither_fires_twice_nor_forgets_a_firing_alert() -> None:
    feed = Feed(AlertProcessor(default_rules()))
    batch = feed.batch(gpu(s(0), temperature_celsius=90.0))
    assert len(feed.apply(batch)) == 1
    # A new worker: a fresh processor and the state restored from the changelog (JSON).
    restarted = Feed(AlertProcessor(default_rules()))
    restarted.state.data = json.loads(json.dumps(feed.state.data))
    restarted.offset, restarted.watermark = feed.offset, None
    assert restarted.apply(batch) == []  # re-delivered after the crash
    assert restarted.run(gpu(s(30), temperature_celsius=92.0)) == []
    assert statuses(restarted.run(gpu(s(60), temperature_celsius=60.0))) == [
        ("GpuTemperatureHigh", "resolved")
    ]


def test_a_resumed_partition_sends_again_what_is_not_committed() -> None:
    feed = Feed(AlertProcessor(default_rules()))
    fire = feed.batch(gpu(s(0), temperature_celsius=90.0))
    resolve = feed.batch(gpu(s(30), temperature_celsius=50.0))
    assert statuses(feed.apply(fire) + feed.apply(resolve)) == [
        ("GpuTemperatureHigh", "firing"),
        ("GpuTemperatureHigh", "resolved"),
    ]
    # Crash: offset 1 was never committed, so the resolved event may be lost; offset 0 is committed.
    replay = replace(resolve, resumed=True, committed_offset=1)
    (again,) = feed.apply(replay)
    assert (again.value["status"], again.value["ends_at"]) == ("resolved", T0 + s(30))
    # Nothing committed at all: both go out again, in order, once each.
    replay = replace(fire, resumed=True, committed_offset=None)
    assert statuses(feed.apply(replay)) == [
        ("GpuTemperatureHigh", "firing"),
        ("GpuTemperatureHigh", "resolved"),
    ]
    # Everything committed: a rebalance sends nothing again.
    assert feed.apply(replace(resolve, resumed=True, committed_offset=2)) == []


def test_refuses_a_topic_it_does_not_consume() -> None:
    processor = AlertProcessor(default_rules())
    assert processor.topics == ("gpu.samples", "queue.samples", "streams.job-outcomes")
    with pytest.raises(ValueError, match=re.escape("does not consume 'k8s.pods'")):
        processor.process(PartitionBatch("k8s.pods", 0, [], T0, None), {})


# -- no data -----------------------------------------------------------------------------------------------


def test_no_data_resolve_ends_a_silent_firing_alert_when_the_watermark_passes() -> None:
    feed = Feed(
        one_rule(
            "- {name: Hot, metric: gpu_temperature_celsius, condition: gt, threshold: 85, severity: info,"
            " no_data: resolve, no_data_after: 5m}"
        )
    )
    assert len(feed.run(gpu(s(0), "a", temperature_celsius=90.0))) == 1
    assert feed.run(gpu(m(4) + s(59), "b", temperature_celsius=50.0)) == []
    (resolved,) = feed.run(gpu(m(6), "b", temperature_celsius=50.0))
    assert resolved.value["labels"]["host"] == "a"
    assert (resolved.value["status"], resolved.value["ends_at"], resolved.value["event_time"]) == (
        "resolved",
        T0 + m(5),
        T0 + m(6),
    )
    assert resolved.value["value"] is None
    assert feed.run(gpu(m(20), "b", temperature_celsius=50.0)) == []  # nothing left to resolve


def test_no_data_alert_fires_for_a_silent_series_and_a_sample_ends_it() -> None:
    feed = Feed(
        one_rule(
            "- {name: Hot, metric: gpu_temperature_celsius, condition: gt, threshold: 85, severity: info,"
            " no_data: alert, no_data_after: 2m}"
        )
    )
    assert feed.run(gpu(s(0), "a", temperature_celsius=50.0), gpu(s(0), "b", temperature_celsius=50.0)) == []
    (firing,) = feed.run(gpu(m(2), "b", temperature_celsius=50.0))
    assert firing.value["labels"]["host"] == "a"
    assert (firing.value["status"], firing.value["value"], firing.value["starts_at"]) == (
        "firing",
        None,
        T0 + m(2),
    )
    assert feed.run(gpu(m(3), "b", temperature_celsius=50.0)) == []  # fires once
    (resolved,) = feed.run(gpu(m(3), "a", temperature_celsius=50.0))
    assert (resolved.value["labels"]["host"], resolved.value["status"]) == ("a", "resolved")


def test_no_data_keep_is_the_default() -> None:
    feed = Feed(AlertProcessor(default_rules()))
    assert len(feed.run(gpu(s(0), "a", temperature_celsius=90.0))) == 1
    assert feed.run(gpu(m(60), "b", temperature_celsius=50.0)) == []


# -- the fleet-wide job error rate -------------------------------------------------------------------------


def test_the_forwarder_sends_outcomes_to_one_partition_once() -> None:
    feed = Feed(JobOutcomeForwarder(), topic="job.events")
    batch = feed.batch(job(s(0), "queued"), job(s(1), "finished", "j1"), job(s(2), "failed", "j2"))
    outputs = feed.apply(batch)
    assert [(o.topic_key, o.key, o.value["event"]) for o in outputs] == [
        ("streams.job-outcomes", "fleet", "finished"),
        ("streams.job-outcomes", "fleet", "failed"),
    ]
    assert feed.apply(batch) == []
    # After a restart with only offset 0 committed, 1 and 2 go out again.
    again = feed.apply(replace(batch, resumed=True, committed_offset=1))
    assert [o.value["event"] for o in again] == ["finished", "failed"]


def test_the_error_rate_counts_each_outcome_once() -> None:
    feed = Feed(AlertProcessor(default_rules()), topic="streams.job-outcomes")
    outcomes = [job(s(i), "failed" if i < 2 else "finished", f"j{i}") for i in range(20)]
    assert statuses(feed.run(*outcomes)) == [("JobErrorRateHigh", "firing")]  # 2 / 20 = 10 %
    # The forwarder's re-send after a restart: the same outcomes at new offsets count once.
    assert feed.run(*outcomes) == []
    (entry,) = feed.state.data.values()
    assert entry["value"] == 10.0


def test_the_error_rate_fires_above_5_percent_with_enough_jobs_and_resolves() -> None:
    feed = Feed(AlertProcessor(default_rules()), topic="streams.job-outcomes")
    assert feed.run(job(s(0), "failed")) == []  # 1 failed out of 1: below min_count, no page
    finished = [job(s(1 + i), "finished") for i in range(19)]
    assert feed.run(*finished) == []  # 1 / 20 = 5 %: not above
    (firing,) = feed.run(job(s(30), "failed"))  # 2 / 21
    fp = fingerprint("JobErrorRateHigh", {})
    assert (firing.key, firing.value["status"], firing.value["labels"]) == (fp, "firing", {})
    assert firing.value["value"] == pytest.approx(100 * 2 / 21)
    assert firing.value["annotations"]["summary"] == "9.52 % of jobs failed in the last 5 minutes"
    # 19 more finished jobs: 2 / 40 = 5 %, no longer above.
    outputs = feed.run(*[job(m(2) + s(i), "finished") for i in range(25)])
    (resolved,) = outputs
    assert resolved.value["status"] == "resolved"
    assert (resolved.value["value"], resolved.value["ends_at"]) == (5.0, T0 + m(2) + s(18))


def test_the_error_rate_window_slides_in_event_time() -> None:
    feed = Feed(AlertProcessor(default_rules()), topic="streams.job-outcomes")
    assert feed.run(*[job(s(i), "failed") for i in range(19)]) == []
    # At 5m the window holds minutes 1-5: the failures of minute 0 have left it.
    assert feed.run(job(m(5), "failed")) == []
    buckets = feed.state.data[f"JobErrorRateHigh/{fingerprint('JobErrorRateHigh', {})}"]["buckets"]
    assert {start: counts[:2] for start, counts in buckets.items()} == {
        str(int((T0 + m(5)).timestamp() * 1000)): [1, 1]
    }
    assert feed.run(*[job(m(5) + s(i), "failed") for i in range(1, 20)])[0].value["value"] == 100.0


def test_alert_processors_from_settings(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(
        "- {name: Hot, metric: host_cpu_utilization_percent, condition: gt, threshold: 99, severity: info}\n"
    )
    default = alert_processors()
    assert [p.name for p in default] == ["job_outcomes", "alerts"]
    only_file = alert_processors_from_settings(
        AlertSettings.from_environ({"AIMA_ALERT_RULES": str(path), "AIMA_ALERT_DEFAULT_RULES": "false"})
    )
    assert [(p.name, p.topics) for p in only_file] == [("alerts", ("system.samples",))]
