-- One home for where each job ran: job_placements (0019) and job_gpus (0020) were one row per job each,
-- kept by two triggers on job_events with the same rules. job_placements now holds the GPUs a job names
-- (JobEvent gpu_uuids) too, and job_gpus is gone. A job whose events name no host is kept when they name its
-- GPUs (the energy view needs it) and for an end event (so an end stored before its start is not lost),
-- as job_gpus kept them: host becomes nullable, and the readers that need a host ask for one. Kept as long
-- as the cost figures (AIMA_RETENTION_COSTS), the longer of the two: a measured share needs the GPU's
-- energy row (gpu_energy, AIMA_RETENTION_ENERGY) besides.
ALTER TABLE job_placements ADD COLUMN gpu_uuids text[];
ALTER TABLE job_placements ALTER COLUMN host DROP NOT NULL;
CREATE INDEX job_placements_gpus ON job_placements (started) WHERE gpu_uuids IS NOT NULL;
COMMENT ON TABLE job_placements IS
    'Per job: the host, GPUs, GPU model, provider, pricing and GPU count of its job events, its start and '
    'end; kept by a trigger on job_events, as long as the cost figures';

UPDATE job_placements p SET gpu_uuids = g.gpu_uuids FROM job_gpus g WHERE g.job_id = p.job_id;
INSERT INTO job_placements (job_id, time, project, gpu_count, gpu_model, provider, pricing, gpu_uuids,
                            started, ended)
SELECT job_id, time, project, coalesce(cardinality(gpu_uuids), 0), gpu_model, provider, pricing, gpu_uuids,
       started, ended
  FROM job_gpus
    ON CONFLICT (job_id) DO NOTHING;

-- The rules of both triggers in one: what the started event names wins over an end event's copy of it;
-- the earliest start and the earliest end win; an end event's GPUs fill in only what no start named.
CREATE OR REPLACE FUNCTION aima_job_placement() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    IF NEW.event NOT IN ('started', 'finished', 'failed')
       OR (NEW.event = 'started' AND NEW.host IS NULL AND NEW.gpu_uuids IS NULL) THEN
        RETURN NULL;
    END IF;
    INSERT INTO job_placements AS p (job_id, time, project, service, model, host, gpu_count, gpu_model,
                                     provider, pricing, gpu_uuids, started, ended)
    VALUES (NEW.job_id, NEW.time, NEW.project, NEW.service, NEW.model, NEW.host, NEW.gpu_count,
            NEW.gpu_model, NEW.provider, NEW.pricing, NEW.gpu_uuids,
            CASE WHEN NEW.event = 'started' THEN NEW.time END,
            CASE WHEN NEW.event <> 'started' THEN NEW.time END)
    ON CONFLICT (job_id) DO UPDATE SET
        time = least(p.time, EXCLUDED.time),
        started = least(p.started, EXCLUDED.started),
        ended = least(p.ended, EXCLUDED.ended),
        project = CASE WHEN NEW.event = 'started' THEN EXCLUDED.project ELSE p.project END,
        service = CASE WHEN NEW.event = 'started' THEN EXCLUDED.service ELSE p.service END,
        model = CASE WHEN NEW.event = 'started' THEN EXCLUDED.model ELSE p.model END,
        host = CASE WHEN NEW.event = 'started' THEN EXCLUDED.host ELSE coalesce(p.host, EXCLUDED.host) END,
        gpu_count = CASE WHEN NEW.event = 'started' THEN EXCLUDED.gpu_count ELSE p.gpu_count END,
        gpu_model = CASE WHEN NEW.event = 'started' THEN EXCLUDED.gpu_model ELSE p.gpu_model END,
        provider = CASE WHEN NEW.event = 'started' THEN EXCLUDED.provider ELSE p.provider END,
        pricing = CASE WHEN NEW.event = 'started' THEN EXCLUDED.pricing ELSE p.pricing END,
        gpu_uuids = CASE WHEN NEW.event = 'started' THEN EXCLUDED.gpu_uuids
                         ELSE coalesce(p.gpu_uuids, EXCLUDED.gpu_uuids) END,
        updated_at = now();
    RETURN NULL;
END
$$;

-- 0020's view, reading the GPUs jobs held from job_placements.
CREATE OR REPLACE VIEW energy_costs AS
WITH held AS NOT MATERIALIZED (
    SELECT g.time, g.period_end, g.gpu_uuid, g.gpu_model, g.energy_kwh, g.energy_cost_eur, g.currency,
           j.project, coalesce(j.provider, '') AS provider, coalesce(j.pricing, '') AS pricing,
           extract(epoch FROM least(coalesce(j.ended, now()), g.period_end) - greatest(j.started, g.time))
               ::double precision / 3600 AS hours
      FROM gpu_energy g
      JOIN job_placements j ON g.gpu_uuid = ANY (j.gpu_uuids) AND j.started < g.period_end
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

DROP TRIGGER job_events_gpus ON job_events;
DROP FUNCTION aima_job_gpus();
DROP TABLE job_gpus;
