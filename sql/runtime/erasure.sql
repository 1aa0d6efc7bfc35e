-- Erasing the payload of one event, in the open: the row keeps its header and payload_hash
-- (so the chain verifies), and a transactional message makes the worker record the erasure as
-- an event of its own, with who asked and why.
CREATE OR REPLACE FUNCTION {schema}.erase_event(target uuid, why text) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    erased record;
    n integer := 0;
BEGIN
    IF coalesce(btrim(why), '') = '' THEN
        RAISE EXCEPTION 'cdc-audit: an erasure needs a reason' USING ERRCODE = '22023';
    END IF;
    PERFORM set_config({guc_erasing}, 'on', true);
    FOR erased IN
        UPDATE {schema}.event AS e
           SET row_key = NULL, old = NULL, new = NULL, changed = NULL, actor_id = NULL,
               reason = NULL, context = NULL, erased_at = clock_timestamp()
         WHERE e.event_id = target AND e.erased_at IS NULL
        RETURNING e.stream, e.seq, e.event_id, e.schema_name, e.table_name
    LOOP
        PERFORM pg_logical_emit_message(true, {msg_erase}, ({schema}.current_context() || jsonb_build_object(
            'v', 1,
            'event_id', erased.event_id,
            'stream', erased.stream,
            'seq', erased.seq,
            'schema_name', erased.schema_name,
            'table_name', erased.table_name,
            'why', why,
            'db', {schema}.database_facts()))::text);
        n := n + 1;
    END LOOP;
    PERFORM set_config({guc_erasing}, '', true);
    RETURN n;
END
$fn$;
