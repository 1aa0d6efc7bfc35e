-- Application events (logins, denied access, admin actions) recorded in the trail through a
-- function, never through pg_logical_emit_message, which applications may not call.
-- durable => true emits outside the transaction, so the event survives a rollback.
CREATE OR REPLACE FUNCTION {schema}.log_event(
    action    text,
    resource  text    DEFAULT NULL,
    outcome   text    DEFAULT 'success',
    details   jsonb   DEFAULT '{{}}',
    durable   boolean DEFAULT false
) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF {app_stream} IS NULL THEN
        RAISE EXCEPTION 'cdc-audit: application events are not enabled by the policy'
            USING ERRCODE = '55000', HINT = 'add app_events with a stream to the policy and apply it';
    END IF;
    IF action IS NULL OR action !~ '^[a-z][a-z0-9_]*(\.[a-z0-9_]+)*$' OR length(action) > 200 THEN
        RAISE EXCEPTION 'cdc-audit: action % is not a dotted lower-case name such as auth.login.failed',
            coalesce(quote_literal(action), 'NULL')
            USING ERRCODE = '22023';
    END IF;
    IF coalesce(outcome, '') = '' THEN
        RAISE EXCEPTION 'cdc-audit: outcome must not be empty' USING ERRCODE = '22023';
    END IF;
    IF details IS NOT NULL AND jsonb_typeof(details) <> 'object' THEN
        RAISE EXCEPTION 'cdc-audit: details must be a JSON object, not %', jsonb_typeof(details)
            USING ERRCODE = '22023';
    END IF;
    PERFORM pg_logical_emit_message(NOT durable, {msg_app}, ({schema}.current_context() || jsonb_build_object(
        'v', 1,
        'stream', {app_stream},
        'action', action,
        'resource', resource,
        'outcome', outcome,
        'details', coalesce(details, jsonb_build_object()),
        'durable', durable,
        'db', {schema}.database_facts()))::text);
END
$fn$;
