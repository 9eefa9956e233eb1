"""The cost processors (S2, M22-M26): GPU-hours, estimated cost, job cost, cost per media minute, budget
utilisation with its forecast and threshold alerts, and idle GPU-hours (U: which GPUs sit idle).

The data flow::

    job.events ──JobRepartitioner──► streams.jobs-by-project (key: project)
        ──CostProcessor──► costs:  gpu_hours per (project, gpu_model, provider, pricing, hour), job_cost per
                                   finished job, budget per (project, budget, month)
                           alerts: budget_<threshold> / budget_forecast_overrun
                           streams.device-hours: allocated GPU-hours per (project, gpu_model, provider,
                                   pricing, hour), key gpu_model
    gpu.samples ──DeviceHoursProcessor──► streams.device-hours: device-hours per (gpu_uuid, hour)
    streams.device-hours ──IdleHoursProcessor──► costs: per (gpu_model, hour) device_hours, idle_gpu_hours

Allocated GPU-hours: a job holds ``gpu_count`` GPUs from its ``started`` to its ``finished``/``failed``
event; each UTC hour gets ``gpu_count x overlap``. While a job runs, its hours are counted up to the
partition's event-time watermark and re-sent as it advances (the current hour as a partial): every output
is an upsert, the same key with a newer value. Partials advance with the job events of the partition; the
end event puts the final figure in place.

Clocks: every retention counts from the event-time watermark of the partition being processed as it
stood at each record (a batch of a backfill spans days; its end is not the clock of its first records).
On ``streams.device-hours``, which merges senders that keep their own pace, the clock is the slowest
device (see IdleHoursProcessor). What the app emits itself is never dead-lettered: only a GPU sample more
than its retention behind its own partition's watermark is.

Device-hours (idle = device - allocated): a whole GPU (MIG instances are skipped: the collector samples
their physical GPU too) counts as present for the time between two consecutive samples, at most
``max_gap`` (default 60 s, twice the slow sampling interval), so a device that stops reporting counts for
at most ``max_gap`` more; the time before its first sample counts nothing.

Both sides meet on ``streams.device-hours`` (keyed by gpu_model, so one model's figures share a partition):
the CostProcessor forwards each allocation bucket there, the DeviceHoursProcessor each device's hour.
Every record there carries an absolute value, and the IdleHoursProcessor keeps per (gpu_model, hour) the
latest value per sender (devices by gpu_uuid, allocations by project/provider/pricing), so a re-sent
partial replaces and never adds. CostRecord has no gpu_uuid field; device records carry it in ``source``
(``stream:device:<gpu_uuid>``) until the schema gains an optional ``gpu_uuid``, which is read first.

Replays: each state entry stores the offset of the last record applied; records at or below it are
skipped. Inputs repeated at new offsets (a re-sent repartition) are harmless too: a second ``started``
for a known job and a second end event change nothing, and every output is an absolute value. Writes
are ordered so that any prefix the changelog keeps is a state to continue from: months, days and hour
buckets (all replace-by-sender, so folding a record twice changes nothing) before the job entries whose
offsets mark a record as folded. On a resumed partition, whatever changed at or after the committed
offset is published again (outputs sent before a crash may be lost); alerts re-sent so are duplicates
with the same fingerprint.

Costs are priced with the catalogue in force when a figure is (re)computed; no price is never invented:
an unknown price gives a null cost (logged once per provider, model and pricing).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from streams.budgets import Budget, BudgetBook, alert_event, crossings, linear_forecast, utilization_percent
from streams.pricing import PriceCatalogue, Reloading, ReloadingCatalogue
from streams.processor import Input, Output, PartitionBatch, Processor, Result

if TYPE_CHECKING:
    from streams.settings import CostSettings

__all__ = [
    "DEFAULT_PRICES_FILE",
    "DEVICE_SOURCE_PREFIX",
    "CostProcessor",
    "DeviceHoursProcessor",
    "IdleHoursProcessor",
    "JobRepartitioner",
    "cost_processors",
    "cost_processors_from_settings",
    "gpu_hours_by_hour",
    "split_by_hour",
]

log = logging.getLogger(__name__)

COST_RECORD = "aima.metrics.CostRecord"
ALERT_RECORD = "aima.metrics.AlertEvent"
JOBS_BY_PROJECT = "streams.jobs-by-project"
DEVICE_HOURS = "streams.device-hours"
DEVICE_SOURCE_PREFIX = "stream:device:"
DEFAULT_PRICES_FILE = Path(__file__).with_name("prices.yaml")
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
_INDEX = "~index"
"""Per partition: running jobs, open months and the watermark so far. '~' sorts it apart from entries."""
_COST_FIELDS = (
    "project",
    "gpu_model",
    "provider",
    "pricing",
    "job_id",
    "budget",
    "gpu_hours",
    "device_hours",
    "idle_gpu_hours",
    "cost_estimated_eur",
    "job_cost_eur",
    "job_cost_per_media_minute_eur",
    "budget_eur",
    "budget_utilization_percent",
    "forecast_eur",
)


class _Current(Protocol):
    def current(self) -> Any: ...


# -- time and records ------------------------------------------------------------------------------------

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS_DELTA = timedelta(milliseconds=1)


def _ms(moment: datetime | int) -> int:
    if isinstance(moment, int):
        return moment
    aware = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return (aware - _EPOCH) // _MS_DELTA


def _dt(ms: int) -> datetime:
    return _EPOCH + timedelta(milliseconds=ms)


def _hour(ms: int) -> int:
    return ms - ms % HOUR_MS


def _hour_label(ms: int) -> str:
    return _dt(ms).strftime("%Y-%m-%dT%H:00Z")


def _iso(ms: int) -> str:
    return _dt(ms).strftime("%Y-%m-%dT%H:%M:%SZ")


def _span(ms: int) -> str:
    """A limit as people write it: ``48 h``, ``90 s``."""
    return f"{ms / HOUR_MS:g} h" if ms % HOUR_MS == 0 else f"{ms / 1000:g} s"


def _month_bounds(ms: int) -> tuple[int, int]:
    moment = _dt(ms)
    start = datetime(moment.year, moment.month, 1, tzinfo=UTC)
    end = datetime(moment.year + moment.month // 12, moment.month % 12 + 1, 1, tzinfo=UTC)
    return _ms(start), _ms(end)


def split_by_hour(start_ms: int, end_ms: int) -> list[tuple[int, int]]:
    """The UTC hours that ``[start_ms, end_ms)`` overlaps, as (hour start, overlap in ms)."""
    out = []
    hour = _hour(start_ms)
    while hour < end_ms:
        overlap = min(end_ms, hour + HOUR_MS) - max(start_ms, hour)
        if overlap > 0:
            out.append((hour, overlap))
        hour += HOUR_MS
    return out


def gpu_hours_by_hour(gpu_count: int, start_ms: int, end_ms: int) -> dict[int, float]:
    """GPU-hours per UTC hour of a job holding ``gpu_count`` GPUs over ``[start_ms, end_ms)``."""
    return {hour: gpu_count * overlap / HOUR_MS for hour, overlap in split_by_hour(start_ms, end_ms)}


def _cost_record(kind: str, start_ms: int, end_ms: int, **fields: Any) -> dict[str, Any]:
    value: dict[str, Any] = {"time": _dt(start_ms), "period_end": _dt(end_ms), "kind": kind}
    value.update(dict.fromkeys(_COST_FIELDS))
    value.update(currency="EUR", source="stream")
    value.update(fields)
    return value


class _Entries:
    """The batch's view of the state: each entry read (copied) once, written or deleted once at the end."""

    def __init__(self, state: MutableMapping[str, Any]) -> None:
        self._state = state
        self._cache: dict[str, dict[str, Any] | None] = {}
        self._dirty: set[str] = set()
        self._deleted: set[str] = set()

    def get(self, key: str) -> dict[str, Any] | None:
        if key not in self._cache:
            stored = self._state.get(key)
            self._cache[key] = None if stored is None else copy.deepcopy(dict(stored))
        return self._cache[key]

    def put(self, key: str, entry: dict[str, Any]) -> None:
        self._cache[key] = entry
        self._dirty.add(key)
        self._deleted.discard(key)

    def live_keys(self) -> list[str]:
        """Every key with an entry: stored or put in this batch, less those deleted in it."""
        found = {key for key in list(self._state) if key not in self._deleted}
        found.update(self._dirty)
        return sorted(found)

    def delete(self, key: str) -> None:
        self._cache[key] = None
        self._deleted.add(key)
        self._dirty.discard(key)

    def flush(self, order: Sequence[str] = ()) -> None:
        """Write, then delete. Keys starting with ``order[0]`` are written first, then ``order[1]`` and
        so on, then the rest: the changelog keeps a prefix of the writes, so aggregates go before the
        entries whose offsets say a record was folded into them."""

        def rank(key: str) -> tuple[int, str]:
            return next((i for i, prefix in enumerate(order) if key.startswith(prefix)), len(order)), key

        for key in sorted(self._dirty, key=rank):
            self._state[key] = self._cache[key]
        for key in self._deleted:
            if key in self._state:
                del self._state[key]


