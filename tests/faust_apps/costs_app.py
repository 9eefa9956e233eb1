"""A stream worker that runs only the cost processors, configured from the environment (AIMA_* settings,
AIMA_PRICES_FILE, AIMA_BUDGETS_FILE, AIMA_STREAMS_APP_ID): ``python -m tests.faust_apps.costs_app``.
Like the stream app's default processors, the cost clock follows the partitions ``job.events`` has."""

import sys

from bus.kafka import partition_count
from bus.settings import Settings
from streams.costs import cost_processors_from_settings
from streams.main import run
from streams.settings import WorkerSettings

if __name__ == "__main__":
    config, settings = WorkerSettings.load(), Settings()
    # None before the topic exists (run() makes it with the catalogue's count): the catalogue's count.
    upstream = partition_count(settings, "job.events")
    sys.exit(
        run(
            settings,
            processors=cost_processors_from_settings(config.costs, upstream_partitions=upstream),
            config=config,
        )
    )
