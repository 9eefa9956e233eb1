"""Probes of a long-running process, served beside its self-metrics on the metrics port (AIMA_METRICS_PORT):

- ``/healthz`` (liveness): 200 while the process serves; its HTTP thread answering is the sign of life.
- ``/readyz`` (readiness): 200 when every dependency the process registered answers, else 503 naming the
  ones that do not (and 503 once a stop is requested, so a load balancer stops sending before it exits).
  "Answers" is a TCP connection within ``timeout_s``: cheap enough for a probe every few seconds and free
  of credentials; a broker or database that accepts connections but refuses this process shows up in its
  own errors and metrics.
- every other path: the Prometheus text of the process's registry, as ``start_http_server`` serves it.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

__all__ = [
    "Check",
    "HealthServer",
    "Unreachable",
    "database_check",
    "kafka_check",
    "tcp_check",
]

Check = Callable[[], None]
"""Returns when the dependency answers; raises (any exception, :class:`Unreachable` by our checks)."""

PROBE_TIMEOUT_S = 2.0


class Unreachable(ConnectionError):
    """None of a dependency's addresses accepted a connection."""

    def __init__(self, what: str, addresses: Iterable[tuple[str, int]], error: str) -> None:
        self.what = what
        self.addresses = list(addresses)
        shown = ", ".join(f"{h}:{p}" for h, p in self.addresses)
        super().__init__(f"{what} unreachable at {shown}: {error}")


def tcp_check(what: str, addresses: Iterable[tuple[str, int]], timeout_s: float = PROBE_TIMEOUT_S) -> Check:
    """A check that passes when any of ``addresses`` accepts a TCP connection."""
    listed = list(addresses)
    if not listed:
        raise ValueError(f"{what}: no address to check")

    def check() -> None:
        last = "no address"
        for host, port in listed:
            try:
                with socket.create_connection((host, port), timeout=timeout_s):
                    return
            except OSError as exc:
                last = f"{type(exc).__name__}: {exc}"
        raise Unreachable(what, listed, last)

    return check


def _host_port(item: str, default_port: int) -> tuple[str, int]:
    item = item.strip()
    for scheme in ("PLAINTEXT://", "SSL://", "SASL_SSL://", "SASL_PLAINTEXT://"):
        item = item.removeprefix(scheme).removeprefix(scheme.lower())
    if item.startswith("["):  # [::1]:9092
        host, _, rest = item[1:].partition("]")
        return host, int(rest.lstrip(":") or default_port)
    host, sep, port = item.rpartition(":")
    return (host, int(port)) if sep else (item, default_port)


def kafka_check(bootstrap: str, timeout_s: float = PROBE_TIMEOUT_S) -> Check:
    """Any of the bootstrap servers (``host:port,host:port``) accepts a connection."""
    return tcp_check("kafka", [_host_port(s, 9092) for s in bootstrap.split(",") if s.strip()], timeout_s)


def database_check(dsn: str, timeout_s: float = PROBE_TIMEOUT_S) -> Check:
    """The database server of a libpq DSN (URL or key=value) accepts a connection. A DSN naming a Unix
    socket (host starting with /) is checked by connecting to that socket."""
    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(dsn)
    hosts = str(params.get("host") or "localhost").split(",")
    ports = str(params.get("port") or "5432").split(",")
    if len(ports) == 1:
        ports = ports * len(hosts)
    sockets = [h for h in hosts if h.startswith("/")]
    if sockets:
        return _unix_check("database", [f"{h}/.s.PGSQL.{p}" for h, p in zip(hosts, ports, strict=True)])
    return tcp_check("database", [(h, int(p)) for h, p in zip(hosts, ports, strict=True)], timeout_s)


def _unix_check(what: str, paths: list[str]) -> Check:
    def check() -> None:
        last = "no socket"
        for path in paths:
            try:
                with socket.socket(socket.AF_UNIX) as sock:
                    sock.settimeout(PROBE_TIMEOUT_S)
                    sock.connect(path)
                    return
            except OSError as exc:
                last = f"{type(exc).__name__}: {exc}"
        raise Unreachable(what, [(p, 0) for p in paths], last)

    return check


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # probes every few seconds: no access log
        pass


class HealthServer:
    """Serves /healthz, /readyz and the registry's metrics on ``host``:``port`` from a daemon thread.
    ``checks`` is read at each /readyz (a live mapping: a process adds checks as it opens clients);
    ``stopping``: set once a stop is requested."""

    def __init__(
        self,
        registry: CollectorRegistry,
        checks: Mapping[str, Check],
        stopping: threading.Event,
        host: str = "0.0.0.0",
        port: int = 0,
    ) -> None:
        self.checks = checks
        self.stopping = stopping
        self._metrics = make_wsgi_app(registry)

        class Server(ThreadingWSGIServer):
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        self._httpd = make_server(host, port, self._app, Server, handler_class=_QuietHandler)
        self.port: int = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="metrics-http", daemon=True)

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def readiness(self) -> tuple[bool, dict[str, str]]:
        """(ready, {dependency: "ok" or why not})."""
        results: dict[str, str] = {}
        for name, check in list(self.checks.items()):
            try:
                check()
                results[name] = "ok"
            except Exception as exc:
                results[name] = str(exc) or type(exc).__name__
        ready = not self.stopping.is_set() and all(v == "ok" for v in results.values())
        return ready, results

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            return _json(start_response, 200, {"status": "ok"})
        if path == "/readyz":
            ready, results = self.readiness()
            status = "ready" if ready else ("stopping" if self.stopping.is_set() else "unavailable")
            return _json(start_response, 200 if ready else 503, {"status": status, "checks": results})
        return self._metrics(environ, start_response)


def _json(start_response: Callable[..., Any], code: int, body: dict[str, Any]) -> list[bytes]:
    data = json.dumps(body).encode()
    reason = "OK" if code == 200 else "Service Unavailable"
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    start_response(f"{code} {reason}", headers)
    return [data]
