"""Energy and its cost (issue 17, item 3) as plain Python: the energy between two readings of a GPU
(counter increase, power x time where the counter reset or is missing, nothing where neither is known),
its split by hour, the DeviceHoursProcessor's energy per GPU and hour (replays, restarts, old state), and
the IdleHoursProcessor's fleet energy with its cost at the catalogue's tariff."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from bus.codec import Codec
from streams.costs import DeviceHoursProcessor, IdleHoursProcessor
from streams.costs.energy import J_PER_KWH, energy_by_hour, reading
from streams.costs.pricing import PriceCatalogue
from streams.runtime.processor import Input
from streams.runtime.state import OFFSET
from tests.unit.test_costs import (
    COST,
    GPU,
    H100,
    Feed,
    allocation_record,
    at,
    costs_feed,
    device_record,
    gpu_sample,
    job_event,
    ms,
)

MAX_GAP_MS = 60_000
TARIFF = PriceCatalogue.from_mapping(
    {"energy_eur_per_kwh": 0.3, "providers": {"aws": {H100: {"on_demand": 4.0}}}}
)
NO_TARIFF = PriceCatalogue.from_mapping({"providers": {"aws": {H100: {"on_demand": 4.0}}}})
FLEET_10 = f"idle|{H100}|2025-04-10T10:00Z"


def slow(uuid: str, time: Any, *, watts: float | None, joules: float | None) -> dict[str, Any]:
    return gpu_sample(uuid, time, interval_group="slow", power_watts=watts, energy_joules=joules)


def device_energy(feed: Feed, uuid: str, hour: int) -> float | None:
    """The latest energy_kwh published for ``uuid``'s hour ``hour`` of 10 April."""
    found = [
        o.value
        for o in feed.outputs
        if o.topic_key == "streams.device-hours"
        and o.value["source"].endswith(uuid)
        and o.value["time"] == at(10, hour)
    ]
    assert found, f"nothing published for {uuid} at {hour}:00"
    return found[-1]["energy_kwh"]


# -- between two readings --------------------------------------------------------------------------------


def test_the_counter_increase_is_the_energy_whatever_the_power_says() -> None:
    t = ms(at(10, 10))
    assert energy_by_hour([t, 1_000.0, 100.0], [t + 30_000, 10_000.0, 900.0], MAX_GAP_MS) == [
        (ms(at(10, 10)), pytest.approx(9_000.0))
    ]


def test_a_counter_reset_falls_back_to_the_mean_power_times_the_time() -> None:
    t = ms(at(10, 10))
    # the counter went back (a driver reload): 200 W and 400 W, 30 s apart: 300 W x 30 s
    assert energy_by_hour([t, 50_000.0, 200.0], [t + 30_000, 100.0, 400.0], MAX_GAP_MS) == [
        (ms(at(10, 10)), pytest.approx(9_000.0))
    ]


def test_a_missing_counter_falls_back_to_the_power_that_is_known() -> None:
    t = ms(at(10, 10))
    # only the first reading has a power: 200 W x 30 s
    assert energy_by_hour([t, None, 200.0], [t + 30_000, 5_000.0, None], MAX_GAP_MS) == [
        (ms(at(10, 10)), pytest.approx(6_000.0))
    ]


def test_neither_counter_increase_nor_power_is_nothing_not_zero() -> None:
    t = ms(at(10, 10))
    assert reading(t, None, None) is None  # a sample with neither is no reading at all
    assert energy_by_hour([t, 50_000.0, None], [t + 30_000, 100.0, None], MAX_GAP_MS) == []  # reset
    assert energy_by_hour([t, 100.0, None], [t, 200.0, None], MAX_GAP_MS) == []  # no time between


def test_energy_across_an_hour_boundary_is_split_by_the_time_in_each_hour() -> None:
    t = ms(at(10, 10, 59, 50))
    assert energy_by_hour([t, 0.0, None], [t + 40_000, 4_000.0, None], MAX_GAP_MS) == [
        (ms(at(10, 10)), pytest.approx(1_000.0)),  # 10 of the 40 s
        (ms(at(10, 11)), pytest.approx(3_000.0)),
    ]


