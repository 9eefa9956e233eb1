"""The cost processors (S2, M22-M26): GPU-hours, estimated cost, job cost, cost per media minute, budget
utilisation with its forecast and threshold alerts, idle GPU-hours (U: which GPUs sit idle), and the
energy the GPUs drew with its cost (issue 17, item 3).

One module per processor, in data-flow order: ``repartition.py`` (JobRepartitioner), ``jobs.py``
(CostProcessor), ``device_hours.py`` (DeviceHoursProcessor), ``idle_hours.py`` (IdleHoursProcessor);
what they share is ``common.py``, how energy is counted ``energy.py``; prices (``pricing.py``, the shipped
``prices.yaml``) and budgets (``budgets.py``) are what the cost processor reads; ``settings.py`` holds the
variables; the wiring is here. Times: see ``common.py`` (a naive datetime is refused).

The data flow::

    job.events ──JobRepartitioner──► streams.jobs-by-project (key: project)
        ──CostProcessor──► costs:  gpu_hours per (project, gpu_model, provider, pricing, hour), job_cost per
                                   finished job, budget per (project, budget, month)
                           alerts: budget_<threshold> / budget_forecast_overrun
                           streams.device-hours: allocated GPU-hours per (project, gpu_model, provider,
                                   pricing, hour), key gpu_model
    gpu.samples ──DeviceHoursProcessor──► streams.device-hours: device-hours and energy_kwh per
                                   (gpu_uuid, hour)
    streams.device-hours ──IdleHoursProcessor──► costs: per (gpu_model, hour) device_hours, idle_gpu_hours,
                                   energy_kwh, energy_cost_eur (the catalogue's energy_eur_per_kwh)
                           energy: GpuEnergy per (gpu_uuid, hour), device_hours, energy_kwh and its cost

Allocated GPU-hours: a job holds ``gpu_count`` GPUs from its ``started`` to its ``finished``/``failed``
event; each UTC hour gets ``gpu_count x overlap``. While a job runs, its hours are counted up to the
partition's event-time watermark and re-sent as it advances (the current hour as a partial): every output
is an upsert, the same key with a newer value. Partials advance with the job events of the partition; the
end event puts the final figure in place.

Clocks: every retention counts from the event-time watermark of the partition being processed as it
stood at each record (a batch of a backfill spans days; its end is not the clock of its first records).
The two topics that merge senders keeping their own pace wait for the slowest: on
``streams.jobs-by-project`` the slowest ``job.events`` partition (each event names it, see
JobRepartitioner), on ``streams.device-hours`` the slowest device (see IdleHoursProcessor). What the
app emits itself is never dead-lettered: only a GPU sample more than its retention behind its own
partition's watermark is.

Device-hours (idle = device - allocated): a whole GPU (MIG instances are skipped: the collector samples
their physical GPU too) counts as present for the time between two consecutive samples, at most
``max_gap`` (default 60 s, twice the slow sampling interval), so a device that stops reporting counts for
at most ``max_gap`` more; the time before its first sample counts nothing.

Energy (streams/costs/energy.py): per GPU, between consecutive readings (samples with an energy counter
or a power draw), the counter's increase, or power x time where the counter reset or is missing, over the
same coverage as the device-hours; a GPU with neither has no energy figure, never 0. The fleet record of a
model's hour carries the sum and its cost, each GPU's hour its own GpuEnergy record (topic ``energy``,
table ``gpu_energy``). A project's share is the view ``energy_costs`` (migrations 0016, 0020, 0021), made
in the database, which alone has both each GPU's hour and the GPUs a job held (``job_placements``, from the
job events' optional ``gpu_uuids``): a job that names its GPUs gets each one's measured energy by the
share of the hour it held it; the hours of jobs that do not (their events say how many GPUs of which model,
not which) get the model's remaining energy per GPU-hour, an average, since a busy GPU draws more than an
idle one.

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

from datetime import timedelta
from typing import TYPE_CHECKING

from streams.costs.budgets import BudgetBook
from streams.costs.common import DEVICE_SOURCE_PREFIX, gpu_hours_by_hour, split_by_hour
from streams.costs.device_hours import DeviceHoursProcessor
from streams.costs.idle_hours import IdleHoursProcessor
from streams.costs.jobs import CostProcessor
from streams.costs.pricing import DEFAULT_PRICES_FILE, PriceCatalogue, Reloading, ReloadingCatalogue
from streams.costs.repartition import JobRepartitioner
from streams.runtime.processor import Processor

if TYPE_CHECKING:
    from streams.costs.settings import CostSettings

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


def cost_processors(
    prices: PriceCatalogue | Reloading[PriceCatalogue],
    budgets: BudgetBook | Reloading[BudgetBook] | None = None,
    *,
    max_gap: timedelta = timedelta(seconds=60),
    cost_retention: timedelta = timedelta(hours=48),
    cost_upstream_stale_after: timedelta = timedelta(days=45),
    device_retention: timedelta = timedelta(hours=48),
    device_emit_interval: timedelta = timedelta(0),
    idle_retention: timedelta = timedelta(days=45),
    idle_stale_after: timedelta = timedelta(days=7),
    upstream_partitions: int | None = None,
) -> list[Processor]:
    """Every processor the cost figures need, in data-flow order. ``upstream_partitions``: how many
    partitions ``job.events`` has on the broker (None: the catalogue's count); the cost clock waits for
    each of them, so a count above the real one would hold it for ``cost_upstream_stale_after``."""
    return [
        JobRepartitioner(),
        CostProcessor(
            prices,
            budgets,
            retention=cost_retention,
            upstream_stale_after=cost_upstream_stale_after,
            upstream_partitions=upstream_partitions,
        ),
        DeviceHoursProcessor(max_gap=max_gap, retention=device_retention, emit_interval=device_emit_interval),
        IdleHoursProcessor(retention=idle_retention, stale_after=idle_stale_after, prices=prices),
    ]


def cost_processors_from_settings(
    settings: CostSettings, *, upstream_partitions: int | None = None
) -> list[Processor]:
    """The cost processors the worker's :class:`streams.settings.CostSettings` describe; the price and
    budget files are re-read when they change. ``upstream_partitions``: see :func:`cost_processors`."""
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
        cost_upstream_stale_after=timedelta(seconds=settings.cost_upstream_stale_s),
        device_retention=timedelta(seconds=settings.device_hours_retention_s),
        device_emit_interval=timedelta(seconds=settings.device_hours_emit_interval_s),
        idle_retention=timedelta(seconds=settings.idle_hours_retention_s),
        idle_stale_after=timedelta(seconds=settings.idle_device_stale_s),
        upstream_partitions=upstream_partitions,
    )
