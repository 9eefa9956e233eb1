"""What an AIMA job imports to report its metrics: lifecycle events (``JobEvent``: queued, started,
finished, failed; M15 queue wait) and per-interval timing summaries (``JobTimings``: M6, M9-M13).

    with JobReporter(settings, job_id, project="news", user="alice", model="yolov8x") as report:
        for batch in batches:
            with report.batch():
                with report.data_transfer("h2d", bytes=batch.nbytes):
                    tensor = batch.to("cuda")
                with report.inference(steps=len(batch)):
                    model(tensor)
        report.finished(media_minutes=12.5)

The job's threads only fold durations into in-memory aggregates; a background thread publishes the
summaries every ``interval_s``. Publishing goes through :class:`producers.publisher.Publisher`, which never
blocks: while Kafka is away records wait in its bounded buffer, and when that is full they are dropped,
counted (:meth:`JobReporter.stats`) and logged, and the job keeps running. User ids are pseudonymised
(keyed hash) here, before anything leaves the process (P1)."""

from __future__ import annotations

import functools
import inspect
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from prometheus_client import CollectorRegistry

from bus.settings import Settings
from producers.publisher import Publisher
from producers.sdk.pseudonym import Pseudonymiser
from producers.sdk.timings import KernelTimer, TimingAggregator

if TYPE_CHECKING:
    from producers.settings import JobGpuSettings

__all__ = ["JobReporter"]

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])
PRICING = frozenset({"on_demand", "spot"})
MAX_ERROR_CHARS = 2000
DROP_LOG_EVERY_S = 30.0


class _Timed:
    """A context manager timing one block with perf_counter; a class rather than a generator because it
    sits on the job's hot path (one per frame)."""

    __slots__ = ("_direction", "_kind", "_nbytes", "_observe", "_steps", "_t0")

    def __init__(
        self, observe: Callable[..., None], kind: str, steps: int = 1, direction: str | None = None,
        nbytes: int | None = None,
    ) -> None:  # fmt: skip
        self._observe, self._kind, self._steps = observe, kind, steps
        self._direction, self._nbytes = direction, nbytes
        self._t0 = 0.0

    def __enter__(self) -> _Timed:
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        # Recorded even when the block raised: the time was spent all the same.
        elapsed = time.perf_counter() - self._t0
        self._observe(self._kind, elapsed / self._steps, direction=self._direction, nbytes=self._nbytes)


class _Kernel:
    __slots__ = ("_kernel", "_started", "_timer")

    def __init__(self, timer: KernelTimer, kernel: str) -> None:
        self._timer, self._kernel = timer, kernel
        self._started: Any = None

    def __enter__(self) -> _Kernel:
        self._started = self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.stop(self._kernel, self._started)


