"""A stream worker that runs only the cost processors, configured from the environment (AIMA_* settings,
AIMA_PRICES_FILE, AIMA_BUDGETS_FILE, AIMA_STREAMS_APP_ID): ``python -m tests.faust_apps.costs_app``."""

import sys

from bus.settings import Settings
from streams.costs import cost_processors_from_settings
from streams.main import run
from streams.settings import WorkerSettings

if __name__ == "__main__":
    config = WorkerSettings.load()
    sys.exit(run(Settings(), processors=cost_processors_from_settings(config.costs), config=config))
