"""Alerts (S3, S4): the rule language and its files (rules.py, the shipped default_rules.yaml) and the alert
processor that evaluates them in event time (processor.py); its settings in settings.py."""
