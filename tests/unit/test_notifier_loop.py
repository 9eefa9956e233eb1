"""The notifier's loop without Kafka or PostgreSQL: a Notifier given doubles of its clients (tests/unit/
kafka_doubles.py, a pool whose connections answer every query with no rows and note every write) and its
real webhook channel on an HTTP client whose transport the test holds: the alert record's offset is
committed only once the delivery has settled, its outcome written to the notification log."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import httpx

from bus.codec import Codec
from bus.settings import Settings
from bus.topics import topic_name
from consumers.notify import channels as channel_factory
from consumers.notify.grouping import OffsetTracker
from consumers.notify.notifier import Commits, Notifier
from tests.integration.test_notifier import alert_event, config, webhook
from tests.unit.kafka_doubles import FakeConsumer, FakeMessage, FakeProducer, Journal, wait_until


class FakeConnection:
    """Answers every query with no rows (no silences, nothing logged before); notes each log write as
    ("log", outcome)."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    def __enter__(self) -> FakeConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def transaction(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def cursor(self, **_options: Any) -> FakeConnection:
        return self

    def execute(self, query: object, params: object = None) -> FakeConnection:
        return self

    def executemany(self, query: object, rows: list[tuple[Any, ...]]) -> None:
        for row in rows:  # an intent row's outcome is its 7th column, a settled row's its 9th
            self.journal.append(("log", row[6] if len(row) == 8 else row[8]))

    def fetchall(self) -> list[Any]:
        return []


class FakePool:
    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.closed = False

    @contextlib.contextmanager
    def connection(self, timeout: float | None = None) -> Iterator[FakeConnection]:
        yield FakeConnection(self.journal)

    def close(self, timeout: float | None = None) -> None:
        self.closed = True


def test_an_offset_is_committed_only_after_its_delivery_settles() -> None:
    settings = Settings(kafka_bootstrap="127.0.0.1:1", topic_prefix="unit.")
    topic = topic_name(settings, "alerts")
    codec = Codec()
    journal: Journal = []
    gate = threading.Event()
    requests: list[httpx.Request] = []

    def receiver(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        assert gate.wait(30), "the test never opened the gate"
        journal.append(("received",))
        return httpx.Response(200)

    notify = config([{"name": "team", "webhook": webhook("http://receiver.test/hook")}])
    http = httpx.Client(transport=httpx.MockTransport(receiver))
    channels = {
        (receiver_config.name, target.id): channel_factory.build(target, http)
        for receiver_config in notify.receivers.values()
        for target in receiver_config.channels
    }
    commits = Commits(OffsetTracker())
    record = FakeMessage(topic, 0, 0, codec.encode("AlertEvent", alert_event(), topic))
    consumer = FakeConsumer(journal, [record], commits.on_commit)
    producer = FakeProducer(journal)
    pool = FakePool(journal)
    stop = threading.Event()
    notifier = Notifier(
        settings,
        stop,
        notify,
        consumer=consumer,  # type: ignore[arg-type]
        producer=producer,  # type: ignore[arg-type]
        pool=pool,  # type: ignore[arg-type]
        http=http,
        channels=channels,
        commits=commits,
        codec=codec,
        commit_interval_s=0.0,
        time_left_s=lambda: 10.0,
    )
    thread = threading.Thread(target=notifier.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: len(requests) == 1, "the webhook called")
        # The loop goes on while the receiver holds the request; the record's offset stays uncommitted.
        rounds = consumer.reads
        wait_until(lambda: consumer.reads >= rounds + 20, "twenty more rounds of the loop")
        assert all(offset == 0 for _, _, offset in consumer.committed)
        gate.set()
        wait_until(lambda: (topic, 0, 1) in consumer.committed, "the record's offset committed")
    finally:
        gate.set()
        stop.set()
        thread.join(30)
    assert not thread.is_alive()
    past_record = next(i for i, e in enumerate(journal) if e[0] == "commit" and (topic, 0, 1) in e[1])
    assert journal.index(("log", "sending")) < journal.index(("received",))
    assert journal.index(("received",)) < journal.index(("log", "delivered")) < past_record
    assert notifier.tracker.pending() == 0
    assert consumer.closed and pool.closed and http.is_closed