def _after(entry: Mapping[str, Any], committed: int | None) -> bool:
    """Whether ``entry`` changed while folding a record at or after the committed offset (None: nothing
    committed), so outputs made then may not have been published."""
    offset = entry.get("offset")
    return committed is None or (offset is not None and offset >= committed)


def _slot(entry: Mapping[str, Any]) -> str:
    """``gpu_model|provider|pricing`` of a job or hour bucket (empty where unknown)."""
    return f"{entry['gpu_model'] or ''}|{entry['provider'] or ''}|{entry['pricing']}"


def _hour_crossed(batch: PartitionBatch) -> bool:
    """Whether the watermark entered a new hour: the cue for a prune pass over the partition's state."""
    previous = batch.previous_watermark
    return previous is None or _hour(_ms(previous)) != _hour(_ms(batch.watermark))


def _by_watermark_hour(batch: PartitionBatch) -> Iterator[PartitionBatch]:
    """``batch`` in event-time order, cut where the watermark, advanced record by record, enters a new
    hour: each part is folded with the clock as it stood at its records, so a batch that spans days of a
    backfill keeps what a live stream would (the retention counts from each record's time, not from the
    batch's end). Only the first part is ``resumed``.

    Sorted because the topic is a repartition: it interleaves job.events partitions that were read at
    their own pace (a backlog read at once arrives one upstream partition after the other, days apart).
    The sort is stable, so one job's events, which all come from one upstream partition, keep their order;
    replays are recognised per job by offset, so folding jobs in another order changes nothing else."""
    inputs = sorted(batch.inputs, key=lambda record: record.event_time)
    if not inputs:
        yield batch
        return
    previous = batch.previous_watermark
    mark = None if previous is None else _ms(previous)
    start = 0
    for position, record in enumerate(inputs):
        t = _ms(record.event_time)
        if mark is not None and position > start and t > mark and _hour(t) != _hour(mark):
            yield _part(batch, inputs[start:position], mark, previous, first=start == 0)
            previous, start = _dt(mark), position
        mark = t if mark is None else max(mark, t)
    assert mark is not None
    yield _part(batch, inputs[start:], max(mark, _ms(batch.watermark)), previous, first=start == 0)


