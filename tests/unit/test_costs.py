"""The cost processors as plain Python, against hand-computed GPU-hours, costs, budgets and idle hours:
every batch goes through a state that keeps only what survives a JSON round trip (as a Faust table does)
and checks that no key is written twice in one call."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator, MutableMapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from streams.costs import (
    DEVICE_SOURCE_PREFIX,
    CostProcessor,
    DeviceHoursProcessor,
    IdleHoursProcessor,
    JobRepartitioner,
    cost_processors_from_settings,
    gpu_hours_by_hour,
    split_by_hour,
)
from streams.costs.budgets import BudgetBook
from streams.costs.common import upstream_of
from streams.costs.pricing import PriceCatalogue, Reloading
from streams.costs.settings import CostSettings
from streams.runtime.processor import Input, Output, PartitionBatch, Result

JOB = "aima.metrics.JobEvent"
GPU = "aima.metrics.GpuSample"
COST = "aima.metrics.CostRecord"
H100 = "NVIDIA H100 80GB HBM3"
PRICES = PriceCatalogue.from_mapping(
    {
        "default_provider": "aws",
        "providers": {
            "aws": {H100: {"on_demand": 4.0, "spot": 1.5}},
            "gcp": {"L4": {"on_demand": 0.5}},
        },
    }
)


def at(day: int, hour: int = 0, minute: int = 0, second: int = 0, month: int = 4) -> datetime:
    return datetime(2025, month, day, hour, minute, second, tzinfo=UTC)


def ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def job_event(event: str, job_id: str, time: datetime, **fields: Any) -> dict[str, Any]:
    value = {
        "time": time,
        "job_id": job_id,
        "event": event,
        "project": "newsroom",
        "user": None,
        "service": None,
        "queue": "default",
        "model": "whisper",
        "host": "gpu-01",
        "gpu_count": 2,
        "gpu_model": H100,
        "provider": "aws",
        "pricing": "on_demand",
        "media_minutes": None,
        "queue_wait_seconds": None,
        "error": None,
        "source": "test",
    }
    value.update(fields)
    return value


def gpu_sample(uuid: str, time: datetime, model: str = H100, **fields: Any) -> dict[str, Any]:
    value = {
        "time": time,
        "host": "gpu-01",
        "gpu": 0,
        "gpu_uuid": uuid,
        "gpu_model": model,
        "mig_instance": None,
        "parent_gpu_uuid": None,
        "source": "test",
        "interval_group": "fast",
    }
    value.update(fields)
    return value


class TableLike(MutableMapping[str, Any]):
    """A Faust table stand-in: stores a JSON copy (so state must be JSON-serialisable) and counts writes."""

    def __init__(self) -> None:
        self.data: dict[str, str] = {}
        self.writes: Counter[str] = Counter()
        self.log: list[tuple[str, str | None]] = []
        """Every write in order, as the changelog has it (None: a delete)."""

    def __getitem__(self, key: str) -> Any:
        return json.loads(self.data[key])

    def __setitem__(self, key: str, value: Any) -> None:
        self.writes[key] += 1
        self.data[key] = json.dumps(value)
        self.log.append((key, self.data[key]))

    def __delitem__(self, key: str) -> None:
        self.writes[key] += 1
        del self.data[key]
        self.log.append((key, None))

    def __iter__(self) -> Iterator[str]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)


class Feed:
    """Drives one processor on one partition of one topic, as the app does."""

    def __init__(self, processor: Any, topic: str, record_name: str, state: TableLike | None = None) -> None:
        self.processor, self.topic, self.record_name = processor, topic, record_name
        self.state = state if state is not None else TableLike()
        self.next_offset = 0
        self.watermark: datetime | None = None
        self.outputs: list[Output] = []
        self.late: list[tuple[Input, str]] = []

    def send(self, *values: dict[str, Any]) -> Result:
        inputs = []
        for value in values:
            inputs.append(Input(self.topic, 0, self.next_offset, self.record_name, value, value["time"]))
            self.next_offset += 1
        return self.run(inputs)

    def run(self, inputs: list[Input], *, resumed: bool = False, committed: int | None = None) -> Result:
        previous = self.watermark
        times = [i.event_time for i in inputs] + ([previous] if previous else [])
        self.watermark = max(times)
        batch = PartitionBatch(self.topic, 0, inputs, self.watermark, previous, committed, resumed)
        self.state.writes.clear()
        result = self.processor.process(batch, self.state)
        assert max(self.state.writes.values(), default=0) <= 1, self.state.writes
        self.outputs += result.outputs
        self.late += result.late
        return result

    def latest(self, topic: str = "costs") -> dict[str, dict[str, Any]]:
        """Upsert semantics: the last value per key."""
        return {o.key: o.value for o in self.outputs if o.topic_key == topic}


def hour_key(hour: int, project: str = "newsroom", model: str = H100, provider: str = "aws") -> str:
    return f"{project}|{model}|{provider}|on_demand|2025-04-10T{hour:02d}:00Z"


def costs_feed(budgets: BudgetBook | None = None, **kwargs: Any) -> Feed:
    processor = CostProcessor(PRICES, budgets, **kwargs)
    return Feed(processor, "streams.jobs-by-project", JOB)


# -- hour splitting --------------------------------------------------------------------------------------


def test_two_gpu_job_from_10_30_to_12_15_splits_into_1_2_and_half_gpu_hours() -> None:
    hours = gpu_hours_by_hour(2, ms(at(10, 10, 30)), ms(at(10, 12, 15)))
    assert hours == {ms(at(10, 10)): 1.0, ms(at(10, 11)): 2.0, ms(at(10, 12)): 0.5}
    assert split_by_hour(ms(at(10, 11)), ms(at(10, 11))) == []
    assert split_by_hour(ms(at(10, 11)), ms(at(10, 12))) == [(ms(at(10, 11)), 3_600_000)]


# -- job events by project -------------------------------------------------------------------------------


def test_repartitioner_keys_every_job_event_by_project() -> None:
    feed = Feed(JobRepartitioner(), "job.events", JOB)
    events = [job_event("queued", "j1", at(10, 9)), job_event("started", "j2", at(10, 9), project="archive")]
    result = feed.send(*events)
    tagged = [{**event, "source": "test via job.events/0"} for event in events]
    assert [(o.topic_key, o.key, o.value) for o in result.outputs] == [
        ("streams.jobs-by-project", "newsroom", tagged[0]),
        ("streams.jobs-by-project", "archive", tagged[1]),
    ]
    assert len(feed.state) == 0


# -- GPU-hours, cost, job cost ---------------------------------------------------------------------------


def test_gpu_hours_cost_and_job_cost_of_a_finished_job() -> None:
    feed = costs_feed()
    feed.send(job_event("queued", "j1", at(10, 10, 20)))
    feed.send(job_event("started", "j1", at(10, 10, 30)))
    feed.send(job_event("finished", "j1", at(10, 12, 15), media_minutes=35.0))
    costs = feed.latest()
    # 2 GPUs x (0.5 h, 1 h, 0.25 h) at 4 EUR per GPU-hour
    for hour, gpu_hours in ((10, 1.0), (11, 2.0), (12, 0.5)):
        record = costs[hour_key(hour)]
        assert record["kind"] == "gpu_hours"
        assert record["gpu_hours"] == pytest.approx(gpu_hours)
        assert record["cost_estimated_eur"] == pytest.approx(gpu_hours * 4.0)
        assert record["time"] == at(10, hour) and record["period_end"] == at(10, hour + 1)
        assert (record["project"], record["gpu_model"], record["provider"], record["pricing"]) == (
            "newsroom",
            H100,
            "aws",
            "on_demand",
        )
        assert record["device_hours"] is None and record["source"] == "stream"
    job = costs["job|j1"]
    assert job["kind"] == "job_cost" and job["job_id"] == "j1"
    assert job["gpu_hours"] == pytest.approx(3.5)
    assert job["job_cost_eur"] == pytest.approx(14.0)  # 3.5 GPU-hours x 4 EUR
    assert job["job_cost_per_media_minute_eur"] == pytest.approx(0.4)  # 14 EUR / 35 min
    assert (job["time"], job["period_end"]) == (at(10, 10, 30), at(10, 12, 15))


def test_running_job_publishes_the_current_hour_as_a_partial_and_upserts_it() -> None:
    feed = costs_feed()
    feed.send(job_event("started", "j1", at(10, 10, 30)))
    feed.send(job_event("queued", "other", at(10, 11, 15)))  # the watermark moves to 11:15
    costs = feed.latest()
    assert costs[hour_key(10)]["gpu_hours"] == pytest.approx(1.0)
    assert costs[hour_key(11)]["gpu_hours"] == pytest.approx(0.5)  # 2 GPUs x 15 min, so far
    assert "job|j1" not in costs
    feed.send(job_event("finished", "j1", at(10, 12, 15)))
    costs = feed.latest()
    assert costs[hour_key(11)]["gpu_hours"] == pytest.approx(2.0)
    assert costs[hour_key(12)]["gpu_hours"] == pytest.approx(0.5)


def test_an_end_event_behind_the_watermark_takes_back_the_partials_after_it() -> None:
    feed = costs_feed()
    feed.send(job_event("started", "j1", at(10, 10, 30)))
    feed.send(job_event("queued", "other", at(10, 13, 30)))  # counted up to 13:30
    assert feed.latest()[hour_key(13)]["gpu_hours"] == pytest.approx(1.0)
    feed.send(job_event("finished", "j1", at(10, 12, 15)))
    costs = feed.latest()
    assert [costs[hour_key(h)]["gpu_hours"] for h in (10, 11, 12, 13)] == pytest.approx([1.0, 2.0, 0.5, 0.0])


def test_jobs_share_the_hour_bucket_of_their_project_model_and_provider() -> None:
    feed = costs_feed()
    feed.send(job_event("started", "a", at(10, 10)), job_event("started", "b", at(10, 10, 30), gpu_count=1))
    feed.send(job_event("finished", "a", at(10, 11)), job_event("finished", "b", at(10, 11)))
    costs = feed.latest()
    assert costs[hour_key(10)]["gpu_hours"] == pytest.approx(2.5)  # 2 x 1 h + 1 x 0.5 h
    assert costs[hour_key(10)]["cost_estimated_eur"] == pytest.approx(10.0)


def test_spot_default_provider_and_other_projects() -> None:
    feed = costs_feed()
    feed.send(
        job_event("started", "s", at(10, 10), pricing="spot", provider=None, gpu_count=4),
        job_event("started", "g", at(10, 10), project="archive", provider="gcp", gpu_model="NVIDIA L4"),
    )
    feed.send(
        job_event("finished", "s", at(10, 10, 30)), job_event("finished", "g", at(10, 11), project="archive")
    )
    costs = feed.latest()
    spot = costs["newsroom|NVIDIA H100 80GB HBM3|aws|spot|2025-04-10T10:00Z"]
    assert spot["gpu_hours"] == pytest.approx(2.0) and spot["cost_estimated_eur"] == pytest.approx(3.0)
    assert spot["provider"] == "aws" and spot["pricing"] == "spot"
    l4 = costs["archive|NVIDIA L4|gcp|on_demand|2025-04-10T10:00Z"]
    assert l4["gpu_hours"] == pytest.approx(2.0) and l4["cost_estimated_eur"] == pytest.approx(1.0)
    assert costs["job|g"]["job_cost_eur"] == pytest.approx(1.0)


def test_unknown_price_gives_null_costs_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    feed = costs_feed()
    with caplog.at_level(logging.WARNING, logger="streams.costs"):
        feed.send(job_event("started", "j1", at(10, 10), gpu_model="NVIDIA B200"))
        feed.send(job_event("queued", "x", at(10, 10, 30)))
        feed.send(job_event("finished", "j1", at(10, 11), gpu_model="NVIDIA B200", media_minutes=10.0))
    costs = feed.latest()
    bucket = costs[hour_key(10, model="NVIDIA B200")]
    assert bucket["gpu_hours"] == pytest.approx(2.0) and bucket["cost_estimated_eur"] is None
    assert costs["job|j1"]["gpu_hours"] == pytest.approx(2.0)
    assert (
        costs["job|j1"]["job_cost_eur"] is None and costs["job|j1"]["job_cost_per_media_minute_eur"] is None
    )
    assert caplog.text.count("no price for GPU model 'NVIDIA B200'") == 1


@pytest.mark.parametrize("minutes", [None, 0.0])
def test_no_cost_per_media_minute_without_media(minutes: float | None) -> None:
    feed = costs_feed()
    feed.send(job_event("started", "j1", at(10, 10)))
    feed.send(job_event("failed", "j1", at(10, 10, 30), media_minutes=minutes, error="boom"))
    job = feed.latest()["job|j1"]
    assert job["job_cost_eur"] == pytest.approx(4.0) and job["job_cost_per_media_minute_eur"] is None


def test_replayed_batches_count_nothing_twice() -> None:
    feed = costs_feed()
    feed.send(job_event("started", "j1", at(10, 10, 30)))
    end = [
        Input(
            "streams.jobs-by-project", 0, 1, JOB, job_event("finished", "j1", at(10, 12, 15)), at(10, 12, 15)
        )
    ]
    feed.run(end)
    before = dict(feed.state.data)
    replayed = feed.run(end)  # redelivered after a crash: same offsets
    assert feed.state.data == {**before, "~index": feed.state.data["~index"]}
    assert not [o for o in replayed.outputs if o.key == "job|j1"]
    costs = feed.latest()
    assert costs[hour_key(11)]["gpu_hours"] == pytest.approx(2.0)
    assert costs["job|j1"]["job_cost_eur"] == pytest.approx(14.0)


def test_events_resent_at_new_offsets_count_nothing_twice() -> None:
    feed = costs_feed()
    start, end = job_event("started", "j1", at(10, 10, 30)), job_event("finished", "j1", at(10, 12, 15))
    feed.send(start, end)
    job_costs = [o for o in feed.outputs if o.key == "job|j1"]
    feed.send(start, end)  # the repartitioner re-sent them after its own replay
    costs = feed.latest()
    assert [costs[hour_key(h)]["gpu_hours"] for h in (10, 11, 12)] == pytest.approx([1.0, 2.0, 0.5])
    assert [o for o in feed.outputs if o.key == "job|j1"] == job_costs


def test_end_without_start_costs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    feed = costs_feed()
    with caplog.at_level(logging.WARNING):
        result = feed.send(job_event("finished", "ghost", at(10, 10)))
    assert not [o for o in result.outputs if o.key.startswith("job|")]
    assert "without a start" in caplog.text


def test_allocation_is_forwarded_by_gpu_model_for_idle_hours() -> None:
    feed = costs_feed()
    feed.send(job_event("started", "j1", at(10, 10, 30)))
    feed.send(job_event("finished", "j1", at(10, 11)))
    forwarded = [o for o in feed.outputs if o.topic_key == "streams.device-hours"]
    assert {o.key for o in forwarded} == {H100}
    last = forwarded[-1].value
    assert last["gpu_hours"] == pytest.approx(1.0) and last["device_hours"] is None
    assert last["project"] == "newsroom" and last["time"] == at(10, 10)


def test_a_naive_datetime_is_refused_not_taken_for_utc() -> None:
    """The cost processors convert times with streams.runtime.buckets (bus/tiers.py): a time without a zone is
    a caller's bug (the decoder gives tz-aware UTC), so it raises instead of being read as UTC, as it was
    once here while the rollups refused it."""
    naive = at(10, 10).replace(tzinfo=None)
    with pytest.raises(ValueError, match="naive datetime"):
        costs_feed().send(job_event("started", "j1", naive))
    sample = Input("gpu.samples", 0, 0, GPU, gpu_sample("GPU-1", naive), at(10, 10))
    with pytest.raises(ValueError, match="naive datetime"):
        Feed(DeviceHoursProcessor(), "gpu.samples", GPU).run([sample])


def test_state_is_json_and_a_restored_copy_carries_on() -> None:
    feed = costs_feed()
    feed.send(job_event("started", "j1", at(10, 10, 30)))
    feed.send(job_event("queued", "x", at(10, 11)))
    restored = TableLike()
    restored.data = dict(feed.state.data)  # a new worker restoring the changelog
    other = Feed(CostProcessor(PRICES), "streams.jobs-by-project", JOB, restored)
    other.next_offset, other.watermark = feed.next_offset, feed.watermark
    other.send(job_event("finished", "j1", at(10, 12, 15)))
    assert other.latest()["job|j1"]["job_cost_eur"] == pytest.approx(14.0)


def test_a_long_running_job_counts_hours_older_than_the_retention() -> None:
    feed = costs_feed(retention=timedelta(hours=2))
    feed.send(job_event("started", "long", at(10, 10), gpu_count=1))
    feed.send(job_event("finished", "long", at(11, 10)))  # no event in between: 24 hours at once
    costs = feed.latest()
    assert costs["job|long"]["gpu_hours"] == pytest.approx(24.0)
    assert sum(v["gpu_hours"] for v in costs.values() if v["kind"] == "gpu_hours") == pytest.approx(24.0)


def test_old_state_is_pruned() -> None:
    feed = costs_feed(retention=timedelta(hours=2))
    feed.send(job_event("started", "j1", at(10, 10)))
    feed.send(job_event("finished", "j1", at(10, 11)))
    assert any(k.startswith("hour|") for k in feed.state)
    feed.send(job_event("queued", "x", at(10, 20)))
    assert [k for k in feed.state if k.startswith(("hour|", "day|", "job|"))] == ["day|newsroom|2025-04-10"]
    feed.send(job_event("queued", "y", at(11, 3)))  # the 10th is over, and older than the retention
    assert not [k for k in feed.state if k.startswith(("hour|", "day|", "job|"))]
    assert any(k.startswith("month|") for k in feed.state)  # April is still open


def _crash_scenario(feed: Feed) -> list[Input]:
    """Two batches folded; returns the third, which the tests crash in."""
    feed.send(
        job_event("started", "j1", at(10, 10, 30)), job_event("started", "j2", at(10, 10, 45), gpu_count=1)
    )
    feed.send(job_event("queued", "x", at(10, 11, 15)))
    values = [
        job_event("finished", "j1", at(10, 12, 15), media_minutes=35.0),
        job_event("started", "j3", at(10, 12, 20), gpu_model="NVIDIA L4", provider="gcp"),
    ]
    return [Input("streams.jobs-by-project", 0, 3 + i, JOB, v, v["time"]) for i, v in enumerate(values)]


def test_a_crash_after_any_prefix_of_the_changelog_recovers_the_same_results() -> None:
    budgets = book("{project: newsroom, name: gpu, monthly_eur: 35}")
    clean = costs_feed(budgets)
    last = _crash_scenario(clean)
    before = (dict(clean.state.data), len(clean.outputs), clean.watermark)
    clean.state.log.clear()
    clean.run(last)
    expected = clean.latest()
    writes = list(clean.state.log)
    expected_alerts = sorted((a["rule"], a["status"]) for a in alerts(clean))
    # 14 EUR (j1) + 6.33 EUR (j2 so far) = 58 % of 35 EUR, forecast 64 EUR: both fire in the lost batch
    assert len(writes) > 5
    assert expected_alerts == [("budget_50", "firing"), ("budget_forecast_overrun", "firing")]

    for cut in range(len(writes) + 1):
        state = TableLike()
        state.data = dict(before[0])
        for key, value in writes[:cut]:  # what the changelog kept
            if value is None:
                state.data.pop(key, None)
            else:
                state.data[key] = value
        crashed = Feed(CostProcessor(PRICES, budgets), "streams.jobs-by-project", JOB, state)
        crashed.outputs = clean.outputs[: before[1]]  # what was published before the lost batch
        crashed.watermark = before[2]
        crashed.run(last, resumed=True, committed=last[0].offset)
        assert crashed.latest() == expected, f"cut after {cut} of {len(writes)} writes"
        assert sorted({(a["rule"], a["status"]) for a in alerts(crashed)}) == expected_alerts


def test_a_resumed_partition_publishes_again_what_was_not_committed() -> None:
    feed = costs_feed(book("{project: newsroom, name: gpu, monthly_eur: 35}"))
    last = _crash_scenario(feed)
    feed.run(last)
    published = feed.latest()
    again = Feed(CostProcessor(PRICES, book("{project: newsroom, name: gpu, monthly_eur: 35}")),
                 "streams.jobs-by-project", JOB, feed.state)  # fmt: skip
    again.watermark = feed.watermark
    result = again.run(last, resumed=True, committed=last[0].offset)  # outputs lost, state kept
    keys = {o.key for o in result.outputs if o.topic_key == "costs"}
    assert {"job|j1", hour_key(12), "budget|newsroom|gpu|2025-04"} <= keys
    assert all(published[o.key] == o.value for o in result.outputs if o.topic_key == "costs")
    resent = alerts(again)  # duplicates, recognisable by their fingerprints
    assert [(a["rule"], a["fingerprint"]) for a in resent] == [
        (a["rule"], a["fingerprint"]) for a in alerts(feed)
    ]
    quiet = Feed(CostProcessor(PRICES, book("{project: newsroom, name: gpu, monthly_eur: 35}")),
                 "streams.jobs-by-project", JOB, feed.state)  # fmt: skip
    quiet.watermark = feed.watermark
    assert quiet.run(last, resumed=True, committed=last[-1].offset + 1).outputs == []  # all committed


# -- budgets ---------------------------------------------------------------------------------------------


def book(*lines: str) -> BudgetBook:
    return BudgetBook.parse("budgets:\n" + "\n".join(f"  - {line}" for line in lines))


def alerts(feed: Feed) -> list[dict[str, Any]]:
    return [o.value for o in feed.outputs if o.topic_key == "alerts"]


def test_budget_thresholds_fire_once_each_and_resolve_when_the_month_ends() -> None:
    feed = costs_feed(
        book("{project: newsroom, name: gpu, monthly_eur: 100}"), min_forecast_elapsed=timedelta(days=31)
    )
    # 4 EUR per GPU-hour: 2 GPUs x 7 h = 56 EUR (56 %)
    feed.send(job_event("started", "a", at(11, 0)))
    feed.send(job_event("finished", "a", at(11, 7)))
    assert [(a["rule"], a["severity"], a["status"]) for a in alerts(feed)] == [
        ("budget_50", "warning", "firing")
    ]
    budget = feed.latest()["budget|newsroom|gpu|2025-04"]
    assert budget["kind"] == "budget" and budget["budget"] == "gpu" and budget["budget_eur"] == 100.0
    assert budget["budget_utilization_percent"] == pytest.approx(56.0)
    assert budget["cost_estimated_eur"] == pytest.approx(56.0)
    assert (budget["time"], budget["period_end"]) == (at(1), at(1, month=5))
    # + 1 GPU x 6 h = 24 EUR: 80 %
    feed.send(job_event("started", "b", at(11, 8), gpu_count=1))
    feed.send(job_event("finished", "b", at(11, 14)))
    # + 24 EUR: 104 %, then more
    feed.send(job_event("started", "c", at(11, 15), gpu_count=1))
    feed.send(job_event("finished", "c", at(11, 21)))
    feed.send(job_event("started", "d", at(12, 1), gpu_count=1))
    feed.send(job_event("finished", "d", at(12, 2)))
    fired = [(a["rule"], a["severity"]) for a in alerts(feed) if a["status"] == "firing"]
    assert fired == [("budget_50", "warning"), ("budget_80", "warning"), ("budget_100", "critical")]
    assert feed.latest()["budget|newsroom|gpu|2025-04"]["budget_utilization_percent"] == pytest.approx(108.0)
    hundred = alerts(feed)[2]
    assert hundred["labels"] == {"project": "newsroom", "budget": "gpu", "month": "2025-04"}
    assert hundred["value"] == pytest.approx(104.0) and hundred["starts_at"] == at(11, 21)

    feed.send(job_event("queued", "may", at(1, 1, month=5)))  # April is over
    resolved = [a for a in alerts(feed) if a["status"] == "resolved"]
    assert sorted(a["rule"] for a in resolved) == ["budget_100", "budget_50", "budget_80"]
    assert all(a["ends_at"] == at(1, month=5) for a in resolved)
    firing = {a["rule"]: a for a in alerts(feed) if a["status"] == "firing"}
    assert all(a["fingerprint"] == firing[a["rule"]]["fingerprint"] for a in resolved)
    assert all(a["starts_at"] == firing[a["rule"]]["starts_at"] for a in resolved)
    feed.send(job_event("queued", "later", at(2, month=5)))
    assert len(alerts(feed)) == 6


def test_budget_forecast_and_overrun() -> None:
    feed = costs_feed(book("{project: newsroom, name: gpu, monthly_eur: 3000}"))
    feed.send(job_event("started", "a", at(1, 0), gpu_count=1))
    # by the end of the 10th (11th 00:00): 240 GPU-hours x 4 EUR = 960 EUR; 10 of 30 days -> 2880 EUR
    feed.send(job_event("started", "b", at(11, 0), gpu_count=1))
    budget = feed.latest()["budget|newsroom|gpu|2025-04"]
    assert budget["cost_estimated_eur"] == pytest.approx(960.0)
    assert budget["forecast_eur"] == pytest.approx(2880.0)
    assert budget["budget_utilization_percent"] == pytest.approx(32.0)
    assert alerts(feed) == []
    # by the 16th 00:00: 960 + 2 x 120 h x 4 EUR = 1920 EUR; half the month -> 3840 EUR > 3000
    feed.send(job_event("queued", "x", at(16, 0)))
    budget = feed.latest()["budget|newsroom|gpu|2025-04"]
    assert budget["forecast_eur"] == pytest.approx(3840.0)
    assert [(a["rule"], a["severity"]) for a in alerts(feed)] == [
        ("budget_50", "warning"),
        ("budget_forecast_overrun", "critical"),
    ]
    assert alerts(feed)[1]["value"] == pytest.approx(3840.0)
    unbudgeted = feed.latest()["budget|newsroom||2025-04"]  # the project's spend, budget or not
    assert unbudgeted["budget"] is None and unbudgeted["budget_utilization_percent"] is None
    assert unbudgeted["forecast_eur"] == pytest.approx(3840.0)


def test_budget_record_is_emitted_on_change_and_daily_only() -> None:
    feed = costs_feed(book("{project: newsroom, name: gpu, monthly_eur: 1000}"))
    feed.send(job_event("started", "a", at(10, 10), gpu_count=1))
    feed.send(job_event("finished", "a", at(10, 11)))
    count = sum(o.key == "budget|newsroom|gpu|2025-04" for o in feed.outputs)
    feed.send(job_event("queued", "x", at(10, 12)))  # no spend, same day: nothing new
    assert sum(o.key == "budget|newsroom|gpu|2025-04" for o in feed.outputs) == count
    feed.send(job_event("queued", "y", at(11, 0, 5)))  # a new day: the forecast moved
    assert sum(o.key == "budget|newsroom|gpu|2025-04" for o in feed.outputs) == count + 1


# -- device-hours and idle hours -------------------------------------------------------------------------


def device_feed(**kwargs: Any) -> Feed:
    return Feed(DeviceHoursProcessor(**kwargs), "gpu.samples", GPU)


def test_device_hours_from_sample_coverage_across_an_hour_boundary() -> None:
    feed = device_feed()
    # every 10 s from 10:59:30 to 11:00:30: 30 s in each hour
    feed.send(*(gpu_sample("GPU-1", at(10, 10, 59, 30) + timedelta(seconds=10 * i)) for i in range(7)))
    records = {o.value["time"]: o for o in feed.outputs}
    assert records[at(10, 10)].value["device_hours"] == pytest.approx(30 / 3600)
    assert records[at(10, 11)].value["device_hours"] == pytest.approx(30 / 3600)
    out = records[at(10, 11)]
    assert out.topic_key == "streams.device-hours" and out.key == H100
    assert out.value["source"] == DEVICE_SOURCE_PREFIX + "GPU-1" and out.value["project"] is None


def test_gaps_count_at_most_max_gap_and_mig_instances_are_skipped() -> None:
    feed = device_feed(max_gap=timedelta(seconds=60))
    feed.send(gpu_sample("GPU-1", at(10, 10)))
    feed.send(gpu_sample("GPU-1", at(10, 10, 10)))  # 10 min of silence: counts 60 s
    feed.send(gpu_sample("MIG-1", at(10, 10, 20), mig_instance="gi1/ci0", parent_gpu_uuid="GPU-1"))
    feed.send(gpu_sample("GPU-1", at(10, 10, 10, 30)))  # + 30 s
    assert feed.latest("streams.device-hours")[H100]["device_hours"] == pytest.approx(90 / 3600)
    assert "dev|MIG-1" not in feed.state


def test_device_hours_replays_and_stale_samples_add_nothing() -> None:
    feed = device_feed()
    first = [
        Input("gpu.samples", 0, i, GPU, gpu_sample("GPU-1", at(10, 10, 0, 10 * i)), at(10, 10, 0, 10 * i))
        for i in range(4)
    ]
    feed.run(first)
    feed.run(first)  # a replay
    feed.send(gpu_sample("GPU-1", at(10, 10, 0, 5)))  # older than the last one: no new coverage
    assert feed.latest("streams.device-hours")[H100]["device_hours"] == pytest.approx(30 / 3600)


def test_device_hours_resumed_partition_publishes_uncommitted_hours_again() -> None:
    feed = device_feed()
    feed.send(*(gpu_sample("GPU-1", at(10, 10, 0, 10 * i)) for i in range(4)))
    again = Feed(DeviceHoursProcessor(), "gpu.samples", GPU, feed.state)
    again.watermark = feed.watermark
    replay = [Input("gpu.samples", 0, 3, GPU, gpu_sample("GPU-1", at(10, 10, 0, 30)), at(10, 10, 0, 30))]
    result = again.run(replay, resumed=True, committed=2)
    assert [o.value["device_hours"] for o in result.outputs] == pytest.approx([30 / 3600])
    assert again.run(replay, resumed=True, committed=4).outputs == []


def test_coalesced_device_hours_go_out_once_per_interval_and_end_at_the_uncoalesced_figures() -> None:
    # One sample a batch, every 10 s from 10:59:00 to 11:02:00, as a live fleet's batches come.
    samples = [gpu_sample("GPU-1", at(10, 10, 59) + timedelta(seconds=10 * i)) for i in range(19)]
    every, coalesced = device_feed(), device_feed(emit_interval=timedelta(seconds=60))
    for sample in samples:
        every.send(sample)
        coalesced.send(sample)
    assert len(every.outputs) >= 18  # about one record a sample
    # 10:59:10 (the first coverage), 11:00:00 (the GPU left 10:00), then 11:01:00 and 11:02:00.
    assert [o.value["time"] for o in coalesced.outputs] == [at(10, 10), at(10, 10), at(10, 11), at(10, 11)]
    hours = lambda feed: {o.value["time"]: o.value["device_hours"] for o in feed.outputs}  # noqa: E731
    assert hours(coalesced) == hours(every)  # every hour's last figure: the same
    assert hours(coalesced)[at(10, 10)] == pytest.approx(60 / 3600)


def test_coalesced_device_hours_of_a_gpu_that_stopped_go_out_when_the_hour_turns() -> None:
    feed = device_feed(emit_interval=timedelta(seconds=60))
    feed.send(gpu_sample("GPU-1", at(10, 10, 30)))
    feed.send(gpu_sample("GPU-1", at(10, 10, 30, 20)))  # its first coverage goes out: 20 s
    feed.send(gpu_sample("GPU-1", at(10, 10, 30, 40)))  # held back: 20 s after that update
    assert feed.latest("streams.device-hours")[H100]["device_hours"] == pytest.approx(20 / 3600)
    feed.send(gpu_sample("GPU-2", at(10, 10, 59, 50)))
    assert len([o for o in feed.outputs if o.value["source"].endswith("GPU-1")]) == 1  # still held
    feed.send(gpu_sample("GPU-2", at(10, 11, 0, 10)))  # the partition enters 11:00: GPU-1's hour goes out
    gpu1 = [o.value for o in feed.outputs if o.value["source"].endswith("GPU-1")]
    assert gpu1[-1]["device_hours"] == pytest.approx(40 / 3600)
    assert feed.state["dev|GPU-1"]["unsent"] == []


def test_samples_older_than_the_retention_are_late() -> None:
    feed = device_feed(retention=timedelta(hours=2))
    feed.send(gpu_sample("GPU-1", at(10, 12)))
    feed.send(gpu_sample("GPU-2", at(10, 9)))
    assert len(feed.late) == 1 and "retention" in feed.late[0][1]


def device_record(uuid: str, hour: int, hours: float) -> dict[str, Any]:
    return {
        "time": at(10, hour),
        "period_end": at(10, hour + 1),
        "kind": "gpu_hours",
        "project": None,
        "gpu_model": H100,
        "provider": None,
        "pricing": None,
        "job_id": None,
        "budget": None,
        "gpu_hours": None,
        "device_hours": hours,
        "idle_gpu_hours": None,
        "cost_estimated_eur": None,
        "job_cost_eur": None,
        "job_cost_per_media_minute_eur": None,
        "budget_eur": None,
        "budget_utilization_percent": None,
        "forecast_eur": None,
        "currency": "EUR",
        "source": DEVICE_SOURCE_PREFIX + uuid,
    }


def allocation_record(project: str, hour: int, hours: float) -> dict[str, Any]:
    value = device_record("x", hour, 0.0)
    value.update(project=project, provider="aws", pricing="on_demand", gpu_hours=hours, device_hours=None)
    value["source"] = "stream"
    return value


def test_idle_is_device_minus_allocated_with_replace_semantics() -> None:
    feed = Feed(IdleHoursProcessor(), "streams.device-hours", COST)
    feed.send(device_record("GPU-1", 10, 0.5), device_record("GPU-2", 10, 1.0))
    feed.send(allocation_record("newsroom", 10, 0.25), allocation_record("archive", 10, 0.5))
    feed.send(device_record("GPU-1", 10, 1.0), allocation_record("newsroom", 10, 0.5))  # re-sent partials
    idle = feed.latest()["idle|NVIDIA H100 80GB HBM3|2025-04-10T10:00Z"]
    assert idle["device_hours"] == pytest.approx(2.0)
    assert idle["idle_gpu_hours"] == pytest.approx(1.0)  # 2.0 - (0.5 + 0.5)
    assert idle["project"] is None and idle["gpu_hours"] is None and idle["kind"] == "gpu_hours"


def test_idle_never_negative_and_needs_a_device() -> None:
    feed = Feed(IdleHoursProcessor(), "streams.device-hours", COST)
    feed.send(allocation_record("newsroom", 10, 2.0))
    assert feed.latest() == {}  # no device seen yet
    feed.send(device_record("GPU-1", 10, 1.0))
    assert feed.latest()["idle|NVIDIA H100 80GB HBM3|2025-04-10T10:00Z"]["idle_gpu_hours"] == 0.0


def test_idle_hours_end_to_end_through_the_processors() -> None:
    """Jobs and samples through their processors, the internal topic replayed into the idle processor."""
    jobs, devices = costs_feed(), device_feed()
    jobs.send(job_event("started", "j1", at(10, 10, 30), gpu_count=1))
    jobs.send(job_event("finished", "j1", at(10, 11)))
    for uuid in ("GPU-1", "GPU-2"):
        devices.send(*(gpu_sample(uuid, at(10, 10) + timedelta(seconds=30 * i)) for i in range(121)))
    idle = Feed(IdleHoursProcessor(), "streams.device-hours", COST)
    internal = [o for feed in (jobs, devices) for o in feed.outputs if o.topic_key == "streams.device-hours"]
    idle.send(*(o.value for o in internal))
    idle.send(*(o.value for o in internal))  # the whole topic again (re-sent at new offsets)
    record = idle.latest()["idle|NVIDIA H100 80GB HBM3|2025-04-10T10:00Z"]
    assert record["device_hours"] == pytest.approx(2.0)
    assert record["idle_gpu_hours"] == pytest.approx(1.5)  # 2 devices x 1 h - 1 GPU x 0.5 h


# -- wiring ----------------------------------------------------------------------------------------------


def test_processors_from_environ(tmp_path: Path) -> None:
    budgets = tmp_path / "budgets.yaml"
    budgets.write_text("budgets: [{project: p, name: b, monthly_eur: 10}]")
    processors = cost_processors_from_settings(
        CostSettings.from_environ({"AIMA_BUDGETS_FILE": str(budgets), "AIMA_DEVICE_MAX_GAP_S": "20"})
    )
    assert [p.name for p in processors] == [
        "costs_jobs_by_project",
        "costs",
        "costs_device_hours",
        "costs_idle_hours",
    ]
    assert [p.topics for p in processors] == [
        ("job.events",),
        ("streams.jobs-by-project",),
        ("gpu.samples",),
        ("streams.device-hours",),
    ]
    cost = processors[1]
    assert isinstance(cost._budgets, Reloading)
    assert cost._prices.current().eur_per_gpu_hour("aws", H100, "on_demand") is not None  # shipped prices
    no_budgets = cost_processors_from_settings(CostSettings.from_environ({}))
    assert len({p.name for p in no_budgets}) == 4  # no budgets file: none


# -- backfills: the clock is each record's partition watermark, and the app's own records are never late


def _ten_days_of_jobs() -> list[dict[str, Any]]:
    """One 1-GPU job a day from 10:00 to 12:00, 1-10 April, and a last event on the 30th that moves the
    clock far past them all."""
    events = []
    for day in range(1, 11):
        events.append(job_event("started", f"d{day}", at(day, 10), gpu_count=1))
        events.append(job_event("finished", f"d{day}", at(day, 12), gpu_count=1))
    return [*events, job_event("queued", "last", at(30, 0))]


def test_a_backfill_in_one_batch_counts_what_record_by_record_counts() -> None:
    budgets = book("{project: newsroom, name: gpu, monthly_eur: 100}")
    whole = costs_feed(budgets, retention=timedelta(hours=2))
    whole.send(*_ten_days_of_jobs())  # ten days in one batch, with a 2 h retention
    single = costs_feed(budgets, retention=timedelta(hours=2))
    for event in _ten_days_of_jobs():
        single.send(event)
    costs = whole.latest()
    hours = [v for v in costs.values() if v["kind"] == "gpu_hours"]
    assert len(hours) == 20 and sum(v["gpu_hours"] for v in hours) == pytest.approx(20.0)
    assert sum(v["job_cost_eur"] for v in costs.values() if v["kind"] == "job_cost") == pytest.approx(80.0)
    assert costs["budget|newsroom|gpu|2025-04"]["cost_estimated_eur"] == pytest.approx(80.0)
    assert costs == single.latest()
    assert [(a["rule"], a["event_time"]) for a in alerts(whole)] == [
        (a["rule"], a["event_time"]) for a in alerts(single)
    ]  # each threshold fires when the clock of its record crossed it, not at the batch's end


def _upstream_input(feed: Feed, value: dict[str, Any], partition: int) -> Input:
    """``value`` as the repartitioner forwards it from job.events partition ``partition``."""
    read = Input("job.events", partition, 0, JOB, value, value["time"])
    batch = PartitionBatch("job.events", partition, [read], value["time"], None)
    [output] = JobRepartitioner().process(batch, {}).outputs
    record = Input(feed.topic, 0, feed.next_offset, JOB, output.value, value["time"])
    feed.next_offset += 1
    return record


def test_a_backlog_read_one_upstream_partition_after_the_other_counts_every_job() -> None:
    """After an outage the repartitioner reads each job.events partition's backlog in its own fetches, so
    streams.jobs-by-project gets ten days of one upstream partition before the same ten days of the other;
    the hours of the second are not final yet (the clock is the slower partition), so none is lost."""
    events = _ten_days_of_jobs()[:-1]
    first = [e for e in events if int(e["job_id"][1:]) % 2 == 0]
    second = [e for e in events if int(e["job_id"][1:]) % 2 == 1]
    budgets = book("{project: newsroom, name: gpu, monthly_eur: 1000}")
    in_time_order = costs_feed(budgets, retention=timedelta(hours=2), upstream_partitions=2)
    for event in sorted(events, key=lambda e: e["time"]):
        in_time_order.run([_upstream_input(in_time_order, event, int(event["job_id"][1:]) % 2)])
    backlog = costs_feed(budgets, retention=timedelta(hours=2), upstream_partitions=2)
    backlog.run([_upstream_input(backlog, e, 0) for e in first])  # upstream 0: ten days in one batch
    backlog.run([_upstream_input(backlog, e, 1) for e in second])  # then upstream 1's ten days
    costs = backlog.latest()
    hours = [v for v in costs.values() if v["kind"] == "gpu_hours"]
    assert len(hours) == 20 and sum(v["gpu_hours"] for v in hours) == pytest.approx(20.0)
    assert costs == in_time_order.latest()
    # One upstream partition gone quiet for longer than upstream_stale_after stops holding the clock back:
    # the other's hours are final and pruned as before.
    quiet = costs_feed(
        retention=timedelta(hours=2), upstream_stale_after=timedelta(days=1), upstream_partitions=2
    )
    quiet.run([_upstream_input(quiet, job_event("queued", "q", at(1, 0)), 1)])
    quiet.run([_upstream_input(quiet, e, 0) for e in first])
    assert min(_kept_hours(quiet)) >= ms(at(10, 8))
    held = costs_feed(retention=timedelta(hours=2), upstream_partitions=2)
    held.run([_upstream_input(held, job_event("queued", "q", at(1, 0)), 1)])
    held.run([_upstream_input(held, e, 0) for e in first])
    assert min(_kept_hours(held)) == ms(at(2, 10)), "the quiet partition holds the clock back"


def _kept_hours(feed: Feed) -> list[int]:
    return [feed.state[key]["hour_ms"] for key in feed.state if key.startswith("hour|")]


def test_a_repartitioned_event_names_its_upstream_partition() -> None:
    value = job_event("started", "j", at(1, 10))
    record = _upstream_input(costs_feed(), value, 3)
    assert record.value["source"] == "test via job.events/3"
    assert upstream_of(record.value) == "3" and upstream_of(value) is None


def test_a_backfill_across_months_closes_the_first_with_its_final_figures() -> None:
    budgets = book("{project: newsroom, name: gpu, monthly_eur: 10}")
    feed = costs_feed(budgets, retention=timedelta(hours=2))
    feed.send(
        job_event("started", "m", at(30, 10, month=3), gpu_count=1),
        job_event("finished", "m", at(30, 13, month=3), gpu_count=1),  # 3 GPU-hours: 12 EUR in March
        job_event("started", "a", at(2, 10), gpu_count=1),
        job_event("finished", "a", at(2, 11), gpu_count=1),  # 4 EUR in April
    )
    costs = feed.latest()
    march, april = costs["budget|newsroom|gpu|2025-03"], costs["budget|newsroom|gpu|2025-04"]
    assert march["cost_estimated_eur"] == pytest.approx(12.0)
    assert march["forecast_eur"] == pytest.approx(12.0)  # closed: the forecast is what was spent
    assert april["cost_estimated_eur"] == pytest.approx(4.0)
    fired = {(a["labels"]["month"], a["rule"], a["status"]) for a in alerts(feed)}
    assert ("2025-03", "budget_100", "resolved") in fired  # March ended in the same batch


def test_device_hours_of_a_backfill_in_one_batch_are_all_counted() -> None:
    samples = [gpu_sample("GPU-1", at(10) + timedelta(seconds=30 * i)) for i in range(3 * 24 * 120 + 1)]
    whole = device_feed(retention=timedelta(hours=2))
    whole.send(*samples)  # three days in one batch, with a 2 h retention
    assert whole.late == []
    hours = [o.value["device_hours"] for o in whole.outputs]
    assert len(hours) == 72 and hours == pytest.approx([1.0] * 72)
    assert len(whole.state["dev|GPU-1"]["hours"]) <= 3  # no more kept than the retention needs


def test_a_late_sample_names_the_processor_the_limit_and_its_setting() -> None:
    feed = device_feed(retention=timedelta(hours=2))
    feed.send(gpu_sample("GPU-1", at(10, 12)), gpu_sample("GPU-2", at(10, 9, 30)))
    [(record, reason)] = feed.late
    assert record.value["gpu_uuid"] == "GPU-2"
    assert reason == (
        "costs_device_hours: sample at 2025-04-10T09:30:00Z is 2:30:00 behind the partition watermark "
        "2025-04-10T12:00:00Z, beyond the 2 h retention (AIMA_DEVICE_HOURS_RETENTION_S)"
    )


def test_idle_hours_take_allocations_days_ahead_of_the_devices() -> None:
    """In a backfill the few job events run days ahead of the samples: their allocations move the
    partition's watermark, and the devices' records that follow are still folded in, none late."""
    feed = Feed(IdleHoursProcessor(retention=timedelta(hours=1)), "streams.device-hours", COST)
    feed.send(*(allocation_record("newsroom", hour, 0.25) for hour in range(0, 20)))
    feed.send(device_record("GPU-1", 0, 1.0), device_record("GPU-2", 0, 1.0))  # each partition's first
    feed.send(*(device_record("GPU-1", hour, 1.0) for hour in range(1, 20)))
    feed.send(*(device_record("GPU-2", hour, 1.0) for hour in range(1, 20)))  # another partition, later
    idle = feed.latest()
    assert feed.late == []
    assert len(idle) == 20
    assert all(v["device_hours"] == pytest.approx(2.0) for v in idle.values())
    assert all(v["idle_gpu_hours"] == pytest.approx(1.75) for v in idle.values())


def test_idle_hours_are_dropped_once_the_slowest_device_passed_them(caplog: pytest.LogCaptureFixture) -> None:
    feed = Feed(IdleHoursProcessor(retention=timedelta(hours=2)), "streams.device-hours", COST)
    feed.send(device_record("GPU-1", 1, 1.0), device_record("GPU-2", 1, 1.0))
    feed.send(device_record("GPU-1", 8, 1.0))  # GPU-2 has not reported past 01:00: hour 1 is kept
    assert any(key.endswith(f"|{ms(at(10, 1))}") for key in feed.state)
    feed.send(device_record("GPU-2", 8, 1.0))
    assert not any(key.endswith(f"|{ms(at(10, 1))}") for key in feed.state)
    with caplog.at_level(logging.WARNING):
        result = feed.send(allocation_record("newsroom", 1, 0.5))  # after every device moved on by 2 h
    assert result.late == [] and result.outputs == []  # the app's own record: logged, not dead-lettered
    assert "AIMA_IDLE_HOURS_RETENTION_S" in caplog.text


def test_a_device_that_stopped_reporting_stops_holding_the_idle_clock() -> None:
    feed = Feed(
        IdleHoursProcessor(retention=timedelta(hours=1), stale_after=timedelta(hours=3)),
        "streams.device-hours",
        COST,
    )
    feed.send(device_record("GPU-1", 1, 1.0), device_record("GPU-2", 1, 1.0))
    feed.send(device_record("GPU-1", 6, 1.0))  # GPU-2 is 5 h behind: stale, no longer the clock
    assert not any(key.endswith(f"|{ms(at(10, 1))}") for key in feed.state)


def test_windows_from_environ_and_their_errors() -> None:
    processors = cost_processors_from_settings(CostSettings.from_environ(
        {"AIMA_COST_RETENTION_S": "7200", "AIMA_DEVICE_HOURS_RETENTION_S": "3600",
         "AIMA_IDLE_HOURS_RETENTION_S": "10800", "AIMA_IDLE_DEVICE_STALE_S": "86400"}
    ))  # fmt: skip
    cost, device, idle = processors[1], processors[2], processors[3]
    assert isinstance(cost, CostProcessor) and cost.retention_ms == 7_200_000
    assert isinstance(device, DeviceHoursProcessor) and device._retention_ms == 3_600_000
    assert isinstance(idle, IdleHoursProcessor) and (idle._retention_ms, idle._stale_ms) == (
        10_800_000,
        86_400_000,
    )
    with pytest.raises(ValueError, match="AIMA_COST_RETENTION_S"):
        CostSettings.from_environ({"AIMA_COST_RETENTION_S": "two days"})
    with pytest.raises(ValueError, match="AIMA_IDLE_HOURS_RETENTION_S"):
        CostSettings.from_environ({"AIMA_IDLE_HOURS_RETENTION_S": "0"})


def test_job_events_interleaved_by_the_repartition_count_as_in_time_order() -> None:
    """A backlog of job.events read at once reaches the repartitioned topic one upstream partition after
    the other: days apart, in one batch. Every job is still counted, as in time order."""
    events = _ten_days_of_jobs()[:-1]
    odd = [e for e in events if int(e["job_id"][1:]) % 2]
    even = [e for e in events if not int(e["job_id"][1:]) % 2]
    interleaved = costs_feed(retention=timedelta(hours=2))
    interleaved.send(*odd, *even)
    ordered = costs_feed(retention=timedelta(hours=2))
    ordered.send(*events)
    assert interleaved.latest() == ordered.latest()
    hours = [v for v in interleaved.latest().values() if v["kind"] == "gpu_hours"]
    assert sum(v["gpu_hours"] for v in hours) == pytest.approx(20.0)
