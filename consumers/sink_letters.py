"""The sink's dead letters on their way to the dead-letter topic, at least once.

Each letter belongs to a batch, and the sink commits a batch's offsets only once every letter of it (and
of every batch before it) is acknowledged by the broker (:attr:`Letter.delivered`). A letter the broker
refuses is never dropped:

- too large for the topic (MSG_SIZE_TOO_LARGE, from the broker or from the client's own limit): it is sent
  again without the original value, its reason saying so; the value is kept in the dead_letters table,
  stored with the batch before any offset moves;
- any other failure (the broker away for longer than ``message.timeout.ms``, a refusal): it is sent again
  after a backoff (0.5 s doubling to 30 s) until the broker takes it; meanwhile its batch and every later
  one stay uncommitted, so a sink that stops or crashes reads those records again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer
from prometheus_client import Counter

from bus.codec import Codec

log = logging.getLogger(__name__)

__all__ = ["Letter", "LetterOutbox"]

_RETRY_INITIAL_S = 0.5
_RETRY_MAX_S = 30.0
_QUEUE_FULL_RETRY_S = 0.1


@dataclass(eq=False)
class Letter:
    """One DeadLetter record (the dict the codec encodes) and how far its delivery got."""

    record: dict[str, Any]
    delivered: bool = False
    attempts: int = 0
    failures: int = 0
    retry_at: float | None = None
    """When to send it again after a failure; None while a send is outstanding (or it is delivered)."""
    errors: list[str] = field(default_factory=list)


class LetterOutbox:
    """Sends letters with ``producer`` and keeps each one until the broker acknowledged it. Call
    :meth:`serve` often (it polls the producer, which runs the delivery callbacks, and sends again what
    is due); use it from one thread."""

    def __init__(
        self,
        producer: Producer,
        codec: Codec,
        topic: str,
        failures: Counter,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``failures``: a counter labelled by error name, counting each refused or failed send."""
        self._producer = producer
        self._codec = codec
        self.topic = topic
        self._failures = failures
        self._clock = clock
        self._waiting: list[Letter] = []
        """Letters not yet delivered whose send failed: sent again once their ``retry_at`` is due."""
        self._outstanding = 0

    def send(self, record: dict[str, Any]) -> Letter:
        letter = Letter(record)
        self._produce(letter)
        return letter

    def pending(self) -> int:
        """Letters not yet acknowledged (sent and waiting, or waiting to be sent again)."""
        return self._outstanding + len(self._waiting)

    def serve(self, timeout_s: float = 0.0) -> None:
        self._producer.poll(timeout_s)
        if not self._waiting:
            return
        now = self._clock()
        due = [letter for letter in self._waiting if letter.retry_at is not None and letter.retry_at <= now]
        for letter in due:
            self._waiting.remove(letter)
            self._produce(letter)

    def flush(self, timeout_s: float) -> bool:
        """Serve until every letter is delivered or ``timeout_s`` passed; True when none is pending."""
        deadline = self._clock() + timeout_s
        while self.pending():
            left = deadline - self._clock()
            if left <= 0:
                return False
            self.serve(min(left, 0.1))
        return True

    # -- sending -----------------------------------------------------------------------------------------

    def _produce(self, letter: Letter) -> None:
        letter.attempts += 1
        letter.retry_at = None
        data = self._codec.encode("DeadLetter", letter.record, self.topic)
        try:
            self._producer.produce(
                self.topic,
                value=data,
                key=letter.record["origin_topic"].encode(),
                on_delivery=lambda error, _message, letter=letter: self._on_delivery(letter, error),
            )
        except BufferError:  # the client's queue is full: serve it and send again shortly
            letter.attempts -= 1
            letter.retry_at = self._clock() + _QUEUE_FULL_RETRY_S
            self._waiting.append(letter)
            return
        except KafkaException as exc:  # refused before sending (the client's own size limit)
            self._failed(letter, exc.args[0])
            return
        self._outstanding += 1

    def _on_delivery(self, letter: Letter, error: KafkaError | None) -> None:
        self._outstanding -= 1
        if error is None:
            letter.delivered = True
            if letter.failures:
                log.info(
                    "dead letter delivered after failed sends",
                    extra={
                        "origin_topic": letter.record["origin_topic"],
                        "origin_offset": letter.record["origin_offset"],
                        "attempts": letter.attempts,
                    },
                )
            return
        self._failed(letter, error)

    def _failed(self, letter: Letter, error: KafkaError) -> None:
        if error.fatal():  # the producer is unusable: the sink stops, its offsets uncommitted
            raise KafkaException(error)
        letter.failures += 1
        letter.errors.append(error.str())
        self._failures.labels(error.name()).inc()
        record = letter.record
        if error.code() == KafkaError.MSG_SIZE_TOO_LARGE and record.get("value") is not None:
            size = len(record["value"])
            letter.record = {
                **record,
                "value": None,
                "reason": f"{record['reason']} [the original value ({size} bytes) is left out: the "
                f"dead-letter topic refused the whole letter ({error.str()}); the sink's dead_letters "
                "table keeps it]",
            }
            delay = 0.0
        else:
            delay = min(_RETRY_INITIAL_S * 2 ** (letter.failures - 1), _RETRY_MAX_S)
        log.warning(
            "dead letter not delivered; sending it again, its offsets wait",
            extra={
                "topic": self.topic,
                "origin_topic": record["origin_topic"],
                "origin_partition": record["origin_partition"],
                "origin_offset": record["origin_offset"],
                "error": error.str(),
                "failures": letter.failures,
                "retry_in_s": delay,
            },
        )
        letter.retry_at = self._clock() + delay
        self._waiting.append(letter)
