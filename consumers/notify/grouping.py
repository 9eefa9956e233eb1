"""Aggregation groups, Alertmanager's way, as pure bookkeeping: no I/O, no threads, the clock passed in.

Every alert goes to the routes that match it; per route it joins the group of its ``group_by`` label values
(and of the channels its rule names: a routing hint, kept apart in groups but never a filter on the
receiver's channels). A new group waits ``group_wait`` before its first notification, so
alerts that fire together arrive together; after that the group is looked at every ``group_interval`` and
notifies when something changed (a new firing alert, an announced alert resolved) or ``repeat_interval``
has passed since the last notification. A group notifies one batch at a time. An alert that fires again
(a new episode: a later ``starts_at``) before the resolution of its last episode was told keeps that
resolution until the next notification tells it, so every announced episode is told resolved.

A resolution whose firing this process saw but did not announce (both read in one go, or within one
group_wait) is no news here, as with Alertmanager; but a predecessor stopped after delivering the firing
and before committing it would leave it untold. Such resolutions are handed over apart
(:meth:`Grouper.take_unconfirmed`) for the deliverer to tell where the notification log shows the firing.

Offsets travel with the alerts: each group entry carries the origins (topic, partition, offset) of the
records folded into it; a flush hands them over, and the caller commits an offset only once every group the
record went to has delivered or dead-lettered it (:class:`OffsetTracker`).

Timestamps here are monotonic seconds (``time.monotonic()`` in production, a counter in tests).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import TypeVar

from consumers.notify.config import Route
from consumers.notify.model import Alert, Origin

__all__ = ["Flush", "Grouper", "OffsetTracker", "Unconfirmed"]

Identity = tuple[str, datetime]
K = TypeVar("K")


@dataclass(slots=True)
class _Entry:
    alert: Alert
    partition: tuple[str, int] | None
    origins: list[Origin] = field(default_factory=list)
    seen_firing: bool = False
    """This process saw the episode fire, so it knows whether the firing was announced. An alert that
    resolves after a restart was last seen firing by the previous process: its resolution is announced."""


@dataclass(frozen=True, slots=True)
class _Notified:
    firing: frozenset[Identity]
    resolved: frozenset[Identity]
    at: float


@dataclass(slots=True)
class _Group:
    key: str
    route: Route
    labels: dict[str, str]
    channels: tuple[str, ...]
    next_flush_at: float
    entries: dict[str, _Entry] = field(default_factory=dict)
    """Per fingerprint, its latest episode."""
    ended: dict[Identity, _Entry] = field(default_factory=dict)
    """Earlier episodes of a fingerprint that fired again before their resolution was told (the group busy
    delivering, or within one group_interval): kept until told, or found not worth telling."""
    in_flight: bool = False
    notified: _Notified | None = None
    leftover: list[Origin] = field(default_factory=list)
    """Origins of an abandoned flush, owed by the next one."""


@dataclass(frozen=True, slots=True)
class Flush:
    """One notification of one group, to be delivered to every channel of the route's receiver."""

    group_key: str
    route: Route
    group_labels: dict[str, str]
    channels: tuple[str, ...]
    """The channels the group's rules name (their routing hint, part of the group key); the notification
    goes to every channel of the route's receiver all the same."""
    alerts: tuple[Alert, ...]
    origins: tuple[Origin, ...]
    repeat: bool
    """Only ``repeat_interval`` passed; nothing changed since the last notification."""
    started_at: float


@dataclass(frozen=True, slots=True)
class Unconfirmed:
    """Resolutions of one group whose firing this process never announced: owed on a channel only where
    the notification log shows the firing told. ``origins``: the records folded into their entries, owed
    until that is settled."""

    group_key: str
    route: Route
    group_labels: dict[str, str]
    channels: tuple[str, ...]
    alerts: tuple[Alert, ...]
    origins: tuple[Origin, ...]


