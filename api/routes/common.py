"""Query parameters several routes share, declared once so the OpenAPI document says the same everywhere."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import Query

__all__ = ["MAX_LIMIT", "EndTime", "Labels", "Limit", "StartTime"]

MAX_LIMIT = 100_000

StartTime = Annotated[
    datetime | None,
    Query(description="ISO 8601; without an offset it is UTC. Default: end_time minus the default range"),
]
EndTime = Annotated[datetime | None, Query(description="ISO 8601, exclusive; without an offset it is UTC")]
Labels = Annotated[
    str | None,
    Query(
        max_length=4096,
        description="label filters `k=v,k2=v2`; an empty value (`k=`) selects series without the label",
    ),
]
Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT, description=f"at most this many rows (1..{MAX_LIMIT})")]
