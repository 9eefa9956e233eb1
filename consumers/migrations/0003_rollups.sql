-- Rollups (S1): one row per series, tier and bucket, upserted by the sink as the stream app re-emits a
-- bucket; the newest emission wins (final over not final, then the later watermark, then the later
-- Kafka timestamp in emitted_at). Kept per tier (D2): hour 7 days, day 30 days, month 1 year, year
-- forever; a bucket expires when its end lies before now minus the tier's retention.
CREATE TABLE rollups (
    series       text             NOT NULL,
    metric       text             NOT NULL,
    labels       jsonb            NOT NULL,
    tier         text             NOT NULL CHECK (tier IN ('hour', 'day', 'month', 'year')),
    bucket_start timestamptz      NOT NULL,
    bucket_end   timestamptz      NOT NULL,
    count        bigint           NOT NULL,
    min          double precision NOT NULL,
    max          double precision NOT NULL,
    sum          double precision NOT NULL,
    avg          double precision NOT NULL,
    p95          double precision NOT NULL,
    sketch       jsonb            NOT NULL,
    final        boolean          NOT NULL,
    watermark    timestamptz      NOT NULL,
    source       text             NOT NULL,
    emitted_at   timestamptz      NOT NULL,
    updated_at   timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (series, tier, bucket_start)
);
-- The API and dashboards ask for one metric's buckets of one tier over a time range.
CREATE INDEX rollups_metric ON rollups (metric, tier, bucket_start);
CREATE INDEX rollups_expiry ON rollups (tier, bucket_end);

INSERT INTO retention_policies (relation, tier, time_column, keep) VALUES
    ('rollups', 'hour', 'bucket_end', INTERVAL '7 days'),
    ('rollups', 'day', 'bucket_end', INTERVAL '30 days'),
    ('rollups', 'month', 'bucket_end', INTERVAL '1 year'),
    ('rollups', 'year', 'bucket_end', NULL);
