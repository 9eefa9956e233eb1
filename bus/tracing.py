"""OpenTelemetry tracing (A6): the one wrapper every layer uses over the OpenTelemetry API and SDK.

Off unless ``AIMA_OTEL_ENDPOINT`` is set. Off costs nothing: :data:`OFF` answers every call with a
constant, and no ``opentelemetry`` module is imported (tests/unit/test_tracing.py checks both). On, each
process exports its spans over OTLP/HTTP in the background (a batch span processor), sampled
``ParentBased(TraceIdRatioBased(AIMA_OTEL_SAMPLE_RATIO))``: a span whose parent was sampled is sampled,
a root is sampled at the ratio.

How one sample's path stays one trace: trace context travels in Kafka record headers as W3C
``traceparent``, written only for sampled spans (an unsampled record carries no header, so 1 % sampling
adds bytes to 1 % of the records). Each stage continues the trace of the records it consumed:
- the collector's ``publish <topic>`` span (producer kind) is the root; it ends at the broker's ack;
- the stream app's ``streams <processor>`` span per partition batch, the sink's ``sink batch`` span and
  the notifier's ``notify <channel>`` span per delivery each take ONE record's context as their parent:
  the record that caused the first output where a processor says which one did (the alerting sample of
  an alert), else the batch's first record with a context. The sink's and the notifier's spans link to
  the other records' contexts too (at most :data:`MAX_LINKS`); the stream app's do not (a span per
  processor and partition batch: links there would cost more than the rest of tracing at 1 %). A batch
  span is made after the batch, with the batch's start as its start time, so that the parent can be
  chosen from what the batch did;
- a stream output that a traced record caused carries the context of the batch span that produced it,
  so the sink's and notifier's spans of an alert join the alerting sample's trace; aggregates of many
  records (rollups) carry none.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from bus.settings import AimaSettings, described

__all__ = [
    "MAX_LINKS",
    "OFF",
    "TRACEPARENT",
    "Tracing",
    "TracingSettings",
    "open_tracing",
]

TRACEPARENT = "traceparent"
MAX_LINKS = 32
"""Links a batch span keeps to the records it did not take as parent: enough to find them, bounded so a
batch of thousands of sampled records does not make a span of thousands of links."""

Headers = list[tuple[str, bytes]]


class TracingSettings(AimaSettings):
    """Where spans go and how many: ``AIMA_OTEL_*``."""

    model_config = SettingsConfigDict(env_prefix="AIMA_OTEL_")

    endpoint: str | None = described(
        None,
        "OTLP/HTTP endpoint of the trace backend (e.g. `http://127.0.0.1:4318`; spans go to "
        "`<endpoint>/v1/traces`); unset: tracing off, and no OpenTelemetry module is loaded",
        shown="off",
    )
    sample_ratio: float = Field(
        0.01,
        ge=0.0,
        le=1.0,
        description="share of new traces (collector publishes, and batches with no traced record) that are "
        "sampled; the later stages of a trace follow its first",
    )
    service_name: str | None = described(
        None, "`service.name` of this process's spans", shown="per process: aima-<process>"
    )
    export_delay_s: float = Field(
        2.0, gt=0, description="most time a finished span waits before it is exported"
    )


class Tracing:
    """Tracing off: every method a constant. :func:`open_tracing` gives the working one when on."""

    on = False

    def start_ns(self) -> int:
        """A batch's start time, for :meth:`batch_span`; 0 when off (no clock read)."""
        return 0

    def context(self, headers: Sequence[tuple[str, bytes | None]] | None) -> Any:
        """The sampled span context a record's headers carry, or None."""
        return None

    def sample(self) -> bool:
        """Whether the next :meth:`publish_span` on this thread will be sampled: asked first, it spares an
        unsampled record the span's name and attributes."""
        return False

    def publish_span(self, name: str, attributes: Mapping[str, Any] | None = None) -> Any:
        """A root producer span, started now; None when off or not sampled."""
        return None

    def headers(self, span: Any) -> Headers | None:
        """The record headers that carry ``span``'s context; None when there is nothing to carry."""
        return None

    def batch_span(
        self,
        name: str,
        parent: Any,
        others: Iterable[Any] = (),
        start_ns: int = 0,
        attributes: Mapping[str, Any] | None = None,
    ) -> Any:
        """A span over work already begun at ``start_ns``, child of ``parent`` (a context from
        :meth:`context`, or None for a root) and linked to ``others``; the caller ends it (:meth:`end`)."""
        return None

    def end(self, span: Any, error: str | None = None, attributes: Mapping[str, Any] | None = None) -> None:
        """End ``span`` (None is fine), with an error status when ``error`` is given."""

    def flush(self, timeout_s: float = 5.0) -> None:
        """Export the spans ended so far (a process on its way out; the exporter itself stops at exit)."""


