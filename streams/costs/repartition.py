"""``job.events`` (keyed by job) repartitioned to ``streams.jobs-by-project`` (keyed by project)."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from streams.costs.common import JOBS_BY_PROJECT, tag_upstream
from streams.runtime.processor import Output, PartitionBatch, Result


class JobRepartitioner:
    """``job.events`` (keyed by job) to ``streams.jobs-by-project`` (keyed by project), so that all of a
    project's jobs, hours and budgets meet on one partition. Stateless: a replay re-sends, and the
    CostProcessor treats a repeated event as the no-op it is. Each event names the partition it was read
    from (:func:`streams.costs.common.tag_upstream`): the CostProcessor's clock is the slowest of them."""

    name = "costs_jobs_by_project"
    topics = ("job.events",)

    def process(self, batch: PartitionBatch, state: MutableMapping[str, Any]) -> Result:
        return Result(
            outputs=[
                Output(JOBS_BY_PROJECT, i.value["project"], i.record_name, tag_upstream(i.value, i.partition))
                for i in batch.inputs
            ]
        )
