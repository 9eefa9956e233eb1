"""open_sink and open_notifier build real clients (no broker or database needed to build them) and close
those they opened when a later one fails: here the consumer, last, refused by librdkafka for a setting
it does not know. Checked by what the clients leave running: librdkafka's own threads (named ``rdk:*``)
and the database pool's workers, counted before and after while the error (and so the factory's frame,
which still refers to the clients) is alive."""

from __future__ import annotations

import gc
import threading
from pathlib import Path

import pytest
from confluent_kafka import KafkaException
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from bus.settings import Settings
from consumers.notify.notifier import open_notifier
from consumers.sink import open_sink
from consumers.sink_metrics import SinkMetrics
from consumers.sink_writer import Writer
from tests.integration.test_notifier import config, webhook

BAD_CONSUMER = {"no.such.property": "1"}
UNREACHABLE_DSN = "postgresql://aima@127.0.0.1:1/aima?connect_timeout=1"


def librdkafka_threads() -> set[str]:
    """The ids of librdkafka's threads now running. A set, not a count: clients of earlier tests may
    still be ending theirs (their threads leave while this test runs), and what is checked is only that
    none of the threads this test's clients started is left."""
    gc.collect()  # earlier tests' clients that only garbage still refers to are destroyed first
    return {task.name for task in Path("/proc/self/task").iterdir() if _thread_name(task).startswith("rdk:")}


def _thread_name(task: Path) -> str:
    """The thread's name; empty for one that ended between the listing and the read."""
    try:
        return (task / "comm").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def pool_threads() -> list[str]:
    return [thread.name for thread in threading.enumerate() if thread.name.startswith("aima-notify-")]


class ClosedWriter(Writer):
    """A real writer that notes its close."""

    closes = 0

    def close(self) -> None:
        self.closes += 1
        super().close()


def test_a_sink_whose_consumer_fails_closes_its_producer_and_writers() -> None:
    settings = Settings(kafka_bootstrap="127.0.0.1:1", topic_prefix="unit.")
    writers = [ClosedWriter(UNREACHABLE_DSN), ClosedWriter(UNREACHABLE_DSN)]
    before = librdkafka_threads()
    with pytest.raises(KafkaException, match=r"no\.such\.property") as failed:
        open_sink(settings, SinkMetrics(CollectorRegistry()), writers, consumer_config=BAD_CONSUMER)
    assert failed.traceback  # the factory's frame, and what it opened, are still referred to here
    assert librdkafka_threads() <= before  # the producer built before the consumer is closed
    assert [writer.closes for writer in writers] == [1, 1]


def test_a_notifier_whose_consumer_fails_closes_its_pool_producer_and_http_client() -> None:
    settings = Settings(
        kafka_bootstrap="127.0.0.1:1", topic_prefix="unit.", database_url=SecretStr(UNREACHABLE_DSN)
    )
    notify = config([{"name": "team", "webhook": webhook("http://receiver.test/hook")}])
    before = librdkafka_threads()
    assert pool_threads() == []
    with pytest.raises(KafkaException, match=r"no\.such\.property") as failed:
        open_notifier(settings, threading.Event(), notify, consumer_config=BAD_CONSUMER)
    assert failed.traceback
    assert librdkafka_threads() <= before  # the dead-letter producer is closed
    assert pool_threads() == []  # the pool (opened, still trying the unreachable database) is closed
    http = next(
        value
        for frame in failed.traceback
        if frame.name == "open_notifier"
        for name, value in frame.locals.items()
        if name == "http"
    )
    assert http.is_closed
