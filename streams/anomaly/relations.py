"""Relations that hold on a healthy GPU, scored per GPU against baselines the GPU's own samples taught
(method ``relations`` of the anomaly detector, streams/anomaly/processor.py). Starting or stopping a job,
and going from idle to busy, move every gauge of a GPU a long way; none of these relations, so a GPU's
normal life raises nothing, while a failing fan, a throttled clock or a leaking job breaks one of them.

Each check is its own series (metric and labels as in the catalogue) and its own alert:

- ``temperature_vs_power`` (gpu_temperature_celsius, slow samples): temperature is a linear function of
  power seen through a first-order thermal lag (``thermal_lag_s``). The detector filters the sampled power
  through that lag (the power is taken to change half-way between two samples, where it changed at all)
  and learns the line from two anchors, the mean (filtered power, temperature) of the GPU's busy samples
  and of its idle ones, so a GPU busy for hours does not forget where its idle point lies. Scored only
  upwards: a GPU cooler than expected is no fault. Scored once both anchors have learnt ``warmup // 2``
  samples and lie ``min_power_spread_w`` apart.
- ``clock_vs_state`` (gpu_sm_clock_hz, slow samples): the SM clock against the GPU's own baseline for its
  state, busy or idle (a baseline each); scored downwards only. The throttle reasons of the sample go into
  the alert's description.
- ``memory_vs_job`` (gpu_memory_used_bytes, fast samples): memory used against what the job holding the GPU
  (its set of process ids) used in its first ``job_warmup`` samples; a new job starts a new baseline, and an
  open alert of the job that left resolves. Scored upwards only. The baseline then follows a lasting change
  slowly (``memory_alpha``, deviations clipped), and its scale stays what the warm-up measured, so a leak,
  which keeps growing, stays ahead of it.

Busy or idle comes from the last fast sample: a GPU with processes on it is busy; where processes are not
readable, utilisation of ``busy_percent`` or more is. A score is ``residual / scale``, the scale the larger
of 1.4826 times the residuals' mean absolute deviation and a floor. A sample scoring ``threshold`` or more
is an anomaly; ``alert_after`` samples in a row scoring the alert threshold or more (6 unless set: an
anomaly three times running) fire the check's alert, so a transient (a state change seen between samples)
never alerts; ``resolve_after`` samples
below ``threshold`` in a row resolve it. Baselines learn from every sample with the deviation clipped to
``threshold`` scales, as the per-series detector does, an anomalous one at a tenth of the rate; scales learn
only from samples scoring below 3.

Everything a GPU needs is one JSON-able entry (:func:`new_entry`); :func:`observe` folds one GpuSample into
it and returns the findings, dicts the processor turns into Anomaly records and AlertEvents. Pure: no
clock but the samples' own times, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from bus import catalogue
from streams.runtime.findings import fingerprint
from streams.runtime.series import series_of

if TYPE_CHECKING:
    from streams.anomaly.processor import AnomalyConfig

__all__ = ["CHECKS", "FIELDS", "RULE", "new_entry", "observe"]

RULE = "anomaly"
CHECKS = {
    "temperature_vs_power": "gpu_temperature_celsius",
    "clock_vs_state": "gpu_sm_clock_hz",
    "memory_vs_job": "gpu_memory_used_bytes",
}
"""Each check and the catalogue metric whose series it scores."""
_MAD_TO_SIGMA = 1.4826
_ANOMALY_RATE = 0.1
"""Share of the learning rate an anomalous sample gets: a fault of minutes barely moves the baseline it is
measured against, while a lasting change (a new fan curve, an application clock set) is learnt in hours."""
_LEARN_BELOW = 3.0
"""Scales learn only from samples scoring below this: a fault that builds up over minutes (a fan, a leak)
would otherwise widen its own yardstick sample by sample and never reach the alert."""
_METRICS = {check: catalogue.get(name) for check, name in CHECKS.items()}
FIELDS = (
    "host", "gpu", "gpu_uuid", "gpu_model", "mig_instance", "processes", "utilization_percent",
    "memory_used_bytes", "memory_total_bytes", "temperature_celsius", "power_watts", "sm_clock_hz",
    "throttle_reasons",
)  # fmt: skip
"""The GpuSample fields the checks read (the catalogue's GPU labels among them)."""
_FAST_FIELDS = ("processes", "utilization_percent", "memory_used_bytes")
"""A record with none of these (a slow-group sample) says nothing about jobs or memory."""


def new_entry() -> dict[str, Any]:
    """A GPU's entry before its first sample. Anchors and baselines are [n, x, y] / [n, mean, mad] lists."""
    return {
        "busy": None,
        "job": None,
        "power": None,
        "filtered": None,
        "t_slow": None,
        "t_fast": None,
        "changed": None,
        "anchors": {"idle": [0, 0.0, 0.0], "busy": [0, 0.0, 0.0]},
        "residual": [0, 0.0],
        "clock": {"idle": [0, 0.0, 0.0], "busy": [0, 0.0, 0.0]},
        "memory": [0, 0.0, 0.0],
        "streak": {},
        "alerts": {},
    }


def observe(
    entry: dict[str, Any], record: Mapping[str, Any], t: int, config: AnomalyConfig
) -> list[dict[str, Any]]:
    """Folds one GpuSample (event time ``t`` in ms) into ``entry``; returns its findings in check order."""
    findings: list[dict[str, Any]] = []
    if any(record.get(name) is not None for name in _FAST_FIELDS):
        _fast(entry, record, t, config, findings)
    if record.get("temperature_celsius") is not None and record.get("power_watts") is not None:
        _temperature(entry, record, t, config, findings)
    if record.get("sm_clock_hz") is not None:
        _clock(entry, record, t, config, findings)
    return findings


def _fast(
    entry: dict[str, Any],
    record: Mapping[str, Any],
    t: int,
    config: AnomalyConfig,
    findings: list[dict[str, Any]],
) -> None:
    processes = record.get("processes")
    utilization = record.get("utilization_percent")
    was = entry["busy"]
    if processes is not None:
        entry["busy"] = bool(processes)
        job = sorted(p["pid"] for p in processes) or None
    else:
        if utilization is not None:
            entry["busy"] = utilization >= config.busy_percent
        job = None  # no job identity without processes: no memory check
    if was is not None and entry["busy"] != was and entry.get("t_fast") is not None:
        # A sample's utilisation covers the period before it: the GPU changed state when that period began.
        entry["changed"] = entry["t_fast"]
    entry["t_fast"] = t
    used = record.get("memory_used_bytes")
    if job != entry["job"]:
        alert = entry["alerts"].get("memory_vs_job")
        if alert is not None:
            # The job the alert was about has left the GPU: what it found ends with it.
            value = float(used) if used is not None else alert["expected"]
            findings.extend(_resolve(entry, "memory_vs_job", record, t, value, alert["expected"], 0.0))
        entry["job"] = job
        entry["memory"] = [0, 0.0, 0.0]
        entry["streak"].pop("memory_vs_job", None)
    if job is None or used is None:
        return
    total = record.get("memory_total_bytes") or 0
    baseline = entry["memory"]
    n, mean, mad = baseline
    if n < config.job_warmup:  # the job's first samples: running mean and mean absolute deviation
        if n == 0:
            entry["memory"] = [1, float(used), 0.0]
        else:
            deviation = used - mean
            entry["memory"] = [n + 1, mean + deviation / (n + 1), mad + (abs(deviation) - mad) / n]
        return
    scale = max(_MAD_TO_SIGMA * mad, config.memory_floor_share * total, config.eps)
    deviation = used - mean
    z = max(0.0, deviation) / scale
    findings.extend(_judge(entry, "memory_vs_job", record, t, float(used), mean, z, config))
    limit = config.threshold * scale
    entry["memory"] = [n + 1, mean + config.memory_alpha * max(-limit, min(limit, deviation)), mad]


def _temperature(
    entry: dict[str, Any],
    record: Mapping[str, Any],
    t: int,
    config: AnomalyConfig,
    findings: list[dict[str, Any]],
) -> None:
    power, celsius = float(record["power_watts"]), float(record["temperature_celsius"])
    filtered, before = entry["filtered"], entry["power"]
    if filtered is None or before is None or entry["t_slow"] is None:
        filtered = power  # first sample: taken as settled
    else:
        # The power between two samples: the previous one's until the GPU changed state (seen in the fast
        # samples), this one's after; without a change, each for half the time.
        changed = entry.get("changed")
        if changed is None or not entry["t_slow"] <= changed <= t:
            changed = (entry["t_slow"] + t) / 2
        lag_ms = config.thermal_lag_s * 1000.0
        filtered = before + (filtered - before) * math.exp(-max(0.0, changed - entry["t_slow"]) / lag_ms)
        filtered = power + (filtered - power) * math.exp(-max(0.0, t - changed) / lag_ms)
    entry.update(filtered=filtered, power=power, t_slow=t, changed=None)
    idle, busy = entry["anchors"]["idle"], entry["anchors"]["busy"]
    half = max(1, config.warmup // 2)
    expected = None
    if idle[0] >= half and busy[0] >= half and busy[1] - idle[1] >= config.min_power_spread_w:
        slope = (busy[2] - idle[2]) / (busy[1] - idle[1])
        expected = idle[2] + slope * (filtered - idle[1])
    residual = entry["residual"]
    learnt, z = celsius, 0.0
    if expected is not None:
        n, mad = residual
        deviation = celsius - expected
        scale = max(_MAD_TO_SIGMA * mad, config.min_scale.get("°C", 0.0), config.eps)
        if n >= half:
            z = max(0.0, deviation) / scale
            findings.extend(_judge(entry, "temperature_vs_power", record, t, celsius, expected, z, config))
            limit = config.threshold * scale
            deviation = max(-limit, min(limit, deviation))
        if z < _LEARN_BELOW:  # an anomaly, or a rise towards one, must not widen the scale measuring it
            rate = max(config.relation_alpha, 1.0 / (n + 1))
            entry["residual"] = [n + 1, mad + rate * (abs(deviation) - mad)]
        learnt = expected + deviation
    state = entry["busy"]
    if state is not None:
        anchor = busy if state else idle
        rate = max(config.relation_alpha, 1.0 / (anchor[0] + 1))
        if z >= config.threshold:
            rate *= _ANOMALY_RATE
        anchor[1] += rate * (filtered - anchor[1])
        anchor[2] += rate * (learnt - anchor[2])
        anchor[0] += 1


def _clock(
    entry: dict[str, Any],
    record: Mapping[str, Any],
    t: int,
    config: AnomalyConfig,
    findings: list[dict[str, Any]],
) -> None:
    state = entry["busy"]
    if state is None:
        return
    clock = float(record["sm_clock_hz"])
    baseline = entry["clock"]["busy" if state else "idle"]
    n, mean, mad = baseline
    deviation = clock - mean
    if n >= max(1, config.warmup // 2):
        scale = max(_MAD_TO_SIGMA * mad, config.relative_floor * abs(mean), config.eps)
        z = max(0.0, -deviation) / scale
        reasons = record.get("throttle_reasons")
        note = f"throttle reasons: {', '.join(reasons) or 'none'}" if reasons is not None else ""
        findings.extend(_judge(entry, "clock_vs_state", record, t, clock, mean, z, config, note))
        limit = config.threshold * scale
        deviation = max(-limit, min(limit, deviation))
        rate = config.relation_alpha * (_ANOMALY_RATE if z >= config.threshold else 1.0)
        learn_scale = z < _LEARN_BELOW  # an anomaly, or a fall towards one, must not widen its scale
    else:
        rate, learn_scale = 1.0 / (n + 1), True
    baseline[0] = n + 1
    baseline[1] = mean + rate * deviation
    if learn_scale:
        baseline[2] = mad + rate * (abs(deviation) - mad) if n else 0.0


def _labels(check: str, record: Mapping[str, Any]) -> tuple[str, dict[str, str]]:
    """The series id and labels of the check's metric for this GPU (the record's own labels)."""
    metric = _METRICS[check]
    value = record.get(metric.field)
    found = series_of(metric, {**record, metric.field: 0.0} if value is None else record)
    series, labels, _ = found[0]
    return series, labels


def _finding_base(
    check: str, record: Mapping[str, Any], t: int, value: float, expected: float, z: float
) -> dict[str, Any]:
    """What every finding of ``check`` on this sample carries: its series, labels, values and method."""
    series, labels = _labels(check, record)
    return {
        "t": t, "metric": CHECKS[check], "labels": labels, "value": value, "expected": expected, "z": z,
        "series": series, "method": check,
    }  # fmt: skip


def _judge(
    entry: dict[str, Any],
    check: str,
    record: Mapping[str, Any],
    t: int,
    value: float,
    expected: float,
    z: float,
    config: AnomalyConfig,
    note: str = "",
) -> list[dict[str, Any]]:
    """A scored sample's findings: an anomaly from ``threshold``; the check's alert fires after
    ``alert_after`` samples in a row from the alert threshold and resolves after ``resolve_after`` below
    ``threshold``."""
    alert = entry["alerts"].get(check)
    streak = entry["streak"].get(check, 0) + 1 if z >= config.alert_from else 0
    if streak:
        entry["streak"][check] = streak
    else:
        entry["streak"].pop(check, None)
    if z < config.threshold and alert is None:
        return []
    base = _finding_base(check, record, t, value, expected, z)
    metric, labels = base["metric"], base["labels"]
    if note:
        base["note"] = note
    findings: list[dict[str, Any]] = []
    if z >= config.threshold:
        findings.append({"kind": "anomaly", **base})
    if alert is None and streak >= config.alert_after:
        fp = fingerprint(RULE, {**labels, "metric": metric})
        entry["alerts"][check] = {"fingerprint": fp, "starts_at": t, "normal": 0, "expected": expected}
        findings.append({"kind": "firing", "fingerprint": fp, "starts_at": t, **base})
    elif alert is not None:
        alert["normal"] = 0 if z >= config.threshold else alert["normal"] + 1
        if alert["normal"] >= config.resolve_after:
            findings.extend(_resolve(entry, check, record, t, value, expected, z, base))
    return findings


def _resolve(
    entry: dict[str, Any],
    check: str,
    record: Mapping[str, Any],
    t: int,
    value: float,
    expected: float,
    z: float,
    base: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    alert = entry["alerts"].pop(check)
    if base is None:
        base = _finding_base(check, record, t, value, expected, z)
    return [
        {"kind": "resolved", "fingerprint": alert["fingerprint"], "starts_at": alert["starts_at"], **base}
    ]
