"""Doubles of the confluent-kafka clients at the boundary the sink and the notifier use, answering as the
real ones do where the loops depend on it: a subscription's assignment and a commit's answer reach their
callbacks only from a later poll/consume, a paused partition yields nothing, and an empty read waits its
timeout. Each double writes what it was asked into a shared ``journal`` so a test can check the order of
events across clients."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from confluent_kafka import OFFSET_INVALID, TIMESTAMP_CREATE_TIME, KafkaError, TopicPartition

Journal = list[tuple[Any, ...]]


class FakeMessage:
    def __init__(
        self, topic: str, partition: int, offset: int, value: bytes, key: bytes | None = None
    ) -> None:
        self._topic, self._partition, self._offset = topic, partition, offset
        self._value, self._key = value, key

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes | None:
        return self._key

    def value(self) -> bytes:
        return self._value

    def error(self) -> KafkaError | None:
        return None

    def timestamp(self) -> tuple[int, int]:
        return TIMESTAMP_CREATE_TIME, int(time.time() * 1000)


class FakeConsumer:
    """One partition (0) of each subscribed topic; ``records`` are read in order."""

    def __init__(
        self,
        journal: Journal,
        records: list[FakeMessage],
        on_commit: Callable[[KafkaError | None, list[TopicPartition]], None],
    ) -> None:
        self.journal = journal
        self._unread = deque(records)
        self._on_commit = on_commit
        self._lock = threading.Lock()
        self._on_assign: Callable[..., None] | None = None
        self._assignment: list[TopicPartition] = []
        self._paused: set[tuple[str, int]] = set()
        self._answers: list[list[TopicPartition]] = []
        self.reads = 0
        """poll/consume calls so far: how many rounds the loop went."""
        self.committed: list[tuple[str, int, int]] = []
        self.closed = False

    # -- what the loops call -----------------------------------------------------------------------------

    def subscribe(self, topics: list[str], on_assign: Callable[..., None], **_callbacks: Any) -> None:
        self._assignment = [TopicPartition(topic, 0) for topic in topics]
        self._on_assign = on_assign

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[FakeMessage]:
        self._serve()
        with self._lock:
            self.reads += 1
            taken: list[FakeMessage] = []
            while self._unread and len(taken) < num_messages:
                if (self._unread[0].topic(), self._unread[0].partition()) in self._paused:
                    break
                taken.append(self._unread.popleft())
        if not taken and timeout > 0:
            time.sleep(min(timeout, 0.05))  # the real consumer waits for records this long
        return taken

    def poll(self, timeout: float = -1) -> FakeMessage | None:
        taken = self.consume(1, timeout)
        return taken[0] if taken else None

    def commit(self, offsets: list[TopicPartition], asynchronous: bool = True) -> None:
        assert asynchronous, "both loops commit asynchronously"
        committed = [(tp.topic, tp.partition, tp.offset) for tp in offsets]
        self.journal.append(("commit", committed))
        self.committed.extend(committed)
        self._answers.append([TopicPartition(t, p, o) for t, p, o in committed])

    def pause(self, partitions: list[TopicPartition]) -> None:
        self._paused |= {(tp.topic, tp.partition) for tp in partitions}

    def resume(self, partitions: list[TopicPartition]) -> None:
        self._paused -= {(tp.topic, tp.partition) for tp in partitions}

    def assignment(self) -> list[TopicPartition]:
        return list(self._assignment)

    def seek(self, partition: TopicPartition) -> None:
        raise AssertionError(f"no test here rewinds: {partition}")

    def position(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        return [TopicPartition(tp.topic, tp.partition, OFFSET_INVALID) for tp in partitions]

    def get_watermark_offsets(self, partition: TopicPartition, cached: bool = False) -> tuple[int, int]:
        return 0, len(self._unread)

    def close(self) -> None:
        self.journal.append(("consumer closed",))
        self.closed = True

    # -- callbacks, served from the reads as librdkafka serves them ---------------------------------------

    def _serve(self) -> None:
        if self._on_assign is not None:
            on_assign, self._on_assign = self._on_assign, None
            on_assign(self, list(self._assignment))
        answers, self._answers = self._answers, []
        for partitions in answers:
            self._on_commit(None, partitions)


class FakeProducer:
    """Acknowledges every record at the next poll or flush."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self._queued: list[Callable[[KafkaError | None, Any], None]] = []
        self.closed = False

    def produce(self, topic: str, value: bytes, key: bytes | None = None, on_delivery: Any = None) -> None:
        self.journal.append(("produce", topic))
        if on_delivery is not None:
            self._queued.append(on_delivery)

    def poll(self, timeout: float = 0) -> int:
        queued, self._queued = self._queued, []
        for on_delivery in queued:
            on_delivery(None, None)
        return len(queued)

    def flush(self, timeout: float = -1) -> int:
        self.poll()
        return 0

    def close(self) -> None:
        self.closed = True


def wait_until(check: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)
