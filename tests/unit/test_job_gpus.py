"""The GPUs a job names (JobEvent ``gpu_uuids``, issue 17 item 3): read by the job SDK from its argument or
from NVIDIA_VISIBLE_DEVICES / CUDA_VISIBLE_DEVICES through :class:`producers.settings.JobGpuSettings`, set
by the simulator from its schedule, and checked by ``bus.validation`` (record by record, on the fast path
and on decoded columns) so that a bad list is dead-lettered with its reason. What the database makes of
them is tests/integration/test_energy_attribution.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import polars as pl
import pytest

from bus.validation import ColumnValidator, Validator, problems
from producers.settings import JobGpuSettings, parse_gpu_uuids
from producers.simulator import Fleet, generate
from tests.unit.test_sdk import FakePublisher, job

T0 = datetime(2025, 3, 14, 8, 0, tzinfo=UTC)


def started_event(**fields: Any) -> dict[str, Any]:
    value = {
        "time": T0, "job_id": "j1", "event": "started", "project": "news", "host": "gpu-01", "gpu_count": 2,
        "gpu_uuids": ["GPU-a", "GPU-b"], "source": "test",
    }  # fmt: skip
    value.update(fields)
    return value


# -- where the SDK finds them --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("GPU-a,GPU-b", ["GPU-a", "GPU-b"]),
        (" GPU-a , GPU-b ,", ["GPU-a", "GPU-b"]),
        ("0,1", None),  # indices name no GPU
        ("all", None),
        ("none", None),
        ("", None),
        ("MIG-4d2a", None),  # a MIG instance: its energy is counted on its physical GPU
        ("GPU-a,1", None),
        (None, None),
    ],
)
def test_only_lists_of_gpu_uuids_count(value: str | None, expected: list[str] | None) -> None:
    assert parse_gpu_uuids(value) == expected


def test_nvidia_visible_devices_come_first_then_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NVIDIA_VISIBLE_DEVICES", "all")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-c")
    assert JobGpuSettings().gpu_uuids() == ["GPU-c"]
    monkeypatch.setenv("NVIDIA_VISIBLE_DEVICES", "GPU-a,GPU-b")
    assert JobGpuSettings().gpu_uuids() == ["GPU-a", "GPU-b"]
    monkeypatch.delenv("NVIDIA_VISIBLE_DEVICES")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert JobGpuSettings().gpu_uuids() is None


def test_the_sdk_sends_the_gpus_it_is_given_once_the_job_holds_them() -> None:
    publisher = FakePublisher()
    report = job(
        publisher, gpu_uuids=["GPU-a", "GPU-b"], gpu_settings=JobGpuSettings(CUDA_VISIBLE_DEVICES="GPU-z")
    )
    report.queued()
    report.started()
    report.finished()
    report.close()
    events = {e["event"]: e for e in publisher.values("JobEvent")}
    assert events["queued"]["gpu_uuids"] is None
    for kind in ("started", "finished"):
        assert (events[kind]["gpu_uuids"], events[kind]["gpu_count"]) == (["GPU-a", "GPU-b"], 2), kind


def test_the_sdk_reads_the_visible_gpus_when_not_told() -> None:
    publisher = FakePublisher()
    with job(publisher, gpu_settings=JobGpuSettings(NVIDIA_VISIBLE_DEVICES="GPU-a,GPU-b")) as report:
        assert report.gpu_uuids == ["GPU-a", "GPU-b"]
    assert [(e["gpu_uuids"], e["gpu_count"]) for e in publisher.values("JobEvent")] == [
        (["GPU-a", "GPU-b"], 2)
    ] * 2
    publisher = FakePublisher()
    with job(publisher, gpu_settings=JobGpuSettings(CUDA_VISIBLE_DEVICES="0,1")):
        pass
    assert [(e["gpu_uuids"], e["gpu_count"]) for e in publisher.values("JobEvent")] == [(None, 1)] * 2


def test_gpus_that_are_not_the_gpu_count(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ValueError, match="gpu_uuids names 1 GPU"):
        job(FakePublisher(), gpu_count=2, gpu_uuids=["GPU-a"])
    # From the environment: left out (logged), so the job's events stay valid.
    publisher = FakePublisher()
    with job(publisher, gpu_count=1, gpu_settings=JobGpuSettings(NVIDIA_VISIBLE_DEVICES="GPU-a,GPU-b")):
        pass
    assert [(e["gpu_uuids"], e["gpu_count"]) for e in publisher.values("JobEvent")] == [(None, 1)] * 2
    assert "GPU UUIDs left out" in caplog.text


# -- the simulator ---------------------------------------------------------------------------------------


def test_the_simulator_names_the_gpus_each_job_holds() -> None:
    fleet = Fleet(seed=4, hosts=3, gpus_per_host=4)
    uuids_of_host = {host.name: {gpu.uuid for gpu in host.gpus} for host in fleet.hosts}
    held: dict[str, str] = {}  # gpu_uuid -> job holding it
    named = 0
    for topic, _, _, value in generate(fleet, T0, T0 + timedelta(hours=2), 15.0):
        if topic != "job.events":
            continue
        assert not problems(value), value
        if value["event"] == "queued":
            assert value["gpu_uuids"] is None
            continue
        uuids = value["gpu_uuids"]
        assert len(uuids) == value["gpu_count"] and set(uuids) <= uuids_of_host[value["host"]], value
        for uuid in uuids:
            if value["event"] == "started":
                assert uuid not in held, f"{uuid} held by {held.get(uuid)} and {value['job_id']}"
                held[uuid] = value["job_id"]
                named += 1
            else:
                assert held.pop(uuid) == value["job_id"]
    assert named > 10


# -- validation ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uuids", "why"),
    [
        (["GPU-a"], "gpu_uuids: names 1 GPU(s) but gpu_count is 2"),
        (["GPU-a", "GPU-a"], "gpu_uuids: names a GPU more than once"),
        (["GPU-a", " "], "gpu_uuids[1]: a GPU UUID must be a non-empty string, got ' '"),
        (["GPU-a", "G" * 300], "gpu_uuids[1]: a label value of 300 characters is longer than 256"),
    ],
)
def test_a_bad_gpu_list_is_refused_saying_why(uuids: list[str], why: str) -> None:
    value = started_event(gpu_uuids=uuids)
    assert problems(value) == [why]
    assert Validator().problems("JobEvent", value) == [why]


def test_no_gpu_list_or_a_good_one_passes() -> None:
    for value in (started_event(), started_event(gpu_uuids=None), started_event(gpu_count=0, gpu_uuids=[])):
        assert problems(value) == [] and Validator().problems("JobEvent", value) == []


def test_columns_pass_or_fail_as_the_records_do() -> None:
    def frame(uuids: list[list[str] | None], counts: list[int]) -> pl.DataFrame:
        return pl.DataFrame(
            {"gpu_count": counts, "gpu_uuids": uuids},
            schema={"gpu_count": pl.Int32, "gpu_uuids": pl.List(pl.String)},
        ).with_columns(
            *(pl.lit(None, dtype=pl.Float64).alias(n) for n in ("media_minutes", "queue_wait_seconds")),
            *(pl.lit("x").alias(n) for n in ("job_id", "project", "host", "model", "gpu_model", "queue")),
            *(pl.lit("x").alias(n) for n in ("service", "provider", "user", "error", "source")),
        )

    validator = ColumnValidator()
    assert validator.all_valid("JobEvent", frame([["GPU-a", "GPU-b"], None], [2, 1])) is True
    assert validator.all_valid("JobEvent", frame([["GPU-a", "GPU-a"], None], [2, 1])) is False
    assert validator.all_valid("JobEvent", frame([["GPU-a"], None], [2, 1])) is False
    assert validator.all_valid("JobEvent", frame([["GPU-a", ""]], [2])) is False
