"""A real Prometheus server for the tests (Debian package ``prometheus``): its own config, data folder and
free port, the remote-write receiver on, and small helpers for its HTTP API. Never the system service.

    with running_prometheus(tmp_path, scrape=[("gpu-exporter", "127.0.0.1:9400")]) as prometheus:
        prometheus.wait_for_targets_up({"gpu-exporter"})
        prometheus.query("aima_gpu_utilization_percent")
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import yaml

from tests.private_stack import free_port

__all__ = ["PrometheusServer", "free_port", "running_prometheus", "wait_until"]

T = TypeVar("T")


def wait_until(check: Callable[[], T], timeout_s: float, what: str, every_s: float = 0.25) -> T:
    """Poll ``check`` until it returns something truthy; fail the test with ``what`` after the timeout."""
    deadline = time.monotonic() + timeout_s
    last: T = check()
    while not last:
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(every_s)
        last = check()
    return last


class PrometheusServer:
    def __init__(self, process: subprocess.Popen[bytes], url: str, log_file: Path, config_file: Path) -> None:
        self.process = process
        self.url = url
        self.log_file = log_file
        self.config_file = config_file
        self.client = httpx.Client(base_url=url, timeout=10.0)

    @property
    def remote_write_url(self) -> str:
        return f"{self.url}/api/v1/write"

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def api(self, path: str, **params: Any) -> Any:
        """GET an API path; the ``data`` of a successful answer, else the test fails with the error."""
        response = self.client.get(path, params=params)
        body = response.json()
        if response.status_code != 200 or body.get("status") != "success":
            pytest.fail(f"Prometheus {path} {params}: {response.status_code} {body}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query's result vector (or matrix, for a range selector)."""
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        return self.api("/api/v1/query", **params)["result"]

    def targets(self) -> list[dict[str, Any]]:
        return self.api("/api/v1/targets", state="active")["activeTargets"]

    def wait_for_targets_up(self, jobs: Iterable[str], timeout_s: float = 60.0) -> dict[str, dict[str, Any]]:
        """Waits until every target of these jobs was scraped successfully; returns them by job."""
        wanted = set(jobs)

        def up() -> dict[str, dict[str, Any]] | None:
            found = {t["labels"]["job"]: t for t in self.targets() if t["labels"].get("job") in wanted}
            if set(found) == wanted and all(t["health"] == "up" for t in found.values()):
                return found
            return None

        try:
            return wait_until(up, timeout_s, f"targets {sorted(wanted)} up")
        except pytest.fail.Exception:
            states = {t["labels"].get("job"): (t["health"], t.get("lastError")) for t in self.targets()}
            pytest.fail(f"targets not up: {states}\nprometheus log:\n{self.log_tail()}")

    def stop(self) -> None:
        self.client.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def _config(scrape: Iterable[tuple[str, str]], scrape_interval: str) -> dict[str, Any]:
    return {
        "global": {"scrape_interval": scrape_interval, "scrape_timeout": "1s", "evaluation_interval": "15s"},
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": [target]}]} for job, target in scrape
        ],
    }


@contextlib.contextmanager
def running_prometheus(
    folder: Path,
    scrape: Iterable[tuple[str, str]] = (),
    scrape_interval: str = "1s",
    ready_timeout_s: float = 60.0,
) -> Iterator[PrometheusServer]:
    """Starts ``prometheus`` with a config scraping ``(job, host:port)`` pairs, a data folder under
    ``folder`` and the remote-write receiver; stops it on the way out."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is not on PATH: apt-get install -y prometheus (the Debian package)")
    folder.mkdir(parents=True, exist_ok=True)
    config_file = folder / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(_config(scrape, scrape_interval), sort_keys=False))
    promtool = shutil.which("promtool")
    if promtool is not None:
        checked = subprocess.run(
            [promtool, "check", "config", str(config_file)], capture_output=True, text=True, timeout=60
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr
    port = free_port()
    log_file = folder / "prometheus.log"
    with log_file.open("wb") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config_file}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--web.enable-remote-write-receiver",
                "--log.level=info",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    server = PrometheusServer(process, f"http://127.0.0.1:{port}", log_file, config_file)
    try:

        def ready() -> bool:
            if process.poll() is not None:
                pytest.fail(f"prometheus exited with {process.returncode}:\n{server.log_tail()}")
            try:
                return server.client.get("/-/ready").status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, ready_timeout_s, "prometheus to be ready")
        yield server
    finally:
        server.stop()
