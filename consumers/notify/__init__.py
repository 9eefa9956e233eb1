"""The notifier: consumes the alerts topic, routes and groups alerts, honours silences, and delivers
notifications at least once to webhook, Slack, Teams, email, SMS (and Apprise); the web UI's push feed
comes from the alert history.

Entry points:
- ``consumers.notify.notifier.run``: the process (``aima-metrics notify``);
- ``consumers.notify.silences``: create_silence, list_silences, get_silence, delete_silence (CLI, API);
- ``consumers.notify.push``: alert_stream and sse_stream (the API's ``GET /alerts/stream``).
"""