class JobReporter:
    """Reports one job's lifecycle and timings: the SDK's entry point (the ``*Metrics`` classes elsewhere
    are bundles of a process's own Prometheus metrics). Use as a context manager (sends ``started`` on
    enter, ``finished`` or ``failed`` on exit, then publishes what is left and flushes), or call the
    lifecycle methods and :meth:`close` yourself."""

    def __init__(
        self,
        settings: Settings,
        job_id: str,
        project: str,
        user: str | None,
        model: str | None = None,
        queue: str | None = None,
        service: str | None = None,
        gpu_count: int | None = None,
        gpu_model: str | None = None,
        provider: str | None = None,
        pricing: str | None = None,
        host: str | None = None,
        publisher: Publisher | None = None,
        interval_s: float = 10.0,
        pseudonym_key: bytes | str | None = None,
        *,
        clock: Callable[[], datetime] | None = None,
        torch: Any = None,
        close_timeout_s: float = 10.0,
        gpu_uuids: Sequence[str] | None = None,
        gpu_settings: JobGpuSettings | None = None,
    ) -> None:
        """``user`` is the raw user id; only its pseudonym is kept and sent. ``pseudonym_key`` (else
        AIMA_PSEUDONYM_KEY or AIMA_PSEUDONYM_KEY_FILE) is required: without one this raises
        :class:`~producers.sdk.pseudonym.PseudonymKeyMissing` before anything starts. ``publisher``: share
        one between the jobs of a process; by default each JobReporter makes its own, with a private
        Prometheus registry. ``clock``: tz-aware UTC event times (tests inject one). ``torch``: see
        :class:`~producers.sdk.timings.KernelTimer`. ``close_timeout_s``: how long :meth:`close` waits
        for the broker to acknowledge what is buffered. ``gpu_uuids``: the UUIDs of the GPUs the job holds,
        sent on its started and end events so each GPU's measured energy goes to ``project``; when not
        given, those of NVIDIA_VISIBLE_DEVICES or CUDA_VISIBLE_DEVICES (``gpu_settings``, built from the
        environment when not given) where they name GPU UUIDs. ``gpu_count`` defaults to their number, else
        1; an explicit list of another length raises ValueError, one from the environment is left out
        (logged), so the events stay valid."""
        # The key check comes first: a misconfigured job must fail before it opens any connection.
        pseudonymise = Pseudonymiser(pseudonym_key)
        if pricing is not None and pricing not in PRICING:
            raise ValueError(f"pricing must be on_demand or spot, got {pricing!r}")
        gpu_count, uuids = _job_gpus(gpu_count, gpu_uuids, gpu_settings, job_id)
        if gpu_count < 0:
            raise ValueError(f"gpu_count must be >= 0, got {gpu_count}")
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.job_id = job_id
        self.project = project
        self.user = pseudonymise(user) if user is not None else None
        self.host = host or socket.gethostname()
        self.interval_s = interval_s
        self.gpu_uuids = uuids
        self._attrs = {
            "service": service, "queue": queue, "model": model, "gpu_count": gpu_count,
            "gpu_model": gpu_model, "provider": provider, "pricing": pricing,
        }  # fmt: skip
        self._clock = clock or (lambda: datetime.now(UTC))
        self._close_timeout_s = close_timeout_s
        self._publisher = publisher or Publisher(settings, source="sdk", registry=CollectorRegistry())
        self._timings = TimingAggregator(
            job_id=job_id, project=project, model=model, host=self.host, clock=self._clock
        )
        self._kernels = KernelTimer(self._timings, torch)
        self._send_lock = threading.Lock()
        self._sent = 0
        self._not_sent = 0
        self._dropped_seen = 0
        self._drop_log_after = 0.0
        self._queued_at: datetime | None = None
        self._started = False
        self._ended = False
        self._closed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"aima-metrics-{job_id}", daemon=True)
        self._thread.start()

    # -- timing (job thread, hot path) ---------------------------------------------------------------------

    def frame(self) -> _Timed:
        """Times processing one frame (M9)."""
        return _Timed(self._timings.observe, "frame")

    def batch(self) -> _Timed:
        """Times processing one batch (M11)."""
        return _Timed(self._timings.observe, "batch")

    def inference(self, steps: int = 1) -> _Timed:
        """Times inference over ``steps`` steps and records the mean per step (M10)."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        return _Timed(self._timings.observe, "inference", steps=steps)

    def model_load(self) -> _Timed:
        """Times loading the model (M12)."""
        return _Timed(self._timings.observe, "model_load")

    def data_transfer(self, direction: str = "h2d", bytes: int | None = None) -> _Timed:
        """Times one host-device copy of ``bytes`` in ``direction`` h2d or d2h (M13)."""
        if direction not in ("h2d", "d2h"):
            raise ValueError(f"direction must be h2d or d2h, got {direction!r}")
        return _Timed(self._timings.observe, "data_transfer", direction=direction, nbytes=bytes)

    def cuda_kernel(self, name: str) -> _Kernel:
        """Times one kernel (M6): CUDA events where torch has CUDA, else wall time."""
        return _Kernel(self._kernels, name)

    def observe(
        self,
        kind: str,
        seconds: float,
        *,
        kernel: str | None = None,
        direction: str | None = None,
        bytes: int | None = None,
    ) -> None:
        """Record a duration measured elsewhere. ``kind``: frame, inference, batch, model_load,
        data_transfer or cuda_kernel."""
        self._timings.observe(kind, seconds, kernel=kernel, direction=direction, nbytes=bytes)

    def timed(self, kind: str, **labels: Any) -> Callable[[F], F]:
        """Decorator timing every call of a function (or coroutine function) as ``kind``; ``labels`` are
        those of :meth:`observe` (kernel, direction, bytes)."""

        def decorate(function: F) -> F:
            if inspect.iscoroutinefunction(function):

                @functools.wraps(function)
                async def timed_async(*args: Any, **kwargs: Any) -> Any:
                    t0 = time.perf_counter()
                    try:
                        return await function(*args, **kwargs)
                    finally:
                        self.observe(kind, time.perf_counter() - t0, **labels)

                return timed_async  # type: ignore[return-value]

            @functools.wraps(function)
            def timed_sync(*args: Any, **kwargs: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return function(*args, **kwargs)
                finally:
                    self.observe(kind, time.perf_counter() - t0, **labels)

            return timed_sync  # type: ignore[return-value]

        return decorate

    # -- lifecycle ---------------------------------------------------------------------------------------

    def queued(self, at: datetime | None = None) -> None:
        """The job entered its queue (``at``, default now); ``started`` then reports the wait."""
        self._queued_at = _aware(at) if at else self._clock()
        self._send_event("queued", self._queued_at, host=None)

    def started(self, queued_at: datetime | None = None) -> None:
        """The job started running. ``queue_wait_seconds`` (M15) is measured from ``queued_at``, else from
        :meth:`queued`'s time, and left null when neither is known."""
        now = self._clock()
        if queued_at is not None:
            self._queued_at = _aware(queued_at)
        wait = None
        if self._queued_at is not None:
            wait = max(0.0, (now - self._queued_at).total_seconds())
        self._started = True
        self._send_event("started", now, queue_wait_seconds=wait)

    def finished(self, media_minutes: float | None = None) -> None:
        """The job ended successfully; ``media_minutes`` processed feeds cost per media minute (M25)."""
        self._end("finished", media_minutes=media_minutes)

    def failed(self, error: str | None = None, media_minutes: float | None = None) -> None:
        self._end("failed", media_minutes=media_minutes, error=error[:MAX_ERROR_CHARS] if error else None)

    def _end(self, event: str, **fields: Any) -> None:
        if self._ended:
            log.warning("job already ended; ignored", extra={"job_id": self.job_id, "event": event})
            return
        self._ended = True
        # The timings up to the end go out before the end event, so a reader that closes the job's books
        # on 'finished' has seen them.
        self.emit()
        self._send_event(event, self._clock(), **fields)

    def __enter__(self) -> JobReporter:
        if not self._started:
            self.started()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._ended:
            if exc_type is None:
                self.finished()
            else:
                self.failed(error=f"{exc_type.__name__}: {exc}")
        self.close()

    def close(self, timeout_s: float | None = None) -> int:
        """Stop the background thread, publish the last interval and wait up to ``timeout_s`` (default
        ``close_timeout_s``) for delivery; returns the records still unacknowledged. Idempotent."""
        if self._closed:
            return 0
        self._closed = True
        self._stop.set()
        self._thread.join()
        self.emit()
        remaining = self._publisher.flush(self._close_timeout_s if timeout_s is None else timeout_s)
        self._report_drops(force=True)
        if remaining:
            log.warning("metrics not delivered at close", extra={"job_id": self.job_id, "pending": remaining})
        return remaining

    # -- publishing (background thread) --------------------------------------------------------------------

    def emit(self) -> int:
        """Publish the current interval's summaries now and start the next interval; returns how many
        records were handed to the publisher. The background thread calls this every ``interval_s``."""
        self._kernels.resolve()
        records = self._timings.drain()
        sent = sum(self._send("job.timings", "JobTimings", record) for record in records)
        self._publisher.poll(0)
        self._report_drops()
        return sent

    def _run(self) -> None:
        # Deadlines on the monotonic clock, so the interval does not drift by the time emit takes.
        deadline = time.monotonic() + self.interval_s
        while not self._stop.wait(max(0.0, deadline - time.monotonic())):
            deadline += self.interval_s
            try:
                self.emit()
            except Exception:  # the thread must outlive any one bad interval
                log.exception("publishing job timings failed", extra={"job_id": self.job_id})

    def _send_event(self, event: str, at: datetime, **fields: Any) -> None:
        value: dict[str, Any] = {
            "time": at, "job_id": self.job_id, "event": event, "project": self.project, "user": self.user,
            "host": self.host, **self._attrs, "media_minutes": None, "queue_wait_seconds": None,
            "error": None, "source": "sdk",
        }  # fmt: skip
        value["gpu_uuids"] = None if event == "queued" else self.gpu_uuids  # held once started
        value.update(fields)
        self._send("job.events", "JobEvent", value)

    def _send(self, topic_key: str, record_name: str, value: dict[str, Any]) -> bool:
        # Publisher.publish never blocks; the lock only keeps its counters exact across our two threads.
        with self._send_lock:
            try:
                accepted = self._publisher.publish(topic_key, self.job_id, record_name, value)
            except Exception:  # a metrics failure must never crash the job
                log.exception("publish failed", extra={"job_id": self.job_id, "topic": topic_key})
                accepted = False
            if accepted:
                self._sent += 1
            else:
                self._not_sent += 1
        return accepted

    def _report_drops(self, force: bool = False) -> None:
        # At most one line per DROP_LOG_EVERY_S: an outage drops records every interval, and a log line
        # for each would flood the job's log.
        dropped = getattr(self._publisher, "dropped", 0)
        now = time.monotonic()
        if dropped > self._dropped_seen and (force or now >= self._drop_log_after):
            log.warning(
                "metrics records dropped: the publish buffer is full (is Kafka away?)",
                extra={
                    "job_id": self.job_id,
                    "dropped": dropped - self._dropped_seen,
                    "dropped_total": dropped,
                },
            )
            self._dropped_seen = dropped
            self._drop_log_after = now + DROP_LOG_EVERY_S

    def stats(self) -> dict[str, int]:
        """sent: records this job handed to the publisher and it accepted; not_sent: records it refused
        (dropped or invalid). delivered, dropped, invalid, failed: the publisher's totals (shared by every
        job using the same publisher)."""
        publisher = self._publisher
        return {
            "sent": self._sent,
            "not_sent": self._not_sent,
            "delivered": getattr(publisher, "delivered", 0),
            "dropped": getattr(publisher, "dropped", 0),
            "invalid": getattr(publisher, "invalid", 0),
            "failed": getattr(publisher, "failed", 0),
        }


def _job_gpus(
    gpu_count: int | None,
    gpu_uuids: Sequence[str] | None,
    settings: JobGpuSettings | None,
    job_id: str,
) -> tuple[int, list[str] | None]:
    """The job's GPU count and GPU UUIDs (see :class:`JobReporter`)."""
    if gpu_uuids is not None:
        uuids = list(gpu_uuids)
        if gpu_count is not None and gpu_count != len(uuids):
            raise ValueError(f"gpu_uuids names {len(uuids)} GPU(s) but gpu_count is {gpu_count}")
        return len(uuids), uuids
    if settings is None:
        from producers.settings import JobGpuSettings

        settings = JobGpuSettings()
    found = settings.gpu_uuids()
    if found is None:
        return (1 if gpu_count is None else gpu_count), None
    if gpu_count is not None and gpu_count != len(found):
        log.warning(
            "the visible GPUs are not the job's gpu_count: GPU UUIDs left out of its events",
            extra={"job_id": job_id, "gpu_count": gpu_count, "visible_gpus": len(found)},
        )
        return gpu_count, None
    return len(found), found


def _aware(at: datetime) -> datetime:
    if at.tzinfo is None:
        raise ValueError(f"times must be timezone-aware (UTC), got {at!r}")
    return at
