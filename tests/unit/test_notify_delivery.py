"""Once per alert state and channel: the deliverer against a notification log that goes away (an honest
in-memory stand-in for the table: it answers as :class:`consumers.notify.told.NotificationLog` does,
raising LogUnavailable while down), with channels that record what they were given."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection
from datetime import UTC, datetime, timedelta

from prometheus_client import CollectorRegistry

from consumers.notify.config import ChannelConfig, RetryPolicy
from consumers.notify.delivery import Deliverer, NotifierMetrics, Outcome, Result
from consumers.notify.model import Alert, Notification
from consumers.notify.told import Key, LogUnavailable

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def alert(status: str = "firing", fingerprint: str = "fp1", starts_at: datetime = T0) -> Alert:
    return Alert.from_event(
        {
            "fingerprint": fingerprint,
            "rule": "GpuHot",
            "status": status,
            "severity": "critical",
            "starts_at": starts_at,
            "ends_at": starts_at + timedelta(minutes=3) if status == "resolved" else None,
            "event_time": starts_at,
            "value": 91.0,
            "labels": {"host": "gpu-1"},
            "annotations": {},
            "channels": [],
        }
    )


def notification(*alerts: Alert, channel: str = "webhook") -> Notification:
    return Notification("ops", channel, "root:{}", {}, alerts)


class FakeLog:
    """The notification log's rows in a dict; ``down`` makes every call fail as PostgreSQL away does."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str, Key], str] = {}
        self.down = threading.Event()
        self.failures = 0
        self.lock = threading.Lock()

    def _check(self) -> None:
        if self.down.is_set():
            with self.lock:
                self.failures += 1
            raise LogUnavailable("connection refused")

    def lookup(self, receiver: str, channel: str, keys: Collection[Key]) -> dict[Key, str]:
        self._check()
        return {k: self.rows[(receiver, channel, k)] for k in keys if (receiver, channel, k) in self.rows}

    def intend(self, n: Notification, at: datetime) -> None:
        self._check()
        for a in n.alerts:
            self.rows.setdefault((n.receiver, n.channel, (a.fingerprint, a.status, a.starts_at)), "sending")

    def record(self, n: Notification, *, outcome: str, **_: object) -> None:
        self._check()
        for a in n.alerts:
            self.rows[(n.receiver, n.channel, (a.fingerprint, a.status, a.starts_at))] = outcome


class RecordingChannel:
    def __init__(self, on_send: Callable[[], None] = lambda: None) -> None:
        self.config = ChannelConfig(kind="webhook", id="webhook", retry=RetryPolicy(max_attempts=1))
        self.sent: list[list[tuple[str, str]]] = []
        self._on_send = on_send

    def send(self, n: Notification, progress: set[str]) -> None:
        self.sent.append([(a.fingerprint, a.status) for a in n.alerts])
        self._on_send()

    def close(self) -> None:
        pass


def deliverer(log: FakeLog, stop: threading.Event | None = None, log_wait_s: float = 60.0) -> Deliverer:
    return Deliverer(
        dead_letters=None,  # type: ignore[arg-type]  # never reached: every send succeeds
        origin_topic="aima.alerts",
        metrics=NotifierMetrics(CollectorRegistry()),
        stop=stop or threading.Event(),
        log_store=log,  # type: ignore[arg-type]
        log_wait_s=log_wait_s,
    )


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def in_thread(call: Callable[[], Result]) -> tuple[threading.Thread, list[Result]]:
    results: list[Result] = []
    thread = threading.Thread(target=lambda: results.append(call()), daemon=True)
    thread.start()
    return thread, results


def test_a_state_told_while_the_log_is_away_is_not_told_again_when_its_record_is_read_again() -> None:
    # The ledger's repeat: PostgreSQL went away right after the webhook's 2xx, and a rebalance made the
    # notifier read the resolution again before the log held it.
    log = FakeLog()
    channel = RecordingChannel(on_send=log.down.set)
    d = deliverer(log)
    n = notification(alert("resolved"))
    first, first_result = in_thread(lambda: d.deliver(n, channel))
    wait_until(lambda: log.failures >= 2, "the log write failing")
    assert first_result == []  # its offsets stay owed while the outcome is not logged
    second, second_result = in_thread(lambda: d.deliver(n, channel))  # the record read again
    wait_until(lambda: log.failures >= 3, "more failed writes")
    log.down.clear()
    first.join(20)
    second.join(20)
    assert [r.outcome for r in first_result + second_result] == [Outcome.DELIVERED, Outcome.DUPLICATE]
    assert channel.sent == [[("fp1", "resolved")]]
    assert log.rows == {("ops", "webhook", ("fp1", "resolved", T0)): "delivered"}
    # And again while the database is away: this process remembers it without asking.
    log.down.set()
    assert d.deliver(n, channel).outcome is Outcome.DUPLICATE
    assert len(channel.sent) == 1


