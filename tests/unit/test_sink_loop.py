"""The sink's loop without Kafka or PostgreSQL: a Sink given doubles of its clients (tests/unit/
kafka_doubles.py, and a writer that stores nothing until the test lets it) hands a full batch to the
writer and commits the batch's offsets only once the writer's future has completed; a stop closes every
client it was given; an idle sink hands its first writer an empty write when upkeep (retention) is due."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence

from prometheus_client import CollectorRegistry

from bus.codec import Codec
from bus.settings import Settings
from bus.topics import topic_name
from consumers.sink import CommitTracker, Sink
from consumers.sink_metrics import SinkMetrics
from consumers.sink_writer import Entry, WriteResult
from tests.integration.test_db_sink import gpu_sample
from tests.unit.kafka_doubles import FakeConsumer, FakeMessage, FakeProducer, Journal, wait_until


class GatedWriter:
    """Takes a batch and stores it only once ``gate`` is set (as a writer waiting for the database)."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.gate = threading.Event()
        self.abort = threading.Event()
        self.retrying = False
        self.taken: list[list[int]] = []
        self.closed = False
        self.upkeeps_due = 0
        """How many more times ``upkeep_due`` answers True (as a writer whose retention came due)."""

    def upkeep_due(self) -> bool:
        return self.upkeeps_due > 0

    def write(self, entries: Sequence[Entry]) -> WriteResult:
        offsets = [entry.offset for entry in entries]
        self.taken.append(offsets)
        if not entries:
            self.upkeeps_due -= 1
        assert self.gate.wait(30), "the test never opened the gate"
        self.journal.append(("stored", offsets))
        rows = Counter({"gpu_samples": len(entries)})
        return WriteResult(staged=rows, stored=rows)

    def close(self) -> None:
        self.closed = True


def test_a_batch_is_committed_only_after_its_write_completes() -> None:
    settings = Settings(kafka_bootstrap="127.0.0.1:1", topic_prefix="unit.")
    topic = topic_name(settings, "gpu.samples")
    codec = Codec()
    journal: Journal = []
    records = [FakeMessage(topic, 0, i, codec.encode("GpuSample", gpu_sample(i), topic)) for i in range(5)]
    metrics = SinkMetrics(CollectorRegistry())
    commits = CommitTracker(metrics.commit_failures)
    consumer = FakeConsumer(journal, records, commits.on_commit)
    producer = FakeProducer(journal)
    writer = GatedWriter(journal)
    sink = Sink(
        settings,
        consumer=consumer,  # type: ignore[arg-type]
        producer=producer,  # type: ignore[arg-type]
        writers=[writer],  # type: ignore[list-item]
        commits=commits,
        metrics=metrics,
        codec=codec,
        topics=("gpu.samples",),
        batch_max=5,
        batch_timeout_s=0.2,
    )
    stopping = threading.Event()
    thread = threading.Thread(target=sink.run, args=(stopping,), daemon=True)
    thread.start()
    try:
        wait_until(lambda: writer.taken == [[0, 1, 2, 3, 4]], "the batch handed to the writer")
        # The loop goes on reading while the write is outstanding, and commits nothing meanwhile.
        rounds = consumer.reads
        wait_until(lambda: consumer.reads >= rounds + 20, "twenty more rounds of the loop")
        assert consumer.committed == []
        writer.gate.set()
        wait_until(lambda: consumer.committed == [(topic, 0, 5)], "the batch's offsets committed")
    finally:
        writer.gate.set()
        stopping.set()
        thread.join(30)
    assert not thread.is_alive()
    assert journal.index(("stored", [0, 1, 2, 3, 4])) < journal.index(("commit", [(topic, 0, 5)]))
    assert commits.committed == {(topic, 0): 5}  # the broker's answer reached the tracker
    assert sink.stats.records == 5 and sink.stats.stored == {"gpu_samples": 5}
    assert consumer.closed and writer.closed


def test_an_idle_sink_hands_its_writer_the_upkeep_when_it_is_due_and_commits_nothing_for_it() -> None:
    settings = Settings(kafka_bootstrap="127.0.0.1:1", topic_prefix="unit.")
    journal: Journal = []
    metrics = SinkMetrics(CollectorRegistry())
    commits = CommitTracker(metrics.commit_failures)
    consumer = FakeConsumer(journal, [], commits.on_commit)
    writer = GatedWriter(journal)
    writer.gate.set()
    sink = Sink(
        settings,
        consumer=consumer,  # type: ignore[arg-type]
        producer=FakeProducer(journal),  # type: ignore[arg-type]
        writers=[writer],  # type: ignore[list-item]
        commits=commits,
        metrics=metrics,
        codec=Codec(),
        topics=("gpu.samples",),
        batch_timeout_s=0.2,
    )
    stopping = threading.Event()
    thread = threading.Thread(target=sink.run, args=(stopping,), daemon=True)
    thread.start()
    try:
        rounds = consumer.reads
        wait_until(lambda: consumer.reads >= rounds + 5, "five idle rounds")
        assert writer.taken == []  # nothing due: nothing handed over
        writer.upkeeps_due = 2
        wait_until(lambda: writer.taken == [[], []], "two upkeep-only writes")
        rounds = consumer.reads
        wait_until(lambda: consumer.reads >= rounds + 5, "five more idle rounds")
    finally:
        stopping.set()
        thread.join(30)
    assert not thread.is_alive()
    assert writer.taken == [[], []]  # once done, no more
    assert consumer.committed == [] and sink.stats.batches == 0
