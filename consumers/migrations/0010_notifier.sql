-- Notifier: silences (muting alerts by label matchers), the notification log (what was delivered where,
-- so a redelivery after a crash is recognised), and the web-UI push feed from alert_history.

CREATE TABLE IF NOT EXISTS silences (
    id         uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    -- [{"name": "host", "op": "=~", "value": "gpu-.*"}, ...]; op is one of =, !=, =~, !~
    matchers   jsonb       NOT NULL CHECK (jsonb_typeof(matchers) = 'array' AND jsonb_array_length(matchers) > 0),
    starts_at  timestamptz NOT NULL DEFAULT now(),
    ends_at    timestamptz NOT NULL,
    created_by text        NOT NULL,
    comment    text        NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now(),
    CHECK (ends_at >= starts_at)
);
CREATE INDEX IF NOT EXISTS silences_ends_at ON silences (ends_at);

-- One row per alert episode and state (fingerprint, status, starts_at) per receiver channel.
CREATE TABLE IF NOT EXISTS notification_log (
    fingerprint  text        NOT NULL,
    status       text        NOT NULL CHECK (status IN ('firing', 'resolved')),
    starts_at    timestamptz NOT NULL,
    channel      text        NOT NULL,
    receiver     text        NOT NULL,
    group_key    text        NOT NULL DEFAULT '',
    delivered_at timestamptz,
    attempts     integer     NOT NULL DEFAULT 0,
    outcome      text        NOT NULL CHECK (outcome IN ('delivered', 'dead_lettered')),
    reason       text,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT notification_log_once UNIQUE (fingerprint, status, starts_at, channel, receiver)
);
CREATE INDEX IF NOT EXISTS notification_log_updated_at ON notification_log (updated_at);

-- Web-UI push: every alert_history row written is announced on channel 'aima_alerts' as
-- {"schema", "table", "op", "alert": <the row as JSON>}. The row is taken whole (to_jsonb), so the trigger
-- keeps working whatever columns alert_history has. NOTIFY payloads are limited to 8000 bytes: a larger
-- row is announced without labels and annotations, and "truncated": true.
CREATE OR REPLACE FUNCTION aima_notify_alert() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    row_json jsonb := to_jsonb(NEW);
    payload  text;
BEGIN
    payload := json_build_object('schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME, 'op', TG_OP,
                                 'alert', row_json)::text;
    IF octet_length(payload) > 7900 THEN
        payload := json_build_object('schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME, 'op', TG_OP,
                                     'truncated', true,
                                     'alert', row_json - 'labels' - 'annotations')::text;
    END IF;
    IF octet_length(payload) > 7900 THEN
        payload := json_build_object('schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME, 'op', TG_OP,
                                     'truncated', true,
                                     'alert', jsonb_build_object('fingerprint', row_json -> 'fingerprint',
                                                                 'status', row_json -> 'status',
                                                                 'starts_at', row_json -> 'starts_at'))::text;
    END IF;
    PERFORM pg_notify('aima_alerts', payload);
    RETURN NULL;
END
$$;

-- Creates the push triggers on alert_history in the current schema when the table exists and they do not;
-- true when they exist afterwards. Called here and again by the push feed at start, because alert_history
-- comes from another migration that may be applied after this one.
CREATE OR REPLACE FUNCTION aima_ensure_alert_trigger() RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    tbl regclass;
BEGIN
    SELECT c.oid::regclass INTO tbl
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE n.nspname = current_schema() AND c.relname = 'alert_history' AND c.relkind IN ('r', 'p');
    IF tbl IS NULL THEN
        RETURN false;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = tbl AND tgname = 'aima_alert_history_notify') THEN
        EXECUTE format('CREATE TRIGGER aima_alert_history_notify AFTER INSERT ON %s '
                       'FOR EACH ROW EXECUTE FUNCTION %I.aima_notify_alert()', tbl, current_schema());
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = tbl AND tgname = 'aima_alert_history_notify_update') THEN
        -- An upserting sink turns a redelivered or resolved alert into an UPDATE; only real changes count.
        EXECUTE format('CREATE TRIGGER aima_alert_history_notify_update AFTER UPDATE ON %s '
                       'FOR EACH ROW WHEN (OLD.* IS DISTINCT FROM NEW.*) '
                       'EXECUTE FUNCTION %I.aima_notify_alert()', tbl, current_schema());
    END IF;
    RETURN true;
END
$$;

DO $$ BEGIN PERFORM aima_ensure_alert_trigger(); END $$;
