-- TimescaleDB: gpu_process_samples as the other raw tables (migration 0002's variant): 1-hour chunks,
-- compressed after 2 hours (segments by the natural key without time), dropped after 24 hours by a
-- retention policy that runs hourly (as migration 0014 made the others).
SELECT create_hypertable('gpu_process_samples', by_range('time', INTERVAL '1 hour'));
ALTER TABLE gpu_process_samples SET (timescaledb.compress,
    timescaledb.compress_segmentby = 'host, gpu_uuid, mig_instance, pid',
    timescaledb.compress_orderby = 'time DESC');
SELECT add_compression_policy('gpu_process_samples', compress_after => INTERVAL '2 hours');
SELECT add_retention_policy('gpu_process_samples', drop_after => keep, schedule_interval => INTERVAL '1 hour')
  FROM retention_policies WHERE relation = 'gpu_process_samples' AND tier = '';
