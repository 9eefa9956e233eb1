"""Samples the length of one job queue (M14, ``QueueSample``) every ``interval_s`` on a background thread.

The scheduler that owns the queue passes a function returning its current length; a failing function is
logged and that sample skipped, never raised into the scheduler."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

from prometheus_client import CollectorRegistry

from bus.settings import Settings
from producers.publisher import Publisher

__all__ = ["QueueSampler"]

log = logging.getLogger(__name__)


class QueueSampler:
    def __init__(
        self,
        settings: Settings,
        queue: str,
        length_fn: Callable[[], int],
        interval_s: float = 10,
        publisher: Publisher | None = None,
        *,
        clock: Callable[[], datetime] | None = None,
        source: str = "queue",
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.queue = queue
        self.interval_s = interval_s
        self._length_fn = length_fn
        self._clock = clock or (lambda: datetime.now(UTC))
        self._source = source
        self._publisher = publisher or Publisher(settings, source="queue", registry=CollectorRegistry())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> dict[str, Any] | None:
        """Read the length now and publish it; returns the record, or None when the length was
        unreadable (logged)."""
        try:
            length = int(self._length_fn())
        except Exception:
            log.exception("cannot read queue length", extra={"queue": self.queue})
            return None
        value = {"time": self._clock(), "queue": self.queue, "length_jobs": length, "source": self._source}
        self._publisher.publish("queue.samples", self.queue, "QueueSample", value)
        return value

    def start(self) -> QueueSampler:
        """Sample now and then every ``interval_s`` on a daemon thread until :meth:`close`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"aima-queue-{self.queue}", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        deadline = time.monotonic()
        while True:
            self.sample()
            self._publisher.poll(0)
            deadline += self.interval_s
            if self._stop.wait(max(0.0, deadline - time.monotonic())):
                return

    def close(self, timeout_s: float = 10.0) -> int:
        """Stop sampling and wait up to ``timeout_s`` for delivery; returns what is still pending."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        return self._publisher.flush(timeout_s)

    def __enter__(self) -> QueueSampler:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
