"""The stream app: the runtime every processor runs on (streams/runtime/) and one package per processor
family (rollups, alerts, anomaly, costs), which import the runtime and never each other; main.py wires the
families into one worker, settings.py composes their settings."""
