"""One alert (one fingerprint) that resolves and fires again while its group's notification is still being
retried: every episode's firing and resolution reaches the receiver exactly once, through the real broker
and PostgreSQL (the ledger test's first GPU overheats twice; its first resolution was lost this way)."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable

import pytest

from bus.settings import Settings
from consumers.notify.model import rfc3339
from tests.integration import test_notifier as base
from tests.integration.test_notifier import (
    Receiver,
    RunningNotifier,
    alert_event,
    config,
    produce,
    verified,
    wait_committed,
    webhook,
)

pytestmark = pytest.mark.integration

start, receiver = base.start, base.receiver  # the notifier tests' fixtures


def _accepted(server: Receiver) -> list[tuple[str, str, str]]:
    """(fingerprint, status, startsAt) of every alert in every accepted call, in order."""
    return [
        (a["fingerprint"], a["status"], a["startsAt"])
        for request in server.seen("/hook")
        for a in verified(request)["alerts"]
    ]


def _wait(condition: Callable[[], bool], timeout_s: float, what: str, server: Receiver) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}; accepted: {_accepted(server)}"
        time.sleep(0.1)


def test_a_resolution_is_told_when_the_alert_fires_again_before_its_group_was_delivered(
    start: Callable[..., RunningNotifier], topics: Settings, receiver: Receiver, unique: str
) -> None:
    up = threading.Event()
    receiver.behaviour["/hook"] = lambda: 200 if up.is_set() else 500
    group = f"notify-{unique}"
    notifier = start(config([{"name": "ops", "webhook": webhook(receiver.url("/hook"))}]), group)
    first = alert_event()
    fingerprint = first["fingerprint"]
    t1 = first["starts_at"]
    t2 = t1 + dt.timedelta(minutes=10)
    resolved1 = dict(first, status="resolved", ends_at=t1 + dt.timedelta(minutes=4),
                     event_time=t1 + dt.timedelta(minutes=4))  # fmt: skip
    second = dict(first, starts_at=t2, event_time=t2)
    resolved2 = dict(second, status="resolved", ends_at=t2 + dt.timedelta(minutes=3),
                     event_time=t2 + dt.timedelta(minutes=3))  # fmt: skip
    try:
        produce(topics, first)
        receiver.wait_for("/hook", 2, accepted_only=False, timeout_s=60)  # refused, being retried
        # While the first firing is retried, the episode resolves and the alert fires again.
        produce(topics, resolved1, second)
        _wait(
            lambda: (
                notifier.metric("aima_notifier_alerts_received_total", status="firing") >= 2
                and notifier.metric("aima_notifier_alerts_received_total", status="resolved") >= 1
            ),
            60,
            "the notifier reading the resolution and the second firing",
            receiver,
        )
        up.set()
        _wait(
            lambda: len(_accepted(receiver)) >= 3,
            60,
            "the first episode's resolution and the second firing",
            receiver,
        )
        produce(topics, resolved2)
        _wait(lambda: len(_accepted(receiver)) >= 4, 60, "the second episode's resolution", receiver)
        wait_committed(topics, group, timeout_s=60)
        time.sleep(3)  # a duplicate would show up by now
    finally:
        notifier.stop()

    want = [
        (fingerprint, e["status"], rfc3339(e["starts_at"])) for e in (first, resolved1, second, resolved2)
    ]
    got = _accepted(receiver)
    assert sorted(got) == sorted(want), got


def test_a_resolution_read_together_with_its_delivered_firing_after_a_crash_is_told(
    start: Callable[..., RunningNotifier], topics: Settings, receiver: Receiver, unique: str
) -> None:
    # A notifier that told the firing and crashed before committing it: its successor reads the firing and
    # the resolution in one go.
    cfg = config([{"name": "ops", "webhook": webhook(receiver.url("/hook"))}])
    first = start(cfg, f"first-{unique}")
    firing = alert_event()
    produce(topics, firing)
    receiver.wait_for("/hook")
    first.stop()
    t = firing["starts_at"] + dt.timedelta(minutes=2)
    produce(topics, dict(firing, status="resolved", ends_at=t, event_time=t))
    replay = start(cfg, f"replay-{unique}")  # nothing committed in its group: reads both records
    try:
        _wait(lambda: len(_accepted(receiver)) >= 2, 30, "the resolution", receiver)
    finally:
        replay.stop()
    assert [s for _, s, _ in _accepted(receiver)] == ["firing", "resolved"]
