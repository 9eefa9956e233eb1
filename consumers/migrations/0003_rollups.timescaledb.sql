-- TimescaleDB: retention policies drop whole chunks of a hypertable, which cannot keep tiers apart, so
-- rollups stay a plain table and a scheduled job deletes the expired buckets of each tier (the same
-- rule consumers/retention.py applies in plain PostgreSQL).
CREATE PROCEDURE aima_rollup_retention(job_id integer, config jsonb)
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    DELETE FROM rollups r
     USING retention_policies p
     WHERE p.relation = 'rollups' AND p.tier = r.tier AND p.keep IS NOT NULL
       AND r.bucket_end < now() - p.keep;
END $$;

SELECT add_job('aima_rollup_retention', INTERVAL '1 hour');
