"""Allocated GPU-hours, their estimated cost, job cost and cost per media minute, and budgets with their
forecast and threshold alerts (M22-M26), from ``streams.jobs-by-project``. The package doc
(streams/costs/__init__.py) says how hours are counted, how replays and crashes are made harmless, and
what the clock is."""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from datetime import datetime, timedelta
from typing import Any, Protocol

from bus.topics import BY_KEY
from streams.costs.budgets import (
    Budget,
    BudgetBook,
    alert_event,
    crossings,
    linear_forecast,
    utilization_percent,
)
from streams.costs.common import (
    COST_RECORD,
    DEVICE_HOURS,
    INDEX,
    JOBS_BY_PROJECT,
    MS,
    by_watermark_hour,
    cost_record,
    gpu_hours_by_hour,
    hour_crossed,
    hour_label,
    since_committed,
    slot,
    slowest_upstream,
    span,
)
from streams.costs.pricing import PriceCatalogue, Reloading
from streams.runtime.buckets import DAY_MS, HOUR_MS, bucket_end, bucket_start, from_ms, to_ms
from streams.runtime.findings import ALERT_RECORD, ALERTS_TOPIC
from streams.runtime.processor import Input, Output, PartitionBatch, Result
from streams.runtime.state import OFFSET, BatchState, copy_entry

log = logging.getLogger(__name__)


class _Current(Protocol):
    """A price catalogue or budget book, fixed or re-read when its file changes (streams/costs/pricing.py)."""

    def current(self) -> Any: ...