def _part(
    batch: PartitionBatch, inputs: list[Input], mark_ms: int, previous: datetime | None, *, first: bool
) -> PartitionBatch:
    return PartitionBatch(
        batch.topic_key,
        batch.partition,
        inputs,
        _dt(mark_ms),
        previous,
        committed_offset=batch.committed_offset,
        resumed=batch.resumed and first,
    )


# -- job events by project -------------------------------------------------------------------------------


class JobRepartitioner:
    """``job.events`` (keyed by job) to ``streams.jobs-by-project`` (keyed by project), so that all of a
    project's jobs, hours and budgets meet on one partition. Stateless: a replay re-sends, and the
    CostProcessor treats a repeated event as the no-op it is."""

    name = "costs_jobs_by_project"
    topics = ("job.events",)

    def process(self, batch: PartitionBatch, state: MutableMapping[str, Any]) -> Result:
        return Result(
            outputs=[
                Output(JOBS_BY_PROJECT, i.value["project"], i.record_name, i.value) for i in batch.inputs
            ]
        )


# -- allocated GPU-hours, cost, job cost, budgets --------------------------------------------------------


class CostProcessor:
    """Reads ``streams.jobs-by-project``. State entries (per partition):

    - ``job|<job_id>``: start, GPUs, model, provider, pricing, end, and up to when its hours are counted;
    - ``hour|<project>|<gpu_model>|<provider>|<pricing>|<hour>``: GPU-hours per job in that hour;
    - ``day|<project>|<YYYY-MM-DD>``: the cost of each of the day's hour buckets;
    - ``month|<project>|<YYYY-MM>``: cost per day, the budget rules fired and resolved;
    - ``~index``: running jobs, months still open, the watermark so far.

    Buckets older than ``retention`` before the watermark are final: they are no longer updated and their
    entries are dropped. ``min_forecast_elapsed``: see :func:`streams.budgets.linear_forecast`.
    """

    topics = (JOBS_BY_PROJECT,)

    def __init__(
        self,
        prices: PriceCatalogue | Reloading[PriceCatalogue],
        budgets: BudgetBook | Reloading[BudgetBook] | None = None,
        *,
        name: str = "costs",
        retention: timedelta = timedelta(hours=48),
        min_forecast_elapsed: timedelta = timedelta(days=1),
    ) -> None:
        self.name = name
        self._prices: _Current = prices
        self._budgets: _Current = budgets if budgets is not None else BudgetBook()
        self.retention_ms = retention // _MS_DELTA
        self.min_forecast_elapsed = min_forecast_elapsed
        self._unpriced: set[tuple[str | None, str | None, str]] = set()

    def process(self, batch: PartitionBatch, state: MutableMapping[str, Any]) -> Result:
        prices, book = self._prices.current(), self._budgets.current()
        entries = _Entries(state)
        outputs: list[Output] = []
        for part in _by_watermark_hour(batch):
            _CostRun(self, part, state, entries, prices, book, outputs).execute()
        entries.flush(order=("month|", "day|", "hour|", _INDEX, "job|"))
        return Result(outputs=outputs)

    def price(
        self, catalogue: PriceCatalogue, provider: str | None, gpu_model: str | None, pricing: str
    ) -> float | None:
        """The catalogue's price, logging once for each combination it has none for."""
        price = catalogue.eur_per_gpu_hour(provider, gpu_model, pricing)
        if price is None and (provider, gpu_model, pricing) not in self._unpriced:
            self._unpriced.add((provider, gpu_model, pricing))
            log.warning(
                "no price for GPU model %r at provider %r (%s): its cost is reported as unknown",
                gpu_model,
                provider,
                pricing,
            )
        return price


