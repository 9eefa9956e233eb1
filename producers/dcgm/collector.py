"""The dcgm-exporter collector: reads an existing dcgm-exporter endpoint (Prometheus text) on the GPU
collector's two interval groups and publishes GpuSample records on ``gpu.samples`` (keyed ``host/gpu_uuid``),
``source`` ``dcgm``.

One HTTP read serves every group due at that moment. While the endpoint does not answer (refused, timed
out, an HTTP error, not exposition text) the collector says so once, counts each failure and tries again
after a back-off that doubles from the fast interval up to ``backoff_max_s``; the first answer after that
is logged and the schedule resumes. The broker being away is the publisher's business (it buffers)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import httpx
from prometheus_client import CollectorRegistry

from bus import self_metrics
from bus.settings import Settings
from producers.dcgm.mapping import Exposition, ExpositionError, XidTracker, parse, samples
from producers.gpu.reader import GROUPS, Group
from producers.publisher import Publisher, last_flush_s

if TYPE_CHECKING:
    from bus.runtime import Service

__all__ = ["DcgmCollector", "DcgmCollectorMetrics", "DcgmSource", "DcgmUnavailable", "loop", "run"]

log = logging.getLogger(__name__)

TOPIC_KEY = "gpu.samples"
RECORD = "GpuSample"


class DcgmUnavailable(Exception):
    """The endpoint gave no exposition: no connection, a timeout, an HTTP error status or unparsable text."""

    def __init__(self, url: str, kind: str, cause: BaseException) -> None:
        super().__init__(f"dcgm-exporter at {url}: {type(cause).__name__}: {cause}")
        self.url, self.kind, self.cause = url, kind, cause


class DcgmCollectorMetrics:
    """The dcgm collector's own health metrics (A5); names, help and labels: bus/self_metrics.py."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.samples = self_metrics.counter("aima_dcgm_collector_samples_total", registry)
        self.errors = self_metrics.counter("aima_dcgm_collector_errors_total", registry)
        self.devices = self_metrics.gauge("aima_dcgm_collector_devices", registry)
        self.up = self_metrics.gauge("aima_dcgm_collector_endpoint_up", registry)
        self.duration = self_metrics.histogram(
            "aima_dcgm_collector_scrape_duration_seconds",
            registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )


class DcgmSource:
    """One dcgm-exporter endpoint. ``http``: the client to read it with (default: one of its own)."""

    def __init__(self, url: str, *, http: httpx.Client | None = None, timeout_s: float = 5.0) -> None:
        self.url = url
        self._own = http is None
        self._http = http or httpx.Client(timeout=timeout_s, follow_redirects=True)

    @property
    def host(self) -> str:
        """The endpoint's host name: the records' host when nothing better names it."""
        return httpx.URL(self.url).host or self.url

    def read(self) -> Exposition:
        try:
            response = self._http.get(self.url, headers={"Accept": "text/plain"})
            response.raise_for_status()
        except httpx.HTTPError as exc:
            raise DcgmUnavailable(self.url, "scrape", exc) from exc
        try:
            return parse(response.text)
        except ExpositionError as exc:
            raise DcgmUnavailable(self.url, "parse", exc) from exc

    def close(self) -> None:
        if self._own:
            self._http.close()


