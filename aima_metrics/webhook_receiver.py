"""A development webhook receiver: accepts the notifier's signed webhooks, verifies the HMAC signature,
and appends each delivery to a JSON-lines file, so a newcomer sees alerts arrive without any outside
service. `aima-metrics up` runs it; other teams' receivers do the same check (consumers.notify.channels
.webhook.verify)."""

from __future__ import annotations

import json
import logging
import threading
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from prometheus_client import Counter

from bus.runtime import Service
from consumers.notify.channels.webhook import SIGNATURE_HEADER, verify

log = logging.getLogger(__name__)


def serve(service: Service, host: str, port: int, key: str, out: Path) -> None:
    """Serve until the service is asked to stop."""
    received = Counter(
        "aima_webhook_receiver_deliveries",
        "Webhook deliveries by signature check",
        ["signature"],
        registry=service.registry,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            valid = verify(body, key, self.headers.get(SIGNATURE_HEADER))
            received.labels("valid" if valid else "invalid").inc()
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

    server = ThreadingHTTPServer((host, port), Handler)
    thread = threading.Thread(target=server.serve_forever, name="webhook-receiver", daemon=True)
    thread.start()
    log.info("listening", extra={"url": f"http://{host}:{port}/alerts", "file": str(out)})
    service.stopping.wait()
    server.shutdown()
    server.server_close()