class CostProcessor:
    """Reads ``streams.jobs-by-project``. State entries (per partition):

    - ``job|<job_id>``: start, GPUs, model, provider, pricing, end, and up to when its hours are counted;
    - ``hour|<project>|<gpu_model>|<provider>|<pricing>|<hour>``: GPU-hours per job in that hour;
    - ``day|<project>|<YYYY-MM-DD>``: the cost of each of the day's hour buckets;
    - ``month|<project>|<YYYY-MM>``: cost per day, the budget rules fired and resolved;
    - ``~index``: running jobs, months still open, the watermark so far, the newest time per upstream
      ``job.events`` partition.

    Buckets older than ``retention`` before the clock are final: they are no longer updated and their
    entries are dropped. The clock is the slowest upstream partition (one more than
    ``upstream_stale_after`` behind the newest no longer counts; of ``upstream_partitions`` (None: the
    catalogue's count of ``job.events``; the stream app passes the broker's), each holds it from the first
    record on), never ahead of the watermark.
    ``min_forecast_elapsed``: see :func:`streams.costs.budgets.linear_forecast`.
    """

    topics = (JOBS_BY_PROJECT,)

    def __init__(
        self,
        prices: PriceCatalogue | Reloading[PriceCatalogue],
        budgets: BudgetBook | Reloading[BudgetBook] | None = None,
        *,
        name: str = "costs",
        retention: timedelta = timedelta(hours=48),
        upstream_partitions: int | None = None,
        upstream_stale_after: timedelta = timedelta(days=45),
        min_forecast_elapsed: timedelta = timedelta(days=1),
    ) -> None:
        if upstream_stale_after <= timedelta(0):
            raise ValueError(f"upstream_stale_after must be positive, got {upstream_stale_after}")
        self.name = name
        self._prices: _Current = prices
        self._budgets: _Current = budgets if budgets is not None else BudgetBook()
        self.retention_ms = retention // MS
        self.upstream_stale_ms = upstream_stale_after // MS
        self.upstream_partitions = upstream_partitions or BY_KEY["job.events"].partitions
        self.min_forecast_elapsed = min_forecast_elapsed
        self._unpriced: set[tuple[str | None, str | None, str]] = set()

    def process(self, batch: PartitionBatch, state: MutableMapping[str, Any]) -> Result:
        prices, book = self._prices.current(), self._budgets.current()
        # Buckets (replace-by-job, so folding a record twice changes nothing) before the index and the job
        # entries whose offsets mark a record as folded.
        entries = BatchState(state, order=("month|", "day|", "hour|", INDEX, "job|"), load=copy_entry)
        outputs: list[Output] = []
        for part in by_watermark_hour(batch):
            _CostRun(self, part, state, entries, prices, book, outputs).execute()
        entries.flush()
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
        entries: BatchState,
        prices: PriceCatalogue,
        book: BudgetBook,
        outputs: list[Output],
    ) -> None:
        self.p, self.batch, self.state, self.prices, self.book = processor, batch, state, prices, book
        self.e = entries
        self.index = self.e.get(INDEX) or {OFFSET: None, "now_ms": None, "running": [], "months": []}
        self.now_ms = max(to_ms(batch.watermark), self.index["now_ms"] or 0)
        # Finality waits for the slowest job.events partition: a backlog is read one partition after the
        # other, and the partition's own watermark would close hours whose jobs are still on their way.
        slowest, upstreams = slowest_upstream(
            self.index.get("upstreams"), batch, processor.upstream_partitions, processor.upstream_stale_ms
        )
        if upstreams is not None:
            self.index["upstreams"] = upstreams
        clock = self.now_ms if slowest is None else min(self.now_ms, slowest)
        self.horizon = bucket_start("hour", clock - processor.retention_ms)
        self.offset = batch.last_offset if len(batch.inputs) else self.index[OFFSET]
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
        self.e.put(INDEX, self.index)
        if hour_crossed(self.batch) or self.batch.resumed:
            self._prune()

    def _resend(self) -> list[dict[str, Any]]:
        """On a resumed partition: mark for publishing again what changed after the committed offset (its
        outputs may have been lost); returns the ended jobs among it."""
        committed = self.batch.committed_offset
        ended = []
        for key in self.e.live_keys():
            kind = key.split("|", 1)[0]
            entry = self.e.get(key) if kind in ("job", "hour", "month") else None
            if entry is None or not since_committed(entry, committed):
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
        if job is not None and record.offset <= job[OFFSET]:
            return  # a replay
        event = value["event"]
        if event == "started":
            if job is not None:
                return  # a repeat: the job is already counted from its first start
            start = to_ms(value["time"])
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
                end_ms=max(to_ms(value["time"]), job["start_ms"]),
                status=event,
                media_minutes=value.get("media_minutes"),
            )
            ended.append(job)
        else:
            return  # queued: no GPU time yet
        job[OFFSET] = record.offset
        self.e.put(key, job)
        touched[job["job_id"]] = job

    def _account(self, job: dict[str, Any], target_ms: int, *, new: bool) -> None:
        """Count the job's hours up to ``target_ms`` where they differ from what was counted before.

        A bucket older than the horizon that is not in the state was pruned: it is final and never made
        again (a new one would hold this job's share alone). Only a running job's own uncounted hours, from
        the hour it was counted to, may be older: :meth:`_prune` keeps their buckets."""
        low, high = sorted((job["accounted_ms"], target_ms))
        kept_from = None if new else bucket_start("hour", job["accounted_ms"])
        hours = gpu_hours_by_hour(job["gpu_count"], job["start_ms"], target_ms)
        final = 0
        for hour in range(bucket_start("hour", low), high, HOUR_MS):
            key = f"hour|{job['project']}|{slot(job)}|{hour}"
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
            bucket[OFFSET] = self.offset
            self.buckets[key] = bucket
            self.e.put(key, bucket)
        if final:
            log.warning(
                "%s: job %s: %d hour(s) more than the %s retention (AIMA_COST_RETENTION_S) behind the "
                "partition watermark, already final, left as they were",
                self.p.name,
                job["job_id"],
                final,
                span(self.p.retention_ms),
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
        value = cost_record(
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
                    f"{project}|{slot(bucket)}|{hour_label(hour)}",
                    COST_RECORD,
                    cost_record(
                        "gpu_hours", hour, hour + HOUR_MS, gpu_hours=total, cost_estimated_eur=cost, **ids
                    ),
                )
            )
            if model is not None:
                forward = cost_record("gpu_hours", hour, hour + HOUR_MS, gpu_hours=total, **ids)
                self.outputs.append(Output(DEVICE_HOURS, model, COST_RECORD, forward))
            day_label = from_ms(hour).strftime("%Y-%m-%d")
            day_key = f"day|{project}|{day_label}"
            day = (
                days.get(day_key)
                or self.e.get(day_key)
                or {"project": project, "day_ms": hour - hour % DAY_MS}
            )
            day.setdefault("costs", {})[f"{slot(bucket)}|{hour}"] = cost
            day[OFFSET] = self.offset
            days[day_key] = day
        for day_key, day in days.items():
            self.e.put(day_key, day)
            month_key = f"month|{day['project']}|{from_ms(day['day_ms']).strftime('%Y-%m')}"
            month = self._month(month_key, day["project"], day["day_ms"])
            known = [cost for cost in day["costs"].values() if cost is not None]
            month["days"][from_ms(day["day_ms"]).strftime("%d")] = sum(known)
            month[OFFSET] = self.offset
            self.e.put(month_key, month)
            self.months.add(month_key)

    def _month(self, key: str, project: str, moment_ms: int) -> dict[str, Any]:
        month = self.e.get(key)
        if month is None:
            start = bucket_start("month", moment_ms)
            end = bucket_end("month", start)
            month = {
                "project": project,
                "month": from_ms(start).strftime("%Y-%m"),
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
        start, end = from_ms(month["start_ms"]), from_ms(month["end_ms"])
        now = from_ms(min(max(self.now_ms, month["start_ms"]), month["end_ms"]))
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
                value = cost_record(
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
            month[OFFSET] = self.offset
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
            starts_at=from_ms(starts_ms if starts_ms is not None else self.now_ms),
            event_time=from_ms(self.now_ms),
            value=value,
            spent_eur=spent,
            forecast_eur=forecast,
            ends_at=ends_at,
        )
        self.outputs.append(Output(ALERTS_TOPIC, event["fingerprint"], ALERT_RECORD, event))

    def _prune(self) -> None:
        """Drop what can no longer change: ended jobs, hours and days before the horizon, closed months;
        but nothing from the hour a running job is counted to, which it will still add to."""
        open_months = set(self.index["months"])
        running = (self.e.get(f"job|{job_id}") for job_id in self.index["running"])
        kept_from = min(
            (bucket_start("hour", job["accounted_ms"]) for job in running if job is not None), default=None
        )
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
