-- Raw samples: one wide table per source kind, one row per Avro record (system samples also write one
-- row per disk and per network interface). Columns carry the Avro field names. Every table has a
-- natural key (a unique index ending in the time column, so it also works on partitions and
-- hypertables) that lets the sink upsert idempotently. Key columns for optional Avro fields
-- (mig_instance, kernel, direction, host of a job) store '' for null; the metric views turn '' back
-- into null. How rows are stored (daily partitions or hypertables) is in the mode variants of this file.

-- What retention keeps, per table (and per rollup tier); read by consumers/retention.py and, in plain
-- PostgreSQL, by aima_ensure_partitions(). keep NULL keeps the data forever.
CREATE TABLE retention_policies (
    relation    text     NOT NULL,
    tier        text     NOT NULL DEFAULT '',
    time_column text     NOT NULL,
    keep        interval,
    PRIMARY KEY (relation, tier)
);

CREATE TABLE gpu_samples (
    time                                 timestamptz      NOT NULL,
    host                                 text             NOT NULL,
    gpu                                  integer          NOT NULL,
    gpu_uuid                             text             NOT NULL,
    gpu_model                            text             NOT NULL,
    mig_instance                         text             NOT NULL DEFAULT '',
    parent_gpu_uuid                      text,
    source                               text             NOT NULL,
    interval_group                       text             NOT NULL,
    utilization_percent                  double precision,
    memory_used_bytes                    bigint,
    memory_total_bytes                   bigint,
    memory_utilization_percent           double precision,
    memory_bandwidth_utilization_percent double precision,
    temperature_celsius                  double precision,
    power_watts                          double precision,
    tensor_core_utilization_percent      double precision,
    pcie_tx_bytes_per_second             double precision,
    pcie_rx_bytes_per_second             double precision,
    energy_joules                        double precision,
    sm_clock_hz                          bigint,
    memory_clock_hz                      bigint,
    throttle_reasons                     text[],
    ecc_corrected_errors                 bigint,
    ecc_uncorrected_errors               bigint,
    xid_errors                           integer[],
    processes                            jsonb
);
CREATE UNIQUE INDEX gpu_samples_natural_key
    ON gpu_samples (host, gpu_uuid, mig_instance, interval_group, time);

CREATE TABLE system_samples (
    time                    timestamptz      NOT NULL,
    host                    text             NOT NULL,
    source                  text             NOT NULL,
    cpu_utilization_percent double precision,
    memory_used_bytes       bigint,
    memory_total_bytes      bigint,
    containers_running      integer
);
CREATE UNIQUE INDEX system_samples_natural_key ON system_samples (host, time);

-- SystemSample.disks[]: one row per file system of a sample.
CREATE TABLE system_disk_samples (
    time        timestamptz NOT NULL,
    host        text        NOT NULL,
    mountpoint  text        NOT NULL,
    used_bytes  bigint      NOT NULL,
    total_bytes bigint      NOT NULL
);
CREATE UNIQUE INDEX system_disk_samples_natural_key ON system_disk_samples (host, mountpoint, time);

-- SystemSample.networks[]: one row per interface of a sample.
CREATE TABLE system_network_samples (
    time                      timestamptz      NOT NULL,
    host                      text             NOT NULL,
    interface                 text             NOT NULL,
    receive_bytes_per_second  double precision NOT NULL,
    transmit_bytes_per_second double precision NOT NULL
);
CREATE UNIQUE INDEX system_network_samples_natural_key
    ON system_network_samples (host, interface, time);

-- JobTimings: per-interval summaries; time is the interval's (exclusive) end. sketch is the Avro Sketch
-- record as JSON (relative_accuracy, zero_count, keys, counts), mergeable with bus.sketch.
CREATE TABLE job_timings (
    time           timestamptz      NOT NULL,
    interval_start timestamptz      NOT NULL,
    job_id         text             NOT NULL,
    project        text             NOT NULL,
    model          text,
    host           text             NOT NULL DEFAULT '',
    kind           text             NOT NULL,
    kernel         text             NOT NULL DEFAULT '',
    direction      text             NOT NULL DEFAULT '',
    bytes          bigint,
    count          bigint           NOT NULL,
    sum_seconds    double precision NOT NULL,
    min_seconds    double precision NOT NULL,
    max_seconds    double precision NOT NULL,
    sketch         jsonb            NOT NULL,
    source         text             NOT NULL
);
CREATE UNIQUE INDEX job_timings_natural_key
    ON job_timings (job_id, kind, kernel, direction, host, time);

-- JobEvent; the Avro field "user" (a keyed hash, never the raw id) is the column user_pseudonym.
CREATE TABLE job_events (
    time               timestamptz      NOT NULL,
    job_id             text             NOT NULL,
    event              text             NOT NULL,
    project            text             NOT NULL,
    user_pseudonym     text,
    service            text,
    queue              text,
    model              text,
    host               text,
    gpu_count          integer          NOT NULL,
    gpu_model          text,
    provider           text,
    pricing            text,
    media_minutes      double precision,
    queue_wait_seconds double precision,
    error              text,
    source             text             NOT NULL
);
CREATE UNIQUE INDEX job_events_natural_key ON job_events (job_id, event, time);

CREATE TABLE queue_samples (
    time        timestamptz NOT NULL,
    queue       text        NOT NULL,
    length_jobs integer     NOT NULL,
    source      text        NOT NULL
);
CREATE UNIQUE INDEX queue_samples_natural_key ON queue_samples (queue, time);

CREATE TABLE pod_status (
    time      timestamptz NOT NULL,
    namespace text        NOT NULL,
    pod       text        NOT NULL,
    host      text,
    phase     text        NOT NULL,
    ready     boolean     NOT NULL,
    restarts  integer     NOT NULL,
    source    text        NOT NULL
);
CREATE UNIQUE INDEX pod_status_natural_key ON pod_status (namespace, pod, time);

-- D2: raw data 24 h.
INSERT INTO retention_policies (relation, time_column, keep) VALUES
    ('gpu_samples', 'time', INTERVAL '24 hours'),
    ('system_samples', 'time', INTERVAL '24 hours'),
    ('system_disk_samples', 'time', INTERVAL '24 hours'),
    ('system_network_samples', 'time', INTERVAL '24 hours'),
    ('job_timings', 'time', INTERVAL '24 hours'),
    ('job_events', 'time', INTERVAL '24 hours'),
    ('queue_samples', 'time', INTERVAL '24 hours'),
    ('pod_status', 'time', INTERVAL '24 hours');
