-- TimescaleDB: every raw table becomes a hypertable on its time column (1-hour chunks, so retention
-- drops data within about an hour of its expiry), compressed into the columnstore after 2 hours and
-- dropped by a retention policy after 24 hours (D2). Segment-by columns are the natural key without
-- time, so the unique indexes stay cheap to check on compressed chunks.

SELECT create_hypertable('gpu_samples', by_range('time', INTERVAL '1 hour'));
SELECT create_hypertable('system_samples', by_range('time', INTERVAL '1 hour'));
SELECT create_hypertable('system_disk_samples', by_range('time', INTERVAL '1 hour'));
SELECT create_hypertable('system_network_samples', by_range('time', INTERVAL '1 hour'));
SELECT create_hypertable('job_timings', by_range('time', INTERVAL '1 hour'));
SELECT create_hypertable('job_events', by_range('time', INTERVAL '1 hour'));
SELECT create_hypertable('queue_samples', by_range('time', INTERVAL '1 hour'));
SELECT create_hypertable('pod_status', by_range('time', INTERVAL '1 hour'));

ALTER TABLE gpu_samples SET (timescaledb.compress,
    timescaledb.compress_segmentby = 'host, gpu_uuid, mig_instance, interval_group',
    timescaledb.compress_orderby = 'time DESC');
ALTER TABLE system_samples SET (timescaledb.compress,
    timescaledb.compress_segmentby = 'host', timescaledb.compress_orderby = 'time DESC');
ALTER TABLE system_disk_samples SET (timescaledb.compress,
    timescaledb.compress_segmentby = 'host, mountpoint', timescaledb.compress_orderby = 'time DESC');
ALTER TABLE system_network_samples SET (timescaledb.compress,
    timescaledb.compress_segmentby = 'host, interface', timescaledb.compress_orderby = 'time DESC');
ALTER TABLE job_timings SET (timescaledb.compress,
    timescaledb.compress_segmentby = 'job_id, kind, kernel, direction, host',
    timescaledb.compress_orderby = 'time DESC');
ALTER TABLE job_events SET (timescaledb.compress,
    timescaledb.compress_segmentby = 'job_id, event', timescaledb.compress_orderby = 'time DESC');
ALTER TABLE queue_samples SET (timescaledb.compress,
    timescaledb.compress_segmentby = 'queue', timescaledb.compress_orderby = 'time DESC');
ALTER TABLE pod_status SET (timescaledb.compress,
    timescaledb.compress_segmentby = 'namespace, pod', timescaledb.compress_orderby = 'time DESC');

SELECT add_compression_policy(relation::regclass, compress_after => INTERVAL '2 hours')
  FROM retention_policies WHERE tier = '' ORDER BY relation;
SELECT add_retention_policy(relation::regclass, drop_after => keep)
  FROM retention_policies WHERE tier = '' AND keep IS NOT NULL ORDER BY relation;

-- Chunks are created as rows arrive; the sink and retention call this in both modes.
CREATE FUNCTION aima_ensure_partitions(
    p_now timestamptz DEFAULT now(), p_days_back integer DEFAULT 2, p_days_ahead integer DEFAULT 7
) RETURNS integer LANGUAGE sql AS $$ SELECT 0 $$;
