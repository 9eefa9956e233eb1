"""The GPU collector against the NVML-shaped fake: unsupported fields, vanishing GPUs, MIG, GPM, throttle
reasons, XID events, the Prometheus exporter and the fast/slow schedule. No real sleeping: the scheduling
step takes explicit times and the fake reads an injected clock."""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pynvml
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.utils import floatToGoString

from bus.codec import Codec
from bus.settings import Settings
from bus.validation import check
from producers.gpu.collector import GpuCollector, GpuCollectorMetrics, run
from producers.gpu.exporter import GpuExporter
from producers.gpu.reader import FIELDS, throttle_names
from tests.fakes.nvml import FakeNvml, FakeProcess, ManualClock, a100, h100, legacy, mig

HOST = "node-1"
T0 = datetime(2025, 1, 1, tzinfo=UTC)
BOARD_FIELDS = (
    "temperature_celsius",
    "power_watts",
    "pcie_tx_bytes_per_second",
    "pcie_rx_bytes_per_second",
    "energy_joules",
    "sm_clock_hz",
    "memory_clock_hz",
    "throttle_reasons",
    "ecc_corrected_errors",
    "ecc_uncorrected_errors",
    "xid_errors",
)


class Rig:
    """A fake NVML with a manual clock, and a collector reading it."""

    def __init__(self, *gpus: Any, fast_s: float = 10, slow_s: float = 30) -> None:
        self.clock = ManualClock()
        self.nvml = FakeNvml(gpus, clock=self.clock)
        self.nvml.nvmlInit()
        self.registry = CollectorRegistry()
        self.metrics = GpuCollectorMetrics(self.registry)
        self.exporter = GpuExporter()
        self.collector = GpuCollector(
            self.nvml,
            host=HOST,
            metrics=self.metrics,
            exporter=self.exporter,
            fast_interval_s=fast_s,
            slow_interval_s=slow_s,
            wall_clock=lambda: T0,
        )
        self.now = 0.0

    def step_to(self, now: float) -> list[dict[str, Any]]:
        """Move both clocks to ``now`` (seconds since start) and run whatever is due."""
        self.clock.advance(now - self.now)
        self.now = now
        return self.collector.step(now)

    def metric(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)

    def scrape(self) -> str:
        registry = CollectorRegistry()
        registry.register(self.exporter)
        return generate_latest(registry).decode()


def by_uuid(records: list[dict[str, Any]], group: str) -> dict[str, dict[str, Any]]:
    return {r["gpu_uuid"]: r for r in records if r["interval_group"] == group}