class Grouper:
    def __init__(self, root: Route) -> None:
        self.root = root
        self._groups: dict[str, _Group] = {}
        self._unconfirmed: list[Unconfirmed] = []

    def __len__(self) -> int:
        return len(self._groups)

    def add(self, alert: Alert, origin: Origin | None, now: float) -> int:
        """Fold an alert into the groups of every route it matches; returns how many (each must flush it
        before its offset may be committed)."""
        routes = self.root.select(alert)
        for route in routes:
            labels = route.group_labels(alert)
            channels = tuple(sorted(set(alert.channels)))
            key = _group_key(route, labels, channels)
            group = self._groups.get(key)
            if group is None:
                group = _Group(key, route, labels, channels, next_flush_at=now + route.group_wait_s)
                self._groups[key] = group
            partition = (origin.topic, origin.partition) if origin else None
            entry = group.entries.get(alert.fingerprint)
            if entry is None:
                entry = group.entries[alert.fingerprint] = _Entry(alert, partition)
            elif alert.starts_at > entry.alert.starts_at:
                # A new episode. The last one's resolution, if still owed, is told with the next flush
                # (replacing it lost the resolution of an episode announced firing).
                previous = entry
                entry = group.entries[alert.fingerprint] = _Entry(alert, partition)
                if previous.alert.firing:
                    entry.origins = previous.origins  # its records are owed by this flush now
                else:
                    group.ended[previous.alert.identity] = previous
            elif alert.starts_at < entry.alert.starts_at and alert.identity in group.ended:
                entry = group.ended[alert.identity]  # news about an earlier episode still held
                if alert.supersedes(entry.alert):
                    entry.alert, entry.partition = alert, partition
            elif alert.supersedes(entry.alert):
                entry.alert, entry.partition = alert, partition
            if alert.firing and entry.alert is alert:
                entry.seen_firing = True
            if origin is not None:
                entry.origins.append(origin)
        return len(routes)

    def next_deadline(self) -> float | None:
        """When :meth:`due` next has work (monotonic seconds), None when no group waits."""
        times = [g.next_flush_at for g in self._groups.values() if not g.in_flight]
        return min(times) if times else None

    def due(self, now: float) -> tuple[list[Flush], list[Origin]]:
        """The groups whose timer ran out: those with news become flushes to deliver (and are in flight
        until :meth:`done`); the others are settled at once and their origins returned for release."""
        flushes: list[Flush] = []
        released: list[Origin] = []
        for group in list(self._groups.values()):
            if group.in_flight or now < group.next_flush_at:
                continue
            origins = [*group.leftover, *(o for e in _all(group) for o in e.origins)]
            group.leftover = []
            self._hand_over_unconfirmed(group)
            for entry in _all(group):
                entry.origins = []
            alerts, repeat = self._news(group, now)
            if alerts is None:
                released.extend(origins)
                group.next_flush_at = now + group.route.group_interval_s
                self._settle(group)
                continue
            group.in_flight = True
            flushes.append(
                Flush(
                    group.key,
                    group.route,
                    dict(group.labels),
                    group.channels,
                    alerts,
                    tuple(origins),
                    repeat,
                    now,
                )
            )
        return flushes, released

    def take_unconfirmed(self) -> list[Unconfirmed]:
        """The unconfirmed resolutions :meth:`due` found since the last call. Their origins are also among
        those :meth:`due` returned (in a flush or released): the caller holds them once more until each is
        settled."""
        taken, self._unconfirmed = self._unconfirmed, []
        return taken

    def done(
        self, flush: Flush, now: float, completed: bool = True, sent: tuple[Alert, ...] | None = None
    ) -> None:
        """A flush was delivered or dead-lettered on every channel (``completed``), or abandoned.
        ``sent``: the alerts actually notified (the flush's alerts less silenced ones; default all)."""
        group = self._groups.get(flush.group_key)
        if group is None:  # dropped meanwhile (partitions revoked)
            return
        group.in_flight = False
        if not completed:
            # Abandoned (the notifier is stopping): the records stay owed, the next flush carries them.
            group.leftover.extend(flush.origins)
            group.next_flush_at = now + group.route.group_interval_s
            return
        told = flush.alerts if sent is None else sent
        group.notified = _Notified(
            firing=frozenset(a.identity for a in told if a.firing),
            resolved=frozenset(a.identity for a in told if not a.firing),
            at=now,
        )
        group.next_flush_at = flush.started_at + group.route.group_interval_s
        self._settle(group)

    def drop_partitions(self, partitions: Iterable[tuple[str, int]]) -> None:
        """Forget alerts from partitions this consumer no longer owns: their new owner replays them."""
        gone = set(partitions)
        for key, group in list(self._groups.items()):
            group.entries = {fp: e for fp, e in group.entries.items() if e.partition not in gone}
            group.ended = {i: e for i, e in group.ended.items() if e.partition not in gone}
            if not group.entries and not group.ended and not group.in_flight:
                del self._groups[key]

    # -- internals ---------------------------------------------------------------------------------------

    def _news(self, group: _Group, now: float) -> tuple[tuple[Alert, ...] | None, bool]:
        """What to notify, Alertmanager's dedup: None when nothing changed and no repeat is due."""
        notified = group.notified
        announced = notified.firing if notified else frozenset()
        firing = [e.alert for e in group.entries.values() if e.alert.firing]
        # Resolutions worth telling: of alerts announced firing, or whose firing this process never saw.
        resolved = [
            e.alert
            for e in _all(group)
            if not e.alert.firing and (e.alert.identity in announced or not e.seen_firing)
        ]
        firing_ids = {a.identity for a in firing}
        resolved_ids = {a.identity for a in resolved}
        alerts = tuple(sorted(firing + resolved, key=lambda a: (a.starts_at, a.fingerprint)))
        if notified is None:
            return (alerts, False) if alerts else (None, False)
        if not firing_ids <= notified.firing or not resolved_ids <= notified.resolved:
            return alerts, False
        if firing and now - notified.at >= group.route.repeat_interval_s:
            return alerts, True
        return None, False

    def _hand_over_unconfirmed(self, group: _Group) -> None:
        announced = group.notified.firing if group.notified else frozenset()
        entries = [
            e
            for e in _all(group)
            if not e.alert.firing and e.seen_firing and e.alert.identity not in announced
        ]
        if entries:
            self._unconfirmed.append(
                Unconfirmed(
                    group.key,
                    group.route,
                    dict(group.labels),
                    group.channels,
                    tuple(e.alert for e in entries),
                    tuple(o for e in entries for o in e.origins),
                )
            )

    def _settle(self, group: _Group) -> None:
        """Forget resolved alerts once told, or when never announced and so not worth telling."""
        announced = group.notified.firing if group.notified else frozenset()
        told = group.notified.resolved if group.notified else frozenset()
        _forget_told(group.entries, announced, told)
        _forget_told(group.ended, announced, told)
        if not group.entries and not group.ended and not group.in_flight and not group.leftover:
            del self._groups[group.key]


