-- Dead letters of every stage (producer, stream, sink, notifier): what could not be processed, and why.
CREATE TABLE IF NOT EXISTS dead_letters (
    time             timestamptz NOT NULL,
    stage            text        NOT NULL,
    origin_topic     text        NOT NULL,
    origin_partition integer,
    origin_offset    bigint,
    key              bytea,
    value            bytea,
    reason           text        NOT NULL,
    error_type       text        NOT NULL,
    source           text        NOT NULL DEFAULT 'unknown'
);
CREATE UNIQUE INDEX IF NOT EXISTS dead_letters_origin
    ON dead_letters (origin_topic, origin_partition, origin_offset, time);