OFF = Tracing()


class _Live(Tracing):
    on = True

    def __init__(self, settings: TracingSettings, service: str, exporter: Any = None) -> None:
        """``exporter``: a span exporter to use instead of OTLP (tests), fed span by span."""
        # Imported here, never at module level: with tracing off no OpenTelemetry module is loaded.
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        endpoint = (settings.endpoint or "").rstrip("/")
        self._trace = trace
        self._readable = ReadableSpan
        self._next_trace = threading.local()
        self._bound = TraceIdRatioBased.get_bound_for_rate(settings.sample_ratio)
        self._propagator = TraceContextTextMapPropagator()
        # This process's own provider, passed down rather than set as OpenTelemetry's global one: two
        # services in one process (tests) keep their names, and nothing else's tracing is changed.
        self._provider = TracerProvider(
            resource=Resource.create({"service.name": settings.service_name or service}),
            sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)),
            shutdown_on_exit=True,
        )
        if exporter is not None:
            self._processor: Any = SimpleSpanProcessor(exporter)
        else:
            self._processor = BatchSpanProcessor(
                OTLPSpanExporter(endpoint=f"{endpoint}/v1/traces"),
                schedule_delay_millis=int(settings.export_delay_s * 1000),
            )
        self._provider.add_span_processor(self._processor)
        self._tracer = self._provider.get_tracer("aima-metrics")
        self._scope = InstrumentationScope("aima-metrics")
        self._ok = trace.Status(trace.StatusCode.UNSET)
        self._producer_kind = trace.SpanKind.PRODUCER
        self._consumer_kind = trace.SpanKind.CONSUMER

    def start_ns(self) -> int:
        return time.time_ns()

    def context(self, headers: Sequence[tuple[str, bytes | None]] | None) -> Any:
        if not headers:
            return None
        for key, value in headers:
            if key == TRACEPARENT and value:
                found = self._propagator.extract({TRACEPARENT: value.decode("ascii", "replace")})
                span_context = self._trace.get_current_span(found).get_span_context()
                return span_context if span_context.is_valid and span_context.trace_flags.sampled else None
        return None

    def sample(self) -> bool:
        # The sampler's own rule (TraceIdRatioBased: the trace id's low 64 bits under the bound), taken
        # before anything is made: at 1 % the other 99 publishes cost one 64-bit draw (a profile of the
        # Publisher put a 128-bit draw at half of what tracing cost it).
        low = _draw(64)
        if low >= self._bound:
            return False
        self._next_trace.trace_id = (_draw(64) << 64 | low) or 1
        return True

    def publish_span(self, name: str, attributes: Mapping[str, Any] | None = None) -> Any:
        # A root span made by hand, not by the SDK's tracer: a publish span has no parent, no links and no
        # events, and the sampling decision is already taken (sample), so the tracer's context lookup,
        # sampler, id generator, attribute bounds and locks were most of what a sampled publish cost. The
        # SDK sees it only when it ends (end), as the finished span its exporter takes.
        trace_id = getattr(self._next_trace, "trace_id", None)
        if trace_id is None:
            if not self.sample():
                return None
            trace_id = self._next_trace.trace_id
        self._next_trace.trace_id = None
        return _PublishSpan(name, trace_id, _draw(64) or 1, time.time_ns(), attributes)

    def headers(self, span: Any) -> Headers | None:
        if span is None:
            return None
        if isinstance(span, _PublishSpan):
            trace_id, span_id = span.trace_id, span.span_id
        else:
            span_context = span.get_span_context()
            if not span_context.trace_flags.sampled:
                return None
            trace_id, span_id = span_context.trace_id, span_context.span_id
        # W3C traceparent written directly (version 00, sampled): the propagator's inject builds a context
        # and a carrier for the same 55 bytes.
        return [(TRACEPARENT, f"00-{trace_id:032x}-{span_id:016x}-01".encode("ascii"))]

    def batch_span(
        self,
        name: str,
        parent: Any,
        others: Iterable[Any] = (),
        start_ns: int = 0,
        attributes: Mapping[str, Any] | None = None,
    ) -> Any:
        trace = self._trace
        context = None if parent is None else trace.set_span_in_context(trace.NonRecordingSpan(parent))
        links = []
        for other in others:
            if len(links) >= MAX_LINKS:
                break
            if other is not None and other is not parent:
                links.append(trace.Link(other))
        span = self._tracer.start_span(
            name,
            context=context,
            kind=self._consumer_kind,
            links=links,
            attributes=attributes,
            start_time=start_ns or None,
        )
        return span if span.is_recording() else None

    def end(self, span: Any, error: str | None = None, attributes: Mapping[str, Any] | None = None) -> None:
        if span is None:
            return
        status = None if error is None else self._trace.Status(self._trace.StatusCode.ERROR, error)
        if isinstance(span, _PublishSpan):
            kept = dict(span.attributes or {})
            if attributes:
                kept.update(attributes)
            self._processor.on_end(
                self._readable(
                    span.name,
                    context=span.get_span_context(),
                    resource=self._provider.resource,
                    attributes=kept,
                    kind=self._producer_kind,
                    status=status or self._ok,
                    start_time=span.start_ns,
                    end_time=time.time_ns(),
                    instrumentation_scope=self._scope,
                )
            )
            return
        if attributes:
            span.set_attributes(dict(attributes))
        if status is not None:
            span.set_status(status)
        span.end()

    def flush(self, timeout_s: float = 5.0) -> None:
        self._provider.force_flush(int(timeout_s * 1000))


