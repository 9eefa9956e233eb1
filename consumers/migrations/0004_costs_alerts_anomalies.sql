-- Outputs of the stream processors (S2, S3, S5), kept without expiry (D2 names none for them).

-- CostRecord of every kind; the natural key is the same for all kinds because the columns that do not
-- apply to a kind store '': gpu_hours per (project, gpu_model, provider, pricing, hour), job_cost per
-- job_id, budget per (project, budget, period). A figure re-emitted for the same key replaces the stored
-- one when it was emitted later (emitted_at: the Kafka timestamp).
CREATE TABLE costs (
    time                          timestamptz      NOT NULL,
    period_end                    timestamptz      NOT NULL,
    kind                          text             NOT NULL CHECK (kind IN ('gpu_hours', 'job_cost', 'budget')),
    project                       text             NOT NULL DEFAULT '',
    gpu_model                     text             NOT NULL DEFAULT '',
    provider                      text             NOT NULL DEFAULT '',
    pricing                       text             NOT NULL DEFAULT '',
    job_id                        text             NOT NULL DEFAULT '',
    budget                        text             NOT NULL DEFAULT '',
    gpu_hours                     double precision,
    device_hours                  double precision,
    idle_gpu_hours                double precision,
    cost_estimated_eur            double precision,
    job_cost_eur                  double precision,
    job_cost_per_media_minute_eur double precision,
    budget_eur                    double precision,
    budget_utilization_percent    double precision,
    forecast_eur                  double precision,
    currency                      text             NOT NULL,
    source                        text             NOT NULL,
    emitted_at                    timestamptz      NOT NULL,
    updated_at                    timestamptz      NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX costs_natural_key
    ON costs (kind, project, gpu_model, provider, pricing, job_id, budget, time);
CREATE INDEX costs_time ON costs (time);

-- Budgets as finance reads them: the latest figure of each project budget and period.
CREATE VIEW budgets AS
SELECT time AS period_start,
       period_end,
       NULLIF(project, '') AS project,
       NULLIF(budget, '') AS budget,
       budget_eur,
       budget_eur * budget_utilization_percent / 100 AS spent_eur,
       budget_utilization_percent,
       forecast_eur,
       currency,
       source,
       updated_at
  FROM costs
 WHERE kind = 'budget';

-- AlertEvent: every state change once (events do not change, so a redelivery is ignored).
CREATE TABLE alert_history (
    fingerprint text             NOT NULL,
    rule        text             NOT NULL,
    status      text             NOT NULL CHECK (status IN ('firing', 'resolved')),
    severity    text             NOT NULL,
    starts_at   timestamptz      NOT NULL,
    ends_at     timestamptz,
    event_time  timestamptz      NOT NULL,
    value       double precision,
    labels      jsonb            NOT NULL,
    annotations jsonb            NOT NULL,
    channels    text[]           NOT NULL,
    source      text             NOT NULL,
    received_at timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (fingerprint, status, starts_at)
);
CREATE INDEX alert_history_time ON alert_history (event_time);
CREATE INDEX alert_history_rule ON alert_history (rule, starts_at);

CREATE TABLE anomalies (
    time     timestamptz      NOT NULL,
    series   text             NOT NULL,
    metric   text             NOT NULL,
    labels   jsonb            NOT NULL,
    value    double precision NOT NULL,
    expected double precision NOT NULL,
    score    double precision NOT NULL,
    method   text             NOT NULL,
    source   text             NOT NULL,
    PRIMARY KEY (series, method, time)
);
CREATE INDEX anomalies_metric ON anomalies (metric, time);

-- Dead letters: where a letter read back from the dead-letter topic sits on that topic (null for the
-- letters the sink writes itself), and a natural key so a letter delivered twice is stored once. Letters
-- of records that never reached Kafka (stage producer) have no origin offset, so the key also holds the
-- time and a hash of the original value.
ALTER TABLE dead_letters
    ADD COLUMN letter_topic     text,
    ADD COLUMN letter_partition integer,
    ADD COLUMN letter_offset    bigint;
CREATE UNIQUE INDEX dead_letters_natural_key ON dead_letters (
    stage, origin_topic, coalesce(origin_partition, -1), coalesce(origin_offset, -1), time,
    md5(coalesce(value, ''::bytea)));
-- The sink dead-letters a record once per origin offset, however often the record is redelivered.
CREATE UNIQUE INDEX dead_letters_sink_origin ON dead_letters (origin_topic, origin_partition, origin_offset)
    WHERE stage = 'sink';
CREATE INDEX dead_letters_time ON dead_letters (time);
