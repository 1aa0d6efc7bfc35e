-- A position marker in the replication stream, for the worker only.
-- It commits a transaction holding one logical message, so the walsender must deliver a
-- Commit past this point: `worker --drain` knows it has sealed everything committed before it
-- started once it has passed the returned LSN, and a heartbeat moves the slot forward while
-- audited tables are idle and others are busy. Emitted by the owner, since the worker's role
-- may not call pg_logical_emit_message itself.
CREATE OR REPLACE FUNCTION {schema}.mark(token text) RETURNS pg_lsn
LANGUAGE sql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT pg_logical_emit_message(true, {msg_mark}, token)
$fn$;
