-- Where each job ran (issue 17, item 2): the host, GPU model, provider, pricing and GPU count its job events
-- name, with when it started and ended, one row per job and kept as long as the cost figures
-- (AIMA_RETENTION_COSTS, by time: the job's first event stored). Job events are raw rows kept 24 h; the
-- recommendations read this table to know which host a job ran on and what a host is (its latest job's
-- provider and pricing) over a window as long as the rollups they read.
-- Kept by a trigger on job_events, so every writer of job events (the sink, in any of its paths, a restore)
-- keeps it; a re-sent event is a row the sink does not insert (ON CONFLICT DO NOTHING), so it changes nothing.
-- Events of one job may come in any order within a batch: the earliest start and the earliest end win.
CREATE TABLE job_placements (
    job_id     text        PRIMARY KEY,
    time       timestamptz NOT NULL,
    project    text        NOT NULL,
    service    text,
    model      text,
    host       text        NOT NULL,
    gpu_count  integer     NOT NULL,
    gpu_model  text,
    provider   text,
    pricing    text,
    started    timestamptz,
    ended      timestamptz,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX job_placements_host ON job_placements (host, started);
CREATE INDEX job_placements_expiry ON job_placements (time);
COMMENT ON TABLE job_placements IS
    'Per job: the host, GPU model, provider, pricing and GPU count of its job events, its start and end; '
    'kept by a trigger on job_events, as long as the cost figures';

CREATE FUNCTION aima_job_placement() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    IF NEW.host IS NULL OR NEW.event NOT IN ('started', 'finished', 'failed') THEN
        RETURN NULL;
    END IF;
    INSERT INTO job_placements AS p (job_id, time, project, service, model, host, gpu_count, gpu_model,
                                     provider, pricing, started, ended)
    VALUES (NEW.job_id, NEW.time, NEW.project, NEW.service, NEW.model, NEW.host, NEW.gpu_count,
            NEW.gpu_model, NEW.provider, NEW.pricing,
            CASE WHEN NEW.event = 'started' THEN NEW.time END,
            CASE WHEN NEW.event <> 'started' THEN NEW.time END)
    ON CONFLICT (job_id) DO UPDATE SET
        time = least(p.time, EXCLUDED.time),
        started = least(p.started, EXCLUDED.started),
        ended = least(p.ended, EXCLUDED.ended),
        -- What the started event names wins over an end event's copy of it.
        project = CASE WHEN NEW.event = 'started' THEN EXCLUDED.project ELSE p.project END,
        service = CASE WHEN NEW.event = 'started' THEN EXCLUDED.service ELSE p.service END,
        model = CASE WHEN NEW.event = 'started' THEN EXCLUDED.model ELSE p.model END,
        host = CASE WHEN NEW.event = 'started' THEN EXCLUDED.host ELSE p.host END,
        gpu_count = CASE WHEN NEW.event = 'started' THEN EXCLUDED.gpu_count ELSE p.gpu_count END,
        gpu_model = CASE WHEN NEW.event = 'started' THEN EXCLUDED.gpu_model ELSE p.gpu_model END,
        provider = CASE WHEN NEW.event = 'started' THEN EXCLUDED.provider ELSE p.provider END,
        pricing = CASE WHEN NEW.event = 'started' THEN EXCLUDED.pricing ELSE p.pricing END,
        updated_at = now();
    RETURN NULL;
END
$$;

-- On a partitioned table (plain PostgreSQL) the trigger is cloned onto every partition, present and future;
-- on a hypertable (TimescaleDB) onto every chunk.
CREATE TRIGGER job_events_placement AFTER INSERT ON job_events
    FOR EACH ROW EXECUTE FUNCTION aima_job_placement();

-- The jobs of the job events stored before this migration (the last day's).
INSERT INTO job_placements (job_id, time, project, service, model, host, gpu_count, gpu_model, provider,
                            pricing, started, ended)
SELECT DISTINCT ON (job_id) job_id, first_seen, project, service, model, host, gpu_count, gpu_model,
       provider, pricing, started, ended
  FROM (SELECT e.*, min(time) OVER w AS first_seen,
               min(time) FILTER (WHERE event = 'started') OVER w AS started,
               min(time) FILTER (WHERE event IN ('finished', 'failed')) OVER w AS ended
          FROM job_events e
         WHERE host IS NOT NULL AND event IN ('started', 'finished', 'failed')
        WINDOW w AS (PARTITION BY job_id)) j
 ORDER BY job_id, (event = 'started') DESC, time;
