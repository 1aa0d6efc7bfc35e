BEGIN;

-- role cdc_audit_owner (owner)
CREATE ROLE "cdc_audit_owner" NOLOGIN;

-- role cdc_audit_writer (writer), bypassing row-level security
CREATE ROLE "cdc_audit_writer" NOLOGIN BYPASSRLS;

-- role cdc_audit_reader (reader)
CREATE ROLE "cdc_audit_reader" NOLOGIN;

-- role cdc_audit_auditor (auditor)
CREATE ROLE "cdc_audit_auditor" NOLOGIN;

-- role cdc_audit_app (app)
CREATE ROLE "cdc_audit_app" NOLOGIN;

-- schema cdc_audit, owned by cdc_audit_owner
CREATE SCHEMA "cdc_audit" AUTHORIZATION "cdc_audit_owner";

-- audit schema migration 0001 trail

-- audit schema migration 0002 event_indexes

-- audit schema migration 0003 worker_progress

-- audit schema migration 0004 erasure

-- audit schema migration 0005 retention

-- audit schema migration 0006 snapshots

-- audit schema migration 0007 privileges

-- audit schema migration 0008 visible_events

-- audit schema migration 0009 read_side

-- audit schema migration 0010 approvals

-- audit schema migration 0011 row_security

-- audit schema migration 0012 read_pages

-- audit schema migration 0013 status_indexes

-- context, application event and DDL capture functions; privileges

-- monthly partitions of the trail, by stream, from last month to three months ahead
INSERT INTO "cdc_audit".install_setting (key, value) VALUES ('streams', 'admin,user') ON CONFLICT (key) DO UPDATE SET value = excluded.value;
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

-- the reader role sees stream(s): none
INSERT INTO "cdc_audit".install_setting (key, value) VALUES ('reader_streams', '') ON CONFLICT (key) DO UPDATE SET value = excluded.value;

-- reads are not recorded (no read_audit)
INSERT INTO "cdc_audit".install_setting (key, value) VALUES ('read_audit_stream', '') ON CONFLICT (key) DO UPDATE SET value = excluded.value;

-- admin_actions shows stream admin
INSERT INTO "cdc_audit".install_setting (key, value) VALUES ('admin_streams', 'admin') ON CONFLICT (key) DO UPDATE SET value = excluded.value;

-- publication cdc_audit; partitioned tables publish through their root
CREATE PUBLICATION "cdc_audit" WITH (publish_via_partition_root = true);

-- audit public.accounts (stream user)
ALTER TABLE "public"."accounts" REPLICA IDENTITY FULL;
-- The statement trigger that emits the transaction's context ahead of its rows. It has no
-- WHEN clause: PostgreSQL prepares a trigger's WHEN expression again for every statement it
-- fires on, and the gate (once per transaction and stream, and once more after each
-- set_context) cost more that way than calling the function, which checks it first and
-- returns (docs/adr/0007-a-lean-capture-trigger.md).
CREATE OR REPLACE TRIGGER "cdc_audit_context"
    BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON "public"."accounts"
    FOR EACH STATEMENT
    EXECUTE FUNCTION "cdc_audit".capture_context('user', 'record', 'actor_id');
ALTER PUBLICATION "cdc_audit" ADD TABLE "public"."accounts" WHERE (status <> 'draft');
INSERT INTO "cdc_audit".audited_table (schema_name, table_name, stream, definition_sha256, original_replica_identity) VALUES ('public', 'accounts', 'user', '449daffd789a8dcf2ab84c4096a61a46e3a2ee70cc152795590d839862e42cc1', 'd') ON CONFLICT (schema_name, table_name) DO UPDATE SET stream = excluded.stream, definition_sha256 = excluded.definition_sha256, installed_at = now();

