"""The notifier: consumes the alerts topic, routes and groups alerts, honours silences, and delivers
notifications at least once to webhook, Slack, Teams, email, SMS (and Apprise). The web UI's live feed is
the API's ``GET /alerts/stream``, on the alert history the sink writes.

Entry point: ``consumers.notify.notifier.run``, the process (``aima-metrics notify``). Silences and the
matcher grammar it shares with the API, the CLI and the rules live in bus (bus/silences.py,
bus/matchers.py).
"""
