"""The cost processors' settings (price catalogue, budgets, how long their figures stay open)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from bus.settings import AimaSettings, described
from streams.costs.pricing import DEFAULT_PRICES_FILE

__all__ = ["CostSettings"]


class CostSettings(AimaSettings):
    """The cost processors: price catalogue, budgets and how long their figures stay open."""

    prices_file: Path = described(
        DEFAULT_PRICES_FILE,
        "price catalogue, EUR per GPU-hour (re-read when it changes)",
        shown="streams/costs/prices.yaml",
    )
    budgets_file: Path | None = Field(
        None, description="project budgets (re-read when it changes); unset: no budgets"
    )
    cost_config_check_s: float = Field(
        30.0, gt=0, description="how often the two files are checked for changes"
    )
    device_max_gap_s: float = Field(
        60.0, gt=0, description="longest gap between two samples of a GPU that still counts as present"
    )
    cost_retention_s: float = Field(
        48 * 3600.0,
        gt=0,
        description="how far behind the cost clock (its partition's event-time watermark as it stood at "
        "each record, held back by the slowest job.events partition) a job's hours stay open",
    )
    cost_upstream_stale_s: float = Field(
        45 * 24 * 3600.0,
        gt=0,
        description="a job.events partition that far behind the newest stops holding back the cost clock "
        "(the slowest job.events partition, which decides when a job's hours are final; a backlog or "
        "backfill read one partition after the other can put them that far apart)",
    )
    device_hours_retention_s: float = Field(
        48 * 3600.0,
        gt=0,
        description="how far behind the watermark a GPU's coverage stays open; only a GPU sample that far "
        "behind on its own partition is dead-lettered (`LateSample`, the reason names the processor and the "
        "variable)",
    )
    device_hours_emit_interval_s: float = Field(
        60.0,
        ge=0,
        description="event time between two updates of one GPU's device hours and energy (an hour the GPU "
        "has left goes out at once; 0: every batch's changes)",
    )
    idle_hours_retention_s: float = Field(
        45 * 24 * 3600.0, gt=0, description="how far behind the watermark an idle hour stays open"
    )
    idle_device_stale_s: float = Field(
        7 * 24 * 3600.0,
        gt=0,
        description="a GPU that far behind the newest stops holding back the idle-hours clock (the "
        "slowest GPU)",
    )