class _CostRun:
    """One CostProcessor.process call: fold the events, recount the affected hours, then roll the changed
    hours up into days, months and budgets."""

    def __init__(
        self,
        processor: CostProcessor,
        batch: PartitionBatch,
        state: MutableMapping[str, Any],
        entries: _Entries,
        prices: PriceCatalogue,
        book: BudgetBook,
        outputs: list[Output],
    ) -> None:
        self.p, self.batch, self.state, self.prices, self.book = processor, batch, state, prices, book
        self.e = entries
        self.index = self.e.get(_INDEX) or {"offset": None, "now_ms": None, "running": [], "months": []}
        self.now_ms = max(_ms(batch.watermark), self.index["now_ms"] or 0)
        self.horizon = _hour(self.now_ms - processor.retention_ms)
        self.offset = batch.last_offset if len(batch.inputs) else self.index["offset"]
        self.outputs = outputs
        self.buckets: dict[str, dict[str, Any]] = {}
        self.months: set[str] = set()
        self.started: set[str] = set()
        self.resent_months: set[str] = set()

    def execute(self) -> None:
        touched: dict[str, dict[str, Any]] = {}
        ended: list[dict[str, Any]] = []
        if self.batch.resumed:
            ended += self._resend()
        for record in self.batch.inputs:
            self._apply(record, touched, ended)
        running = set(self.index["running"])
        for job_id in sorted(running | set(touched)):
            job = touched.get(job_id) or self.e.get(f"job|{job_id}")
            if job is None:
                running.discard(job_id)
                continue
            target = job["end_ms"] if job["end_ms"] is not None else max(job["accounted_ms"], self.now_ms)
            if target != job["accounted_ms"] or job_id in touched:
                self._account(job, target, new=job_id in self.started)
            (running.discard if job["end_ms"] is not None else running.add)(job_id)
        for job in {job["job_id"]: job for job in ended}.values():
            self._job_cost(job)
        self._roll_up()
        self._months()
        self.index.update(offset=self.offset, now_ms=self.now_ms, running=sorted(running))
        self.e.put(_INDEX, self.index)
        if _hour_crossed(self.batch) or self.batch.resumed:
            self._prune()

    def _resend(self) -> list[dict[str, Any]]:
        """On a resumed partition: mark for publishing again what changed after the committed offset (its
        outputs may have been lost); returns the ended jobs among it."""
        committed = self.batch.committed_offset
        ended = []
        for key in self.e.live_keys():
            kind = key.split("|", 1)[0]
            entry = self.e.get(key) if kind in ("job", "hour", "month") else None
            if entry is None or not _after(entry, committed):
                continue
            if kind == "hour":
                self.buckets[key] = entry
            elif kind == "job" and entry["end_ms"] is not None:
                ended.append(entry)
            elif kind == "month":
                self.months.add(key)
                self.resent_months.add(key)
        return ended

    # -- events ------------------------------------------------------------------------------------------

    def _apply(self, record: Input, touched: dict[str, dict[str, Any]], ended: list[dict[str, Any]]) -> None:
        value = record.value
        key = f"job|{value['job_id']}"
        job = self.e.get(key)
        if job is not None and record.offset <= job["offset"]:
            return  # a replay
        event = value["event"]
        if event == "started":
            if job is not None:
                return  # a repeat: the job is already counted from its first start
            start = _ms(value["time"])
            job = {
                "job_id": value["job_id"],
                "project": value["project"],
                "gpu_count": max(int(value["gpu_count"]), 0),
                "gpu_model": value.get("gpu_model"),
                "provider": self.prices.provider_for(value.get("provider")),
                "pricing": value.get("pricing") or "on_demand",
                "start_ms": start,
                "accounted_ms": start,
                "end_ms": None,
                "status": "running",
                "media_minutes": None,
            }
            self.started.add(job["job_id"])
        elif event in ("finished", "failed"):
            if job is None:
                log.warning("job %s %s without a start seen here: no cost for it", value["job_id"], event)
                return
            if job["end_ms"] is not None:
                return  # a repeat of the end
            job.update(
                end_ms=max(_ms(value["time"]), job["start_ms"]),
                status=event,
                media_minutes=value.get("media_minutes"),
            )
            ended.append(job)
        else:
            return  # queued: no GPU time yet
        job["offset"] = record.offset
        self.e.put(key, job)
        touched[job["job_id"]] = job

    def _account(self, job: dict[str, Any], target_ms: int, *, new: bool) -> None:
        """Count the job's hours up to ``target_ms`` where they differ from what was counted before.

        A bucket older than the horizon that is not in the state was pruned: it is final and never made
        again (a new one would hold this job's share alone). Only a running job's own uncounted hours, from
        the hour it was counted to, may be older: :meth:`_prune` keeps their buckets."""
        low, high = sorted((job["accounted_ms"], target_ms))
        kept_from = None if new else _hour(job["accounted_ms"])
        hours = gpu_hours_by_hour(job["gpu_count"], job["start_ms"], target_ms)
        final = 0
        for hour in range(_hour(low), high, HOUR_MS):
            key = f"hour|{job['project']}|{_slot(job)}|{hour}"
            bucket = self.buckets.get(key) or self.e.get(key)
            if bucket is None and hour < self.horizon and (kept_from is None or hour < kept_from):
                final += 1
                continue
            if bucket is None:
                bucket = {field: job[field] for field in ("project", "gpu_model", "provider", "pricing")}
                bucket.update(hour_ms=hour, jobs={})
            counted = hours.get(hour, 0.0)
            if bucket["jobs"].get(job["job_id"], 0.0) == counted:
                continue
            if counted > 0:
                bucket["jobs"][job["job_id"]] = counted
            else:
                bucket["jobs"].pop(job["job_id"], None)
            bucket["offset"] = self.offset
            self.buckets[key] = bucket
            self.e.put(key, bucket)
        if final:
            log.warning(
                "%s: job %s: %d hour(s) more than the %s retention (AIMA_COST_RETENTION_S) behind the "
                "partition watermark, already final, left as they were",
                self.p.name,
                job["job_id"],
                final,
                _span(self.p.retention_ms),
            )
        job["accounted_ms"] = target_ms
        self.e.put(f"job|{job['job_id']}", job)

    # -- outputs -----------------------------------------------------------------------------------------

    def _job_cost(self, job: dict[str, Any]) -> None:
        total = job["gpu_count"] * (job["end_ms"] - job["start_ms"]) / HOUR_MS
        price = self.p.price(self.prices, job["provider"], job["gpu_model"], job["pricing"])
        cost = None if price is None else total * price
        minutes = job["media_minutes"]
        per_minute = None if cost is None or not minutes else cost / minutes
        value = _cost_record(
            "job_cost",
            job["start_ms"],
            job["end_ms"],
            project=job["project"],
            gpu_model=job["gpu_model"],
            provider=job["provider"],
            pricing=job["pricing"],
            job_id=job["job_id"],
            gpu_hours=total,
            job_cost_eur=cost,
            job_cost_per_media_minute_eur=per_minute,
        )
        self.outputs.append(Output("costs", f"job|{job['job_id']}", COST_RECORD, value))

    def _roll_up(self) -> None:
        """Publish every changed hour bucket (to costs, and its allocation to streams.device-hours) and put
        its cost into its day and month."""
        days: dict[str, dict[str, Any]] = {}
        for bucket in self.buckets.values():
            hour, project, model = bucket["hour_ms"], bucket["project"], bucket["gpu_model"]
            total = sum(bucket["jobs"].values())
            price = self.p.price(self.prices, bucket["provider"], model, bucket["pricing"])
            cost = None if price is None else total * price
            ids = dict(
                project=project, gpu_model=model, provider=bucket["provider"], pricing=bucket["pricing"]
            )
            self.outputs.append(
                Output(
                    "costs",
                    f"{project}|{_slot(bucket)}|{_hour_label(hour)}",
                    COST_RECORD,
                    _cost_record(
                        "gpu_hours", hour, hour + HOUR_MS, gpu_hours=total, cost_estimated_eur=cost, **ids
                    ),
                )
            )
            if model is not None:
                forward = _cost_record("gpu_hours", hour, hour + HOUR_MS, gpu_hours=total, **ids)
                self.outputs.append(Output(DEVICE_HOURS, model, COST_RECORD, forward))
            day_label = _dt(hour).strftime("%Y-%m-%d")
            day_key = f"day|{project}|{day_label}"
            day = (
                days.get(day_key)
                or self.e.get(day_key)
                or {"project": project, "day_ms": hour - hour % DAY_MS}
            )
            day.setdefault("costs", {})[f"{_slot(bucket)}|{hour}"] = cost
            day["offset"] = self.offset
            days[day_key] = day
        for day_key, day in days.items():
            self.e.put(day_key, day)
            month_key = f"month|{day['project']}|{_dt(day['day_ms']).strftime('%Y-%m')}"
            month = self._month(month_key, day["project"], day["day_ms"])
            known = [cost for cost in day["costs"].values() if cost is not None]
            month["days"][_dt(day["day_ms"]).strftime("%d")] = sum(known)
            month["offset"] = self.offset
            self.e.put(month_key, month)
            self.months.add(month_key)

    def _month(self, key: str, project: str, moment_ms: int) -> dict[str, Any]:
        month = self.e.get(key)
        if month is None:
            start, end = _month_bounds(moment_ms)
            month = {
                "project": project,
                "month": _dt(start).strftime("%Y-%m"),
                "start_ms": start,
                "end_ms": end,
                "days": {},
                "fired": {},
                "resolved": {},
                "emitted": None,
            }
        return month

    def _months(self) -> None:
        """Budget records and alerts for every open or changed month; a month closes when the watermark
        passes its end (final figures, its alerts resolved)."""
        open_months = set(self.index["months"]) | self.months
        for key in sorted(open_months):
            month = self.e.get(key)
            if month is None:
                open_months.discard(key)
                continue
            closed = self.now_ms >= month["end_ms"]
            self._budget(key, month, closed)
            if closed:
                open_months.discard(key)
        self.index["months"] = sorted(open_months)

    def _budget(self, key: str, month: dict[str, Any], closed: bool) -> None:
        project, label = month["project"], month["month"]
        start, end = _dt(month["start_ms"]), _dt(month["end_ms"])
        now = _dt(min(max(self.now_ms, month["start_ms"]), month["end_ms"]))
        spent = sum(month["days"].values())
        forecast = linear_forecast(spent, start, now, self.p.min_forecast_elapsed)
        budgets = self.book.for_project(project)
        signature = [
            round(spent, 6),
            now.strftime("%Y-%m-%d"),
            [[b.name, b.monthly_eur] for b in budgets],
            closed,
        ]
        resend = key in self.resent_months
        changed = resend or signature != month["emitted"]
        if changed:
            for budget in (None, *budgets):
                amount = None if budget is None else budget.monthly_eur
                value = _cost_record(
                    "budget",
                    month["start_ms"],
                    month["end_ms"],
                    project=project,
                    budget=None if budget is None else budget.name,
                    budget_eur=amount,
                    budget_utilization_percent=None if amount is None else utilization_percent(spent, amount),
                    forecast_eur=forecast,
                    cost_estimated_eur=spent,
                )
                name = "" if budget is None else budget.name
                self.outputs.append(Output("costs", f"budget|{project}|{name}|{label}", COST_RECORD, value))
            month["emitted"] = signature
        for budget in budgets:
            fired = month["fired"].setdefault(budget.name, {})
            resolved = month["resolved"].setdefault(budget.name, [])
            for rule in sorted(fired) if resend else ():
                fired_ms, severity, value = fired[rule]
                self._alert(budget, label, rule, severity, "firing", value, spent, forecast, fired_ms)
                if rule in resolved:
                    self._alert(
                        budget, label, rule, severity, "resolved", None, spent, forecast, fired_ms, end
                    )
            for crossing in crossings(budget, spent, forecast, fired):
                fired[crossing.rule] = [self.now_ms, crossing.severity, crossing.value]
                self._alert(
                    budget, label, crossing.rule, crossing.severity, "firing", crossing.value, spent, forecast
                )
                changed = True
            if closed:
                for rule in sorted(set(fired) - set(resolved)):
                    fired_ms, severity, _ = fired[rule]
                    self._alert(
                        budget, label, rule, severity, "resolved", None, spent, forecast, fired_ms, end
                    )
                    resolved.append(rule)
                    changed = True
        if changed:
            month["offset"] = self.offset
            self.e.put(key, month)

    def _alert(
        self,
        budget: Budget,
        month: str,
        rule: str,
        severity: str,
        status: str,
        value: float | None,
        spent: float,
        forecast: float | None,
        starts_ms: int | None = None,
        ends_at: datetime | None = None,
    ) -> None:
        event = alert_event(
            budget,
            month,
            rule,
            severity,
            status=status,
            starts_at=_dt(starts_ms if starts_ms is not None else self.now_ms),
            event_time=_dt(self.now_ms),
            value=value,
            spent_eur=spent,
            forecast_eur=forecast,
            ends_at=ends_at,
        )
        self.outputs.append(Output("alerts", event["fingerprint"], ALERT_RECORD, event))

    def _prune(self) -> None:
        """Drop what can no longer change: ended jobs, hours and days before the horizon, closed months;
        but nothing from the hour a running job is counted to, which it will still add to."""
        open_months = set(self.index["months"])
        running = (self.e.get(f"job|{job_id}") for job_id in self.index["running"])
        kept_from = min((_hour(job["accounted_ms"]) for job in running if job is not None), default=None)
        before = self.horizon if kept_from is None else min(self.horizon, kept_from)
        for key in self.e.live_keys():
            kind = key.split("|", 1)[0]
            entry = self.e.get(key) if kind in ("job", "hour", "day", "month") else None
            if entry is None:
                continue
            if kind == "job":
                old = entry["end_ms"] is not None and entry["end_ms"] < self.horizon
            elif kind == "hour":
                old = entry["hour_ms"] + HOUR_MS <= before
            elif kind == "day":
                old = entry["day_ms"] + DAY_MS <= before
            else:
                old = key not in open_months and entry["end_ms"] <= before
            if old:
                self.e.delete(key)


