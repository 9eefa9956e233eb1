"""Routing, aggregation groups (group_wait, group_interval, repeat_interval), offset bookkeeping and label
matchers of the notifier, with an injected clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from bus.matchers import InvalidMatcher, Matcher
from bus.silences import Silence, silenced_by
from consumers.notify.config import ConfigError, NotifyConfig, parse
from consumers.notify.grouping import Flush, Grouper, OffsetTracker
from consumers.notify.model import Alert, Origin

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def alert(
    fingerprint: str = "fp1",
    status: str = "firing",
    *,
    rule: str = "GpuHot",
    severity: str = "critical",
    starts_at: datetime = T0,
    labels: dict[str, str] | None = None,
    channels: tuple[str, ...] = (),
) -> Alert:
    return Alert.from_event(
        {
            "fingerprint": fingerprint,
            "rule": rule,
            "status": status,
            "severity": severity,
            "starts_at": starts_at,
            "ends_at": starts_at + timedelta(minutes=5) if status == "resolved" else None,
            "event_time": starts_at,
            "value": 91.0,
            "labels": {"host": "gpu-1", **(labels or {})},
            "annotations": {"summary": "hot"},
            "channels": list(channels),
            "source": "test",
        }
    )


def slack(name: str) -> dict[str, Any]:
    """A receiver with one channel (a receiver a route names must have one)."""
    return {"name": name, "slack": {"url": f"https://hooks.slack.test/{name}"}}


def config(route: dict[str, Any] | None = None, **extra: Any) -> NotifyConfig:
    data = {
        "route": {
            "receiver": "ops",
            "group_wait": "30s",
            "group_interval": "5m",
            "repeat_interval": "4h",
            **(route or {}),
        },
        "receivers": [slack("ops"), slack("oncall"), slack("mail")],
        **extra,
    }
    return parse(data, environ={})


def origin(offset: int, partition: int = 0) -> Origin:
    return Origin("aima.alerts", partition, offset)


def only(flushes: tuple[list[Flush], list[Origin]]) -> Flush:
    sent, _ = flushes
    assert len(sent) == 1, sent
    return sent[0]


# -- routing ------------------------------------------------------------------------------------------------


def test_the_wait_for_the_notification_log_is_configured_under_delivery() -> None:
    base = {"route": {"receiver": "ops"}, "receivers": [slack("ops")]}
    assert parse(base, environ={}).log_wait_s == 300
    assert parse({**base, "delivery": {"log_wait": "90s"}}, environ={}).log_wait_s == 90


def test_defaults_are_alertmanagers() -> None:
    route = parse({"route": {"receiver": "ops"}, "receivers": [slack("ops")]}, environ={}).route
    assert (route.group_wait_s, route.group_interval_s, route.repeat_interval_s) == (30, 300, 4 * 3600)
    assert route.group_by == ("alertname",)


def test_routes_pick_by_rule_severity_labels_and_channel() -> None:
    cfg = config(
        {
            "routes": [
                {"matchers": ["severity=critical", "rule=~Gpu.*"], "receiver": "oncall", "continue": True},
                {"channels": ["email"], "receiver": "mail"},
                {"matchers": ["host!=gpu-1"], "receiver": "mail", "group_wait": "0s"},
            ]
        }
    )
    root = cfg.route
    assert [r.receiver for r in root.select(alert())] == ["oncall"]  # continue, but nothing else matches
    assert [r.receiver for r in root.select(alert(channels=("mail",)))] == ["oncall", "mail"]
    assert [r.receiver for r in root.select(alert(severity="warning"))] == ["ops"]  # the root itself
    other = root.select(alert(severity="info", labels={"host": "gpu-2"}))
    assert [(r.receiver, r.group_wait_s, r.group_interval_s) for r in other] == [("mail", 0, 300)]


def test_route_children_inherit_and_nest() -> None:
    cfg = config(
        {
            "group_by": ["alertname", "host"],
            "routes": [
                {
                    "matchers": ["severity=critical"],
                    "receiver": "oncall",
                    "routes": [{"matchers": ["host=gpu-9"], "receiver": "mail"}],
                }
            ],
        }
    )
    (child,) = cfg.route.select(alert(labels={"host": "gpu-9"}))
    assert (child.id, child.receiver, child.group_by) == ("root/0/0", "mail", ("alertname", "host"))
    (parent,) = cfg.route.select(alert())
    assert parent.id == "root/0"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"route": {"receiver": "nobody"}, "receivers": [{"name": "ops"}]}, "'nobody', which is not defined"),
        ({"route": {"receiver": "ops", "group_wait": "soon"}, "receivers": [{"name": "ops"}]}, "group_wait"),
        (
            {
                "route": {"receiver": "ops", "routes": [{"matchers": ["host=~("]}]},
                "receivers": [{"name": "ops"}],
            },
            "bad regular expression",
        ),
        (
            {
                "route": {"receiver": "ops", "routes": [{"channels": ["pager"]}]},
                "receivers": [{"name": "ops"}],
            },
            "unknown channel 'pager'",
        ),
        (
            {"route": {"receiver": "ops", "grouping": 1}, "receivers": [{"name": "ops"}]},
            "unknown key(s) grouping",
        ),
        ({"receivers": [{"name": "ops"}]}, "'route' is missing"),
        (
            {
                "delivery": {"log_wait": "a while"},
                "route": {"receiver": "ops"},
                "receivers": [{"name": "ops"}],
            },
            "delivery.log_wait",
        ),
    ],
)
def test_config_errors_say_where(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse(data, environ={}, source="notify.yaml")
    assert message in str(raised.value)
    assert str(raised.value).startswith("notify.yaml: ")


# -- grouping ----------------------------------------------------------------------------------------------


def test_group_wait_collects_alerts_then_one_notification() -> None:
    grouper = Grouper(config().route)
    assert grouper.add(alert("a"), origin(1), now=0.0) == 1
    assert grouper.add(alert("b", labels={"host": "gpu-2"}), origin(2), now=10.0) == 1
    assert grouper.due(29.9) == ([], [])
    flush = only(grouper.due(30.0))
    assert [a.fingerprint for a in flush.alerts] == ["a", "b"]
    assert flush.group_labels == {"alertname": "GpuHot"}
    assert flush.origins == (origin(1), origin(2))
    assert not flush.repeat
    assert grouper.due(31.0) == ([], [])  # in flight: one batch at a time
    grouper.done(flush, now=31.0)
    assert grouper.next_deadline() == 330.0  # started_at + group_interval


def test_group_interval_sends_news_and_repeat_interval_resends() -> None:
    grouper = Grouper(config({"repeat_interval": "1h"}).route)
    grouper.add(alert("a"), origin(1), 0.0)
    grouper.done(only(grouper.due(30.0)), 30.0)
    grouper.add(alert("a"), origin(2), 40.0)  # a duplicate: no news
    sent, released = grouper.due(330.0)
    assert sent == [] and released == [origin(2)]
    grouper.add(alert("b", labels={"host": "gpu-2"}), origin(3), 400.0)
    assert grouper.due(500.0) == ([], [])  # waits for the next group_interval tick, not group_wait
    flush = only(grouper.due(630.0))
    assert {a.fingerprint for a in flush.alerts} == {"a", "b"} and not flush.repeat
    grouper.done(flush, 630.0)
    assert grouper.due(930.0)[0] == []
    repeat = only(grouper.due(630.0 + 3600.0))
    assert repeat.repeat and repeat.origins == ()


def test_resolved_is_announced_once_then_forgotten() -> None:
    grouper = Grouper(config({"group_wait": "0s", "group_interval": "10s"}).route)
    grouper.add(alert("a"), origin(1), 0.0)
    grouper.done(only(grouper.due(0.0)), 0.0)
    grouper.add(alert("a", "resolved"), origin(2), 5.0)
    flush = only(grouper.due(10.0))
    assert [(a.fingerprint, a.status) for a in flush.alerts] == [("a", "resolved")]
    grouper.done(flush, 10.0)
    assert len(grouper) == 0  # nothing left: the group is gone


def test_fired_and_resolved_within_group_wait_is_never_sent() -> None:
    grouper = Grouper(config().route)
    grouper.add(alert("a"), origin(1), 0.0)
    grouper.add(alert("a", "resolved"), origin(2), 10.0)
    sent, released = grouper.due(30.0)
    assert sent == [] and released == [origin(1), origin(2)]
    assert len(grouper) == 0


def test_resolution_of_an_alert_fired_before_a_restart_is_announced() -> None:
    grouper = Grouper(config().route)
    grouper.add(alert("a", "resolved"), origin(7), 0.0)
    flush = only(grouper.due(30.0))
    assert [a.status for a in flush.alerts] == ["resolved"]


def test_a_resolution_read_with_its_unannounced_firing_is_handed_over_unconfirmed() -> None:
    # A replay after the firing's sender stopped before committing: no news here (as Alertmanager would
    # have it), but the notification log may show the firing told, so the resolution goes on apart.
    grouper = Grouper(config({"group_wait": "0s"}).route)
    grouper.add(alert("a"), origin(1), 0.0)
    grouper.add(alert("a", "resolved"), origin(2), 0.0)
    sent, released = grouper.due(0.0)
    assert sent == [] and released == [origin(1), origin(2)]
    (item,) = grouper.take_unconfirmed()
    assert [(a.fingerprint, a.status) for a in item.alerts] == [("a", "resolved")]
    assert item.origins == (origin(1), origin(2)) and item.group_key.startswith("root:")
    assert grouper.take_unconfirmed() == [] and len(grouper) == 0


def test_a_resolution_of_an_announced_firing_is_not_unconfirmed() -> None:
    grouper = Grouper(config({"group_wait": "0s", "group_interval": "10s"}).route)
    grouper.add(alert("a"), origin(1), 0.0)
    grouper.done(only(grouper.due(0.0)), 0.0)
    grouper.add(alert("a", "resolved"), origin(2), 5.0)
    assert [a.status for a in only(grouper.due(10.0)).alerts] == ["resolved"]
    assert grouper.take_unconfirmed() == []


def test_a_replayed_firing_record_does_not_undo_a_resolution() -> None:
    grouper = Grouper(config({"group_wait": "0s"}).route)
    grouper.add(alert("a", "resolved"), origin(2), 0.0)
    grouper.add(alert("a", "firing"), origin(1), 0.0)
    assert [a.status for a in only(grouper.due(0.0)).alerts] == ["resolved"]


def test_refiring_is_a_new_episode() -> None:
    grouper = Grouper(config({"group_wait": "0s", "group_interval": "10s"}).route)
    grouper.add(alert("a"), origin(1), 0.0)
    grouper.done(only(grouper.due(0.0)), 0.0)
    later = T0 + timedelta(hours=1)
    grouper.add(alert("a", starts_at=later), origin(2), 1.0)
    flush = only(grouper.due(10.0))
    assert [a.starts_at for a in flush.alerts] == [later]


def test_a_resolution_is_told_when_the_alert_fires_again_while_its_group_is_in_flight() -> None:
    # The ledger's GPU overheats twice: its first firing was retried for a minute, meanwhile the episode
    # resolved and a second one fired; the second episode replaced the first's resolution, never told.
    grouper = Grouper(config({"group_wait": "0s", "group_interval": "10s"}).route)
    later = T0 + timedelta(hours=1)
    grouper.add(alert("a"), origin(1), 0.0)
    first = only(grouper.due(0.0))  # in flight (retried)
    grouper.add(alert("a", "resolved"), origin(2), 20.0)
    grouper.add(alert("a", starts_at=later), origin(3), 30.0)
    grouper.done(first, 60.0)
    flush = only(grouper.due(60.0))
    assert [(a.status, a.starts_at) for a in flush.alerts] == [("resolved", T0), ("firing", later)]
    assert sorted(flush.origins, key=lambda o: o.offset) == [origin(2), origin(3)]
    grouper.done(flush, 60.0)
    grouper.add(alert("a", "resolved", starts_at=later), origin(4), 65.0)
    last = only(grouper.due(70.0))
    assert [(a.status, a.starts_at) for a in last.alerts] == [("resolved", later)]
    grouper.done(last, 70.0)
    assert len(grouper) == 0


def test_a_resolution_and_a_new_firing_within_one_group_interval_are_both_told() -> None:
    grouper = Grouper(config({"group_wait": "0s", "group_interval": "10s"}).route)
    later = T0 + timedelta(hours=1)
    grouper.add(alert("a"), origin(1), 0.0)
    grouper.done(only(grouper.due(0.0)), 0.0)
    grouper.add(alert("a", "resolved"), origin(2), 3.0)
    grouper.add(alert("a", starts_at=later), origin(3), 6.0)
    grouper.add(alert("a", "firing"), origin(4), 7.0)  # a replayed record of the first episode: stale
    flush = only(grouper.due(10.0))
    assert [(a.status, a.starts_at) for a in flush.alerts] == [("resolved", T0), ("firing", later)]
    assert sorted(flush.origins, key=lambda o: o.offset) == [origin(2), origin(3), origin(4)]


def test_an_episode_fired_and_resolved_unannounced_stays_untold_when_the_alert_fires_again() -> None:
    grouper = Grouper(config({"group_wait": "0s"}).route)
    later = T0 + timedelta(hours=1)
    grouper.add(alert("a"), origin(1), 0.0)
    grouper.add(alert("a", "resolved"), origin(2), 0.0)
    grouper.add(alert("a", starts_at=later), origin(3), 0.0)
    flush = only(grouper.due(0.0))
    assert [(a.status, a.starts_at) for a in flush.alerts] == [("firing", later)]
    assert sorted(flush.origins, key=lambda o: o.offset) == [origin(1), origin(2), origin(3)]


def test_a_firing_episode_replaced_by_a_new_one_keeps_its_records_owed() -> None:
    grouper = Grouper(config({"group_wait": "0s", "group_interval": "10s"}).route)
    grouper.add(alert("a"), origin(1), 0.0)
    first = only(grouper.due(0.0))
    grouper.add(alert("a"), origin(2), 1.0)  # the same episode again (a re-send)
    grouper.add(alert("a", starts_at=T0 + timedelta(hours=1)), origin(3), 2.0)
    grouper.done(first, 3.0)
    assert sorted(only(grouper.due(10.0)).origins, key=lambda o: o.offset) == [origin(2), origin(3)]


def test_group_by_all_labels_makes_one_group_per_alert() -> None:
    grouper = Grouper(config({"group_by": ["..."], "group_wait": "0s"}).route)
    grouper.add(alert("a"), origin(1), 0.0)
    grouper.add(alert("b", labels={"host": "gpu-2"}), origin(2), 0.0)
    sent, _ = grouper.due(0.0)
    assert sorted(len(f.alerts) for f in sent) == [1, 1]


def test_channels_a_rule_asks_for_split_groups() -> None:
    grouper = Grouper(config({"group_wait": "0s"}).route)
    grouper.add(alert("a", channels=("webhook",)), origin(1), 0.0)
    grouper.add(alert("b", channels=("slack", "webhook")), origin(2), 0.0)
    sent, _ = grouper.due(0.0)
    assert sorted(f.channels for f in sent) == [("slack", "webhook"), ("webhook",)]


def test_silenced_alerts_are_not_remembered_as_told() -> None:
    grouper = Grouper(config({"group_wait": "0s", "group_interval": "10s"}).route)
    grouper.add(alert("a"), origin(1), 0.0)
    grouper.done(only(grouper.due(0.0)), 0.0, sent=())  # everything silenced
    assert [a.fingerprint for a in only(grouper.due(10.0)).alerts] == ["a"]  # asked again next tick


def test_an_abandoned_flush_keeps_its_offsets_owed() -> None:
    grouper = Grouper(config({"group_wait": "0s", "group_interval": "10s"}).route)
    grouper.add(alert("a"), origin(1), 0.0)
    flush = only(grouper.due(0.0))
    grouper.done(flush, 1.0, completed=False)
    again = only(grouper.due(11.0))
    assert again.origins == (origin(1),)
    assert [a.fingerprint for a in again.alerts] == ["a"]


def test_revoked_partitions_are_forgotten() -> None:
    grouper = Grouper(config().route)
    grouper.add(alert("a"), origin(1, partition=0), 0.0)
    grouper.add(alert("b", labels={"host": "x"}), origin(1, partition=1), 0.0)
    grouper.drop_partitions([("aima.alerts", 0)])
    assert [a.fingerprint for a in only(grouper.due(30.0)).alerts] == ["b"]


# -- offsets -----------------------------------------------------------------------------------------------


def test_offsets_commit_below_the_lowest_owed_record() -> None:
    tracker = OffsetTracker()
    tracker.add(origin(10), refs=2)
    tracker.add(origin(11), refs=1)
    tracker.add(origin(12), refs=0)  # settled at once (a dead-lettered record)
    assert list(tracker.committable()) == [("aima.alerts", 0, 10)]
    tracker.committed("aima.alerts", 0, 10)
    tracker.release(origin(11))
    tracker.release(origin(10))
    assert list(tracker.committable()) == []  # 10 is still owed once
    tracker.release(origin(10))
    assert list(tracker.committable()) == [("aima.alerts", 0, 13)]
    tracker.release(origin(10))  # a stray release is harmless
    assert tracker.pending() == 0


# -- matchers and silences ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "labels", "expected"),
    [
        ("severity=critical", {"severity": "critical"}, True),
        ("severity!=critical", {"severity": "critical"}, False),
        ('host=~"gpu-[0-9]+"', {"host": "gpu-12"}, True),
        ("host=~gpu", {"host": "gpu-12"}, False),  # anchored
        ("host!~gpu-.*", {"host": "cpu-1"}, True),
        ("team=", {}, True),  # a missing label is the empty string
    ],
)
def test_matchers(text: str, labels: dict[str, str], expected: bool) -> None:
    assert Matcher.parse(text).matches(labels) is expected


def test_matcher_forms_round_trip() -> None:
    m = Matcher.parse("host=~gpu-.*")
    assert Matcher.from_json(m.to_json()) == m
    assert Matcher.from_json({"name": "host", "value": "gpu-.*", "isRegex": True, "isEqual": True}) == m
    with pytest.raises(InvalidMatcher):
        Matcher.parse("no operator")
    with pytest.raises(InvalidMatcher):
        Matcher("a", "==", "b")


def test_silence_matching_respects_its_window() -> None:
    silence = Silence(
        "id",
        (Matcher.parse("host=gpu-1"), Matcher.parse("alertname=GpuHot")),
        T0,
        T0 + timedelta(hours=1),
        "me",
        "",
        T0,
    )
    labels = dict(alert().labels)
    assert silenced_by([silence], labels, now=T0 + timedelta(minutes=1)) is silence
    assert silenced_by([silence], labels, now=T0 + timedelta(hours=2)) is None
    assert silenced_by([silence], {**labels, "host": "gpu-2"}, now=T0) is None
    assert silence.state(T0 - timedelta(seconds=1)) == "pending"
