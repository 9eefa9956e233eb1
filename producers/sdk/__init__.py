"""The job SDK: what an AIMA job imports to report lifecycle events and timing summaries (M6, M9-M15).

from producers.sdk import JobReporter
"""

from producers.sdk.job import JobReporter
from producers.sdk.pseudonym import Pseudonymiser, PseudonymKeyMissing
from producers.sdk.queue import QueueSampler

__all__ = ["JobReporter", "PseudonymKeyMissing", "Pseudonymiser", "QueueSampler"]
