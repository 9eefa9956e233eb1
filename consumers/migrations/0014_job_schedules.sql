-- Retention is at most an hour late in both modes (D2): the sink's run every AIMA_SINK_RETENTION_EVERY_S
-- (default one hour) in plain PostgreSQL; in TimescaleDB the jobs of this schema, made hourly in this
-- migration's variant.
COMMENT ON TABLE retention_policies IS
    'How long each raw table and rollup tier keeps its rows (keep NULL: forever); written by each '
    'retention run from AIMA_RETENTION_*, read by aima_ensure_partitions and aima_rollup_retention';
