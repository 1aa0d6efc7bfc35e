-- Session context: who is acting and why, set per transaction by the application, and the
-- statement trigger that turns it into a transactional logical message ahead of the rows.
-- Settings are transaction-local (set_config(..., true)), so context never leaks to the next
-- transaction on a pooled connection.

-- The database facts that no application can claim: who is connected, as whom, from where.
-- "current_user" is the role the session acts as (SET ROLE), read from the role setting
-- because inside a SECURITY DEFINER function current_user names the function owner.
--
-- These three functions run in every audited transaction, from the SECURITY DEFINER
-- functions below: they are plain SQL without a SET clause so that PostgreSQL inlines them
-- into the caller (a SQL function it cannot inline is planned again on every call, which cost
-- more than the rest of the capture together). Every name, type and operator in them is
-- schema-qualified, and none uses NULLIF or a simple CASE (both look "=" up in the
-- search_path): they mean the same whatever the caller's search_path, which capture_context
-- leaves in place. They run with the caller's privileges.
--
-- The facts as json text: capture_context embeds them in its message without going through
-- jsonb. `xid` is the caller's: the capture trigger assigns one, the others report it if any.
CREATE OR REPLACE FUNCTION {schema}.database_facts_json(xid pg_catalog.text)
RETURNS pg_catalog.json
LANGUAGE sql STABLE
AS $fn$
    SELECT pg_catalog.json_build_object(
        'session_user', session_user::pg_catalog.text,
        'current_user', CASE WHEN pg_catalog.current_setting('role') OPERATOR(pg_catalog.=) 'none'
                             THEN session_user::pg_catalog.text
                             ELSE pg_catalog.current_setting('role') END,
        'application_name', pg_catalog.current_setting('application_name'),
        'client_addr', pg_catalog.host(pg_catalog.inet_client_addr()),
        'backend_pid', pg_catalog.pg_backend_pid(),
        'database', pg_catalog.current_database(),
        'xid', xid)
$fn$;

CREATE OR REPLACE FUNCTION {schema}.database_facts() RETURNS pg_catalog.jsonb
LANGUAGE sql STABLE
AS $fn$
    SELECT {schema}.database_facts_json(
        pg_catalog.pg_current_xact_id_if_assigned()::pg_catalog.text)::pg_catalog.jsonb
$fn$;

-- What the application said, as set by set_context; '' (a finished transaction's leftover)
-- means nothing was said.
CREATE OR REPLACE FUNCTION {schema}.current_context() RETURNS pg_catalog.jsonb
LANGUAGE sql STABLE
AS $fn$
    SELECT CASE WHEN coalesce(pg_catalog.current_setting({guc_ctx}, true), '')
                         OPERATOR(pg_catalog.=) ''
                THEN pg_catalog.jsonb_build_object()
                ELSE pg_catalog.current_setting({guc_ctx}, true)::pg_catalog.jsonb END
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
    -- An empty string says nothing: it is left out like NULL.
    PERFORM set_config({guc_ctx}, jsonb_strip_nulls(jsonb_build_object(
        'actor_id', nullif(actor_id, ''), 'actor_role', nullif(actor_role, ''),
        'reason', nullif(reason, ''), 'on_behalf_of', nullif(on_behalf_of, ''),
        'session_id', nullif(session_id, ''), 'client_ip', client_ip,
        'trace_id', nullif(trace_id, ''), 'approval', nullif(approval, ''),
        'extra', extra))::text, true);
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

-- Called for every statement on an audited table; emits once per transaction and stream, and
-- again after set_context changes the context: the gate at the top compares the generation
-- emitted for the stream with the current one, both transaction-local settings.
-- Arguments: stream, on_missing (record | reject), required fields (comma separated, sorted).
--
-- The message (v 2) nests what the application said under "ctx" beside the bookkeeping and
-- the database facts, built as json text in one expression: merging jsonb values and printing
-- them again cost more than the rest of the trigger.
--
-- No SET search_path, unlike the other SECURITY DEFINER functions: this one runs on every
-- audited statement, and setting and restoring search_path around each call was a
-- measurable part of its cost (docs/benchmarks.md). It is safe without one because every
-- function, type and operator it names, and everything inlined into it, is schema-qualified:
-- a caller's search_path cannot substitute its own objects (pg_temp is never searched for
-- functions or operators). tests/integration/test_context_capture.py tries.
CREATE OR REPLACE FUNCTION {schema}.capture_context() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
AS $fn$
DECLARE
    generation  pg_catalog.text   := coalesce(pg_catalog.current_setting({guc_gen}, true), '');
    said        pg_catalog.jsonb;
    missing     pg_catalog.text[] := '{{}}';
    field       pg_catalog.text;
BEGIN
    IF coalesce(pg_catalog.current_setting({guc_emitted} OPERATOR(pg_catalog.||) TG_ARGV[0], true), '')
       OPERATOR(pg_catalog.=) ('e' OPERATOR(pg_catalog.||) generation) THEN
        RETURN NULL;  -- already emitted for this generation
    END IF;
    said := {schema}.current_context();
    IF pg_catalog.jsonb_typeof(said) OPERATOR(pg_catalog.<>) 'object' THEN
        RAISE EXCEPTION 'cdc-audit: the audit context was not set by set_context'
            USING ERRCODE = '22023';
    END IF;
    -- A loop, not a query: this runs in every audited transaction.
    IF TG_ARGV[2] OPERATOR(pg_catalog.<>) '' THEN
        FOREACH field IN ARRAY pg_catalog.string_to_array(TG_ARGV[2], ',') LOOP
            IF coalesce(said OPERATOR(pg_catalog.->>) field, '') OPERATOR(pg_catalog.=) '' THEN
                missing := missing OPERATOR(pg_catalog.||) field;
            END IF;
        END LOOP;
    END IF;
    IF TG_ARGV[1] OPERATOR(pg_catalog.=) 'reject'
       AND pg_catalog.cardinality(missing) OPERATOR(pg_catalog.>) 0 THEN
        RAISE EXCEPTION 'cdc-audit: % on %.% needs audit context: % missing',
            TG_OP, pg_catalog.quote_ident(TG_TABLE_SCHEMA), pg_catalog.quote_ident(TG_TABLE_NAME),
            pg_catalog.array_to_string(missing, ', ')
            USING ERRCODE = 'CA001',
                  HINT = 'call ' OPERATOR(pg_catalog.||) pg_catalog.quote_ident({schema_name})
                         OPERATOR(pg_catalog.||) '.set_context(...) earlier in the same transaction';
    END IF;
    PERFORM pg_catalog.pg_logical_emit_message(true, {msg_ctx}, pg_catalog.json_build_object(
        'v', 2,
        'stream', TG_ARGV[0],
        'generation', generation,
        'missing', missing,
        'db', {schema}.database_facts_json(pg_catalog.pg_current_xact_id()::pg_catalog.text),
        'ctx', said)::pg_catalog.text);
    PERFORM pg_catalog.set_config({guc_emitted} OPERATOR(pg_catalog.||) TG_ARGV[0],
                                  'e' OPERATOR(pg_catalog.||) generation, true);
    RETURN NULL;
END
$fn$;
