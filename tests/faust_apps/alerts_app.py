"""A stream worker running only the alert and anomaly processors (tests/integration/test_streams_alerts.py):
``python -m tests.faust_apps.alerts_app``, configured like streams/main.py through ``AIMA_*`` variables."""

from __future__ import annotations

import sys

from bus.settings import Settings
from streams.alerts.processor import alert_processors_from_settings
from streams.anomaly.processor import AnomalyProcessor
from streams.main import run
from streams.settings import WorkerSettings


def main() -> None:
    config = WorkerSettings.load()
    processors = [*alert_processors_from_settings(config.alerts), AnomalyProcessor(config.anomaly.config())]
    sys.exit(run(Settings(), processors=processors, config=config))


if __name__ == "__main__":
    main()
