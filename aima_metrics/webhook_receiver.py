"""A development webhook receiver: accepts the notifier's signed webhooks, verifies the HMAC signature,
and appends each delivery to a JSON-lines file, so a newcomer sees alerts arrive without any outside
service. `aima-metrics up` runs it; other teams' receivers do the same check (consumers.notify.channels
.webhook.verify)."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from prometheus_client import CollectorRegistry

from bus import self_metrics
from bus.runtime import Service
from consumers.notify.channels.webhook import SIGNATURE_HEADER, verify

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 10.0
DRAIN_S = 5.0


class WebhookReceiverMetrics:
    """The receiver's own Prometheus metrics; names, help and labels: bus/self_metrics.py."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.deliveries = self_metrics.counter("aima_webhook_receiver_deliveries_total", registry)


class _InFlight:
    """How many requests are being served, to wait for them (a bounded wait) on the way out."""

    def __init__(self) -> None:
        self._count = 0
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def one(self) -> Iterator[None]:
        with self._changed:
            self._count += 1
        try:
            yield
        finally:
            with self._changed:
                self._count -= 1
                self._changed.notify_all()

    def drain(self, timeout_s: float) -> int:
        """Wait until none is left or ``timeout_s`` has passed; returns how many are left."""
        with self._changed:
            self._changed.wait_for(lambda: self._count == 0, timeout=max(0.0, timeout_s))
            return self._count


class _Server(ThreadingHTTPServer):
    # Request threads are waited for by _InFlight.drain, with a bound, not by server_close without one.
    daemon_threads = True
    block_on_close = False


def serve(service: Service, host: str, port: int, key: str, out: Path) -> None:
    """Serve until the service is asked to stop."""
    metrics = WebhookReceiverMetrics(service.registry)
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = threading.Lock()
    in_flight = _InFlight()

    class Handler(BaseHTTPRequestHandler):
        timeout = REQUEST_TIMEOUT_S  # the socket's: a client that stalls cannot hold a thread forever

        def handle(self) -> None:
            with in_flight.one():
                super().handle()

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            valid = verify(body, key, self.headers.get(SIGNATURE_HEADER))
            metrics.deliveries.labels("valid" if valid else "invalid").inc()
            if not valid:
                log.warning("rejected a webhook with a bad signature", extra={"path": self.path})
                self.send_response(401)
                self.end_headers()
                return
            try:
                document = json.loads(body)
            except ValueError:
                self.send_response(400)
                self.end_headers()
                return
            alerts = document.get("alerts", [])
            with lock, out.open("a") as sink:
                line = {"received_at": datetime.now(UTC).isoformat(), "payload": document}
                sink.write(json.dumps(line) + "\n")
            for alert in alerts:
                log.info(
                    "alert received",
                    extra={
                        "status": alert.get("status"),
                        "alertname": alert.get("labels", {}).get("alertname"),
                        "fingerprint": alert.get("fingerprint"),
                    },
                )
            self.send_response(200)
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:  # the structured lines above suffice
            return

    server = _Server((host, port), Handler)
    thread = threading.Thread(target=server.serve_forever, name="webhook-receiver", daemon=True)
    thread.start()
    log.info("listening", extra={"url": f"http://{host}:{port}/alerts", "file": str(out)})
    service.stopping.wait()
    server.shutdown()
    server.server_close()
    if left := in_flight.drain(min(DRAIN_S, service.time_left_s())):
        log.warning("requests still in flight at the stop are abandoned", extra={"requests": left})
