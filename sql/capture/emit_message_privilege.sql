-- pg_logical_emit_message is executable by PUBLIC by default: anyone could forge a context
-- message or an application event. Only the audit owner's SECURITY DEFINER functions emit.
DO $do$
DECLARE
    fn regprocedure;
BEGIN
    FOR fn IN SELECT oid::regprocedure FROM pg_catalog.pg_proc
               WHERE proname = 'pg_logical_emit_message'
                 AND pronamespace = 'pg_catalog'::regnamespace
    LOOP
        EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', fn);
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %I', fn, {owner_name});
    END LOOP;
END
$do$