def test_a_first_delivery_waits_for_the_log_to_answer() -> None:
    log = FakeLog()
    log.rows[("ops", "webhook", ("fp1", "firing", T0))] = "delivered"  # told by a predecessor
    log.down.set()
    channel = RecordingChannel()
    d = deliverer(log)
    thread, results = in_thread(lambda: d.deliver(notification(alert()), channel))
    wait_until(lambda: log.failures >= 2, "lookups failing")
    assert channel.sent == [] and results == []
    log.down.clear()
    thread.join(20)
    assert [r.outcome for r in results] == [Outcome.DUPLICATE] and channel.sent == []


def test_past_its_patience_the_deliverer_sends_without_the_log() -> None:
    log = FakeLog()
    log.down.set()
    channel = RecordingChannel(on_send=log.down.clear)  # the database returns meanwhile
    result = deliverer(log, log_wait_s=0.0).deliver(notification(alert()), channel)
    assert result.outcome is Outcome.DELIVERED and channel.sent == [[("fp1", "firing")]]
    assert log.rows == {("ops", "webhook", ("fp1", "firing", T0)): "delivered"}


def test_a_stop_while_the_log_is_away_settles_the_delivery_unlogged() -> None:
    log = FakeLog()
    stop = threading.Event()
    channel = RecordingChannel(on_send=log.down.set)
    d = deliverer(log, stop)
    thread, results = in_thread(lambda: d.deliver(notification(alert()), channel))
    wait_until(lambda: log.failures >= 1, "the log write failing")
    stop.set()
    thread.join(20)
    # Delivered, so its offsets are committed: the successor does not read it again and send it twice.
    assert [r.outcome for r in results] == [Outcome.DELIVERED]
    assert d.told.unlogged() == 1


def test_concurrent_deliveries_of_one_state_send_it_once() -> None:
    log = FakeLog()
    release = threading.Event()
    channel = RecordingChannel(on_send=lambda: release.wait(5))
    d = deliverer(log)
    n = notification(alert())
    threads = [in_thread(lambda: d.deliver(n, channel)) for _ in range(3)]
    wait_until(lambda: len(channel.sent) == 1, "the first send")
    release.set()
    for thread, _ in threads:
        thread.join(20)
    outcomes = sorted(r.outcome.value for _, results in threads for r in results)
    assert outcomes == ["delivered", "duplicate", "duplicate"] and len(channel.sent) == 1


def test_a_told_resolution_is_left_out_and_firing_alerts_stay_in_the_group() -> None:
    log = FakeLog()
    later = T0 + timedelta(hours=1)
    log.rows[("ops", "webhook", ("fp1", "resolved", T0))] = "delivered"
    log.rows[("ops", "webhook", ("fp2", "firing", T0))] = "delivered"
    channel = RecordingChannel()
    n = notification(alert("resolved"), alert(fingerprint="fp2"), alert(starts_at=later))
    assert deliverer(log).deliver(n, channel).outcome is Outcome.DELIVERED
    assert channel.sent == [[("fp2", "firing"), ("fp1", "firing")]]
    assert log.rows[("ops", "webhook", ("fp1", "firing", later))] == "delivered"


def test_an_unconfirmed_resolution_is_told_only_where_its_firing_was() -> None:
    log = FakeLog()
    log.rows[("ops", "webhook", ("fp1", "firing", T0))] = "delivered"
    log.rows[("ops", "webhook/1", ("fp1", "firing", T0))] = "sending"  # killed before the log write
    log.rows[("ops", "webhook/3", ("fp1", "firing", T0))] = "delivered"
    log.rows[("ops", "webhook/3", ("fp1", "resolved", T0))] = "delivered"
    d = deliverer(log)
    got = {}
    for name in ("webhook", "webhook/1", "webhook/2", "webhook/3"):
        channel = RecordingChannel()
        result = d.deliver(notification(alert("resolved"), channel=name), channel, unconfirmed=True)
        got[name] = (result.outcome, channel.sent)
    assert got == {
        "webhook": (Outcome.DELIVERED, [[("fp1", "resolved")]]),
        "webhook/1": (Outcome.DELIVERED, [[("fp1", "resolved")]]),
        "webhook/2": (Outcome.NOT_OWED, []),  # the firing never reached it (fired and resolved unseen)
        "webhook/3": (Outcome.DUPLICATE, []),
    }
