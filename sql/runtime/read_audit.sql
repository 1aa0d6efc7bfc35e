-- Audit of the audit: reads of the trail through cdc-audit's query layer and the audited_*
-- functions (migration 0009) are recorded as application events in the stream the policy's read_audit names
-- (apply records it in install_setting `read_audit_stream`). The message is emitted outside
-- the transaction, so a read is recorded even when the reading transaction rolls back.

-- Records one read; returns whether it was recorded (false: the policy asks for no record).
CREATE OR REPLACE FUNCTION {schema}.record_read(what text, filters jsonb DEFAULT '{{}}')
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    target text;
BEGIN
    SELECT value INTO target FROM {schema}.install_setting
     WHERE key = 'read_audit_stream' AND value <> '';
    IF target IS NULL THEN
        RETURN false;
    END IF;
    IF what IS NULL OR what !~ '^[a-z][a-z0-9_]*(\.[a-z0-9_]+)*$' OR length(what) > 100 THEN
        RAISE EXCEPTION 'cdc-audit: % is not a dotted lower-case name of a read such as row_history',
            coalesce(quote_literal(what), 'NULL')
            USING ERRCODE = '22023';
    END IF;
    IF filters IS NOT NULL AND jsonb_typeof(filters) <> 'object' THEN
        RAISE EXCEPTION 'cdc-audit: filters must be a JSON object, not %', jsonb_typeof(filters)
            USING ERRCODE = '22023';
    END IF;
    PERFORM pg_logical_emit_message(false, {msg_app}, ({schema}.current_context() || jsonb_build_object(
        'v', 1,
        'stream', target,
        'action', 'audit.read.' || what,
        'resource', NULL,
        'outcome', 'success',
        'details', jsonb_build_object(
            'filters', coalesce(filters, jsonb_build_object()),
            -- The role the session acts as (SET ROLE, else the login), as session_role().
            'role', CASE current_setting('role') WHEN 'none' THEN session_user::text
                         ELSE current_setting('role') END,
            'session_user', session_user::text),
        'durable', true,
        'db', {schema}.database_facts()))::text);
    RETURN true;
END
$fn$;

REVOKE ALL ON FUNCTION {schema}.record_read(text, jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION {schema}.record_read(text, jsonb) TO {reader}, {auditor};