def merged(records: list[dict[str, Any]], uuid: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for record in records:
        if record["gpu_uuid"] == uuid:
            out.update({k: v for k, v in record.items() if v is not None or k not in out})
    return out


# -- support and nulls ---------------------------------------------------------------------------------------


def test_unsupported_fields_are_null_not_zero_and_the_rest_present() -> None:
    old, new = legacy(0), h100(1, processes=[FakeProcess(4242, "/usr/bin/python3", 3 << 30)])
    rig = Rig(old, new)
    rig.step_to(0)
    records = rig.step_to(30)  # both groups; GPM now has a window

    k80 = merged(records, old.uuid)
    for field in ("energy_joules", "pcie_tx_bytes_per_second", "pcie_rx_bytes_per_second"):
        assert k80[field] is None, field
    assert k80["ecc_corrected_errors"] is None and k80["ecc_uncorrected_errors"] is None
    assert k80["tensor_core_utilization_percent"] is None
    for field in ("utilization_percent", "memory_used_bytes", "temperature_celsius", "power_watts"):
        assert k80[field] is not None, field
    assert k80["throttle_reasons"] == []  # read through the older ThrottleReasons function

    hopper = merged(records, new.uuid)
    for field in (*FIELDS["fast"], *FIELDS["slow"]):
        assert hopper[field] is not None, field
    assert hopper["ecc_corrected_errors"] == 0  # a real 0 from the device, not a filler
    assert hopper["processes"] == [{"pid": 4242, "name": "python3", "used_memory_bytes": 3 << 30}]
    assert hopper["memory_utilization_percent"] == pytest.approx(
        hopper["memory_used_bytes"] / hopper["memory_total_bytes"] * 100
    )

    # Probed once, never asked again: another slow round asks only the H100.
    before = dict(rig.nvml.calls)
    rig.step_to(60)
    for function in ("nvmlDeviceGetTotalEnergyConsumption", "nvmlDeviceGetCurrentClocksEventReasons"):
        assert rig.nvml.calls[function] - before[function] == 1, function
    assert (
        rig.nvml.calls["nvmlDeviceGetCurrentClocksThrottleReasons"]
        - before["nvmlDeviceGetCurrentClocksThrottleReasons"]
        == 1
    )  # the K80's fallback
    codec = Codec()
    for record in records:
        check("GpuSample", record)
        codec.encode("GpuSample", record)


def test_a_field_that_stops_being_supported_is_null_and_the_gpu_stays() -> None:
    gpu = a100(0)
    rig = Rig(gpu)
    rig.step_to(0)
    gpu.unsupported.add("nvmlDeviceGetPowerUsage")
    slow = by_uuid(rig.step_to(30), "slow")[gpu.uuid]
    assert slow["power_watts"] is None
    assert slow["temperature_celsius"] is not None
    assert rig.metric("aima_gpu_collector_errors_total", kind="read") is None


def test_units_are_converted_from_nvml() -> None:
    gpu = a100(0)
    rig = Rig(gpu)
    slow = by_uuid(rig.step_to(0), "slow")[gpu.uuid]
    handle = rig.nvml.nvmlDeviceGetHandleByIndex(0)
    assert slow["power_watts"] == rig.nvml.nvmlDeviceGetPowerUsage(handle) / 1000
    assert slow["energy_joules"] == rig.nvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1000
    assert slow["memory_clock_hz"] == 2619 * 1_000_000
    tx = rig.nvml.nvmlDeviceGetPcieThroughput(handle, pynvml.NVML_PCIE_UTIL_TX_BYTES)
    assert slow["pcie_tx_bytes_per_second"] == tx * 1024


# -- vanishing GPUs ------------------------------------------------------------------------------------------


def test_a_vanishing_gpu_is_logged_counted_skipped_and_picked_up_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    gpus = [h100(0), h100(1), a100(2)]
    rig = Rig(*gpus)
    caplog.set_level(logging.DEBUG, logger="producers.gpu.collector")
    assert len(by_uuid(rig.step_to(0), "fast")) == 3

    rig.nvml.vanish(1)
    fast = by_uuid(rig.step_to(10), "fast")
    assert set(fast) == {gpus[0].uuid, gpus[2].uuid}  # the others go on
    gone = [r for r in caplog.records if r.getMessage() == "GPU gone"]
    assert len(gone) == 1 and gone[0].gpu_uuid == gpus[1].uuid and "NVMLError_GpuIsLost" in gone[0].reason
    assert gone[0].levelno == logging.WARNING
    assert rig.metric("aima_gpu_collector_errors_total", kind="read") == 1
    assert rig.metric("aima_gpu_collector_devices") == 2
    assert gpus[1].uuid not in rig.scrape()  # no stale values on the scrape target

    # Still gone: retried every round, counted, but warned about only once.
    assert set(by_uuid(rig.step_to(20), "fast")) == {gpus[0].uuid, gpus[2].uuid}
    assert rig.metric("aima_gpu_collector_errors_total", kind="probe") == 1
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in warnings] == ["GPU gone"]

    rig.nvml.restore(1)
    fast = by_uuid(rig.step_to(30), "fast")
    assert set(fast) == {gpu.uuid for gpu in gpus}
    back = [r for r in caplog.records if r.getMessage() == "GPU back"]
    assert [r.gpu_uuid for r in back] == [gpus[1].uuid]
    assert rig.metric("aima_gpu_collector_devices") == 3
    # Re-probed: GPM starts again from a fresh first sample, and reads resume.
    assert fast[gpus[1].uuid]["utilization_percent"] is not None


