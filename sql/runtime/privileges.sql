-- Recording what the privileges job observed: a change of roles, memberships or privileges
-- since the last snapshot, or drift from the applied policy. A transactional message, so the
-- event lands in the trail exactly when (and only if) the job's snapshot commits. Emitted by
-- the owner, since the worker's role may not call pg_logical_emit_message itself.
-- Context keys in `change` are dropped: the session context and the database facts say who
-- recorded it; `change` says what was observed.
CREATE OR REPLACE FUNCTION {schema}.record_privilege_change(change jsonb) RETURNS pg_lsn
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF change IS NULL OR jsonb_typeof(change) <> 'object' THEN
        RAISE EXCEPTION 'cdc-audit: a privilege change must be a JSON object'
            USING ERRCODE = '22023';
    END IF;
    RETURN pg_logical_emit_message(true, {msg_privilege}, ({schema}.current_context()
        || (change - ARRAY['v', 'db', 'stream', 'generation', 'durable', 'extra', 'actor_id',
                           'actor_role', 'reason', 'on_behalf_of', 'session_id', 'client_ip',
                           'trace_id'])
        || jsonb_build_object(
            'v', 1,
            'db', {schema}.database_facts()))::text);
END
$fn$;

REVOKE ALL ON FUNCTION {schema}.record_privilege_change(jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION {schema}.record_privilege_change(jsonb) TO {writer};

-- The job runs as the worker's role. The tables come with migration 0007, which grants the
-- same: an installation still at an older schema version has none yet.
DO $grant$
BEGIN
    IF to_regclass(format('%I.drift_check', {schema_name})) IS NOT NULL THEN
        GRANT SELECT, INSERT ON {schema}.privilege_snapshot, {schema}.drift_check TO {writer};
        GRANT SELECT ON {schema}.privilege_snapshot, {schema}.drift_check TO {auditor};
    END IF;
END
$grant$;
