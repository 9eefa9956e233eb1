-- A project's energy measured per GPU (issue 17, item 3). Job events may name the GPUs a job holds
-- (JobEvent gpu_uuids: the job SDK from NVIDIA_VISIBLE_DEVICES / CUDA_VISIBLE_DEVICES or its caller, the
-- simulator from its schedule); null in every event stored before.
ALTER TABLE job_events ADD COLUMN gpu_uuids text[];

-- The GPUs each job held and when: one row per job whose started event names its GPUs (and, so that an
-- end event stored before its start is not lost, per job with an end event), kept as long as the cost
-- figures (AIMA_RETENTION_COSTS, by time: the job's first event stored). Kept by a trigger on job_events,
-- like job_placements (0019): every writer of job events keeps it, and a re-sent event is a row the sink
-- does not insert, so it changes nothing. The earliest start and the earliest end win; what the started
-- event names wins over an end event's copy of it.
CREATE TABLE job_gpus (
    job_id     text        PRIMARY KEY,
    time       timestamptz NOT NULL,
    project    text        NOT NULL,
    gpu_model  text,
    provider   text,
    pricing    text,
    gpu_uuids  text[],
    started    timestamptz,
    ended      timestamptz,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX job_gpus_started ON job_gpus (started) WHERE gpu_uuids IS NOT NULL;
CREATE INDEX job_gpus_expiry ON job_gpus (time);
COMMENT ON TABLE job_gpus IS
    'Per job whose events name its GPUs: their UUIDs, its project, GPU model, provider, pricing, start and '
    'end; kept by a trigger on job_events, as long as the cost figures';

CREATE FUNCTION aima_job_gpus() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    IF NEW.event NOT IN ('started', 'finished', 'failed') OR (NEW.event = 'started' AND NEW.gpu_uuids IS NULL)
    THEN
        RETURN NULL;
    END IF;
    INSERT INTO job_gpus AS g (job_id, time, project, gpu_model, provider, pricing, gpu_uuids, started, ended)
    VALUES (NEW.job_id, NEW.time, NEW.project, NEW.gpu_model, NEW.provider, NEW.pricing, NEW.gpu_uuids,
            CASE WHEN NEW.event = 'started' THEN NEW.time END,
            CASE WHEN NEW.event <> 'started' THEN NEW.time END)
    ON CONFLICT (job_id) DO UPDATE SET
        time = least(g.time, EXCLUDED.time),
        started = least(g.started, EXCLUDED.started),
        ended = least(g.ended, EXCLUDED.ended),
        project = CASE WHEN NEW.event = 'started' THEN EXCLUDED.project ELSE g.project END,
        gpu_model = CASE WHEN NEW.event = 'started' THEN EXCLUDED.gpu_model ELSE g.gpu_model END,
        provider = CASE WHEN NEW.event = 'started' THEN EXCLUDED.provider ELSE g.provider END,
        pricing = CASE WHEN NEW.event = 'started' THEN EXCLUDED.pricing ELSE g.pricing END,
        gpu_uuids = CASE WHEN NEW.event = 'started' THEN EXCLUDED.gpu_uuids
                         ELSE coalesce(g.gpu_uuids, EXCLUDED.gpu_uuids) END,
        updated_at = now();
    RETURN NULL;
END
$$;

CREATE TRIGGER job_events_gpus AFTER INSERT ON job_events
    FOR EACH ROW EXECUTE FUNCTION aima_job_gpus();

-- Each project's share of the energy, per project, GPU model, provider, pricing and hour: the one home of
-- the rule (api/sql.py and the dashboards read this view).
-- basis 'measured': jobs whose events name their GPUs get, of each such GPU's measured energy in the hour
--   (gpu_energy, migration 0018), the share they held it: time held / the hour (over the time all jobs
--   held it, where jobs shared a GPU for more than the hour). A busy GPU draws more than an idle one, so
--   this is the meter's reading, not an average.
-- basis 'gpu_hours': the GPU-hours no event names a GPU for (jobs without gpu_uuids, or GPUs whose energy
--   is unknown) keep the average rule of 0016, because nothing says which GPU they drew: the energy the
--   measured shares leave of the model's hour, per GPU-hour, times the project's remaining GPU-hours; per
--   GPU-hour: per device-hour not held by a measured job, or per GPU-hour allocated where jobs held more.
-- basis 'idle', project NULL: what is left (GPUs no project held, the unheld part of a measured GPU's
--   hour), so an hour's rows add up to the fleet's energy. With no job naming its GPUs this is 0016's view.
-- A job still running counts up to now. The time of the fleet row is the output's (so a filter on time
-- reaches the costs_time and gpu_energy_time indexes in every branch).
CREATE OR REPLACE VIEW energy_costs AS
WITH held AS NOT MATERIALIZED (
    SELECT g.time, g.period_end, g.gpu_uuid, g.gpu_model, g.energy_kwh, g.energy_cost_eur, g.currency,
           j.project, coalesce(j.provider, '') AS provider, coalesce(j.pricing, '') AS pricing,
           extract(epoch FROM least(coalesce(j.ended, now()), g.period_end) - greatest(j.started, g.time))
               ::double precision / 3600 AS hours
      FROM gpu_energy g
      JOIN job_gpus j ON g.gpu_uuid = ANY (j.gpu_uuids) AND j.started < g.period_end
                     AND coalesce(j.ended, now()) > g.time AND coalesce(j.ended, now()) > j.started
     WHERE g.energy_kwh IS NOT NULL
), per_gpu AS NOT MATERIALIZED (
    SELECT time, gpu_uuid, greatest(sum(hours), 1.0) AS shared_by FROM held GROUP BY time, gpu_uuid
), measured AS NOT MATERIALIZED (
    SELECT h.time, min(h.period_end) AS period_end, h.gpu_model, h.project, h.provider, h.pricing,
           min(h.currency) AS currency, sum(h.hours) AS gpu_hours,
           sum(h.energy_kwh * h.hours / p.shared_by) AS energy_kwh,
           sum(h.energy_cost_eur * h.hours / p.shared_by) AS energy_cost_eur
      FROM held h JOIN per_gpu p ON p.time = h.time AND p.gpu_uuid = h.gpu_uuid
     GROUP BY h.time, h.gpu_model, h.project, h.provider, h.pricing
), averaged AS NOT MATERIALIZED (
    SELECT c.time, c.gpu_model, c.project, c.provider, c.pricing, c.gpu_hours - coalesce(m.gpu_hours, 0) AS gpu_hours
      FROM costs c
      LEFT JOIN measured m ON m.time = c.time AND m.gpu_model = c.gpu_model AND m.project = c.project
                          AND m.provider = c.provider AND m.pricing = c.pricing
     WHERE c.kind = 'gpu_hours' AND c.project <> '' AND c.gpu_hours - coalesce(m.gpu_hours, 0) > 1e-9
), fleet AS NOT MATERIALIZED (
    SELECT f.time, f.period_end, f.gpu_model, f.currency, a.allocated,
           f.energy_kwh - coalesce(t.energy_kwh, 0) AS energy_kwh,
           f.energy_cost_eur - coalesce(t.energy_cost_eur, 0) AS energy_cost_eur,
           greatest(f.device_hours - coalesce(t.gpu_hours, 0), a.allocated, 0) AS shared_by
      FROM costs f
     CROSS JOIN LATERAL (
           SELECT sum(m.gpu_hours) AS gpu_hours, sum(m.energy_kwh) AS energy_kwh,
                  sum(m.energy_cost_eur) AS energy_cost_eur
             FROM measured m WHERE m.time = f.time AND m.gpu_model = f.gpu_model) t
     CROSS JOIN LATERAL (
           SELECT coalesce(sum(r.gpu_hours), 0) AS allocated
             FROM averaged r WHERE r.time = f.time AND r.gpu_model = f.gpu_model) a
     WHERE f.kind = 'gpu_hours' AND f.project = '' AND f.energy_kwh IS NOT NULL AND f.device_hours > 0
)
SELECT f.time,
       f.period_end,
       h.project,
       f.gpu_model,
       NULLIF(h.provider, '') AS provider,
       NULLIF(h.pricing, '') AS pricing,
       h.gpu_hours,
       f.energy_kwh * h.gpu_hours / f.shared_by AS energy_kwh,
       f.energy_cost_eur * h.gpu_hours / f.shared_by AS energy_cost_eur,
       f.currency,
       'gpu_hours'::text AS basis
  FROM fleet f
  JOIN averaged h ON h.time = f.time AND h.gpu_model = f.gpu_model
UNION ALL
SELECT f.time,
       f.period_end,
       NULL,
       f.gpu_model,
       NULL,
       NULL,
       f.shared_by - f.allocated,
       f.energy_kwh * (f.shared_by - f.allocated) / f.shared_by,
       f.energy_cost_eur * (f.shared_by - f.allocated) / f.shared_by,
       f.currency,
       'idle'
  FROM fleet f
 WHERE f.shared_by > f.allocated
UNION ALL
SELECT m.time,
       m.period_end,
       m.project,
       m.gpu_model,
       NULLIF(m.provider, ''),
       NULLIF(m.pricing, ''),
       m.gpu_hours,
       m.energy_kwh,
       m.energy_cost_eur,
       m.currency,
       'measured'
  FROM measured m;
COMMENT ON VIEW energy_costs IS
    'GPU energy (kWh) and its cost (EUR) per project, GPU model, provider, pricing and hour: basis measured, '
    'the project''s share of the measured energy of the GPUs its jobs named (time held / hour); gpu_hours, '
    'its GPU-hours share of what is left of its model''s energy in that hour; idle (project NULL): the energy '
    'no project held';

-- The view's new column in the project readers' copy (CREATE OR REPLACE keeps the grants).
SELECT aima_reader_grants();
