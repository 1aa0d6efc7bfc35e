-- Schema changes and grants, recorded through event triggers as transactional messages, so a
-- DDL statement lands in the trail exactly when (and only if) it commits. Temporary objects
-- are application scratch space and are left out.

CREATE OR REPLACE FUNCTION {schema}.capture_ddl() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    objects jsonb;
BEGIN
    SELECT coalesce(jsonb_agg(jsonb_build_object(
               'command_tag', command_tag,
               'object_type', object_type,
               'schema_name', schema_name,
               'object_identity', object_identity,
               'in_extension', in_extension)), jsonb_build_array())
      INTO objects
      FROM pg_event_trigger_ddl_commands()
     WHERE coalesce(schema_name, '') NOT LIKE 'pg\_temp%'
       AND coalesce(schema_name, '') NOT LIKE 'pg\_toast\_temp%';
    IF jsonb_array_length(objects) = 0 THEN
        RETURN;
    END IF;
    PERFORM pg_logical_emit_message(true, {msg_ddl}, ({schema}.current_context() || jsonb_build_object(
        'v', 1,
        'command_tag', TG_TAG,
        'objects', objects,
        'statement', current_query(),
        'db', {schema}.database_facts()))::text);
END
$fn$;

CREATE OR REPLACE FUNCTION {schema}.capture_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    objects jsonb;
BEGIN
    SELECT coalesce(jsonb_agg(jsonb_build_object(
               'object_type', object_type,
               'schema_name', schema_name,
               'object_name', object_name,
               'object_identity', object_identity,
               'original', original)), jsonb_build_array())
      INTO objects
      FROM pg_event_trigger_dropped_objects()
     WHERE NOT is_temporary;
    IF jsonb_array_length(objects) = 0 THEN
        RETURN;
    END IF;
    PERFORM pg_logical_emit_message(true, {msg_ddl}, ({schema}.current_context() || jsonb_build_object(
        'v', 1,
        'command_tag', TG_TAG,
        'dropped', objects,
        'statement', current_query(),
        'db', {schema}.database_facts()))::text);
END
$fn$;