# -- device-hours and idle GPU-hours ---------------------------------------------------------------------


class DeviceHoursProcessor:
    """Reads ``gpu.samples``; per whole GPU an entry ``dev|<gpu_uuid>`` with its last sample time and its
    seconds present per hour. Publishes each changed (gpu_uuid, hour) to ``streams.device-hours``.

    The clock is the partition's watermark as it stands at each record, in offset order (not at the end
    of the batch: one batch of a backfill can span days). Hours more than ``retention`` behind it are
    complete and dropped; a sample that old (out of order on its own partition) goes to ``Result.late``."""

    topics = ("gpu.samples",)

    def __init__(
        self,
        *,
        name: str = "costs_device_hours",
        max_gap: timedelta = timedelta(seconds=60),
        retention: timedelta = timedelta(hours=48),
    ) -> None:
        if max_gap <= timedelta(0):
            raise ValueError(f"max_gap must be positive, got {max_gap}")
        if retention <= timedelta(0):
            raise ValueError(f"retention must be positive, got {retention}")
        self.name = name
        self._max_gap_ms = max_gap // _MS_DELTA
        self._retention_ms = retention // _MS_DELTA

    def process(self, batch: PartitionBatch, state: MutableMapping[str, Any]) -> Result:
        e = _Entries(state)
        retention = self._retention_ms
        mark = None if batch.previous_watermark is None else _ms(batch.previous_watermark)
        result = Result()
        changed: dict[str, tuple[dict[str, Any], set[int]]] = {}
        if batch.resumed:  # publish again what may not have been published before a crash
            for key in list(state.keys()):
                device = e.get(key)
                if device is not None and _after(device, batch.committed_offset):
                    changed[key] = (device, {int(hour) for hour in device["hours"]})
        devices: dict[str, dict[str, Any]] = {}  # each entry the batch touches, read once
        gap = self._max_gap_ms
        for row, offset, t, mig_instance, uuid, model in _gpu_samples(batch):
            if mark is None or t > mark:
                mark = t
            if mig_instance is not None:
                continue  # counted through its physical GPU
            key = f"dev|{uuid}"
            device = devices.get(key)
            if device is None:
                device = devices[key] = e.get(key) or {
                    "gpu_uuid": uuid,
                    "last_ms": None,
                    "hours": {},
                    "offset": -1,
                }
            if offset <= device["offset"]:
                continue
            horizon = _hour(mark - retention)
            if t < horizon:
                result.late.append((_input(batch, row), self._late_reason(t, mark)))
                continue
            last = device["last_ms"]
            if last is not None and t > last:
                hours = device["hours"]
                for hour, overlap in split_by_hour(max(last, horizon), min(t, last + gap)):
                    label = str(hour)
                    hours[label] = hours.get(label, 0) + overlap
                    if key not in changed:
                        changed[key] = (device, set())
                    changed[key][1].add(hour)
            if last is None or t > last:
                device["last_ms"] = t
            device["gpu_model"], device["offset"] = model, offset
        for device, hours in changed.values():
            for hour in sorted(hours):
                if str(hour) not in device["hours"]:
                    continue
                value = _cost_record(
                    "gpu_hours",
                    hour,
                    hour + HOUR_MS,
                    gpu_model=device["gpu_model"],
                    device_hours=device["hours"][str(hour)] / HOUR_MS,
                    source=DEVICE_SOURCE_PREFIX + device["gpu_uuid"],
                )
                result.outputs.append(Output(DEVICE_HOURS, device["gpu_model"], COST_RECORD, value))
        horizon = _hour((_ms(batch.watermark) if mark is None else mark) - retention)
        for key, device in devices.items():
            # Published above; no later sample reaches back past the horizon, so these are complete.
            device["hours"] = {h: ms for h, ms in device["hours"].items() if int(h) >= horizon}
            e.put(key, device)
        if _hour_crossed(batch):
            for key in list(state.keys()):
                device = e.get(key)
                if device is not None and (device["last_ms"] or 0) < horizon:
                    e.delete(key)  # not seen for the whole retention
        e.flush()
        return result

    def _late_reason(self, event_ms: int, mark_ms: int) -> str:
        return (
            f"{self.name}: sample at {_iso(event_ms)} is {_dt(mark_ms) - _dt(event_ms)} behind the partition "
            f"watermark {_iso(mark_ms)}, beyond the {_span(self._retention_ms)} retention "
            f"(AIMA_DEVICE_HOURS_RETENTION_S)"
        )


