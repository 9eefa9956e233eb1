"""The merge of partial rollups (streams/rollups/merge.py) as pure processor logic: the rollup processor on
every partition of job.events, the merger on every partition of streams.rollup-partials, records routed
between them as the app routes them (key hash or the named partition, in the order listed) and through the
Avro codec. Several senders of one series, replays of the same partial, a partial older than the one the
merge holds, a partial for a bucket already final, finality waiting for every partition, restarts."""

from __future__ import annotations

import json
import random
import zlib
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta

import pytest

from bus.codec import Codec
from bus.topics import BY_KEY
from streams.rollups.merge import RollupMerger
from streams.rollups.processor import PARTIALS_TOPIC, RollupProcessor
from streams.runtime.buckets import TIERS, to_ms
from streams.runtime.processor import Input, Output, PartitionBatch
from streams.runtime.series import series_id
from tests.unit.test_rollups import RecordingState, assert_matches, at, finals_of, offline, restore

JOB = "aima.metrics.JobEvent"
PARTIAL = "aima.metrics.RollupPartial"
SENDERS = BY_KEY["job.events"].partitions
MERGERS = BY_KEY[PARTIALS_TOPIC].partitions
WAIT = series_id("job_queue_wait_seconds", {"project": "news", "queue": "gpu"})
CODEC = Codec()


def event(time: datetime, job: str, kind: str, wait: float | None, *, project: str = "news") -> dict:
    return {
        "time": time, "job_id": job, "event": kind, "project": project, "user": None, "service": None,
        "queue": "gpu", "model": None, "host": None, "gpu_count": 1, "gpu_model": None, "provider": None,
        "pricing": None, "media_minutes": None, "queue_wait_seconds": wait, "error": None, "source": "test",
    }  # fmt: skip


def sender_of(job: str) -> int:
    return zlib.crc32(job.encode()) % SENDERS


def jobs(seed: int = 3) -> list[dict]:
    """A job queued and started every 4 minutes, Jan 31 21:00 to Feb 1 02:00 UTC (a day and a month end)."""
    rng = random.Random(seed)
    out = []
    time, number = at(2026, 1, 31, 21), 0
    while time < at(2026, 2, 1, 2):
        job = f"job-{number:04d}"
        wait = rng.choice([0.0, rng.lognormvariate(2, 1.2)])
        out.append(event(time - timedelta(seconds=wait), job, "queued", None))
        out.append(event(time, job, "started", wait))
        time, number = time + timedelta(minutes=4), number + 1
    return out


def closers(time: datetime) -> list[dict]:
    """One started event on every job.events partition at ``time``: moves every watermark there."""
    found: dict[int, dict] = {}
    number = 0
    while len(found) < SENDERS:
        job = f"closer-{number}"
        found.setdefault(sender_of(job), event(time, job, "started", 1.0, project="closer"))
        number += 1
    return [found[p] for p in range(SENDERS)]


def expected(values: Iterable[dict]) -> dict[tuple[str, str, int], dict]:
    started = [v for v in values if v["event"] == "started" and v["project"] == "news"]
    return offline((WAIT, v["time"], v["queue_wait_seconds"]) for v in started)


class Sender:
    """The rollup processor on one partition of job.events, driven as the app drives it."""

    def __init__(self, partition: int) -> None:
        self.partition = partition
        self.processor = RollupProcessor(emit_interval=timedelta(0))
        self.state = RecordingState()
        self.watermark: datetime | None = None
        self.inputs: list[Input] = []

    def add(self, values: Iterable[dict]) -> None:
        for value in values:
            self.inputs.append(
                Input("job.events", self.partition, len(self.inputs), JOB, value, value["time"])
            )

    def run(self, inputs: Sequence[Input], *, resumed: bool = False, committed: int | None = None) -> list:
        newest = max(record.event_time for record in inputs)
        mark = newest if self.watermark is None else max(self.watermark, newest)
        batch = PartitionBatch(
            "job.events",
            self.partition,
            inputs,
            mark,
            self.watermark,
            committed_offset=committed,
            resumed=resumed,
        )
        result = self.processor.process(batch, self.state)
        self.state.log.append(("#progress", json.dumps(to_ms(mark))))
        self.watermark = mark
        assert result.late == []
        return result.outputs