def test_a_gpu_nvml_no_longer_counts_is_released() -> None:
    gpus = [a100(0), a100(1)]
    rig = Rig(*gpus)
    rig.step_to(0)
    rig.nvml.remove(1)
    records = rig.step_to(30)  # the slow round recounts
    assert {r["gpu_uuid"] for r in records} == {gpus[0].uuid}
    assert rig.metric("aima_gpu_collector_devices") == 1
    rig.nvml.restore(1)
    assert {r["gpu_uuid"] for r in rig.step_to(40)} == {gpus[0].uuid}  # counted again at the slow round
    assert {r["gpu_uuid"] for r in rig.step_to(60)} == {gpus[0].uuid, gpus[1].uuid}


# -- MIG and GPM ---------------------------------------------------------------------------------------------


def test_mig_instances_are_entities_of_their_own() -> None:
    parent = h100(0, mig_mode=True, migs=[mig(0, 1), mig(0, 2, processes=[FakeProcess(7, "infer", 1 << 30)])])
    rig = Rig(parent)
    rig.step_to(0)
    records = rig.step_to(30)
    assert {r["gpu_uuid"] for r in records} == {parent.uuid, *(m.uuid for m in parent.migs)}
    for instance in parent.migs:
        rec = merged(records, instance.uuid)
        assert rec["parent_gpu_uuid"] == parent.uuid
        assert rec["gpu"] == 0 and rec["gpu_model"] == "NVIDIA H100 80GB HBM3"
        assert rec["mig_instance"] == f"gi{instance.gpu_instance_id}/ci0"
        assert rec["memory_total_bytes"] == instance.memory_total_bytes
        assert rec["tensor_core_utilization_percent"] is not None  # GPM per GPU instance
        assert rec["utilization_percent"] is not None  # SM activity from GPM per GPU instance
        for field in BOARD_FIELDS:
            assert rec[field] is None, field  # board-level values live on the parent
    assert merged(records, parent.migs[1].uuid)["processes"] == [
        {"pid": 7, "name": "infer", "used_memory_bytes": 1 << 30}
    ]
    whole = merged(records, parent.uuid)
    assert whole["mig_instance"] is None and whole["parent_gpu_uuid"] is None
    # nvmlDeviceGetUtilizationRates is not supported in MIG mode: the parent's is GPM on the parent device.
    assert whole["utilization_percent"] is not None
    assert whole["power_watts"] is not None


def test_gpm_tensor_cores_from_two_samples_on_hopper_and_null_before() -> None:
    hopper, ampere = h100(0), a100(1)
    rig = Rig(hopper, ampere)
    first = by_uuid(rig.step_to(0), "fast")
    # Probe took the first sample at this very instant: no window yet, so no value (not 0).
    assert first[hopper.uuid]["tensor_core_utilization_percent"] is None
    start = rig.clock()
    fast = by_uuid(rig.step_to(10), "fast")
    expected = (
        rig.nvml._tensor_integral(rig.nvml.nvmlDeviceGetHandleByIndex(0), start + 10)
        - rig.nvml._tensor_integral(rig.nvml.nvmlDeviceGetHandleByIndex(0), start)
    ) / 10
    assert fast[hopper.uuid]["tensor_core_utilization_percent"] == pytest.approx(expected)
    assert 0 < expected < 100
    # The next read uses the sample just taken as its first one.
    later = by_uuid(rig.step_to(20), "fast")[hopper.uuid]["tensor_core_utilization_percent"]
    assert later != fast[hopper.uuid]["tensor_core_utilization_percent"]
    assert fast[ampere.uuid]["tensor_core_utilization_percent"] is None
    assert rig.nvml.calls["nvmlGpmQueryDeviceSupport"] == 2  # each GPU's probe, never again
    assert rig.nvml.calls["nvmlGpmSampleGet"] == 4  # the H100's first sample and three reads


