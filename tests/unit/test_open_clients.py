"""open_sink and open_notifier build real clients (no broker or database needed to build them) and close
those they opened when a later one fails: here the consumer, last, refused by librdkafka for a setting
it does not know. Checked by what the clients leave running: librdkafka's own threads (named ``rdk:*``)
and the database pool's workers, counted before and after while the error (and so the factory's frame,
which still refers to the clients) is alive.

Each check runs in an interpreter of its own: in the test process, clients of earlier tests still start
and end librdkafka threads of their own (a producer learning of a broker starts one), which no count or
set of thread ids taken here could tell from this test's."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest
from confluent_kafka import KafkaException
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from bus.settings import REPO_ROOT, Settings
from consumers.notify.notifier import open_notifier
from consumers.sink import open_sink
from consumers.sink_metrics import SinkMetrics
from consumers.sink_writer import Writer
from tests.integration.test_notifier import config, webhook

BAD_CONSUMER = {"no.such.property": "1"}
UNREACHABLE_DSN = "postgresql://aima@127.0.0.1:1/aima?connect_timeout=1"


def librdkafka_threads() -> set[str]:
    """The ids of librdkafka's threads now running."""
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


def in_own_interpreter(check: str) -> None:
    """Run ``check``, a function of this module, in a fresh interpreter; fail with what it printed."""
    code = f"from tests.unit.test_open_clients import {check}; {check}()"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, f"{check} failed:\n{done.stdout}\n{done.stderr}"


def test_a_sink_whose_consumer_fails_closes_its_producer_and_writers() -> None:
    in_own_interpreter("sink_check")


def test_a_notifier_whose_consumer_fails_closes_its_pool_producer_and_http_client() -> None:
    in_own_interpreter("notifier_check")


def sink_check() -> None:
    settings = Settings(kafka_bootstrap="127.0.0.1:1", topic_prefix="unit.")
    writers = [ClosedWriter(UNREACHABLE_DSN), ClosedWriter(UNREACHABLE_DSN)]
    before = librdkafka_threads()
    with pytest.raises(KafkaException, match=r"no\.such\.property") as failed:
        open_sink(settings, SinkMetrics(CollectorRegistry()), writers, consumer_config=BAD_CONSUMER)
    assert failed.traceback  # the factory's frame, and what it opened, are still referred to here
    assert librdkafka_threads() == before  # the producer built before the consumer is closed
    assert [writer.closes for writer in writers] == [1, 1]


def notifier_check() -> None:
    settings = Settings(
        kafka_bootstrap="127.0.0.1:1", topic_prefix="unit.", database_url=SecretStr(UNREACHABLE_DSN)
    )
    notify = config([{"name": "team", "webhook": webhook("http://receiver.test/hook")}])
    before = librdkafka_threads()
    assert pool_threads() == []
    with pytest.raises(KafkaException, match=r"no\.such\.property") as failed:
        open_notifier(settings, threading.Event(), notify, consumer_config=BAD_CONSUMER)
    assert failed.traceback
    assert librdkafka_threads() == before  # the dead-letter producer is closed
    assert pool_threads() == []  # the pool (opened, still trying the unreachable database) is closed
    http = next(
        value
        for frame in failed.traceback
        if frame.name == "open_notifier"
        for name, value in frame.locals.items()
        if name == "http"
    )
    assert http.is_closed