def test_readings_further_apart_than_max_gap_count_power_for_max_gap_only() -> None:
    t = ms(at(10, 10))
    # 10 min of silence: like the device-hours, the GPU counts as present for 60 s after its reading
    assert energy_by_hour([t, 0.0, 300.0], [t + 600_000, 180_000.0, 300.0], MAX_GAP_MS) == [
        (ms(at(10, 10)), pytest.approx(18_000.0))
    ]


# -- per GPU and hour ------------------------------------------------------------------------------------


def _an_hour_of_gpu_1() -> list[dict[str, Any]]:
    """GPU-1 from 10:00 to 11:00: slow readings every 30 s whose counter grows 9 kJ a step (300 W); the
    counter resets at reading 60 (400 W reported around it); readings 80-84 have no counter (500 W);
    fast samples without power or energy 10 s after each reading."""
    values = []
    for i in range(121):
        counter: float | None = 1e6 + 9_000 * i if i < 60 else 9_000.0 * (i - 60)
        watts = 300.0
        if i in (59, 60):
            watts = 400.0
        if 80 <= i <= 84:
            counter, watts = None, 500.0
        moment = at(10, 10) + timedelta(seconds=30 * i)
        values.append(slow("GPU-1", moment, watts=watts, joules=counter))
        if i < 120:
            values.append(gpu_sample("GPU-1", moment + timedelta(seconds=10)))
    return values


# 120 intervals of 30 s: 113 by the counter (9 kJ), the reset one by power (400 W x 30 s), and the six
# touching readings without a counter by power: 79-80 and 84-85 at (300 + 500) / 2 W, four at 500 W.
GPU_1_JOULES = 113 * 9_000 + 400 * 30 + 2 * 400 * 30 + 4 * 500 * 30


def test_energy_per_gpu_and_hour_through_a_reset_and_missing_counters() -> None:
    feed = Feed(DeviceHoursProcessor(), "gpu.samples", GPU)
    feed.send(*_an_hour_of_gpu_1())
    assert device_energy(feed, "GPU-1", 10) == pytest.approx(GPU_1_JOULES / J_PER_KWH)
    record = feed.latest("streams.device-hours")[H100]
    assert record["device_hours"] == pytest.approx(1.0)  # the coverage is unchanged by the readings


def test_a_gpu_without_power_or_energy_has_no_energy_figure() -> None:
    feed = Feed(DeviceHoursProcessor(), "gpu.samples", GPU)
    feed.send(*(gpu_sample("GPU-9", at(10, 10) + timedelta(seconds=30 * i)) for i in range(10)))
    assert device_energy(feed, "GPU-9", 10) is None  # unknown, not 0
    assert feed.latest("streams.device-hours")[H100]["device_hours"] == pytest.approx(270 / 3600)


def test_energy_across_an_hour_boundary_in_the_processor() -> None:
    feed = Feed(DeviceHoursProcessor(), "gpu.samples", GPU)
    feed.send(
        *(
            slow("GPU-2", at(10, 10, 59) + timedelta(seconds=30 * i), watts=200.0, joules=6_000.0 * i)
            for i in range(5)
        )
    )
    assert device_energy(feed, "GPU-2", 10) == pytest.approx(12_000 / J_PER_KWH)
    assert device_energy(feed, "GPU-2", 11) == pytest.approx(12_000 / J_PER_KWH)


def test_replays_count_no_energy_twice_and_a_restart_publishes_it_again() -> None:
    feed = Feed(DeviceHoursProcessor(), "gpu.samples", GPU)
    values = [
        slow("GPU-1", at(10, 10) + timedelta(seconds=30 * i), watts=300.0, joules=9e3 * i) for i in range(5)
    ]
    inputs = [Input("gpu.samples", 0, i, GPU, v, v["time"]) for i, v in enumerate(values)]
    feed.run(inputs)
    feed.run(inputs)  # redelivered after a crash: at or below each entry's offset
    feed.run(inputs[2:])
    assert device_energy(feed, "GPU-1", 10) == pytest.approx(36_000 / J_PER_KWH)
    again = Feed(DeviceHoursProcessor(), "gpu.samples", GPU, feed.state)
    again.watermark = feed.watermark
    result = again.run(inputs[4:], resumed=True, committed=3)  # the last sample may not have been sent
    assert [o.value["energy_kwh"] for o in result.outputs] == pytest.approx([36_000 / J_PER_KWH])


