-- The audit log records changes and refusals too (A3): what was done (action), how it ended (outcome and
-- why), by whom in words (actor) and to what (target). Rows of the command line (token and silence
-- commands) have no HTTP method or status: their endpoint is the command.
--
-- Columns are added without rewriting the table (constant defaults, nullable columns): a year of audit rows
-- is not touched at start. Rows written before this migration have action 'read' and no outcome; readers
-- take it from the status with audit_outcome(), the one definition of that mapping, which the API's writer
-- uses too.
ALTER TABLE audit_log
    ADD COLUMN action  text NOT NULL DEFAULT 'read',
    ADD COLUMN outcome text CHECK (outcome IN ('allowed', 'unauthenticated', 'denied', 'invalid', 'failed')),
    ADD COLUMN reason  text,
    ADD COLUMN actor   text,
    ADD COLUMN target  text,
    ALTER COLUMN method DROP NOT NULL,
    ALTER COLUMN method DROP DEFAULT,
    ALTER COLUMN status DROP NOT NULL;

COMMENT ON COLUMN audit_log.action IS
    'read (any API request for data), silence.create, silence.expire, token.create or token.revoke';
COMMENT ON COLUMN audit_log.outcome IS
    'allowed, unauthenticated (401), denied (403), invalid (another 4xx; a command that found nothing to '
    'change) or failed (5xx); NULL on rows older than migration 0013: audit_outcome(status)';
COMMENT ON COLUMN audit_log.reason IS
    'why it was refused: missing_token, malformed_token, unknown_token, revoked_token, expired_token, '
    'insufficient_scope, insufficient_role, project_not_allowed, or the error code of the answer';
COMMENT ON COLUMN audit_log.actor IS
    'who in words: api:<token name>, or cli:<name given with --by, else the local login>';
COMMENT ON COLUMN audit_log.target IS 'the id of the token or silence created, revoked or expired';

CREATE FUNCTION audit_outcome(status integer) RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN status IS NULL THEN NULL
        WHEN status < 400 THEN 'allowed'
        WHEN status = 401 THEN 'unauthenticated'
        WHEN status = 403 THEN 'denied'
        WHEN status < 500 THEN 'invalid'
        ELSE 'failed'
    END
$$;

-- The changes among the reads, for the admin's filter by action (time and token have their indexes, and
-- every row of the command line is a change). Empty when created: all older rows are reads.
CREATE INDEX audit_log_changes ON audit_log (action, id) WHERE action <> 'read';