def _gpu_samples(batch: PartitionBatch) -> Iterator[tuple[int, int, int, str | None, str, str]]:
    """(row, offset, event ms, mig_instance, gpu_uuid, gpu_model) of each GpuSample of the batch, read
    from its columns when it has them."""
    columns = batch.columns
    if columns is not None:
        yield from zip(
            range(len(columns)),
            columns.offsets,
            columns.event_ms,
            columns.values("mig_instance"),
            columns.values("gpu_uuid"),
            columns.values("gpu_model"),
            strict=True,
        )
        return
    for row, record in enumerate(batch.inputs):
        value = record.value
        yield (
            row,
            record.offset,
            _ms(value["time"]),
            value.get("mig_instance"),
            value["gpu_uuid"],
            value["gpu_model"],
        )


def _input(batch: PartitionBatch, row: int) -> Input:
    columns = batch.columns
    return batch.inputs[row] if columns is None else columns.input(batch.topic_key, batch.partition, row)


class IdleHoursProcessor:
    """Reads ``streams.device-hours``; per (gpu_model, hour) an entry ``idle|<gpu_model>|<hour>`` with the
    latest device-hours per gpu_uuid and allocated GPU-hours per project/provider/pricing. Publishes to
    ``costs`` a fleet record (project null) with device_hours and idle_gpu_hours = max(device - allocated,
    0) for every changed hour with at least one device seen. gpu_hours stays null in it: the projects'
    records carry the allocation, and a fleet copy would be counted twice by anyone summing gpu_hours.

    This topic merges senders that each keep their own pace: device records come from every gpu.samples
    partition, allocations from every jobs-by-project partition, and in a backfill the few job events run
    days ahead of the many samples. So the partition's watermark, moved by the fastest sender, says nothing
    about how late another sender is. The clock is the slowest device instead (each device's records come
    in its own event-time order): an hour is dropped once every device still reporting is ``retention``
    past it. A device more than ``stale_after`` behind the newest one (a GPU taken out) stops holding the
    clock back. Nothing is dead-lettered here, the records are the app's own; one for an hour already
    dropped is left out, logged. That happens to a device this processor has not heard of yet while the
    others are more than the retention ahead: a backlog read one gpu.samples partition at a time (a
    fetch takes megabytes from one partition) gets there, which is why the default retention is long
    (45 days, a month-long backfill). State: one entry per (gpu_model, hour) with a figure per device."""

    topics = (DEVICE_HOURS,)

    def __init__(
        self,
        *,
        name: str = "costs_idle_hours",
        retention: timedelta = timedelta(days=45),
        stale_after: timedelta = timedelta(days=7),
    ) -> None:
        if retention <= timedelta(0) or stale_after <= timedelta(0):
            raise ValueError(f"retention and stale_after must be positive, got {retention}, {stale_after}")
        self.name = name
        self._retention_ms = retention // _MS_DELTA
        self._stale_ms = stale_after // _MS_DELTA

    def process(self, batch: PartitionBatch, state: MutableMapping[str, Any]) -> Result:
        e = _Entries(state)
        index = e.get(_INDEX) or {"devices": {}, "dropped_before": None}
        progress: dict[str, int] = index["devices"]
        """Newest hour seen per device: the clock."""
        dropped = index["dropped_before"]
        result = Result()
        changed: dict[str, dict[str, Any]] = {}
        if batch.resumed:  # publish again what may not have been published before a crash
            for key in e.live_keys():
                entry = e.get(key) if key.startswith("idle|") else None
                if entry is not None and _after(entry, batch.committed_offset):
                    changed[key] = entry
        left_out: list[int] = []
        for record in batch.inputs:
            value = record.value
            hour, model = _hour(_ms(value["time"])), value.get("gpu_model")
            if model is None:
                continue
            if value.get("device_hours") is not None:
                side, figure = "devices", value["device_hours"]
                sender = value.get("gpu_uuid") or str(value.get("source", "")).removeprefix(
                    DEVICE_SOURCE_PREFIX
                )
                progress[sender] = max(progress.get(sender, hour), hour)
            elif value.get("gpu_hours") is not None and value.get("project") is not None:
                side, figure = "allocated", value["gpu_hours"]
                sender = f"{value['project']}|{value.get('provider') or ''}|{value.get('pricing') or ''}"
            else:
                continue
            key = f"idle|{model}|{hour}"
            entry = e.get(key)
            if entry is not None and record.offset <= entry["offset"]:
                continue  # a replay
            if entry is None and dropped is not None and hour < dropped:
                left_out.append(hour)
                continue
            if entry is None:
                entry = {"gpu_model": model, "hour_ms": hour, "devices": {}, "allocated": {}, "offset": -1}
            entry[side][sender] = figure
            entry["offset"] = record.offset
            e.put(key, entry)
            changed[key] = entry
        if left_out:
            log.warning(
                "%s: %d record(s) for hours from %s on left out: every device had moved on by more than the "
                "%s retention (AIMA_IDLE_HOURS_RETENTION_S), so those hours' figures were dropped",
                self.name,
                len(left_out),
                _hour_label(min(left_out)),
                _span(self._retention_ms),
            )
        for entry in changed.values():
            if not entry["devices"]:
                continue  # no device seen: nothing to compare the allocation with
            device = sum(entry["devices"].values())
            allocated = sum(entry["allocated"].values())
            hour, model = entry["hour_ms"], entry["gpu_model"]
            value = _cost_record(
                "gpu_hours",
                hour,
                hour + HOUR_MS,
                gpu_model=model,
                device_hours=device,
                idle_gpu_hours=max(device - allocated, 0.0),
            )
            result.outputs.append(Output("costs", f"idle|{model}|{_hour_label(hour)}", COST_RECORD, value))
        if progress:
            newest = max(progress.values())
            index["devices"] = {u: h for u, h in progress.items() if h >= newest - self._stale_ms}
            horizon = _hour(min(index["devices"].values()) - self._retention_ms)
            if dropped is None or horizon > dropped:
                for key in e.live_keys():
                    entry = e.get(key) if key.startswith("idle|") else None
                    if entry is not None and entry["hour_ms"] < horizon:
                        e.delete(key)
                index["dropped_before"] = horizon
            e.put(_INDEX, index)
        e.flush(order=("idle|",))
        return result