-- audit "Sales"."Order Items" (stream user)
ALTER TABLE "Sales"."Order Items" REPLICA IDENTITY FULL;
-- The statement trigger that emits the transaction's context ahead of its rows. It has no
-- WHEN clause: PostgreSQL prepares a trigger's WHEN expression again for every statement it
-- fires on, and the gate (once per transaction and stream, and once more after each
-- set_context) cost more that way than calling the function, which checks it first and
-- returns (docs/adr/0007-a-lean-capture-trigger.md).
CREATE OR REPLACE TRIGGER "cdc_audit_context"
    BEFORE INSERT OR UPDATE ON "Sales"."Order Items"
    FOR EACH STATEMENT
    EXECUTE FUNCTION "cdc_audit".capture_context('user', 'record', 'actor_id');
ALTER PUBLICATION "cdc_audit" ADD TABLE "Sales"."Order Items";
INSERT INTO "cdc_audit".audited_table (schema_name, table_name, stream, definition_sha256, original_replica_identity) VALUES ('Sales', 'Order Items', 'user', '03cb971afb5a92f29d3260454ea98576cbfda251630adfbba367956268dc259a', 'd') ON CONFLICT (schema_name, table_name) DO UPDATE SET stream = excluded.stream, definition_sha256 = excluded.definition_sha256, installed_at = now();

-- audit public.roles (stream admin)
-- The statement trigger that emits the transaction's context ahead of its rows. It has no
-- WHEN clause: PostgreSQL prepares a trigger's WHEN expression again for every statement it
-- fires on, and the gate (once per transaction and stream, and once more after each
-- set_context) cost more that way than calling the function, which checks it first and
-- returns (docs/adr/0007-a-lean-capture-trigger.md).
CREATE OR REPLACE TRIGGER "cdc_audit_context"
    BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON "public"."roles"
    FOR EACH STATEMENT
    EXECUTE FUNCTION "cdc_audit".capture_context('admin', 'reject', 'actor_id,reason');
ALTER PUBLICATION "cdc_audit" ADD TABLE "public"."roles";
INSERT INTO "cdc_audit".audited_table (schema_name, table_name, stream, definition_sha256, original_replica_identity) VALUES ('public', 'roles', 'admin', 'c39ecca50875d2f73eba84e0b7a509f345ddb8768fed1154744878f839634b6a', 'd') ON CONFLICT (schema_name, table_name) DO UPDATE SET stream = excluded.stream, definition_sha256 = excluded.definition_sha256, installed_at = now();

-- event triggers recording schema changes, grants and drops
-- Schema changes and drops, recorded in the trail when they commit.
CREATE EVENT TRIGGER "cdc_audit_ddl" ON ddl_command_end
    EXECUTE FUNCTION "cdc_audit".capture_ddl();
CREATE EVENT TRIGGER "cdc_audit_drop" ON sql_drop
    EXECUTE FUNCTION "cdc_audit".capture_drop();

-- record policy version 1 (sha256 <sha>…)
INSERT INTO "cdc_audit".policy_version (action, policy_version, sha256, policy_text, schema_version, software_version) VALUES ('apply', 1, '<sha256>', 'version: 1
schema: cdc_audit
context:
  require: [actor_id]
  on_missing: record
streams:
  user:  {retention: 400d, sign: checkpoint}
  admin: {retention: 7y, sign: every_row, require: [actor_id, reason], on_missing: reject}
tables:
  - table: public.accounts
    stream: user
    exclude: [updated_at]
    redact: {email: hash, ssn: mask}
    when: "status <> ''draft''"
  - table: ''"Sales"."Order Items"''
    stream: user
    operations: [insert, update]
  - table: public.roles
    stream: admin
    old_values: key
ddl: {stream: admin}
app_events: {stream: user}
', 13, '0.1.0');
INSERT INTO "cdc_audit".install_setting (key, value) VALUES ('slot_name', 'cdc_audit_shop') ON CONFLICT (key) DO UPDATE SET value = excluded.value;
SELECT pg_logical_emit_message(true, 'cdc_audit.policy', (SELECT max(id)::text FROM "cdc_audit".policy_version));

COMMIT;

-- replication slot cdc_audit_shop (pgoutput); created outside the transaction
SELECT pg_create_logical_replication_slot('cdc_audit_shop', 'pgoutput');