_draw = random.getrandbits


class _PublishSpan:
    """A sampled publish span on its way: what :meth:`_Live.end` needs to hand the SDK a finished span."""

    __slots__ = ("attributes", "name", "span_id", "start_ns", "trace_id")

    def __init__(
        self, name: str, trace_id: int, span_id: int, start_ns: int, attributes: Mapping[str, Any] | None
    ) -> None:
        self.name = name
        self.trace_id = trace_id
        self.span_id = span_id
        self.start_ns = start_ns
        self.attributes = attributes

    def get_span_context(self) -> Any:
        from opentelemetry.trace import SpanContext, TraceFlags

        return SpanContext(
            self.trace_id, self.span_id, is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED)
        )


_OPENED: dict[tuple[str, str | None, float, str | None], Tracing] = {}


def open_tracing(service: str, settings: TracingSettings | None = None) -> Tracing:
    """This process's tracing for ``service`` (e.g. ``aima-streams``): :data:`OFF` unless the settings name
    an endpoint. One exporter per process and service: asked twice, the same one comes back."""
    settings = settings if settings is not None else TracingSettings()
    if not settings.endpoint:
        return OFF
    key = (service, settings.endpoint, settings.sample_ratio, settings.service_name)
    tracing = _OPENED.get(key)
    if tracing is None:
        tracing = _OPENED[key] = _Live(settings, service)
    return tracing
