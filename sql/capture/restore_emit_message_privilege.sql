-- Uninstall gives pg_logical_emit_message back its default privileges.
DO $do$
DECLARE
    fn regprocedure;
BEGIN
    FOR fn IN SELECT oid::regprocedure FROM pg_catalog.pg_proc
               WHERE proname = 'pg_logical_emit_message'
                 AND pronamespace = 'pg_catalog'::regnamespace
    LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO PUBLIC', fn);
        EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM %I', fn, {owner_name});
    END LOOP;
END
$do$
