"""The anomaly detector: robust z-score against EWMA and EW MAD, warm-up, anomalies, alerts, replays."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from bus.codec import Codec
from streams.anomaly.processor import AnomalyConfig, AnomalyProcessor, default_metrics
from streams.anomaly.settings import AnomalySettings
from streams.runtime.findings import fingerprint
from streams.runtime.processor import Input, Output, PartitionBatch

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
GPU = "aima.metrics.GpuSample"
LABELS = {"host": "a", "gpu": "0", "gpu_uuid": "GPU-a0", "gpu_model": "NVIDIA H100"}
SERIES = 'gpu_temperature_celsius{gpu="0",gpu_model="NVIDIA H100",gpu_uuid="GPU-a0",host="a"}'
# Small numbers so the expectations can be worked out by hand: no floors, a quick baseline.
HAND = AnomalyConfig(
    method="ewma_mad_zscore",
    alpha=0.5,
    warmup=3,
    threshold=6,
    alert_threshold=10,
    resolve_after=2,
    min_scale={},
    relative_floor=0,
    metrics=("gpu_temperature_celsius",),
)


class Feed:
    def __init__(self, processor: AnomalyProcessor) -> None:
        self.processor = processor
        self.state: dict[str, Any] = {}
        self.offset = 0
        self.seconds = 0

    def batch(self, *values: float, metric: str = "temperature_celsius") -> PartitionBatch:
        inputs = []
        for value in values:
            record = {
                "time": T0 + timedelta(seconds=self.seconds),
                "host": "a",
                "gpu": 0,
                "gpu_uuid": "GPU-a0",
                "gpu_model": "NVIDIA H100",
                "mig_instance": None,
                "source": "test",
                "interval_group": "fast",
                metric: value,
            }
            inputs.append(Input("gpu.samples", 0, self.offset, GPU, record, record["time"]))
            self.offset += 1
            self.seconds += 10
        return PartitionBatch("gpu.samples", 0, inputs, inputs[-1].event_time, None)

    def apply(self, batch: PartitionBatch) -> list[Output]:
        writes: list[str] = []

        class Counting(dict):  # type: ignore[type-arg]
            def __setitem__(self, key: str, value: Any) -> None:
                writes.append(key)
                super().__setitem__(key, value)

        state = Counting(self.state)
        result = self.processor.process(batch, state)
        assert len(writes) == len(set(writes)), writes  # one write per series per batch
        self.state = json.loads(json.dumps(dict(state)))  # JSON-serialisable, as a changelog restores it
        for output in result.outputs:
            Codec().encode(output.record_name, output.value)
        return result.outputs

    def run(self, *values: float, metric: str = "temperature_celsius") -> list[Output]:
        return self.apply(self.batch(*values, metric=metric))


def test_a_spike_after_the_warm_up_is_flagged_with_the_hand_computed_score() -> None:
    feed = Feed(AnomalyProcessor(HAND))
    # 10 -> mean 10, mad 0; 12 -> mean 11, mad 1; 10 -> mean 10.5, mad 1   (warm-up: 3 samples)
    # 12 -> z = 1.5 / 1.4826 = 1.01, normal; mean 11.25, mad 1.25
    assert feed.run(10, 12, 10, 12) == []
    assert feed.state[SERIES] == {"n": 4, "mean": 11.25, "mad": 1.25, "offset": 3}
    # 30 -> z = (30 - 11.25) / (1.4826 * 1.25) = 10.117: an anomaly and an alert
    anomaly, alert = feed.run(30)
    score = 18.75 / (1.4826 * 1.25)
    assert (anomaly.topic_key, anomaly.key, anomaly.record_name) == (
        "anomalies",
        SERIES,
        "aima.metrics.Anomaly",
    )
    assert anomaly.value == {
        "time": T0 + timedelta(seconds=40),
        "series": SERIES,
        "metric": "gpu_temperature_celsius",
        "labels": LABELS,
        "value": 30.0,
        "expected": 11.25,
        "score": pytest.approx(score),
        "method": "ewma_mad_zscore",
        "source": "stream",
    }
    fp = fingerprint("anomaly", {**LABELS, "metric": "gpu_temperature_celsius"})
    assert (alert.topic_key, alert.key) == ("alerts", fp)
    assert {
        k: alert.value[k] for k in ("fingerprint", "rule", "status", "severity", "value", "starts_at")
    } == {
        "fingerprint": fp,
        "rule": "anomaly",
        "status": "firing",
        "severity": "warning",
        "value": 30.0,
        "starts_at": T0 + timedelta(seconds=40),
    }
    assert alert.value["annotations"]["summary"] == (
        "Unusual gpu_temperature_celsius: 30 °C (expected about 11.25 °C)"
    )
    # The spike moved the baseline by at most 6 scales: 11.25 + 0.5 * 6 * 1.85325
    assert feed.state[SERIES]["mean"] == pytest.approx(11.25 + 0.5 * 6 * 1.4826 * 1.25)


def test_nothing_is_flagged_during_the_warm_up() -> None:
    feed = Feed(AnomalyProcessor(HAND))
    assert feed.run(10, 12, 1000) == []
    assert feed.state[SERIES]["n"] == 3


def test_an_anomaly_below_the_alert_threshold_raises_no_alert() -> None:
    feed = Feed(AnomalyProcessor(HAND))
    assert feed.run(10, 12, 10, 12) == []
    # z = (24 - 11.25) / 1.85325 = 6.88: published, but below 10
    (anomaly,) = feed.run(24)
    assert anomaly.topic_key == "anomalies"
    assert anomaly.value["score"] == pytest.approx(12.75 / (1.4826 * 1.25))


def test_the_alert_resolves_after_n_normal_samples() -> None:
    feed = Feed(AnomalyProcessor(HAND))
    feed.run(10, 12, 10, 12)
    assert [o.topic_key for o in feed.run(30)] == ["anomalies", "alerts"]
    assert feed.run(15) == []  # one normal sample
    (resolved,) = feed.run(15)  # the second
    assert (resolved.value["status"], resolved.value["ends_at"], resolved.value["starts_at"]) == (
        "resolved",
        T0 + timedelta(seconds=60),
        T0 + timedelta(seconds=40),
    )
    assert resolved.key == fingerprint("anomaly", {**LABELS, "metric": "gpu_temperature_celsius"})


def test_replaying_a_batch_emits_nothing_new() -> None:
    feed = Feed(AnomalyProcessor(HAND))
    feed.run(10, 12, 10, 12)
    spike = feed.batch(30)
    assert len(feed.apply(spike)) == 2
    state = json.dumps(feed.state, sort_keys=True)
    assert feed.apply(spike) == []
    assert json.dumps(feed.state, sort_keys=True) == state


def test_defaults_flag_a_spike_in_a_noisy_series_and_not_its_noise() -> None:
    feed = Feed(AnomalyProcessor(AnomalyConfig(method="ewma_mad_zscore")))
    noise = [50 + (i % 5) - 2 for i in range(60)]  # 48..52
    assert feed.run(*noise, metric="utilization_percent") == []
    outputs = feed.run(85, metric="utilization_percent")
    assert [o.topic_key for o in outputs] == ["anomalies", "alerts"]
    assert outputs[0].value["metric"] == "gpu_utilization_percent"


def test_every_series_has_its_own_baseline() -> None:
    processor = AnomalyProcessor(
        AnomalyConfig(method="ewma_mad_zscore", metrics=("gpu_temperature_celsius", "gpu_power_watts"))
    )
    assert processor.topics == ("gpu.samples",)
    feed = Feed(processor)
    feed.run(*[60.0] * 5)
    feed.run(*[300.0] * 5, metric="power_watts")
    assert len(feed.state) == 2


def test_configuration() -> None:
    assert "gpu_temperature_celsius" in default_metrics() and "gpu_sm_clock_hz" not in default_metrics()
    assert AnomalyProcessor().topics == ("gpu.samples",)  # relations: GPU samples only
    zscore = AnomalyProcessor(AnomalyConfig(method="ewma_mad_zscore"))
    assert zscore.topics == ("gpu.samples", "queue.samples", "system.samples")
    config = AnomalySettings.from_environ(
        {
            "AIMA_ANOMALY_METHOD": "ewma_mad_zscore",
            "AIMA_ANOMALY_THRESHOLD": "4",
            "AIMA_ANOMALY_WARMUP": "10",
            "AIMA_ANOMALY_METRICS": "queue_length_jobs",
        }
    )
    assert (config.threshold, config.warmup, config.config().alert_from, config.metrics) == (
        4.0,
        10,
        10.0,  # the z-score's own default
        ("queue_length_jobs",),
    )
    assert AnomalyConfig().alert_from == 6.0  # relations: an anomaly alert_after times in a row
    assert AnomalyProcessor(config.config()).topics == ("queue.samples",)
    with pytest.raises(ValueError, match="need 0 < threshold <= alert_threshold"):
        AnomalyConfig(threshold=12)
    with pytest.raises(KeyError, match="unknown metric"):
        AnomalyConfig(method="ewma_mad_zscore", metrics=("gpu_temp",))
    with pytest.raises(ValueError, match="metrics choose the series of method ewma_mad_zscore"):
        AnomalySettings.from_environ({"AIMA_ANOMALY_METRICS": "queue_length_jobs"})
    with pytest.raises(ValueError, match="AIMA_ANOMALY_METHOD: Input should be"):
        AnomalySettings.from_environ({"AIMA_ANOMALY_METHOD": "crystal_ball"})
    with pytest.raises(ValueError, match="AIMA_ANOMALY_ALPHA: not a number"):
        AnomalySettings.from_environ({"AIMA_ANOMALY_ALPHA": "fast"})


def test_a_resumed_partition_sends_again_what_is_not_committed() -> None:
    feed = Feed(AnomalyProcessor(HAND))
    feed.run(10, 12, 10, 12)
    spike = feed.batch(30)  # offset 4
    assert len(feed.apply(spike)) == 2
    calm = feed.batch(15)  # offset 5
    assert feed.apply(calm) == []
    # Offset 4 not committed: its anomaly and alert may be lost in the crash, so they go out again.
    again = feed.apply(replace(calm, resumed=True, committed_offset=4))
    assert [(o.topic_key, o.value.get("status")) for o in again] == [
        ("anomalies", None),
        ("alerts", "firing"),
    ]
    assert again[0].value["score"] == pytest.approx(18.75 / (1.4826 * 1.25))
    # Committed: nothing again.
    assert feed.apply(replace(calm, resumed=True, committed_offset=6)) == []


def test_findings_remembered_under_the_old_offset_name_are_sent_again() -> None:
    """State written when a sent finding kept its offset as ``o`` (before streams/runtime/state.py) re-sends
    as it did."""
    feed = Feed(AnomalyProcessor(HAND))
    feed.run(10, 12, 10, 12)
    feed.apply(feed.batch(30))  # offset 4: an anomaly and an alert
    calm = feed.batch(15)
    feed.apply(calm)
    for entry in feed.state.values():
        for finding in entry.get("sent", ()):
            finding["o"] = finding.pop("offset")
    again = feed.apply(replace(calm, resumed=True, committed_offset=4))
    assert [(o.topic_key, o.value.get("status")) for o in again] == [
        ("anomalies", None),
        ("alerts", "firing"),
    ]
    assert feed.apply(replace(calm, resumed=True, committed_offset=6)) == []