class Merge:
    """The merger on every partition of streams.rollup-partials. ``deliver`` routes outputs as the app's
    sender does (the partition named, else crc32 of the key) through the Avro codec, keeping their order."""

    def __init__(self) -> None:
        self.processors = [RollupMerger() for _ in range(MERGERS)]
        self.states = [RecordingState() for _ in range(MERGERS)]
        self.logs: list[list[Input]] = [[] for _ in range(MERGERS)]
        self.watermarks: list[datetime | None] = [None] * MERGERS
        self.rollups: list[dict] = []

    def route(self, outputs: Iterable[Output]) -> list[list[Input]]:
        routed: list[list[Input]] = [[] for _ in range(MERGERS)]
        for output in outputs:
            if output.topic_key != PARTIALS_TOPIC:
                continue
            partition = output.partition
            if partition is None:
                partition = zlib.crc32(output.key.encode()) % MERGERS
            name, value = CODEC.decode(CODEC.encode(output.record_name, output.value))
            log = self.logs[partition]
            record = Input(PARTIALS_TOPIC, partition, len(log), name, value, value["time"])
            log.append(record)
            routed[partition].append(record)
        return routed

    def deliver(self, outputs: Iterable[Output]) -> None:
        for partition, inputs in enumerate(self.route(outputs)):
            if inputs:
                self.run(partition, inputs)

    def run(
        self, partition: int, inputs: Sequence[Input], *, resumed: bool = False, committed: int | None = None
    ) -> list[Output]:
        newest = max(record.event_time for record in inputs)
        previous = self.watermarks[partition]
        mark = newest if previous is None else max(previous, newest)
        batch = PartitionBatch(
            PARTIALS_TOPIC, partition, inputs, mark, previous, committed_offset=committed, resumed=resumed
        )
        result = self.processors[partition].process(batch, self.states[partition])
        self.watermarks[partition] = mark
        assert result.late == []
        for output in result.outputs:
            assert output.topic_key == "rollups"
            _, value = CODEC.decode(CODEC.encode(output.record_name, output.value))
            value = {
                **value,
                "bucket_start": to_ms(value["bucket_start"]),
                "bucket_end": to_ms(value["bucket_end"]),
            }
            self.rollups.append(value)
        return result.outputs

    def finals(self) -> dict[tuple[str, str, int], dict]:
        return {key: value for key, value in finals_of(self.rollups).items() if key[0] == WAIT}


def spread(values: Iterable[dict]) -> list[Sender]:
    senders = [Sender(p) for p in range(SENDERS)]
    for value in values:
        senders[sender_of(value["job_id"])].add([value])
    return senders


def interleave(senders: list[Sender], size: int, merge: Merge) -> None:
    """Each sender's records in batches of ``size``, the senders taking turns, every batch's outputs
    delivered to the merge before the next batch runs (as the app delivers before it acknowledges)."""
    for start in range(0, max(len(s.inputs) for s in senders), size):
        for sender in senders:
            batch = sender.inputs[start : start + size]
            if batch:
                merge.deliver(sender.run(batch, resumed=start == 0))


@pytest.mark.parametrize("size", [1, 5, 1000])
def test_partials_of_every_partition_merge_into_the_rollup_of_all_their_records(size: int) -> None:
    values = [*jobs(), *closers(at(2027, 1, 1, 1))]
    senders = spread(values)
    assert sum(1 for s in senders if any(r.value["project"] == "news" for r in s.inputs)) == SENDERS
    merge = Merge()
    interleave(senders, size, merge)
    finals = {key: value for key, value in merge.finals().items() if key[2] < to_ms(at(2027, 1, 1))}
    assert_matches(finals, expected(values))  # every tier: the count of every started event, p95 within 1 %
    assert {key[1] for key in finals} == set(TIERS)
    started = sum(1 for v in values if v["event"] == "started" and v["project"] == "news")
    for tier in TIERS:
        assert sum(v["count"] for k, v in finals.items() if k[1] == tier) == started, tier


def test_no_partial_reaches_the_rollups_topic() -> None:
    sender = Sender(0)
    sender.add(
        [event(at(2026, 3, 1, 9), "j", "started", 5.0), event(at(2026, 3, 1, 11), "k", "started", 6.0)]
    )
    outputs = sender.run(sender.inputs)
    assert outputs and all(o.topic_key == PARTIALS_TOPIC for o in outputs)
    progress = [o for o in outputs if o.value["rollup"] is None]
    assert sorted(o.partition for o in progress) == list(range(MERGERS))
    assert outputs[-len(progress) :] == progress  # listed after every partial of the batch
    assert {o.value["closed_before"] for o in progress} == {to_ms(at(2026, 3, 1, 11)) - 10 * 60 * 1000}


def test_not_final_until_every_partition_of_the_topic_has_closed_the_bucket() -> None:
    values = jobs()
    senders = spread(values)
    merge = Merge()
    interleave(senders, 50, merge)
    early = set(merge.finals())  # what every partition's own watermark has closed: up to about 01:50
    assert (WAIT, "month", to_ms(at(2026, 1, 1))) in early
    last = closers(at(2027, 1, 1, 1))
    for sender, closer in zip(senders[:-1], last[:-1], strict=True):
        sender.add([closer])
        merge.deliver(sender.run(sender.inputs[-1:]))
    # Three partitions closed everything; the fourth has not told: its 01:00 hour may still fill.
    assert set(merge.finals()) == early
    assert (WAIT, "hour", to_ms(at(2026, 2, 1, 1))) not in early
    senders[-1].add([last[-1]])
    merge.deliver(senders[-1].run(senders[-1].inputs[-1:]))
    finals = {key: value for key, value in merge.finals().items() if key[2] < to_ms(at(2027, 1, 1))}
    assert_matches(finals, expected(values))