def test_mig_sm_utilization_is_gpm_sm_activity_per_instance_and_on_the_parent() -> None:
    parent = h100(0, mig_mode=True, migs=[mig(0, 1), mig(0, 2)])
    rig = Rig(parent)
    first = by_uuid(rig.step_to(0), "fast")
    assert all(rec["utilization_percent"] is None for rec in first.values())  # no GPM window yet: null
    start = rig.clock()
    fast = by_uuid(rig.step_to(10), "fast")
    parent_handle = rig.nvml.nvmlDeviceGetHandleByIndex(0)
    handles = {parent.uuid: parent_handle}
    for slot, instance in enumerate(parent.migs):
        handles[instance.uuid] = rig.nvml.nvmlDeviceGetMigDeviceHandleByIndex(parent_handle, slot)
    for uuid, handle in handles.items():
        sm = rig.nvml._sm_integral(handle, start + 10) - rig.nvml._sm_integral(handle, start)
        assert fast[uuid]["utilization_percent"] == pytest.approx(sm / 10), uuid
    assert len({fast[uuid]["utilization_percent"] for uuid in handles}) == 3  # each its own value
    assert rig.nvml.calls["nvmlGpmMigSampleGet"] >= 4  # per GPU instance, from the parent's handle


def test_utilization_rates_keep_their_meaning_outside_mig_and_pre_hopper_mig_has_none() -> None:
    hopper = h100(0)
    ampere = a100(1, mig_mode=True, migs=[mig(1, 1)])
    rig = Rig(hopper, ampere)
    rig.step_to(0)
    fast = by_uuid(rig.step_to(10), "fast")
    rates = rig.nvml.nvmlDeviceGetUtilizationRates(rig.nvml.nvmlDeviceGetHandleByIndex(0))
    assert fast[hopper.uuid]["utilization_percent"] == float(rates.gpu)  # not replaced by GPM
    # An A100 has no GPM and NVML has no utilization for MIG: null for the parent and its instance, never 0.
    assert fast[ampere.uuid]["utilization_percent"] is None
    assert fast[ampere.migs[0].uuid]["utilization_percent"] is None
    assert fast[ampere.migs[0].uuid]["tensor_core_utilization_percent"] is None


# -- throttle reasons and XID events -------------------------------------------------------------------------


def test_throttle_reasons_are_decoded() -> None:
    assert throttle_names(0) == []
    assert throttle_names(
        pynvml.nvmlClocksEventReasonSwPowerCap | pynvml.nvmlClocksEventReasonHwSlowdown
    ) == [
        "sw_power_cap",
        "hw_slowdown",
    ]
    assert throttle_names(0x1 | 0x20 | 0x10000) == ["gpu_idle", "sw_thermal_slowdown", "unknown_0x10000"]
    gpu = a100(0, throttle_mask=pynvml.nvmlClocksEventReasonSwThermalSlowdown)
    rig = Rig(gpu)
    assert by_uuid(rig.step_to(0), "slow")[gpu.uuid]["throttle_reasons"] == ["sw_thermal_slowdown"]
    assert 'reason="sw_thermal_slowdown"' in rig.scrape()


def test_xid_events_are_reported_once() -> None:
    gpus = [h100(0, mig_mode=True, migs=[mig(0, 1)]), a100(1)]
    rig = Rig(*gpus)
    assert by_uuid(rig.step_to(0), "slow")[gpus[0].uuid]["xid_errors"] == []
    rig.nvml.inject_xid(0, 79)
    rig.nvml.inject_xid(0, 48)
    slow = by_uuid(rig.step_to(30), "slow")
    assert slow[gpus[0].uuid]["xid_errors"] == [79, 48]
    assert slow[gpus[1].uuid]["xid_errors"] == []
    assert slow[gpus[0].migs[0].uuid]["xid_errors"] is None  # monitored on the parent
    assert by_uuid(rig.step_to(60), "slow")[gpus[0].uuid]["xid_errors"] == []
    assert 'xid="79"' in rig.scrape()


# -- exporter ------------------------------------------------------------------------------------------------


