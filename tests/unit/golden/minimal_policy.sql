BEGIN;

-- role cdc_audit_owner (owner)
CREATE ROLE "cdc_audit_owner" NOLOGIN;

-- role cdc_audit_writer (writer)
CREATE ROLE "cdc_audit_writer" NOLOGIN;

-- role cdc_audit_reader (reader)
CREATE ROLE "cdc_audit_reader" NOLOGIN;

-- role cdc_audit_auditor (auditor)
CREATE ROLE "cdc_audit_auditor" NOLOGIN;

-- role cdc_audit_app (app)
CREATE ROLE "cdc_audit_app" NOLOGIN;

-- schema cdc_audit, owned by cdc_audit_owner
CREATE SCHEMA "cdc_audit" AUTHORIZATION "cdc_audit_owner";

-- audit schema migration 0001 trail
SET LOCAL ROLE "cdc_audit_owner";
-- The trail and the tables that describe the installation.
-- Runs as the audit owner; placeholders are identifiers filled by psycopg.sql.

CREATE TABLE "cdc_audit".schema_migration (
    version     integer     PRIMARY KEY,
    name        text        NOT NULL,
    checksum    text        NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);

-- One row per captured fact. Partitioned by month of commit time so that a retention purge
-- is a DROP of whole partitions. (stream, seq) is gapless per stream; the primary key must
-- carry the partition key, so uniqueness of seq alone is proven by the hash chain.
CREATE TABLE "cdc_audit".event (
    stream          text        NOT NULL,
    seq             bigint      NOT NULL,
    event_id        uuid        NOT NULL,
    commit_lsn      pg_lsn,
    commit_time     timestamptz NOT NULL,
    xid             bigint,
    kind            text        NOT NULL,
    schema_name     text,
    table_name      text,
    row_key         jsonb,
    old             jsonb,
    new             jsonb,
    changed         text[],
    actor_id        text,
    reason          text,
    context         jsonb,
    context_missing boolean     NOT NULL DEFAULT false,
    payload_hash    bytea       NOT NULL,
    prev_hash       bytea       NOT NULL,
    hash            bytea       NOT NULL,
    signature       bytea,
    key_id          text,
    sealed_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream, seq, commit_time)
) PARTITION BY RANGE (commit_time);

CREATE TABLE "cdc_audit".checkpoint (
    stream       text        NOT NULL,
    first_seq    bigint      NOT NULL,
    last_seq     bigint      NOT NULL,
    event_count  bigint      NOT NULL,
    head_hash    bytea       NOT NULL,
    merkle_root  bytea       NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    key_id       text        NOT NULL,
    signature    bytea       NOT NULL,
    statement    jsonb       NOT NULL,
    PRIMARY KEY (stream, last_seq)
);

CREATE TABLE "cdc_audit".signing_key (
    key_id      text        PRIMARY KEY,
    public_key  text        NOT NULL,
    algorithm   text        NOT NULL DEFAULT 'ed25519',
    added_at    timestamptz NOT NULL DEFAULT now(),
    added_by    text        NOT NULL DEFAULT session_user,
    retired_at  timestamptz
);

