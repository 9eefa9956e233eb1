"""The long-term archive (D5): before retention drops raw rows or rollups, they go to an S3-compatible
bucket as zstd-compressed Parquet, one object per (table, rollup tier, UTC day) with a manifest beside it
(layout.py); `aima-metrics archive list` and `archive restore` read them back (archiver.py).

When: retention (consumers/retention.py) archives a day in the same database transaction that then drops
its partition, deletes its rows or drops its chunks, and only once every row of that UTC day has expired
(so with the archive on, deletes go by whole days and a row may live up to a day longer). The archive is
written at the drop, not ahead of it, because rollups and late raw rows are still upserted until then: what
the archive holds is exactly what was dropped. A store that fails holds the drop back (a warning, the
metrics aima_archive_failures_total and aima_archive_held_back_drops) until a later run succeeds.

Configuration: consumers.settings.ArchiveSettings (AIMA_ARCHIVE_*); off unless a bucket is set.
"""
