-- Session context: who is acting and why, set per transaction by the application, and the
-- statement trigger that turns it into a transactional logical message ahead of the rows.
-- Settings are transaction-local (set_config(..., true)), so context never leaks to the next
-- transaction on a pooled connection.

-- The database facts that no application can claim: who is connected, as whom, from where.
-- "current_user" is the role the session acts as (SET ROLE), read from the role setting
-- because inside a SECURITY DEFINER function current_user names the function owner.
--
-- This function and current_context() run in every audited transaction, from the SECURITY
-- DEFINER functions below: they are plain SQL without a SET clause so that PostgreSQL inlines
-- them into the caller (a SQL function it cannot inline is planned again on every call, which
-- cost more than the rest of the capture together). Everything in them is schema-qualified,
-- so they mean the same whatever the caller's search_path; they run with the caller's
-- privileges, and every SECURITY DEFINER caller pins its own search_path.
CREATE OR REPLACE FUNCTION {schema}.database_facts() RETURNS pg_catalog.jsonb
LANGUAGE sql STABLE
AS $fn$
    SELECT pg_catalog.jsonb_build_object(
        'session_user', session_user::pg_catalog.text,
        'current_user', CASE pg_catalog.current_setting('role')
                            WHEN 'none' THEN session_user::pg_catalog.text
                            ELSE pg_catalog.current_setting('role') END,
        'application_name', pg_catalog.current_setting('application_name'),
        'client_addr', pg_catalog.host(pg_catalog.inet_client_addr()),
        'backend_pid', pg_catalog.pg_backend_pid(),
        'database', pg_catalog.current_database(),
        'xid', pg_catalog.pg_current_xact_id_if_assigned()::pg_catalog.text)
$fn$;

-- What the application said, as set by set_context; '' (a finished transaction's leftover)
-- means nothing was said.
CREATE OR REPLACE FUNCTION {schema}.current_context() RETURNS pg_catalog.jsonb
LANGUAGE sql STABLE
AS $fn$
    SELECT coalesce(nullif(pg_catalog.current_setting({guc_ctx}, true), '')::pg_catalog.jsonb,
                    pg_catalog.jsonb_build_object())
$fn$;

CREATE OR REPLACE FUNCTION {schema}.set_context(
    actor_id      text  DEFAULT NULL,
    actor_role    text  DEFAULT NULL,
    reason        text  DEFAULT NULL,
    on_behalf_of  text  DEFAULT NULL,
    session_id    text  DEFAULT NULL,
    client_ip     text  DEFAULT NULL,
    trace_id      text  DEFAULT NULL,
    extra         jsonb DEFAULT NULL,
    approval      text  DEFAULT NULL
) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    generation bigint := coalesce(nullif(current_setting({guc_gen}, true), ''), '0')::bigint + 1;
BEGIN
    IF client_ip IS NOT NULL AND client_ip !~ '^[0-9A-Fa-f:.]+(/[0-9]+)?$' THEN
        RAISE EXCEPTION 'cdc-audit: client_ip % is not an IP address', quote_literal(client_ip)
            USING ERRCODE = '22023';
    END IF;
    IF client_ip IS NOT NULL THEN
        client_ip := host(client_ip::inet);
    END IF;
    IF extra IS NOT NULL AND jsonb_typeof(extra) <> 'object' THEN
        RAISE EXCEPTION 'cdc-audit: extra must be a JSON object, not %', jsonb_typeof(extra)
            USING ERRCODE = '22023';
    END IF;
    PERFORM set_config({guc_ctx}, jsonb_strip_nulls(jsonb_build_object(
        'actor_id', actor_id, 'actor_role', actor_role, 'reason', reason,
        'on_behalf_of', on_behalf_of, 'session_id', session_id, 'client_ip', client_ip,
        'trace_id', trace_id, 'approval', approval, 'extra', extra))::text, true);
    -- A new generation makes every context trigger fire once more in this transaction.
    PERFORM set_config({guc_gen}, generation::text, true);
END
$fn$;

CREATE OR REPLACE FUNCTION {schema}.clear_context() RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT {schema}.set_context()
$fn$;

-- Fires once per transaction and stream, and again after set_context changes the context
-- (the WHEN clause of the trigger compares the emitted generation with the current one).
-- Arguments: stream, on_missing (record | reject), required fields (comma separated).
CREATE OR REPLACE FUNCTION {schema}.capture_context() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    stream      text   := TG_ARGV[0];
    on_missing  text   := TG_ARGV[1];
    generation  text   := coalesce(current_setting({guc_gen}, true), '');
    said        jsonb  := {schema}.current_context();
    missing     text[] := ARRAY[]::text[];
    field       text;
BEGIN
    IF jsonb_typeof(said) <> 'object' THEN
        RAISE EXCEPTION 'cdc-audit: the audit context was not set by set_context'
            USING ERRCODE = '22023';
    END IF;
    -- A loop, not a query: this runs in every audited transaction.
    IF TG_ARGV[2] <> '' THEN
        FOREACH field IN ARRAY string_to_array(TG_ARGV[2], ',') LOOP
            IF coalesce(said ->> field, '') = '' THEN
                missing := missing || field;
            END IF;
        END LOOP;
        IF cardinality(missing) > 1 THEN
            missing := ARRAY(SELECT m FROM unnest(missing) AS m ORDER BY m);
        END IF;
    END IF;
    IF cardinality(missing) > 0 AND on_missing = 'reject' THEN
        RAISE EXCEPTION 'cdc-audit: % on %.% needs audit context: % missing',
            TG_OP, quote_ident(TG_TABLE_SCHEMA), quote_ident(TG_TABLE_NAME),
            array_to_string(missing, ', ')
            USING ERRCODE = 'CA001',
                  HINT = 'call ' || quote_ident({schema_name}) || '.set_context(...) earlier in the same transaction';
    END IF;
    PERFORM pg_logical_emit_message(true, {msg_ctx}, (said || jsonb_build_object(
        'v', 1,
        'stream', stream,
        'generation', generation,
        'missing', to_jsonb(missing),
        'db', {schema}.database_facts() || jsonb_build_object('xid', pg_current_xact_id()::text)))::text);
    PERFORM set_config({guc_emitted} || stream, 'e' || generation, true);
    RETURN NULL;
END
$fn$;
