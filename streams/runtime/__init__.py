"""The stream runtime: what every processor family runs on. The Faust app and its dispatcher (app.py),
the only module that touches Faust's and aiokafka's private names (transport.py), the processor contract
(processor.py), columnar inputs (columns.py), the framework-owned batch state (state.py), calendar buckets
(buckets.py), series extraction (series.py), the app's settings (settings.py). It imports no processor
family; the families (streams/rollups, alerts, anomaly, costs) import it and never each other."""