class DcgmCollector:
    """Reads the endpoint into records; publishes nothing itself. ``host``: the records' host when set,
    else each GPU's ``Hostname`` label, else the endpoint's host."""

    def __init__(
        self,
        source: DcgmSource,
        metrics: DcgmCollectorMetrics,
        *,
        host: str | None = None,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.source = source
        self.metrics = metrics
        self.host = host
        self.wall_clock = wall_clock
        self._xids = XidTracker()
        self._seen: set[tuple[str, int | None]] = set()

    def collect(self, groups: Iterable[Group]) -> list[dict[str, Any]]:
        """The GpuSample values of the groups, from one read. Raises DcgmUnavailable (counted)."""
        started = time.perf_counter()
        taken = self.wall_clock()
        try:
            exposition = self.source.read()
        except DcgmUnavailable as exc:
            self.metrics.errors.labels(exc.kind).inc()
            self.metrics.up.set(0)
            raise
        finally:
            self.metrics.duration.observe(time.perf_counter() - started)
        self.metrics.up.set(1)
        if exposition.unlabelled:
            self.metrics.errors.labels("labels").inc(exposition.unlabelled)
        self._notice(exposition)
        records = samples(
            exposition, groups, time=taken, host=self.host, xids=self._xids, fallback_host=self.source.host
        )
        for record in records:
            self.metrics.samples.labels(record["interval_group"]).inc()
        return records

    def _notice(self, exposition: Exposition) -> None:
        """Logs the entities that appear in or leave the exposition."""
        now = {series.key: series for series in exposition.series}
        for key in now.keys() - self._seen:
            series = now[key]
            log.info(
                "GPU found",
                extra={
                    "gpu": series.gpu,
                    "gpu_uuid": series.uuid,
                    "gpu_instance_id": series.gpu_instance_id,
                    "gpu_model": series.model,
                    "dcgm_fields": sorted(series.values),
                },
            )
        for uuid, gi in sorted(self._seen - now.keys(), key=str):
            log.warning("GPU gone from the exposition", extra={"gpu_uuid": uuid, "gpu_instance_id": gi})
        self._seen = set(now)
        self.metrics.devices.set(len(now))


def publish(publisher: Publisher, metrics: DcgmCollectorMetrics, records: list[dict[str, Any]]) -> int:
    """Hands records to the publisher; returns how many it accepted."""
    accepted = 0
    for value in records:
        if publisher.publish(TOPIC_KEY, f"{value['host']}/{value['gpu_uuid']}", RECORD, value):
            accepted += 1
        else:
            metrics.errors.labels("publish").inc()
    return accepted


def _advance(due: float, interval_s: float, now: float) -> float:
    # Keep the cadence; after a stall (suspend, overload) start afresh instead of catching up.
    return due + interval_s if due + interval_s > now else now + interval_s


def loop(
    collector: DcgmCollector,
    publisher: Publisher,
    stopping: threading.Event,
    *,
    fast_interval_s: float,
    slow_interval_s: float,
    backoff_max_s: float,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Read and publish on schedule until ``stopping`` is set."""
    interval_s: dict[Group, float] = {"fast": fast_interval_s, "slow": slow_interval_s}
    start = clock()
    next_due: dict[Group, float] = dict.fromkeys(GROUPS, start)
    failures = 0
    while not stopping.is_set():
        now = clock()
        due = [group for group in GROUPS if now >= next_due[group]]
        if due:
            try:
                records = collector.collect(due)
            except DcgmUnavailable as exc:
                failures += 1
                retry_s = min(backoff_max_s, fast_interval_s * 2 ** (failures - 1))
                level = logging.WARNING if failures == 1 else logging.DEBUG
                log.log(
                    level,
                    "dcgm-exporter not answering",
                    extra={"url": exc.url, "error": str(exc), "failures": failures, "retry_in_s": retry_s},
                )
                for group in due:
                    next_due[group] = now + retry_s
            else:
                if failures:
                    back = {"url": collector.source.url, "failures": failures}
                    log.info("dcgm-exporter answers again", extra=back)
                    failures = 0
                publish(publisher, collector.metrics, records)
                for group in due:
                    next_due[group] = _advance(next_due[group], interval_s[group], now)
        publisher.poll(0)
        stopping.wait(max(0.0, min(next_due.values()) - clock()))


def run(
    settings: Settings,
    *,
    url: str,
    once: bool = False,
    service: Service | None = None,
    publisher: Publisher | None = None,
    fast_interval_s: float = 10.0,
    slow_interval_s: float = 30.0,
    timeout_s: float = 5.0,
    backoff_max_s: float = 60.0,
    registry: CollectorRegistry | None = None,
    host: str | None = None,
    http: httpx.Client | None = None,
    wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    clock: Callable[[], float] = time.monotonic,
) -> list[tuple[str, dict[str, Any]]]:
    """Read ``url`` and publish its GPUs' samples to ``gpu.samples``.

    ``once``: one read for both groups, published, flushed and returned as (record name, value) pairs of
    the records the publisher accepted; an endpoint that does not answer raises DcgmUnavailable.
    Otherwise loop until ``service.stopping`` is set and return []. Self-metrics go to ``registry``, else
    the service's, else a private one."""
    if not once and service is None:
        raise ValueError("the collector loop needs a service to tell it when to stop")
    if registry is None:
        registry = service.registry if service is not None else CollectorRegistry()
    publisher = publisher or Publisher(settings, registry=registry, source="dcgm-collector")
    source = DcgmSource(url, http=http, timeout_s=timeout_s)
    collector = DcgmCollector(source, DcgmCollectorMetrics(registry), host=host, wall_clock=wall_clock)
    log.info("reading dcgm-exporter", extra={"url": url})
    try:
        if once or service is None:
            records = collector.collect(GROUPS)
            sent = [value for value in records if publish(publisher, collector.metrics, [value])]
            return [(RECORD, value) for value in sent]
        loop(
            collector,
            publisher,
            service.stopping,
            fast_interval_s=fast_interval_s,
            slow_interval_s=slow_interval_s,
            backoff_max_s=backoff_max_s,
            clock=clock,
        )
        return []
    finally:
        # Within what the stop bound leaves (with the broker away a full flush would outlast it).
        publisher.flush(last_flush_s(service, settings))
        source.close()