def test_state_written_before_energy_was_counted_carries_on() -> None:
    feed = Feed(DeviceHoursProcessor(), "gpu.samples", GPU)
    feed.state["dev|GPU-1"] = {
        "gpu_uuid": "GPU-1",
        "last_ms": ms(at(10, 10)),
        "hours": {str(ms(at(10, 10))): 0},
        "gpu_model": H100,
        OFFSET: -1,
    }
    feed.send(slow("GPU-1", at(10, 10, 0, 30), watts=300.0, joules=0.0))  # the first reading
    assert device_energy(feed, "GPU-1", 10) is None  # present 30 s, energy not known yet
    feed.send(slow("GPU-1", at(10, 10, 1), watts=300.0, joules=9_000.0))
    assert device_energy(feed, "GPU-1", 10) == pytest.approx(9_000 / J_PER_KWH)


# -- the fleet's energy and its cost ---------------------------------------------------------------------


def energy_record(uuid: str, hour: int, hours: float, kwh: float | None) -> dict[str, Any]:
    value = device_record(uuid, hour, hours)
    value.update(energy_kwh=kwh, energy_cost_eur=None)
    return value


def test_fleet_energy_is_the_sum_of_the_known_and_priced_at_the_tariff() -> None:
    feed = Feed(IdleHoursProcessor(prices=TARIFF), "streams.device-hours", COST)
    feed.send(energy_record("GPU-1", 10, 1.0, 0.2), energy_record("GPU-2", 10, 1.0, None))
    feed.send(allocation_record("newsroom", 10, 0.5))
    feed.send(energy_record("GPU-1", 10, 1.0, 0.3))  # a re-sent partial replaces, never adds
    fleet = feed.latest()[FLEET_10]
    assert fleet["energy_kwh"] == pytest.approx(0.3)  # GPU-2 told nothing: not counted as 0
    assert fleet["energy_cost_eur"] == pytest.approx(0.3 * 0.3)
    assert fleet["idle_gpu_hours"] == pytest.approx(1.5) and fleet["project"] is None


def test_no_gpu_with_energy_is_a_null_figure_and_no_tariff_a_null_cost(
    caplog: pytest.LogCaptureFixture,
) -> None:
    unknown = Feed(IdleHoursProcessor(prices=TARIFF), "streams.device-hours", COST)
    unknown.send(energy_record("GPU-1", 10, 1.0, None))
    assert unknown.latest()[FLEET_10]["energy_kwh"] is None
    assert unknown.latest()[FLEET_10]["energy_cost_eur"] is None
    untariffed = Feed(IdleHoursProcessor(prices=NO_TARIFF), "streams.device-hours", COST)
    untariffed.send(energy_record("GPU-1", 10, 1.0, 0.5))
    untariffed.send(energy_record("GPU-1", 10, 1.0, 0.6))
    fleet = untariffed.latest()[FLEET_10]
    assert fleet["energy_kwh"] == pytest.approx(0.6) and fleet["energy_cost_eur"] is None
    assert sum("energy_eur_per_kwh" in r.message for r in caplog.records) == 1  # said once


def test_energy_cost_end_to_end_through_the_processors() -> None:
    """Job events and samples through their processors, the internal topic replayed into the fleet's."""
    jobs, devices = costs_feed(), Feed(DeviceHoursProcessor(), "gpu.samples", GPU)
    jobs.send(job_event("started", "j1", at(10, 10, 30), gpu_count=1))
    jobs.send(job_event("finished", "j1", at(10, 11)))
    devices.send(*_an_hour_of_gpu_1())
    devices.send(*(gpu_sample("GPU-9", at(10, 10) + timedelta(seconds=30 * i)) for i in range(121)))
    fleet = Feed(IdleHoursProcessor(prices=TARIFF), "streams.device-hours", COST)
    internal = [o for feed in (jobs, devices) for o in feed.outputs if o.topic_key == "streams.device-hours"]
    fleet.send(*(o.value for o in internal))
    fleet.send(*(o.value for o in internal))  # the whole topic again (re-sent at new offsets)
    record = fleet.latest()[FLEET_10]
    assert record["device_hours"] == pytest.approx(2.0)
    assert record["energy_kwh"] == pytest.approx(GPU_1_JOULES / J_PER_KWH)  # GPU-9 has no readings
    assert record["energy_cost_eur"] == pytest.approx(GPU_1_JOULES / J_PER_KWH * 0.3)
    project = jobs.latest()[f"newsroom|{H100}|aws|on_demand|2025-04-10T10:00Z"]
    assert project["energy_kwh"] is None  # a project's share is the energy_costs view's (migration 0016)


