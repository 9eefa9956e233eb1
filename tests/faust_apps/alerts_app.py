"""A stream worker running only the alert and anomaly processors (tests/integration/test_streams_alerts.py):
``python -m tests.faust_apps.alerts_app``, configured like streams/main.py through ``AIMA_*`` variables."""

from __future__ import annotations

import sys

from bus.settings import Settings
from streams.alerts import alert_processors_from_environ
from streams.anomaly import AnomalyConfig, AnomalyProcessor
from streams.main import run


def main() -> None:
    processors = [*alert_processors_from_environ(), AnomalyProcessor(AnomalyConfig.from_environ())]
    sys.exit(run(Settings(), processors=processors))


if __name__ == "__main__":
    main()