# -- wiring ----------------------------------------------------------------------------------------------


def cost_processors(
    prices: PriceCatalogue | Reloading[PriceCatalogue],
    budgets: BudgetBook | Reloading[BudgetBook] | None = None,
    *,
    max_gap: timedelta = timedelta(seconds=60),
    cost_retention: timedelta = timedelta(hours=48),
    device_retention: timedelta = timedelta(hours=48),
    idle_retention: timedelta = timedelta(days=45),
    idle_stale_after: timedelta = timedelta(days=7),
) -> list[Processor]:
    """Every processor the cost figures need, in data-flow order."""
    return [
        JobRepartitioner(),
        CostProcessor(prices, budgets, retention=cost_retention),
        DeviceHoursProcessor(max_gap=max_gap, retention=device_retention),
        IdleHoursProcessor(retention=idle_retention, stale_after=idle_stale_after),
    ]


def cost_processors_from_settings(settings: CostSettings) -> list[Processor]:
    """The cost processors the worker's :class:`streams.settings.CostSettings` describe; the price and
    budget files are re-read when they change."""
    check_s = settings.cost_config_check_s
    prices = ReloadingCatalogue(settings.prices_file, check_interval_s=check_s)
    budgets = (
        Reloading(settings.budgets_file, BudgetBook.parse, check_interval_s=check_s)
        if settings.budgets_file is not None
        else None
    )
    return cost_processors(
        prices,
        budgets,
        max_gap=timedelta(seconds=settings.device_max_gap_s),
        cost_retention=timedelta(seconds=settings.cost_retention_s),
        device_retention=timedelta(seconds=settings.device_hours_retention_s),
        idle_retention=timedelta(seconds=settings.idle_hours_retention_s),
        idle_stale_after=timedelta(seconds=settings.idle_device_stale_s),
    )
