-- Each GPU's energy per hour (issue 17, item 3): the GpuEnergy records of the stream app's
-- IdleHoursProcessor (topic energy), one row per GPU and UTC hour, the latest record of the hour winning
-- (emitted_at: the Kafka timestamp; the hour is re-sent with its total so far as it grows). energy_kwh is
-- the GPU's energy counter's increase, power x time where it reset or is missing, null where neither was
-- read; energy_cost_eur that at the price catalogue's tariff, null without one. These rows are what the
-- fleet's cost rows (costs of kind gpu_hours, project '') sum per GPU model and hour. Kept for
-- AIMA_RETENTION_ENERGY by period_end (consumers/retention.py); not partitioned, like costs.
CREATE TABLE gpu_energy (
    time            timestamptz      NOT NULL,
    period_end      timestamptz      NOT NULL,
    gpu_uuid        text             NOT NULL,
    gpu_model       text             NOT NULL,
    device_hours    double precision NOT NULL,
    energy_kwh      double precision,
    energy_cost_eur double precision,
    currency        text             NOT NULL,
    source          text             NOT NULL,
    emitted_at      timestamptz      NOT NULL,
    updated_at      timestamptz      NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX gpu_energy_natural_key ON gpu_energy (gpu_uuid, time);
CREATE INDEX gpu_energy_time ON gpu_energy (time);
COMMENT ON TABLE gpu_energy IS
    'Per GPU and UTC hour: the time it was seen (device_hours), the energy it drew (kWh, null when unknown) '
    'and its cost at the energy tariff (EUR)';

-- Fleet data (no project: job events do not say which GPUs a job held): the finance dashboard reads it as
-- the fleet reader; the project reader gets no grant.
INSERT INTO reader_relations (relation) VALUES ('gpu_energy');
SELECT aima_reader_grants();