def test_exporter_text_has_the_values_and_omits_unsupported_ones() -> None:
    old, new = legacy(0), h100(1)
    rig = Rig(old, new)
    rig.step_to(0)
    records = rig.step_to(30)
    text = rig.scrape()
    hopper = merged(records, new.uuid)
    labels = f'gpu="1",gpu_model="NVIDIA H100 80GB HBM3",gpu_uuid="{new.uuid}",host="{HOST}",mig_instance=""'
    for name, field in (
        ("aima_gpu_utilization_percent", "utilization_percent"),
        ("aima_gpu_power_watts", "power_watts"),
        ("aima_gpu_energy_joules_total", "energy_joules"),
        ("aima_gpu_memory_used_bytes", "memory_used_bytes"),
        ("aima_gpu_sm_clock_hz", "sm_clock_hz"),
    ):
        assert f"{name}{{{labels}}} {floatToGoString(hopper[field])}" in text, name
    assert f"aima_gpu_tensor_core_utilization_percent{{{labels}}}" in text
    energy_lines = [line for line in text.splitlines() if line.startswith("aima_gpu_energy_joules_total{")]
    assert len(energy_lines) == 1  # the K80 has no energy counter: no sample, not a 0
    assert not any(old.uuid in line for line in text.splitlines() if "pcie" in line or "ecc" in line)
    assert f'aima_gpu_temperature_celsius{{gpu="0",gpu_model="Tesla K80",gpu_uuid="{old.uuid}"' in text


def test_exporter_has_per_process_memory_and_drops_processes_that_end() -> None:
    gpu = h100(0, processes=[FakeProcess(11, "train", 3 << 30), FakeProcess(12, "infer", 1 << 30)])
    rig = Rig(gpu)
    rig.step_to(0)
    labels = f'gpu="0",gpu_model="NVIDIA H100 80GB HBM3",gpu_uuid="{gpu.uuid}",host="{HOST}",mig_instance=""'
    text = rig.scrape()
    name = "aima_gpu_process_memory_used_bytes"
    assert f'{name}{{{labels},pid="11",process_name="train"}} {floatToGoString(3 << 30)}' in text
    assert f'{name}{{{labels},pid="12",process_name="infer"}} {floatToGoString(1 << 30)}' in text
    gpu.processes = [gpu.processes[1], FakeProcess(13, "infer", 2 << 30)]
    rig.step_to(30)  # the next slow read
    lines = [line for line in rig.scrape().splitlines() if line.startswith(name + "{")]
    assert sorted(line.split('pid="')[1].split('"')[0] for line in lines) == ["12", "13"]  # 11 ended: gone
    gpu.processes = []
    rig.step_to(60)
    assert name not in rig.scrape()  # no process: no family at all


def test_exporter_with_no_gpus_renders_nothing() -> None:
    registry = CollectorRegistry()
    registry.register(GpuExporter())
    assert generate_latest(registry) == b""


# -- schedule ------------------------------------------------------------------------------------------------


def test_fast_and_slow_groups_run_at_their_intervals() -> None:
    gpu = a100(0)
    rig = Rig(gpu, fast_s=10, slow_s=30)
    seen: dict[float, list[str]] = {}
    for now in (0, 5, 10, 15, 20, 29.9, 30, 40, 50, 60):
        seen[now] = [r["interval_group"] for r in rig.step_to(now)]
    assert seen == {
        0: ["fast", "slow"],
        5: [],
        10: ["fast"],
        15: [],
        20: ["fast"],
        29.9: [],
        30: ["fast", "slow"],
        40: ["fast"],
        50: ["fast"],
        60: ["fast", "slow"],
    }
    assert rig.collector.next_due() == 70
    # After a stall the cadence starts afresh rather than firing every missed round.
    assert [r["interval_group"] for r in rig.step_to(200)] == ["fast", "slow"]
    assert rig.collector.next_due() == 210
    assert rig.metric("aima_gpu_collector_samples_total", group="fast") == 8
    assert rig.metric("aima_gpu_collector_samples_total", group="slow") == 4


def test_configurable_intervals() -> None:
    rig = Rig(a100(0), fast_s=1, slow_s=5)
    groups = [r["interval_group"] for now in range(6) for r in rig.step_to(now)]
    assert groups.count("fast") == 6 and groups.count("slow") == 2
    with pytest.raises(ValueError, match="positive"):
        GpuCollector(
            FakeNvml([]), host=HOST, metrics=GpuCollectorMetrics(CollectorRegistry()), fast_interval_s=0
        )


