"""The Faust stream processors: rollups, costs, alerts and anomalies."""