def test_a_replayed_partial_changes_nothing() -> None:
    values = [*jobs(), *closers(at(2027, 1, 1, 1))]
    reference = Merge()
    interleave(spread(values), 20, reference)

    senders = spread(values)
    merge = Merge()
    for start in range(0, max(len(s.inputs) for s in senders), 20):
        for sender in senders:
            batch = sender.inputs[start : start + 20]
            if not batch:
                continue
            outputs = sender.run(batch, resumed=start == 0)
            merge.deliver(outputs)
            merge.deliver(outputs)  # the same partials and progress again: a replay of the merge's input
    assert merge.finals() == reference.finals()
    # Not even on the way: no upsert ever counts more than the bucket's events.
    want = expected(values)
    for value in merge.rollups:
        key = (value["series"], value["tier"], value["bucket_start"])
        if key in want:
            assert value["count"] <= want[key]["count"], key


def test_a_partial_older_than_the_one_held_does_not_replace_it() -> None:
    # A worker that lost its partition may still deliver an older partial after the new owner's newer one.
    sender = Sender(1)
    sender.add(
        [event(at(2026, 3, 1, 9, minute), f"j{minute}", "started", float(minute + 1)) for minute in range(6)]
    )
    older = sender.run(sender.inputs[:2], resumed=True)
    newer = sender.run(sender.inputs[2:])
    merge = Merge()
    merge.deliver(newer)
    merge.deliver(older)
    latest = [v for v in merge.rollups if v["tier"] == "hour"][-1]
    assert (latest["count"], latest["sum"], latest["max"]) == (6, 21.0, 6.0)


def test_a_partial_for_a_bucket_already_final_is_ignored_and_then_dropped() -> None:
    values = [*jobs(), *closers(at(2027, 1, 1, 1))]
    senders = spread(values)
    merge = Merge()
    interleave(senders, 1000, merge)
    finals = merge.finals()
    assert finals
    # A sender restarted before its commit sends its finals again (a resumed partition re-emits them).
    again = senders[0].run(senders[0].inputs[-1:], resumed=True, committed=None)
    assert any(o.value["rollup"] and o.value["rollup"]["final"] for o in again)
    before = len(merge.rollups)
    merge.deliver(again)
    assert len(merge.rollups) == before  # held as final: nothing new to say
    assert merge.finals() == finals
    # Once the merge's finals are committed they are dropped; a re-sent final then finds no entry, and is
    # dropped too instead of starting a bucket that would hold one partition's part only.
    for partition, inputs in enumerate(merge.route(again)):
        merge.run(partition, inputs, resumed=True, committed=inputs[0].offset)
    assert len(merge.rollups) == before
    assert not any(k[0] in "hdmy" and WAIT in k for state in merge.states for k in state)
    before = len(merge.rollups)
    merge.deliver(again)
    assert len(merge.rollups) == before
    assert not any(k[0] in "hdmy" and WAIT in k for state in merge.states for k in state)
    assert merge.finals() == finals


@pytest.mark.parametrize("cut", [0.0, 0.4, 1.0])
def test_a_merge_restarted_from_a_changelog_prefix_gives_the_same_finals(cut: float) -> None:
    values = [*jobs(), *closers(at(2027, 1, 1, 1))]
    reference = Merge()
    interleave(spread(values), 30, reference)

    senders = spread(values)
    every: list[Output] = []
    for start in range(0, max(len(s.inputs) for s in senders), 30):
        for sender in senders:
            batch = sender.inputs[start : start + 30]
            if batch:
                every.extend(sender.run(batch, resumed=start == 0))
    routed = Merge().route(every)
    restarted = Merge()
    for partition, inputs in enumerate(routed):
        if not inputs:
            continue
        # Crash after the first half, none of it committed; the changelog keeps a prefix of the writes.
        half = len(inputs) // 2
        crashing = Merge()
        for position in range(0, half, 7):
            crashing.run(partition, inputs[position : min(position + 7, half)])
        log = crashing.states[partition].log
        restarted.states[partition] = restore(log[: int(len(log) * cut)])
        restarted.run(partition, inputs[:7], resumed=True)
        for position in range(7, len(inputs), 7):
            restarted.run(partition, inputs[position : position + 7])
    assert restarted.finals() == reference.finals()
