"""The web console (api/ui, api/routes/ui.py) in a real headless browser: Debian's chromium driven by
playwright, against the real API under uvicorn over a fresh migrated schema. A person logs in with a token,
an alert written to alert_history (the row the sink writes; its trigger announces it to the SSE feed)
appears on the open page and raises a browser notification, and a user token sees only its projects.

With AIMA_CONSOLE_SCREENSHOTS=<folder> the test saves a screenshot of each page there (docs/console holds
the ones the README shows)."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.types.json import Jsonb

from api import auth
from api.app import create_app
from api.config import ApiSettings
from api.main import server
from bus.settings import Settings

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
NOW = datetime.now(UTC).replace(microsecond=0)
FLEET_SCOPES = [
    "metrics:read:gpu_utilization_percent",
    "metrics:read:gpu_memory_used_bytes",
    "metrics:read:gpu_temperature_celsius",
]
WAIT_MS = 30_000  # the machine is shared and loaded: generous deadlines on every browser wait


def _browser_or_skip() -> str:
    if shutil.which(CHROMIUM) is None:
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing in CI: ./dev setup installs the Debian package chromium")
        pytest.skip(f"{CHROMIUM} is not installed (./dev setup installs the Debian package chromium)")
    return CHROMIUM


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _fleet_rows(db: psycopg.Connection[Any]) -> None:
    """Simulator-like data: two hosts of four GPUs over the last hour (one idle), two projects' jobs with
    timings, hourly costs and budgets (p2 over its budget)."""
    gib = 2**30
    for host in ("gpu-node-1", "gpu-node-2"):
        for gpu in range(4):
            idle = host == "gpu-node-2" and gpu == 3
            for minute in range(60, -1, -2):
                at = NOW - timedelta(minutes=minute)
                util = 2.0 if idle else 55 + 35 * ((gpu + minute // 6) % 3) / 2
                db.execute(
                    """INSERT INTO gpu_samples (time, host, gpu, gpu_uuid, gpu_model, source, interval_group,
                                                utilization_percent, memory_used_bytes, memory_total_bytes,
                                                temperature_celsius, power_watts)
                       VALUES (%s, %s, %s, %s, 'H100', 'sim', '10s', %s, %s, %s, %s, %s)""",
                    (
                        at,
                        host,
                        gpu,
                        f"GPU-{host}-{gpu}",
                        util,
                        int((4 if idle else 40 + gpu * 5) * gib),
                        80 * gib,
                        38 + util * 0.4,
                        70 + util * 6,
                    ),
                )
    for job, project, host in (("job-p1", "p1", "gpu-node-1"), ("job-p2", "p2", "gpu-node-2")):
        for event, at in (
            ("queued", NOW - timedelta(minutes=50)),
            ("started", NOW - timedelta(minutes=45)),
            ("finished", NOW - timedelta(minutes=5)),
        ):
            db.execute(
                """INSERT INTO job_events (time, job_id, event, project, service, host, gpu_count, gpu_model,
                                           source)
                   VALUES (%s, %s, %s, %s, 'transcode', %s, 2, 'H100', 'sim')""",
                (at, job, event, project, host),
            )
        for kind, kernel, mean in (
            ("frame", "", 0.021),
            ("inference", "", 0.012),
            ("cuda_kernel", "gemm", 0.004),
        ):
            db.execute(
                """INSERT INTO job_timings (time, interval_start, job_id, project, model, host, kind, kernel,
                                            count, sum_seconds, min_seconds, max_seconds, sketch, source)
                   VALUES (%s, %s, %s, %s, 'yolo', %s, %s, %s, 1000, %s, %s, %s, '{}', 'sim')""",
                (
                    NOW - timedelta(minutes=10),
                    NOW - timedelta(minutes=11),
                    job,
                    project,
                    host,
                    kind,
                    kernel,
                    1000 * mean,
                    mean / 2,
                    mean * 3,
                ),
            )
        db.execute(
            """INSERT INTO costs (time, period_end, kind, project, job_id, job_cost_eur, currency, source,
                                  emitted_at)
               VALUES (%s, %s, 'job_cost', %s, %s, 4.2, 'EUR', 'sim', now())""",
            (NOW - timedelta(minutes=5), NOW - timedelta(minutes=5), project, job),
        )
    day = NOW.replace(hour=0, minute=0, second=0)
    for days in range(7, -1, -1):
        for project, eur in (("p1", 40.0 + days), ("p2", 90.0 - days * 3)):
            at = day - timedelta(days=days)
            db.execute(
                """INSERT INTO costs (time, period_end, kind, project, gpu_model, provider, pricing,
                                      gpu_hours, cost_estimated_eur, currency, source, emitted_at)
                   VALUES (%s, %s, 'gpu_hours', %s, 'H100', 'aws', 'on_demand', %s, %s, 'EUR', 'sim',
                           now())""",
                (at, at + timedelta(hours=1), project, eur / 3, eur),
            )
        # The fleet's row of the hour: 100 device-hours drawing 50 kWh at 0.3 EUR, shared by GPU-hours.
        db.execute(
            """INSERT INTO costs (time, period_end, kind, gpu_model, device_hours, idle_gpu_hours, energy_kwh,
                                  energy_cost_eur, currency, source, emitted_at)
               VALUES (%s, %s, 'gpu_hours', 'H100', 100, 50, 50, 15, 'EUR', 'sim', now())""",
            (at, at + timedelta(hours=1)),
        )
    month = NOW.replace(day=1, hour=0, minute=0, second=0)
    for project, used, forecast in (("p1", 42.0, 80.0), ("p2", 96.0, 130.0)):
        db.execute(
            """INSERT INTO costs (time, period_end, kind, project, budget, budget_eur,
                                  budget_utilization_percent, forecast_eur, currency, source, emitted_at)
               VALUES (%s, %s, 'budget', %s, 'monthly', 1000, %s, %s, 'EUR', 'sim', now())""",
            (month, month + timedelta(days=31), project, used, forecast * 10),
        )


def _alert(db: psycopg.Connection[Any], fingerprint: str, status: str) -> None:
    db.execute(
        """INSERT INTO alert_history (fingerprint, rule, status, severity, starts_at, ends_at, event_time,
                                      value, labels, annotations, channels, source)
           VALUES (%s, 'GpuTemperatureHigh', %s, 'critical', %s, %s, now(), 91.5, %s, %s, '{web}',
                   'stream')""",
        (
            fingerprint,
            status,
            NOW - timedelta(minutes=1),
            NOW if status == "resolved" else None,
            Jsonb({"host": "gpu-node-1", "gpu": "2"}),
            Jsonb({"summary": "GPU 2 of gpu-node-1 is at 91.5 °C"}),
        ),
    )


@pytest.fixture
def console(settings: Settings, db_schema: str, db: psycopg.Connection[Any]) -> Iterator[str]:
    """The base URL of a real API server over the test's schema, with the simulator-like rows in it."""
    global NOW
    # Dated from when the test runs, not from when the module was collected: in a long suite the fleet's
    # "seen in the last 5 minutes" would otherwise be empty (CI: "Fleet: 0 GPUs").
    NOW = datetime.now(UTC).replace(microsecond=0)
    _fleet_rows(db)
    config = ApiSettings.from_environ({}, port=_free_port())
    api_server = server(create_app(settings, schema=db_schema, config=config), config)
    thread = threading.Thread(target=api_server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not api_server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert api_server.started
    try:
        yield f"http://127.0.0.1:{config.port}"
    finally:
        api_server.should_exit = True
        thread.join(timeout=15)


# Wraps the browser's Notification so that the test can see which ones the page raised.
RECORD_NOTIFICATIONS = """
window.__notified = [];
const Real = window.Notification;
window.Notification = class extends Real {
  constructor(title, options) { super(title, options); window.__notified.push(title); }
};
"""


def _shot(page: Any, name: str) -> None:
    folder = os.environ.get("AIMA_CONSOLE_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / f"{name}.png"), full_page=True)


def _login(page: Any, base: str, token: str) -> None:
    page.goto(f"{base}/ui/")
    page.fill("#token", token)
    page.click("#login-form button[type=submit]")
    page.wait_for_selector("#nav:not([hidden])", timeout=WAIT_MS)


def test_console_live_alerts_fleet_costs_job_and_a_user_limited_to_its_projects(
    console: str, db: psycopg.Connection[Any]
) -> None:
    from playwright.sync_api import sync_playwright

    executable = _browser_or_skip()
    _, admin = auth.create_token(db, "admin", name="ops-admin")
    _, user = auth.create_token(db, "user", FLEET_SCOPES, ["p1"], name="alice")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        try:
            context = browser.new_context(viewport={"width": 1100, "height": 800})
            context.grant_permissions(["notifications"], origin=console)
            context.add_init_script(RECORD_NOTIFICATIONS)
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))

            # Without a token only the login form shows; a wrong token is refused with the API's 401.
            page.goto(f"{console}/ui/")
            page.wait_for_selector("#login-form:not([hidden])", timeout=WAIT_MS)
            _shot(page, "login")
            page.fill("#token", "aima_000000000000_wrong")
            page.click("#login-form button[type=submit]")
            page.wait_for_selector("#login-error:has-text('unknown')", timeout=WAIT_MS)

            # Admin: the feed goes live, then an alert written now appears without a reload.
            _login(page, console, admin)
            assert "ops-admin (admin)" in page.inner_text("#who")
            page.wait_for_selector("body[data-feed=live]", timeout=WAIT_MS)
            _alert(db, "fp-hot", "firing")
            page.wait_for_selector("#feed li[data-fingerprint=fp-hot][data-status=firing]", timeout=WAIT_MS)
            _alert(db, "fp-hot", "resolved")
            page.wait_for_selector("#feed li[data-fingerprint=fp-hot][data-status=resolved]", timeout=WAIT_MS)
            assert page.evaluate("window.__notified") == [
                "firing: GpuTemperatureHigh",
                "resolved: GpuTemperatureHigh",
            ]
            assert "GPU 2 of gpu-node-1 is at 91.5" in page.inner_text("#feed")
            _shot(page, "alerts")

            page.goto(f"{console}/ui/#fleet")
            page.wait_for_selector("body[data-page=fleet]", timeout=WAIT_MS)
            heading = page.inner_text("#page h1")
            assert "8 GPUs, 1 idle" in heading, heading
            assert page.locator("tr.idle").count() == 1
            assert page.locator("#fleet-chart .uplot").count() == 1, "the uPlot chart did not render"
            _shot(page, "fleet")

            page.goto(f"{console}/ui/#costs")
            page.wait_for_selector("body[data-page=costs]", timeout=WAIT_MS)
            assert page.locator("tr[data-project]").count() == 2
            assert page.locator("#costs-chart .uplot").count() == 1
            energy = {
                row.get_attribute("data-energy"): row.locator("td").all_inner_texts()
                for row in page.locator("#costs-energy tr[data-energy]").all()
            }
            assert set(energy) == {"p1", "p2", ""}, energy
            # p1's 8 days: its GPU-hours (40..47 EUR / 3 each) x 0.5 kWh per device-hour
            assert energy["p1"][2] == f"{sum(40 + d for d in range(8)) / 3 * 0.5:.1f}", energy
            _shot(page, "costs")

            page.goto(f"{console}/ui/#job/job-p2")
            page.wait_for_selector("body[data-page=job]", timeout=WAIT_MS)
            text = page.inner_text("#page")
            assert "project p2" in text and "40.0 min" in text and "cost 4.20 EUR" in text, text
            assert "gemm" in text
            assert page.locator("#job-chart .uplot").count() == 1
            _shot(page, "job")

            # A user token of p1: p1's costs and jobs only, another project's job is "not found", no feed.
            page.click("#logout")
            _login(page, console, user)
            page.wait_for_selector("#alerts-admin-only", timeout=WAIT_MS)
            page.goto(f"{console}/ui/#costs")
            page.wait_for_selector("body[data-page=costs]", timeout=WAIT_MS)
            assert page.locator("tr[data-project]").all_inner_texts()[0].startswith("p1")
            assert page.locator("tr[data-project]").count() == 1
            assert [r.get_attribute("data-energy") for r in page.locator("tr[data-energy]").all()] == ["p1"]
            page.goto(f"{console}/ui/#jobs")
            page.wait_for_selector("body[data-page=jobs]", timeout=WAIT_MS)
            assert page.locator("tr[data-job]").count() == 1
            assert page.locator("tr[data-job=job-p1]").count() == 1
            _shot(page, "user-jobs")
            page.goto(f"{console}/ui/#job/job-p2")
            page.wait_for_selector("#page-error", timeout=WAIT_MS)
            assert "no job 'job-p2'" in page.inner_text("#page-error")
            # the token stays in the tab's sessionStorage, never in the address or a cookie
            assert user not in page.url and context.cookies() == []
            assert errors == [], errors
        finally:
            browser.close()


