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
INSERT INTO "cdc_audit".install_setting (key, value) VALUES ('streams', 'user') ON CONFLICT (key) DO UPDATE SET value = excluded.value;
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

-- admin_actions shows administrative kinds only (no ddl stream)
INSERT INTO "cdc_audit".install_setting (key, value) VALUES ('admin_streams', '') ON CONFLICT (key) DO UPDATE SET value = excluded.value;

-- publication cdc_audit; partitioned tables publish through their root
CREATE PUBLICATION "cdc_audit" WITH (publish_via_partition_root = true);

-- record policy version 1 (sha256 <sha>…)
INSERT INTO "cdc_audit".policy_version (action, policy_version, sha256, policy_text, schema_version, software_version) VALUES ('apply', 1, '<sha256>', '<policy text>', 13, '0.1.0');
INSERT INTO "cdc_audit".install_setting (key, value) VALUES ('slot_name', 'cdc_audit_shop') ON CONFLICT (key) DO UPDATE SET value = excluded.value;
SELECT pg_logical_emit_message(true, 'cdc_audit.policy', (SELECT max(id)::text FROM "cdc_audit".policy_version));

COMMIT;

-- replication slot cdc_audit_shop (pgoutput); created outside the transaction
SELECT pg_create_logical_replication_slot('cdc_audit_shop', 'pgoutput');