# -- each GPU's energy and its cost ----------------------------------------------------------------------


def test_each_gpu_hour_is_published_priced_beside_the_fleet_sum() -> None:
    feed = Feed(IdleHoursProcessor(prices=TARIFF), "streams.device-hours", COST)
    feed.send(energy_record("GPU-1", 10, 1.0, 0.2), energy_record("GPU-2", 10, 0.5, None))
    feed.send(allocation_record("newsroom", 10, 0.5))  # an allocation names no GPU: no GPU record
    feed.send(energy_record("GPU-1", 10, 1.0, 0.3))  # the hour's new total
    gpus = feed.latest("energy")
    assert set(gpus) == {"GPU-1|2025-04-10T10:00Z", "GPU-2|2025-04-10T10:00Z"}
    one, two = gpus["GPU-1|2025-04-10T10:00Z"], gpus["GPU-2|2025-04-10T10:00Z"]
    assert (one["gpu_uuid"], one["gpu_model"], one["time"], one["period_end"]) == (
        "GPU-1",
        H100,
        at(10, 10),
        at(10, 11),
    )
    assert one["device_hours"] == 1.0 and one["energy_kwh"] == pytest.approx(0.3)
    assert one["energy_cost_eur"] == pytest.approx(0.3 * 0.3)
    assert two["device_hours"] == 0.5 and two["energy_kwh"] is None and two["energy_cost_eur"] is None
    assert len([o for o in feed.outputs if o.topic_key == "energy"]) == 3  # only the GPU that changed
    fleet = feed.latest()[FLEET_10]
    known = [g["energy_kwh"] for g in gpus.values() if g["energy_kwh"] is not None]
    assert fleet["energy_kwh"] == pytest.approx(sum(known))  # the fleet's figure is their sum
    assert sum(g["device_hours"] for g in gpus.values()) == fleet["device_hours"]


def test_a_gpu_record_is_valid_avro_and_unpriced_without_a_tariff() -> None:
    feed = Feed(IdleHoursProcessor(prices=NO_TARIFF), "streams.device-hours", COST)
    feed.send(energy_record("GPU-1", 10, 1.0, 0.5))
    (output,) = [o for o in feed.outputs if o.topic_key == "energy"]
    assert output.value["energy_kwh"] == 0.5 and output.value["energy_cost_eur"] is None
    codec = Codec()
    assert codec.decode(codec.encode(output.record_name, output.value)) == (
        "aima.metrics.GpuEnergy",
        output.value,
    )


def test_replays_repeat_no_gpu_record_and_a_restart_publishes_them_again() -> None:
    feed = Feed(IdleHoursProcessor(prices=TARIFF), "streams.device-hours", COST)
    inputs = [
        Input("streams.device-hours", 0, offset, COST, value, value["time"])
        for offset, value in enumerate(
            (energy_record("GPU-1", 10, 1.0, 0.2), energy_record("GPU-2", 10, 1.0, 0.4))
        )
    ]
    feed.run(inputs)
    sent = len(feed.outputs)
    feed.run(inputs)  # a replay at the same offsets
    assert [o for o in feed.outputs[sent:] if o.topic_key == "energy"] == []
    again = Feed(IdleHoursProcessor(prices=TARIFF), "streams.device-hours", COST, state=feed.state)
    again.watermark = feed.watermark
    again.run([], resumed=True, committed=1)  # the GPU-2 record may not have been sent
    assert {k: v["energy_kwh"] for k, v in again.latest("energy").items()} == {
        "GPU-1|2025-04-10T10:00Z": pytest.approx(0.2),
        "GPU-2|2025-04-10T10:00Z": pytest.approx(0.4),
    }