def test_console_endpoints_refuse_bad_input_with_4xx(console: str, db: psycopg.Connection[Any]) -> None:
    _, admin = auth.create_token(db, "admin", name="admin")
    _, nothing = auth.create_token(db, "user", [], ["p1"], name="no-scopes")
    headers = {"Authorization": f"Bearer {admin}"}
    with httpx.Client(base_url=console, timeout=30) as http:
        for path in (
            "/jobs?limit=0",
            "/jobs?start_time=yesterday",
            "/fleet?idle_below=101",
            "/fleet?max_age_s=1",
            "/jobs/bad%20id",
        ):
            response = http.get(path, headers=headers)
            assert 400 <= response.status_code < 500, (path, response.status_code, response.text)
            assert "detail" in response.json()
        assert http.get("/jobs/no-such-job", headers=headers).status_code == 404
        assert http.get("/jobs").status_code == 401
        assert http.get("/fleet", headers={"Authorization": f"Bearer {nothing}"}).status_code == 403
        for path in ("/ui/..%2Fapp.py", "/ui/.hidden.js", "/ui/lib/package.json"):
            assert http.get(path).status_code == 404, path
        index = http.get("/ui/")
        assert index.status_code == 200 and "default-src 'self'" in index.headers["content-security-policy"]
        assert http.get("/ui/lib/uPlot.iife.min.js").status_code == 200, "./dev setup installs uPlot from npm"
