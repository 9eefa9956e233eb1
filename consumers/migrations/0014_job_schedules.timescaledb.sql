-- TimescaleDB schedules a retention policy daily by default, so a raw row could live about 49 hours
-- (24 h, plus its chunk's hour, plus a day's wait). Every retention policy of this schema runs hourly
-- now: a chunk goes within an hour of its whole hour expiring. The compression policies (every 30
-- minutes for 1-hour chunks) and the aima_rollup_retention job (hourly) already run often enough.
-- alter_job also moves the next run to an hour from now, so an existing database waits no longer.
SELECT alter_job(job_id, schedule_interval => INTERVAL '1 hour')
  FROM timescaledb_information.jobs
 WHERE proc_name = 'policy_retention' AND hypertable_schema = current_schema()
   AND schedule_interval > INTERVAL '1 hour'
 ORDER BY job_id;
