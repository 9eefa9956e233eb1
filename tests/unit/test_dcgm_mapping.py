"""dcgm-exporter's text onto the GpuSample contract (producers/dcgm/mapping.py), on an exposition in the
real exporter's shape (tests/fakes/dcgm.py): every DCGM field to its catalogue field and unit, nulls where
the endpoint exports nothing, MIG instances as entities of their own, and the collector's back-off."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from bus.codec import Codec
from bus.validation import Validator
from producers.dcgm.collector import DcgmCollector, DcgmCollectorMetrics, DcgmSource, DcgmUnavailable, loop
from producers.dcgm.mapping import (
    FIELD_MAP,
    ExpositionError,
    XidTracker,
    parse,
    samples,
)
from producers.gpu.reader import FIELDS
from tests.fakes.dcgm import HOSTNAME, UUIDS, exposition

AT = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
MIB = 1024 * 1024


def _records(text: str, groups: tuple[str, ...] = ("fast", "slow"), **kwargs: Any) -> list[dict[str, Any]]:
    options: dict[str, Any] = {"host": None, "xids": XidTracker(), "fallback_host": "endpoint"} | kwargs
    return samples(parse(text), groups, time=AT, **options)  # type: ignore[arg-type]


def _by(records: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["gpu_uuid"], r["interval_group"]): r for r in records}


def test_every_gpusample_metric_field_has_a_rule() -> None:
    assert set(FIELD_MAP) == {name for group in FIELDS.values() for name in group}


def test_the_h100_with_profiling_fields_maps_every_one() -> None:
    got = _by(_records(exposition()))
    fast, slow = got[(UUIDS[0], "fast")], got[(UUIDS[0], "slow")]
    assert (fast["host"], fast["gpu"], fast["gpu_model"], fast["source"]) == (
        HOSTNAME,
        0,
        "NVIDIA H100 80GB HBM3",
        "dcgm",
    )
    assert fast["mig_instance"] is None and fast["parent_gpu_uuid"] is None
    assert fast["utilization_percent"] == 87.0
    assert fast["memory_used_bytes"] == 61440 * MIB
    assert fast["memory_total_bytes"] == (61440 + 19573) * MIB
    assert fast["memory_utilization_percent"] == pytest.approx(61440 / (61440 + 19573) * 100)
    assert fast["memory_bandwidth_utilization_percent"] == pytest.approx(35.2411)  # DRAM_ACTIVE, not COPY
    assert fast["tensor_core_utilization_percent"] == pytest.approx(48.2019)
    assert slow["temperature_celsius"] == 64.0
    assert slow["power_watts"] == pytest.approx(512.337)
    assert slow["energy_joules"] == pytest.approx(123456789.012)  # mJ -> J
    assert slow["pcie_tx_bytes_per_second"] == 1048576000.0
    assert slow["pcie_rx_bytes_per_second"] == 2097152000.0
    assert (slow["sm_clock_hz"], slow["memory_clock_hz"]) == (1_980_000_000, 2_619_000_000)
    assert slow["throttle_reasons"] == ["sw_power_cap"]
    assert (slow["ecc_corrected_errors"], slow["ecc_uncorrected_errors"]) == (3, 0)
    assert slow["xid_errors"] == []
    assert slow["processes"] is None
    # Each group's record carries its own fields only, as the NVML collector's do.
    assert all(fast[name] is None for name in FIELDS["slow"])
    assert all(slow[name] is None for name in FIELDS["fast"])


def test_what_the_a100_does_not_export_is_null_never_zero() -> None:
    got = _by(_records(exposition()))
    fast, slow = got[(UUIDS[1], "fast")], got[(UUIDS[1], "slow")]
    assert fast["tensor_core_utilization_percent"] is None
    assert fast["memory_bandwidth_utilization_percent"] == 5.0  # DCGM_FI_DEV_MEM_COPY_UTIL without DCP
    for name in ("pcie_tx_bytes_per_second", "pcie_rx_bytes_per_second", "throttle_reasons"):
        assert slow[name] is None, name
    assert slow["ecc_corrected_errors"] is None and slow["ecc_uncorrected_errors"] is None
    assert slow["temperature_celsius"] == 41.0 and slow["energy_joules"] == pytest.approx(9876543.21)


def test_mig_instances_are_entities_and_the_board_values_their_gpus() -> None:
    got = _by(_records(exposition()))
    parent = UUIDS[2]
    first, second = f"MIG-{parent}/1", f"MIG-{parent}/2"
    assert set(got) == {
        (UUIDS[0], "fast"), (UUIDS[0], "slow"), (UUIDS[1], "fast"), (UUIDS[1], "slow"),
        (parent, "slow"), (first, "fast"), (second, "fast"),
    }  # fmt: skip
    gpu = got[(parent, "slow")]
    assert gpu["mig_instance"] is None and gpu["gpu"] == 2
    assert (gpu["temperature_celsius"], gpu["power_watts"], gpu["sm_clock_hz"]) == (
        55.0,
        180.25,
        1_410_000_000,
    )
    assert gpu["xid_errors"] == []
    one, two = got[(first, "fast")], got[(second, "fast")]
    assert (one["mig_instance"], one["parent_gpu_uuid"], one["gpu"]) == ("3g.20gb:gi1", parent, 2)
    assert one["gpu_model"] == "NVIDIA A100-SXM4-40GB"
    assert one["memory_used_bytes"] == 10240 * MIB
    assert one["memory_utilization_percent"] == pytest.approx(10240 / (10240 + 9872) * 100)
    assert one["tensor_core_utilization_percent"] == pytest.approx(33.0)
    assert one["utilization_percent"] is None  # dcgm-exporter exports no GPU_UTIL for a GPU instance
    assert two["mig_instance"] == "1g.5gb:gi2"
    assert two["tensor_core_utilization_percent"] == 0.0  # a measured 0 stays 0
    assert two["memory_bandwidth_utilization_percent"] == 0.0


def test_a_gpus_own_board_row_wins_over_its_instances() -> None:
    own_row = f'DCGM_FI_DEV_GPU_TEMP{{gpu="2",UUID="{UUIDS[2]}",modelName="NVIDIA A100-SXM4-40GB"}} 61\n'
    text = exposition().replace('DCGM_FI_DEV_GPU_TEMP{gpu="1"', own_row + 'DCGM_FI_DEV_GPU_TEMP{gpu="1"')
    gpu = _by(_records(text))[(UUIDS[2], "slow")]
    assert gpu["temperature_celsius"] == 61.0


def test_every_record_is_valid_and_encodes() -> None:
    codec, validator = Codec(), Validator()
    for record in _records(exposition()):
        validator.check("GpuSample", record)
        name, decoded = codec.decode(codec.encode("GpuSample", record))
        assert name == "aima.metrics.GpuSample" and decoded["gpu_uuid"] == record["gpu_uuid"]


def test_the_host_setting_wins_over_the_hostname_label_which_wins_over_the_endpoint() -> None:
    assert {r["host"] for r in _records(exposition(), host="set-by-aima-host")} == {"set-by-aima-host"}
    assert {r["host"] for r in _records(exposition())} == {HOSTNAME}
    unlabelled = exposition().replace(f',Hostname="{HOSTNAME}"', "")
    assert {r["host"] for r in _records(unlabelled)} == {"endpoint"}


def test_a_new_xid_is_reported_once_and_the_first_value_is_a_baseline() -> None:
    xids = XidTracker()
    assert xids.new("GPU-a", 43) == []  # seen at start: no telling when it happened
    assert xids.new("GPU-a", 43) == []
    assert xids.new("GPU-a", 79) == [79]
    assert xids.new("GPU-a", 79) == []
    assert xids.new("GPU-a", 0) == []
    assert xids.new("GPU-a", None) is None
    tracker = XidTracker()
    _records(exposition(), ("slow",), xids=tracker)
    after = _by(_records(exposition(xid_gpu1=79), ("slow",), xids=tracker))
    assert after[(UUIDS[1], "slow")]["xid_errors"] == [79]
    assert after[(UUIDS[0], "slow")]["xid_errors"] == []


def test_nan_is_no_reading_and_rows_without_gpu_labels_are_counted() -> None:
    text = exposition().replace('pod="train-llm-0"} 87', 'pod="train-llm-0"} NaN')
    parsed = parse(text + 'DCGM_FI_DEV_FB_USED{Hostname="x"} 5\n')
    fast = _by(samples(parsed, ("fast",), time=AT, host=None, xids=XidTracker(), fallback_host="e"))
    assert fast[(UUIDS[0], "fast")]["utilization_percent"] is None
    assert parsed.unlabelled == 1


def test_text_that_is_not_an_exposition_is_refused() -> None:
    with pytest.raises(ExpositionError):
        parse("<html><body>502 Bad Gateway</body></html>\n{")


def test_only_the_groups_asked_for_are_made() -> None:
    assert {r["interval_group"] for r in _records(exposition(), ("fast",))} == {"fast"}


# -- the collector's schedule and back-off, on a fake clock --------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class _Stop(threading.Event):
    """Waiting advances the fake clock; stops once the clock passes ``until``."""

    def __init__(self, clock: _Clock, until: float) -> None:
        super().__init__()
        self.clock, self.until = clock, until

    def wait(self, timeout: float | None = None) -> bool:
        self.clock.now += max(timeout or 0.0, 0.001)
        if self.clock.now >= self.until:
            self.set()
        return self.is_set()


class _Publisher:
    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def publish(self, topic_key: str, key: str, name: str, value: dict[str, Any]) -> bool:
        self.records.append(value)
        return True

    def poll(self, timeout: float) -> int:
        return 0


def test_back_off_doubles_to_its_cap_while_the_endpoint_is_away_then_the_schedule_resumes() -> None:
    clock = _Clock()
    calls: list[tuple[float, bool]] = []
    away_until = clock.now + 100

    def answer(request: httpx.Request) -> httpx.Response:
        up = clock.now >= away_until
        calls.append((clock.now, up))
        return httpx.Response(200, text=exposition()) if up else httpx.Response(503, text="busy")

    registry = CollectorRegistry()
    source = DcgmSource("http://dcgm:9400/metrics", http=httpx.Client(transport=httpx.MockTransport(answer)))
    collector = DcgmCollector(source, DcgmCollectorMetrics(registry), wall_clock=lambda: AT)
    publisher = _Publisher()
    stop = _Stop(clock, until=away_until + 65)
    loop(collector, publisher, stop, fast_interval_s=5, slow_interval_s=15, backoff_max_s=30, clock=clock)  # type: ignore[arg-type]
    start = 1000.0
    failed = [round(at - start, 3) for at, up in calls if not up]
    assert failed[:6] == [0, 5, 15, 35, 65, 95]  # waits of 5, 10, 20, 30 (the cap), 30
    answered = [round(at - start, 3) for at, up in calls if up]
    assert answered[0] == 125 and answered[1:4] == [130, 135, 140]  # then every fast interval
    assert registry.get_sample_value("aima_dcgm_collector_errors_total", {"kind": "scrape"}) == len(failed)
    assert registry.get_sample_value("aima_dcgm_collector_endpoint_up") == 1
    assert registry.get_sample_value("aima_dcgm_collector_devices") == 4
    groups = [r["interval_group"] for r in publisher.records if r["gpu_uuid"] == UUIDS[0]]
    assert groups.count("slow") == 3 and groups.count("fast") == len(answered)


def test_once_with_the_endpoint_away_raises_its_url() -> None:
    source = DcgmSource("http://127.0.0.1:9/metrics", timeout_s=1)
    collector = DcgmCollector(source, DcgmCollectorMetrics(CollectorRegistry()))
    with pytest.raises(DcgmUnavailable, match=r"127\.0\.0\.1:9/"):
        collector.collect(("fast",))