-- Where the worker is: the end LSN of the last whole transaction sealed, and how far it got
-- inside a transaction it was sealing in batches.
CREATE TABLE "cdc_audit".progress (
    slot_name    text        PRIMARY KEY,
    end_lsn      pg_lsn      NOT NULL DEFAULT '0/0',
    partial_lsn  pg_lsn,
    partial_done bigint,
    updated_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE "cdc_audit".policy_version (
    id               bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    action           text        NOT NULL,
    policy_version   integer,
    sha256           text,
    policy_text      text,
    schema_version   integer     NOT NULL,
    software_version text        NOT NULL,
    applied_by       text        NOT NULL DEFAULT session_user,
    applied_at       timestamptz NOT NULL DEFAULT now()
);

-- Installation state, not evidence: what apply did to each audited table, so that removing
-- the table from the policy can undo exactly that.
CREATE TABLE "cdc_audit".audited_table (
    schema_name                text        NOT NULL,
    table_name                 text        NOT NULL,
    stream                     text        NOT NULL,
    definition_sha256          text        NOT NULL,
    original_replica_identity  text        NOT NULL,
    installed_at               timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (schema_name, table_name)
);

CREATE TABLE "cdc_audit".install_setting (
    key    text PRIMARY KEY,
    value  text NOT NULL
);

-- The trail is append-only for everyone but a superuser, and what a superuser does to it is
-- caught by the hash chain and the external anchors.
CREATE FUNCTION "cdc_audit".refuse_change() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    RAISE EXCEPTION 'cdc-audit: % on %.% is refused: the audit trail is append-only',
        TG_OP, TG_TABLE_SCHEMA, TG_TABLE_NAME
        USING ERRCODE = 'CA002';
END
$fn$;

-- A key may be retired (retired_at set once), never changed or removed.
CREATE FUNCTION "cdc_audit".refuse_key_change() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF TG_OP = 'UPDATE' AND OLD.retired_at IS NULL AND NEW.retired_at IS NOT NULL
       AND (NEW.key_id, NEW.public_key, NEW.algorithm, NEW.added_at, NEW.added_by)
           IS NOT DISTINCT FROM (OLD.key_id, OLD.public_key, OLD.algorithm, OLD.added_at, OLD.added_by)
    THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'cdc-audit: % on %.% is refused: keys can only be retired',
        TG_OP, TG_TABLE_SCHEMA, TG_TABLE_NAME
        USING ERRCODE = 'CA002';
END
$fn$;

CREATE TRIGGER append_only BEFORE UPDATE OR DELETE ON "cdc_audit".event
    FOR EACH ROW EXECUTE FUNCTION "cdc_audit".refuse_change();
CREATE TRIGGER append_only_truncate BEFORE TRUNCATE ON "cdc_audit".event
    FOR EACH STATEMENT EXECUTE FUNCTION "cdc_audit".refuse_change();
CREATE TRIGGER append_only BEFORE UPDATE OR DELETE ON "cdc_audit".checkpoint
    FOR EACH ROW EXECUTE FUNCTION "cdc_audit".refuse_change();
CREATE TRIGGER append_only_truncate BEFORE TRUNCATE ON "cdc_audit".checkpoint
    FOR EACH STATEMENT EXECUTE FUNCTION "cdc_audit".refuse_change();
CREATE TRIGGER append_only BEFORE UPDATE OR DELETE ON "cdc_audit".policy_version
    FOR EACH ROW EXECUTE FUNCTION "cdc_audit".refuse_change();
CREATE TRIGGER append_only_truncate BEFORE TRUNCATE ON "cdc_audit".policy_version
    FOR EACH STATEMENT EXECUTE FUNCTION "cdc_audit".refuse_change();
CREATE TRIGGER retire_only BEFORE UPDATE OR DELETE ON "cdc_audit".signing_key
    FOR EACH ROW EXECUTE FUNCTION "cdc_audit".refuse_key_change();
CREATE TRIGGER append_only_truncate BEFORE TRUNCATE ON "cdc_audit".signing_key
    FOR EACH STATEMENT EXECUTE FUNCTION "cdc_audit".refuse_change();;
INSERT INTO "cdc_audit".schema_migration (version, name, checksum) VALUES (1, 'trail', '1e8298edc4305a9ba97d699139a702428ac239f11cf4bfef0ba732a9e61e98f9');
RESET ROLE;

-- audit schema migration 0002 event_indexes
SET LOCAL ROLE "cdc_audit_owner";
-- Indexes for the questions auditors ask. Created on the partitioned table, so every
-- partition, present and future, gets them.

-- Who did what, recently.
CREATE INDEX event_actor_time ON "cdc_audit".event (actor_id, commit_time);
-- The history of one row.
CREATE INDEX event_row_time ON "cdc_audit".event (schema_name, table_name, row_key, commit_time);
-- Look-up of one event, for proofs.
CREATE INDEX event_event_id ON "cdc_audit".event (event_id);
-- Time windows over the whole trail: commit time grows with insertion order, BRIN stays tiny.
CREATE INDEX event_time_brin ON "cdc_audit".event USING brin (commit_time);;
INSERT INTO "cdc_audit".schema_migration (version, name, checksum) VALUES (2, 'event_indexes', 'f4bdc9bcc8a719917ad0b78247d4e3732c3fbae27f51360c969c51227dd881c7');
RESET ROLE;

-- context, application event and DDL capture functions; privileges
SET LOCAL ROLE "cdc_audit_owner";
-- Session context: who is acting and why, set per transaction by the application, and the
-- statement trigger that turns it into a transactional logical message ahead of the rows.
-- Settings are transaction-local (set_config(..., true)), so context never leaks to the next
-- transaction on a pooled connection.

-- The database facts that no application can claim: who is connected, as whom, from where.
-- "current_user" is the role the session acts as (SET ROLE), read from the role setting
-- because inside a SECURITY DEFINER function current_user names the function owner.
CREATE OR REPLACE FUNCTION "cdc_audit".database_facts() RETURNS jsonb
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT jsonb_build_object(
        'session_user', session_user::text,
        'current_user', CASE current_setting('role')
                            WHEN 'none' THEN session_user::text
                            ELSE current_setting('role') END,
        'application_name', current_setting('application_name'),
        'client_addr', host(inet_client_addr()),
        'backend_pid', pg_backend_pid(),
        'database', current_database(),
        'xid', pg_current_xact_id_if_assigned()::text)
$fn$;

-- What the application said, as set by set_context; '' (a finished transaction's leftover)
-- means nothing was said.
CREATE OR REPLACE FUNCTION "cdc_audit".current_context() RETURNS jsonb
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT coalesce(nullif(current_setting('cdc_audit.ctx', true), '')::jsonb, jsonb_build_object())
$fn$;

CREATE OR REPLACE FUNCTION "cdc_audit".set_context(
    actor_id      text  DEFAULT NULL,
    actor_role    text  DEFAULT NULL,
    reason        text  DEFAULT NULL,
    on_behalf_of  text  DEFAULT NULL,
    session_id    text  DEFAULT NULL,
    client_ip     text  DEFAULT NULL,
    trace_id      text  DEFAULT NULL,
    extra         jsonb DEFAULT NULL
) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    generation bigint := coalesce(nullif(current_setting('cdc_audit.generation', true), ''), '0')::bigint + 1;
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
    PERFORM set_config('cdc_audit.ctx', jsonb_strip_nulls(jsonb_build_object(
        'actor_id', actor_id, 'actor_role', actor_role, 'reason', reason,
        'on_behalf_of', on_behalf_of, 'session_id', session_id, 'client_ip', client_ip,
        'trace_id', trace_id, 'extra', extra))::text, true);
    -- A new generation makes every context trigger fire once more in this transaction.
    PERFORM set_config('cdc_audit.generation', generation::text, true);
END
$fn$;

CREATE OR REPLACE FUNCTION "cdc_audit".clear_context() RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT "cdc_audit".set_context()
$fn$;

-- Fires once per transaction and stream, and again after set_context changes the context
-- (the WHEN clause of the trigger compares the emitted generation with the current one).
-- Arguments: stream, on_missing (record | reject), required fields (comma separated).
CREATE OR REPLACE FUNCTION "cdc_audit".capture_context() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    stream      text   := TG_ARGV[0];
    on_missing  text   := TG_ARGV[1];
    required    text[] := string_to_array(nullif(TG_ARGV[2], ''), ',');
    generation  text   := coalesce(current_setting('cdc_audit.generation', true), '');
    said        jsonb  := "cdc_audit".current_context();
    missing     text[];
BEGIN
    IF jsonb_typeof(said) <> 'object' THEN
        RAISE EXCEPTION 'cdc-audit: the audit context was not set by set_context'
            USING ERRCODE = '22023';
    END IF;
    SELECT coalesce(array_agg(field ORDER BY field), ARRAY[]::text[]) INTO missing
      FROM unnest(required) AS field
     WHERE coalesce(said ->> field, '') = '';
    IF cardinality(missing) > 0 AND on_missing = 'reject' THEN
        RAISE EXCEPTION 'cdc-audit: % on %.% needs audit context: % missing',
            TG_OP, quote_ident(TG_TABLE_SCHEMA), quote_ident(TG_TABLE_NAME),
            array_to_string(missing, ', ')
            USING ERRCODE = 'CA001',
                  HINT = 'call ' || quote_ident('cdc_audit') || '.set_context(...) earlier in the same transaction';
    END IF;
    PERFORM pg_logical_emit_message(true, 'cdc_audit.ctx', (said || jsonb_build_object(
        'v', 1,
        'stream', stream,
        'generation', generation,
        'missing', to_jsonb(missing),
        'db', "cdc_audit".database_facts() || jsonb_build_object('xid', pg_current_xact_id()::text)))::text);
    PERFORM set_config('cdc_audit.emitted_' || stream, 'e' || generation, true);
    RETURN NULL;
END
$fn$;;
-- Application events (logins, denied access, admin actions) recorded in the trail through a
-- function, never through pg_logical_emit_message, which applications may not call.
-- durable => true emits outside the transaction, so the event survives a rollback.
CREATE OR REPLACE FUNCTION "cdc_audit".log_event(
    action    text,
    resource  text    DEFAULT NULL,
    outcome   text    DEFAULT 'success',
    details   jsonb   DEFAULT '{}',
    durable   boolean DEFAULT false
) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF NULL::text IS NULL THEN
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
    PERFORM pg_logical_emit_message(NOT durable, 'cdc_audit.app', ("cdc_audit".current_context() || jsonb_build_object(
        'v', 1,
        'stream', NULL::text,
        'action', action,
        'resource', resource,
        'outcome', outcome,
        'details', coalesce(details, jsonb_build_object()),
        'durable', durable,
        'db', "cdc_audit".database_facts()))::text);
END
$fn$;;
-- Schema changes and grants, recorded through event triggers as transactional messages, so a
-- DDL statement lands in the trail exactly when (and only if) it commits. Temporary objects
-- are application scratch space and are left out.

CREATE OR REPLACE FUNCTION "cdc_audit".capture_ddl() RETURNS event_trigger
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
    PERFORM pg_logical_emit_message(true, 'cdc_audit.ddl', ("cdc_audit".current_context() || jsonb_build_object(
        'v', 1,
        'command_tag', TG_TAG,
        'objects', objects,
        'statement', current_query(),
        'db', "cdc_audit".database_facts()))::text);
END
$fn$;

CREATE OR REPLACE FUNCTION "cdc_audit".capture_drop() RETURNS event_trigger
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
    PERFORM pg_logical_emit_message(true, 'cdc_audit.ddl', ("cdc_audit".current_context() || jsonb_build_object(
        'v', 1,
        'command_tag', TG_TAG,
        'dropped', objects,
        'statement', current_query(),
        'db', "cdc_audit".database_facts()))::text);
END
$fn$;;
-- Monthly partitions of the trail, created ahead of time so that sealing never fails at a
-- month boundary. Boundaries are in UTC whatever the session's TimeZone.

CREATE OR REPLACE FUNCTION "cdc_audit".ensure_event_partition(moment timestamptz) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    month_start timestamptz := date_trunc('month', moment, 'UTC');
    month_end   timestamptz := month_start + interval '1 month';
    partition   text := 'event_' || to_char(month_start AT TIME ZONE 'UTC', 'YYYY_MM');
BEGIN
    IF to_regclass(format('%I.%I', 'cdc_audit', partition)) IS NOT NULL THEN
        RETURN false;
    END IF;
    EXECUTE format('CREATE TABLE %I.%I PARTITION OF %I.event FOR VALUES FROM (%L) TO (%L)',
                   'cdc_audit', partition, 'cdc_audit', month_start, month_end);
    -- Statement triggers are not inherited: a TRUNCATE of one partition needs its own guard.
    EXECUTE format('CREATE TRIGGER append_only_truncate BEFORE TRUNCATE ON %I.%I '
                   'FOR EACH STATEMENT EXECUTE FUNCTION %I.refuse_change()',
                   'cdc_audit', partition, 'cdc_audit');
    RETURN true;
END
$fn$;

-- The month before this one (for a worker catching up across a boundary) up to months_ahead.
CREATE OR REPLACE FUNCTION "cdc_audit".ensure_event_partitions(months_ahead integer DEFAULT 3)
RETURNS integer
LANGUAGE sql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT count(*) FILTER (WHERE "cdc_audit".ensure_event_partition(now() + make_interval(months => m)))::integer
      FROM generate_series(-1, months_ahead) AS m
$fn$;

CREATE OR REPLACE FUNCTION "cdc_audit".missing_event_partitions(months_ahead integer DEFAULT 3)
RETURNS integer
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT count(*)::integer
      FROM generate_series(-1, months_ahead) AS m
     WHERE to_regclass(format('%I.%I', 'cdc_audit',
               'event_' || to_char(date_trunc('month', now() + make_interval(months => m), 'UTC')
                                    AT TIME ZONE 'UTC', 'YYYY_MM'))) IS NULL
$fn$;;
-- Least privilege. Nothing in the audit schema is reachable through PUBLIC; each role gets
-- exactly what its job needs. Re-run on every change of the runtime, so it must be idempotent.

REVOKE ALL ON SCHEMA "cdc_audit" FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA "cdc_audit" FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA "cdc_audit" FROM PUBLIC;
GRANT USAGE ON SCHEMA "cdc_audit" TO "cdc_audit_writer", "cdc_audit_reader", "cdc_audit_auditor", "cdc_audit_app";

-- The worker: appends to the trail, moves its progress, reads what it needs to seal.
GRANT SELECT, INSERT ON "cdc_audit".event, "cdc_audit".checkpoint TO "cdc_audit_writer";
GRANT SELECT, INSERT, UPDATE ON "cdc_audit".progress TO "cdc_audit_writer";
GRANT SELECT ON "cdc_audit".signing_key, "cdc_audit".policy_version, "cdc_audit".audited_table,
                "cdc_audit".install_setting, "cdc_audit".schema_migration TO "cdc_audit_writer";
GRANT EXECUTE ON FUNCTION "cdc_audit".ensure_event_partition(timestamptz),
                          "cdc_audit".ensure_event_partitions(integer),
                          "cdc_audit".missing_event_partitions(integer) TO "cdc_audit_writer";

-- Auditors read everything.
GRANT SELECT ON ALL TABLES IN SCHEMA "cdc_audit" TO "cdc_audit_auditor";

-- Applications say who is acting and log their own events; they never see the trail.
GRANT EXECUTE ON FUNCTION "cdc_audit".set_context(text, text, text, text, text, text, text, jsonb),
                          "cdc_audit".clear_context(),
                          "cdc_audit".current_context(),
                          "cdc_audit".log_event(text, text, text, jsonb, boolean) TO "cdc_audit_app";;
RESET ROLE;
INSERT INTO "cdc_audit".install_setting (key, value) VALUES ('runtime_sha256', '438e1cd3e4f6d2085e0fcea55ed0de8bc613b2e498b5ca66e5c55995ad5cb9ad') ON CONFLICT (key) DO UPDATE SET value = excluded.value;

-- monthly partitions of the trail, from last month to three months ahead
SELECT "cdc_audit".ensure_event_partitions(3);

-- only the audit owner may emit logical messages (PUBLIC may by default)
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
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %I', fn, 'cdc_audit_owner');
    END LOOP;
END
$do$;

-- publication cdc_audit; partitioned tables publish through their root
CREATE PUBLICATION "cdc_audit" WITH (publish_via_partition_root = true);

-- record policy version 1 (sha256 <sha>…)
INSERT INTO "cdc_audit".policy_version (action, policy_version, sha256, policy_text, schema_version, software_version) VALUES ('apply', 1, '<sha256>', '<policy text>', 2, '0.1.0');
INSERT INTO "cdc_audit".install_setting (key, value) VALUES ('slot_name', 'cdc_audit_shop') ON CONFLICT (key) DO UPDATE SET value = excluded.value;

COMMIT;

-- replication slot cdc_audit_shop (pgoutput); created outside the transaction
SELECT pg_create_logical_replication_slot('cdc_audit_shop', 'pgoutput');
