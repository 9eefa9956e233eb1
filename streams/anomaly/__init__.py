"""Anomalies: the detector that scores every watched gauge against its own baseline (processor.py); its
settings in settings.py."""
