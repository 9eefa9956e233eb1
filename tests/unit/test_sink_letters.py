"""The sink's dead-letter outbox (consumers/sink_letters.py) with a producer that answers as
confluent-kafka's does (delivery callbacks served by poll, refusals as KafkaError): a letter is only
delivered once acknowledged, a too-large one goes again without its value, other failures go again after
a growing pause, and a fatal error stops the sink."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException
from prometheus_client import CollectorRegistry, Counter

from bus.codec import Codec
from consumers.sink_letters import LetterOutbox


class FakeProducer:
    """Queues what is produced; :meth:`poll` answers each with the next scripted error (None: acked)."""

    def __init__(self, answers: list[KafkaError | None]) -> None:
        self.answers = answers
        self.sent: list[bytes] = []
        self._queued: list[Callable[[KafkaError | None, Any], None]] = []

    def produce(self, topic: str, value: bytes, key: bytes, on_delivery: Callable[..., None]) -> None:
        self.sent.append(value)
        self._queued.append(on_delivery)

    def poll(self, timeout: float = 0.0) -> int:
        queued, self._queued = self._queued, []
        for callback in queued:
            callback(self.answers.pop(0) if self.answers else None, None)
        return len(queued)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def letter() -> dict[str, Any]:
    return {
        "time": datetime(2026, 1, 1, tzinfo=UTC),
        "stage": "sink",
        "origin_topic": "aima.gpu.samples",
        "origin_partition": 0,
        "origin_offset": 7,
        "key": b"k",
        "value": b"x" * 5000,
        "reason": "GpuSample: utilization_percent: nan is not a finite number",
        "error_type": "InvalidRecord",
        "source": "sink",
    }


def outbox(producer: FakeProducer, clock: Clock) -> tuple[LetterOutbox, Counter]:
    failures = Counter("failures", "refused sends", ["error"], registry=CollectorRegistry())
    return LetterOutbox(producer, Codec(), "aima.deadletter", failures, clock=clock), failures  # type: ignore[arg-type]


def test_a_letter_counts_only_once_acknowledged() -> None:
    producer, clock = FakeProducer([None]), Clock()
    box, _ = outbox(producer, clock)
    sent = box.send(letter())
    assert not sent.delivered and box.pending() == 1
    box.serve()
    assert sent.delivered and box.pending() == 0


def test_a_too_large_letter_goes_again_without_its_value() -> None:
    producer, clock = FakeProducer([KafkaError(KafkaError.MSG_SIZE_TOO_LARGE), None]), Clock()
    box, failures = outbox(producer, clock)
    sent = box.send(letter())
    box.serve()  # refused: queued again at once, without the value
    assert not sent.delivered and box.pending() == 1
    box.serve()  # sent again
    box.serve()  # acknowledged
    assert sent.delivered
    assert sent.record["value"] is None and "(5000 bytes) is left out" in sent.record["reason"]
    assert len(producer.sent) == 2 and len(producer.sent[1]) < len(producer.sent[0]) - 4000
    assert failures.labels("MSG_SIZE_TOO_LARGE")._value.get() == 1


def test_other_failures_go_again_after_a_growing_pause() -> None:
    refused = KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED)
    producer, clock = FakeProducer([refused, refused, None]), Clock()
    box, _ = outbox(producer, clock)
    sent = box.send(letter())
    box.serve()
    assert sent.retry_at == pytest.approx(0.5)
    box.serve()
    assert len(producer.sent) == 1  # not due yet
    clock.now = 0.5
    box.serve()  # sent again
    box.serve()  # refused again: twice the pause
    assert sent.retry_at == pytest.approx(1.5) and not sent.delivered
    clock.now = 1.5
    box.serve()
    box.serve()
    assert sent.delivered and sent.attempts == 3 and box.pending() == 0
    assert sent.record["value"] is not None  # never cut for a refusal that is not about size


def test_a_fatal_error_stops_the_sink() -> None:
    producer, clock = FakeProducer([KafkaError(KafkaError._FATAL, fatal=True)]), Clock()
    box, _ = outbox(producer, clock)
    box.send(letter())
    with pytest.raises(KafkaException):
        box.serve()


def test_flush_waits_for_the_acknowledgements_within_its_time() -> None:
    producer, clock = FakeProducer([KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED)] * 100), Clock()
    box, _ = outbox(producer, clock)
    box.send(letter())

    def poll(timeout: float = 0.0) -> int:
        clock.now += max(timeout, 0.01)
        return FakeProducer.poll(producer, timeout)

    producer.poll = poll  # type: ignore[method-assign]
    assert box.flush(2.0) is False and box.pending() == 1