# -- run() ---------------------------------------------------------------------------------------------------


class FakePublisher:
    def __init__(self, stop: threading.Event | None = None) -> None:
        self.sent: list[tuple[str, str, str, dict[str, Any]]] = []
        self.flushed = 0
        self.stop = stop

    def publish(self, topic_key: str, key: str, record_name: str, value: dict[str, Any]) -> bool:
        self.sent.append((topic_key, key, record_name, value))
        if self.stop is not None:
            self.stop.set()
        return True

    def poll(self, timeout_s: float = 0.0) -> int:
        return 0

    def flush(self, timeout_s: float = 30.0) -> int:
        self.flushed += 1
        return 0


class StopOnWait(threading.Event):
    """A service's stop event that is set the first time the loop would sleep."""

    def wait(self, timeout: float | None = None) -> bool:
        self.set()
        return True


def settings() -> Settings:
    return Settings(kafka_bootstrap="127.0.0.1:1", topic_prefix="unit.")


def test_run_once_publishes_both_groups_keyed_per_gpu_and_flushes() -> None:
    nvml = FakeNvml([a100(0, mig_mode=True, migs=[mig(0, 1)]), legacy(1)])
    publisher = FakePublisher()
    pairs = run(settings(), once=True, nvml=nvml, publisher=publisher, host=HOST)  # type: ignore[arg-type]
    assert len(pairs) == 2 * 3  # fast and slow for the A100, its MIG instance and the K80
    assert {name for name, _ in pairs} == {"GpuSample"}
    assert [(t, k, n) for t, k, n, _ in publisher.sent] == [
        ("gpu.samples", f"{HOST}/{value['gpu_uuid']}", "GpuSample") for _, value in pairs
    ]
    assert f"{HOST}/{nvml.gpus[0].migs[0].uuid}" in {key for _, key, _, _ in publisher.sent}
    assert publisher.flushed == 1
    assert nvml.initialized == 0  # nvmlShutdown was called
    assert not any(events.gpus for events in nvml._event_sets)  # event sets freed


@pytest.mark.parametrize(
    "nvml",
    [
        FakeNvml([], init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND),
        FakeNvml([], init_error=pynvml.NVML_ERROR_DRIVER_NOT_LOADED),
        FakeNvml([]),
    ],
    ids=["no library", "no driver", "no device"],
)
def test_run_once_without_nvml_device_says_so(nvml: FakeNvml, caplog: pytest.LogCaptureFixture) -> None:
    publisher = FakePublisher()
    assert run(settings(), once=True, nvml=nvml, publisher=publisher) == []  # type: ignore[arg-type]
    assert any(r.getMessage().startswith("no NVML device found") for r in caplog.records)
    assert publisher.sent == []


def test_run_loop_publishes_and_flushes_on_stop() -> None:
    stop = threading.Event()
    service = SimpleNamespace(stopping=stop, registry=CollectorRegistry(), time_left_s=lambda: 8.0)
    publisher = FakePublisher(stop=stop)
    nvml = FakeNvml([a100(0)])
    result = run(
        settings(),
        service=service,  # type: ignore[arg-type]
        nvml=nvml,
        publisher=publisher,  # type: ignore[arg-type]
        exporter_port=None,
    )
    assert result == []
    assert {value["interval_group"] for _, _, _, value in publisher.sent} == {"fast", "slow"}
    assert publisher.flushed == 1
    assert nvml.initialized == 0
    assert service.registry.get_sample_value("aima_gpu_collector_samples_total", {"group": "fast"}) == 1


def test_run_loop_without_nvml_keeps_going_until_stopped(caplog: pytest.LogCaptureFixture) -> None:
    service = SimpleNamespace(stopping=StopOnWait(), registry=CollectorRegistry(), time_left_s=lambda: 8.0)
    nvml = FakeNvml([], init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    assert run(settings(), service=service, nvml=nvml, exporter_port=None) == []  # type: ignore[arg-type]
    assert service.registry.get_sample_value("aima_gpu_collector_errors_total", {"kind": "init"}) == 1
    assert any("no NVML device found" in r.getMessage() for r in caplog.records)
