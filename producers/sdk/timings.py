"""Per-interval aggregation of a job's timings (M6, M9-M13): count, sum, min, max and a DDSketch per
(kind, kernel, direction), turned into ``JobTimings`` records at the end of each interval; and the CUDA
kernel timer that feeds it.

Frames and kernels are far too many to send one message each, so the job thread only folds each duration
into an in-memory summary: O(1) work under a lock held for microseconds. The publishing thread swaps the
whole table out under the same lock and builds records outside it."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from bus import sketch as sketches

__all__ = ["DIRECTIONS", "KINDS", "KernelTimer", "TimingAggregator"]

KINDS = frozenset({"frame", "inference", "batch", "model_load", "data_transfer", "cuda_kernel"})
DIRECTIONS = frozenset({"h2d", "d2h"})
SeriesKey = tuple[str, str | None, str | None]
"""(kind, kernel, direction): one JobTimings record per key and interval."""


@dataclass(slots=True)
class _Summary:
    sketch: sketches.Sketch
    count: int = 0
    total_s: float = 0.0
    min_s: float = math.inf
    max_s: float = 0.0
    bytes: int | None = None

    def add(self, seconds: float, nbytes: int | None) -> None:
        self.count += 1
        self.total_s += seconds
        if seconds < self.min_s:
            self.min_s = seconds
        if seconds > self.max_s:
            self.max_s = seconds
        if nbytes is not None:
            self.bytes = (self.bytes or 0) + nbytes
        self.sketch.add(seconds)  # already checked >= 0 by observe


class TimingAggregator:
    """Thread-safe: :meth:`observe` from any number of job threads, :meth:`drain` from the publisher."""

    def __init__(
        self,
        *,
        job_id: str,
        project: str,
        model: str | None = None,
        host: str | None = None,
        source: str = "sdk",
        relative_accuracy: float = sketches.DEFAULT_RELATIVE_ACCURACY,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._labels = {"job_id": job_id, "project": project, "model": model, "host": host}
        self._source = source
        self._accuracy = relative_accuracy
        self._clock = clock
        self._lock = threading.Lock()
        self._series: dict[SeriesKey, _Summary] = {}
        self._interval_start = clock()

    def observe(
        self,
        kind: str,
        seconds: float,
        *,
        kernel: str | None = None,
        direction: str | None = None,
        nbytes: int | None = None,
    ) -> None:
        """Fold one duration into its series. Raises ValueError for an unknown kind or direction, or a
        negative or non-finite duration: those are bugs in the caller, not data."""
        if kind not in KINDS:
            raise ValueError(f"unknown timing kind {kind!r}; known: {', '.join(sorted(KINDS))}")
        if not (seconds >= 0.0 and math.isfinite(seconds)):
            raise ValueError(f"durations must be finite and >= 0, got {seconds!r} for {kind}")
        if direction is not None and direction not in DIRECTIONS:
            raise ValueError(f"unknown transfer direction {direction!r}; known: h2d, d2h")
        if nbytes is not None and nbytes < 0:
            raise ValueError(f"bytes must be >= 0, got {nbytes!r}")
        key = (kind, kernel, direction)
        with self._lock:
            summary = self._series.get(key)
            if summary is None:
                summary = self._series[key] = _Summary(sketches.new_sketch(self._accuracy))
            summary.add(seconds, nbytes)

    def drain(self, end: datetime | None = None) -> list[dict[str, Any]]:
        """The JobTimings records of the interval that ends now (or at ``end``), one per series that saw at
        least one observation; starts the next interval."""
        with self._lock:
            series, self._series = self._series, {}
            start = self._interval_start
            end = end or self._clock()
            self._interval_start = end
        return [self._record(key, summary, start, end) for key, summary in series.items()]

    def _record(self, key: SeriesKey, summary: _Summary, start: datetime, end: datetime) -> dict[str, Any]:
        kind, kernel, direction = key
        return {
            "time": end,
            "interval_start": start,
            **self._labels,
            "kind": kind,
            "kernel": kernel,
            "direction": direction,
            "bytes": summary.bytes,
            "count": summary.count,
            "sum_seconds": summary.total_s,
            "min_seconds": summary.min_s,
            "max_seconds": summary.max_s,
            "sketch": sketches.to_avro(summary.sketch),
            "source": self._source,
        }


class KernelTimer:
    """Times CUDA kernels (M6). With CUDA available it records a pair of ``torch.cuda.Event`` around the
    kernel on the current stream and resolves the pairs only at interval end (:meth:`resolve`, on the
    publishing thread), so the job thread never synchronises with the GPU. Without CUDA it falls back to
    wall time around the block, which then includes launch overhead but not the asynchronous run.

    ``torch``: the torch module to use; None imports it lazily on first use (importing torch takes
    seconds, and most jobs that time kernels have imported it already); False always uses wall time."""

    def __init__(self, aggregator: TimingAggregator, torch: Any = None) -> None:
        self._aggregator = aggregator
        self._given = torch
        self._torch: Any = None
        self._checked = False
        self._pending: list[tuple[str, Any, Any]] = []
        self._lock = threading.Lock()

    @property
    def uses_cuda_events(self) -> bool:
        return self._cuda() is not None

    def _cuda(self) -> Any:
        """The torch module when CUDA events can be used, else None; decided once, on first use."""
        if not self._checked:
            self._checked = True
            torch = self._given
            if torch is None:
                try:
                    import torch
                except ImportError:
                    torch = None
            try:
                self._torch = torch if torch and torch.cuda.is_available() else None
            except Exception:  # a broken driver install must not take the job down
                self._torch = None
        return self._torch

    def start(self) -> Any:
        """A start marker: a recorded CUDA event, or a perf_counter reading."""
        torch = self._cuda()
        if torch is None:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def stop(self, kernel: str, started: Any) -> None:
        if isinstance(started, float):
            self._aggregator.observe("cuda_kernel", time.perf_counter() - started, kernel=kernel)
            return
        end = self._torch.cuda.Event(enable_timing=True)
        end.record()
        with self._lock:
            self._pending.append((kernel, started, end))

    def resolve(self) -> int:
        """Fold every recorded kernel into the aggregator, waiting for the GPU to reach each end event;
        returns how many were resolved. Called from the publishing thread before each drain."""
        with self._lock:
            pending, self._pending = self._pending, []
        for kernel, start, end in pending:
            end.synchronize()
            # elapsed_time is in milliseconds.
            self._aggregator.observe("cuda_kernel", max(0.0, start.elapsed_time(end)) / 1000.0, kernel=kernel)
        return len(pending)
