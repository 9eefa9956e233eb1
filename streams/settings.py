"""The stream worker's settings, beyond the shared :class:`bus.settings.Settings`: the app's own
(streams/runtime/settings.py) and each processor family's, from its room (costs, alerts, anomalies).
``streams.main.run`` builds them once when the worker starts and hands each processor family its own."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from streams.alerts.settings import AlertSettings
from streams.anomaly.settings import AnomalySettings
from streams.costs.settings import CostSettings
from streams.runtime.settings import StreamsSettings

__all__ = ["AlertSettings", "AnomalySettings", "CostSettings", "StreamsSettings", "WorkerSettings"]


@dataclass(frozen=True)
class WorkerSettings:
    """Everything one stream worker reads beyond :class:`bus.settings.Settings`, built once at its start."""

    app: StreamsSettings
    costs: CostSettings
    alerts: AlertSettings
    anomaly: AnomalySettings

    @classmethod
    def load(cls) -> WorkerSettings:
        """From the process's environment and env file; a bad value raises SettingsError naming it."""
        return cls(StreamsSettings(), CostSettings(), AlertSettings(), AnomalySettings())

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> WorkerSettings:
        return cls(
            StreamsSettings.from_environ(environ),
            CostSettings.from_environ(environ),
            AlertSettings.from_environ(environ),
            AnomalySettings.from_environ(environ),
        )
