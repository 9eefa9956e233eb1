"""The shapes of the API's answers and request bodies, for the OpenAPI document. Routes build large answers
as plain dicts (a 100,000-sample answer is not validated field by field); these models describe them."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

__all__ = [
    "AggregatedResponse",
    "AlertsResponse",
    "AuditResponse",
    "BudgetsResponse",
    "CatalogueResponse",
    "CostsResponse",
    "GpuEnergyResponse",
    "RawResponse",
    "SilenceIn",
    "SilenceOut",
    "SilencesResponse",
]


class MetricInfo(BaseModel):
    name: str
    unit: str
    type: str
    interval: str
    labels: list[str]
    description: str
    requirement: str
    source: str
    readable: bool = Field(description="whether the calling token may read this metric")


class CatalogueResponse(BaseModel):
    metrics: list[MetricInfo]


class Sample(BaseModel):
    time: datetime
    value: float | None
    labels: dict[str, str]


class RawResponse(BaseModel):
    metric: str
    unit: str
    start_time: datetime
    end_time: datetime
    labels: dict[str, str]
    limit: int
    truncated: bool = Field(description="more samples matched than `limit` let through")
    samples: list[Sample]


class Bucket(BaseModel):
    bucket_start: datetime
    bucket_end: datetime
    labels: dict[str, str]
    min: float | None
    max: float | None
    avg: float | None
    p95: float | None
    count: int
    final: bool | None = Field(None, description="rollups only: whether the bucket is complete")


class AggregatedResponse(BaseModel):
    metric: str
    unit: str
    interval: str
    source: str = Field(
        description="`rollups` (hour, day, month, year tiers) or `raw` (computed from samples)"
    )
    start_time: datetime
    end_time: datetime
    labels: dict[str, str]
    limit: int
    truncated: bool
    buckets: list[Bucket]


class CostsResponse(BaseModel):
    group_by: str
    period: str
    source: str = Field(description="`gpu_hours` (hourly estimates) or `job_cost` (per finished job)")
    start_time: datetime
    end_time: datetime
    truncated: bool
    rows: list[dict[str, Any]]


class GpuEnergyResponse(BaseModel):
    period: str
    start_time: datetime
    end_time: datetime
    truncated: bool
    rows: list[dict[str, Any]]


class BudgetsResponse(BaseModel):
    truncated: bool
    budgets: list[dict[str, Any]]


class RecommendationsResponse(BaseModel):
    start_time: datetime
    end_time: datetime
    idle_min_share: float
    thresholds: dict[str, float] = Field(description="the thresholds applied (settings or the request's)")
    idle_gpus: list[dict[str, Any]] = Field(description="idle GPU capacity with idle_cost_eur_per_day")
    idle_by_gpu: list[dict[str, Any]] | None = Field(
        description="each GPU idle for the least hours, allocated or not, with idle_cost_eur_per_day; null "
        "without the scopes of gpu_utilization_percent and gpu_memory_utilization_percent"
    )
    idle_by_gpu_truncated: bool
    memory_headroom: list[dict[str, Any]] = Field(description="jobs whose batch could grow by batch_factor")
    memory_headroom_truncated: bool
    slowed_jobs: list[dict[str, Any]] | None = Field(
        description="jobs whose frames/s dropped against their own fastest hour, with the GPU metrics that "
        "moved most (moved_most) and likely_cause; null without the GPU metric scopes"
    )
    slowed_jobs_truncated: bool
    job_model: str | None = Field(description="the job profile of cheapest; null: every job")
    throughput: list[dict[str, Any]] = Field(description="measured frames per GPU second per GPU model")
    cheapest: list[dict[str, Any]] = Field(description="catalogue offers by eur_per_million_frames")
    cheapest_problem: str | None = Field(description="why cheapest is empty when the catalogue is unusable")
    budgets: list[dict[str, Any]] = Field(description="period-end forecast against budget per project budget")


class AlertsResponse(BaseModel):
    state: str
    truncated: bool
    alerts: list[dict[str, Any]]


class MatcherIn(BaseModel):
    name: str = Field(max_length=200)
    op: str = Field("=", max_length=2, description="=, !=, =~ or !~ (regular expressions are anchored)")
    value: str = Field(max_length=1024)


class SilenceIn(BaseModel):
    matchers: list[MatcherIn | str] = Field(
        min_length=1,
        max_length=50,
        description='{"name", "op", "value"} objects or texts like host=~"gpu-.*"',
    )
    starts_at: datetime | None = Field(None, description="default now")
    ends_at: datetime | None = Field(None, description="give ends_at or duration")
    duration: str | None = Field(None, max_length=20, description="e.g. 2h, 1d")
    comment: str = Field("", max_length=2000)


class SilenceOut(BaseModel):
    id: str
    matchers: list[dict[str, str]]
    starts_at: datetime
    ends_at: datetime
    created_by: str
    comment: str
    created_at: datetime
    state: str


class SilencesResponse(BaseModel):
    truncated: bool
    silences: list[SilenceOut]


class AuditEntry(BaseModel):
    id: int
    time: datetime
    action: str = Field(description="read, silence.create, silence.expire, token.create or token.revoke")
    outcome: str | None = Field(description="allowed, unauthenticated, denied, invalid or failed")
    reason: str | None = Field(description="why it was refused (e.g. revoked_token, insufficient_scope)")
    actor: str | None = Field(description="api:<token name> or cli:<name>")
    token_id: str | None
    role: str | None
    method: str | None = Field(description="null for a command's row")
    endpoint: str = Field(description="the request's path, or the command")
    metric: str | None
    target: str | None = Field(description="the token or silence changed")
    parameters: dict[str, Any]
    status: int | None = Field(description="the HTTP status; null for a command's row")
    row_count: int | None
    duration_ms: float | None
    client: str | None


class AuditResponse(BaseModel):
    limit: int
    next_cursor: str | None = Field(description="pass as `cursor` for the next (older) page; null: no more")
    entries: list[AuditEntry]
