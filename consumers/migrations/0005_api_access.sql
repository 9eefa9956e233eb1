-- Access to metric data through the REST API (A2, A3): tokens with a role and scopes, and the audit log.

-- token_hash is a hash of the secret (the secret itself is never stored). scopes: metrics:read:<name>
-- or *; projects: what a 'user' token may see (A2: own jobs and projects only).
CREATE TABLE api_tokens (
    id         uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    name       text        NOT NULL,
    token_hash text        NOT NULL UNIQUE,
    role       text        NOT NULL CHECK (role IN ('admin', 'user', 'finance')),
    scopes     text[]      NOT NULL DEFAULT '{}',
    projects   text[]      NOT NULL DEFAULT '{}',
    subject    text,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz,
    revoked_at timestamptz
);

-- One row per access to metric data: who (token), what (endpoint, metric, parameters), when, result.
-- token_id is not a foreign key, so a token can be deleted without rewriting its history.
CREATE TABLE audit_log (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    time        timestamptz NOT NULL DEFAULT now(),
    token_id    uuid,
    role        text,
    method      text        NOT NULL DEFAULT 'GET',
    endpoint    text        NOT NULL,
    metric      text,
    parameters  jsonb       NOT NULL DEFAULT '{}',
    status      integer     NOT NULL,
    row_count   integer,
    duration_ms double precision,
    client      text
);
CREATE INDEX audit_log_time ON audit_log (time);
CREATE INDEX audit_log_token ON audit_log (token_id, time);
