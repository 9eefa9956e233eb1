-- Energy cost (issue 17, item 3). The stream app's fleet rows of kind gpu_hours (project '', one per GPU
-- model and hour) carry the energy the model's GPUs drew (energy_kwh: each GPU's energy counter, power x
-- time where it reset or is missing) and its cost at the price catalogue's energy tariff (energy_cost_eur,
-- null without one). Both are optional CostRecord fields: null in every row written before them.
ALTER TABLE costs
    ADD COLUMN energy_kwh      double precision,
    ADD COLUMN energy_cost_eur double precision;

-- Each project's share of that energy, per project, GPU model, provider, pricing and hour: the model's
-- energy per GPU-hour of the hour times the project's GPU-hours. Job events say how many GPUs of a model
-- a job holds, not which ones, so energy follows the allocation the GPU-hour cost follows. Per GPU-hour:
-- per device-hour seen, or per GPU-hour allocated where jobs held more than the devices seen. The energy
-- no project held (idle GPUs) is one row per model and hour with project NULL and gpu_hours the hours
-- nobody held, so an hour's rows add up to the fleet's energy. The time of the fleet row is the output's
-- (so a filter on time reaches the costs_time index in both branches).
CREATE VIEW energy_costs AS
WITH fleet AS NOT MATERIALIZED (
    SELECT f.time, f.period_end, f.gpu_model, f.energy_kwh, f.energy_cost_eur, f.currency, a.allocated,
           greatest(f.device_hours, a.allocated) AS shared_by
      FROM costs f
     CROSS JOIN LATERAL (
           SELECT coalesce(sum(c.gpu_hours), 0) AS allocated
             FROM costs c
            WHERE c.kind = 'gpu_hours' AND c.time = f.time AND c.gpu_model = f.gpu_model
              AND c.project <> '' AND c.gpu_hours > 0) a
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
       f.currency
  FROM fleet f
  JOIN costs h ON h.kind = 'gpu_hours' AND h.time = f.time AND h.gpu_model = f.gpu_model
              AND h.project <> '' AND h.gpu_hours > 0
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
       f.currency
  FROM fleet f
 WHERE f.shared_by > f.allocated;
COMMENT ON VIEW energy_costs IS
    'GPU energy (kWh) and its cost (EUR) per project, GPU model, provider, pricing and hour, the project''s '
    'GPU-hours share of its model''s energy in that hour; project NULL: the energy no project held';

-- The finance dashboard reads it as the fleet reader, the users dashboard per project.
INSERT INTO reader_relations (relation, by_project) VALUES ('energy_costs', true);
SELECT aima_reader_grants();
