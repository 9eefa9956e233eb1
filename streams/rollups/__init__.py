"""Rollups (S1): the rollup processor (processor.py) folds samples into per-series aggregates
(aggregate.py) for every tier; the merge (merge.py) combines the partial rollups of series whose samples
arrive on several partitions."""