def _forget_told(entries: dict[K, _Entry], announced: frozenset[Identity], told: frozenset[Identity]) -> None:
    for key, entry in list(entries.items()):
        alert = entry.alert
        if alert.firing or entry.origins or alert.identity in announced:
            continue
        if alert.identity in told or entry.seen_firing:
            del entries[key]


def _all(group: _Group) -> Iterator[_Entry]:
    """Every entry of the group: each fingerprint's latest episode and the ended ones still held."""
    yield from group.entries.values()
    yield from group.ended.values()


def _group_key(route: Route, labels: dict[str, str], channels: tuple[str, ...]) -> str:
    body = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return f"{route.id}:{{{body}}}" + (f":[{','.join(channels)}]" if channels else "")


class OffsetTracker:
    """Which offsets may be committed: per partition, everything below the lowest record still owed a
    delivery. A record routed to n groups is owed n releases."""

    def __init__(self) -> None:
        self._pending: dict[tuple[str, int], dict[int, int]] = {}
        self._next: dict[tuple[str, int], int] = {}
        self._committed: dict[tuple[str, int], int] = {}

    def add(self, origin: Origin, refs: int) -> None:
        tp = (origin.topic, origin.partition)
        self._next[tp] = max(self._next.get(tp, 0), origin.offset + 1)
        if refs > 0:
            pending = self._pending.setdefault(tp, {})
            pending[origin.offset] = pending.get(origin.offset, 0) + refs

    def release(self, origin: Origin) -> None:
        pending = self._pending.get((origin.topic, origin.partition))
        if pending is None or origin.offset not in pending:
            return  # a revoked partition's record, or released already
        pending[origin.offset] -= 1
        if pending[origin.offset] <= 0:
            del pending[origin.offset]

    def pending(self) -> int:
        return sum(len(p) for p in self._pending.values())

    def committable(self) -> Iterator[tuple[str, int, int]]:
        """(topic, partition, next offset to read) for every partition whose commit point moved."""
        for tp, next_offset in self._next.items():
            pending = self._pending.get(tp)
            offset = min(pending) if pending else next_offset
            if self._committed.get(tp) != offset:
                yield tp[0], tp[1], offset

    def committed(self, topic: str, partition: int, offset: int) -> None:
        self._committed[(topic, partition)] = offset

    def drop(self, partitions: Iterable[tuple[str, int]]) -> None:
        for tp in partitions:
            self._pending.pop(tp, None)
            self._next.pop(tp, None)
            self._committed.pop(tp, None)
