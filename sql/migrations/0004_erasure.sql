-- Erasure (for instance under the GDPR): an event's payload may be removed, never its header
-- or its payload_hash, so the chain still verifies and the erasure itself stays visible.
ALTER TABLE {schema}.event ADD COLUMN erased_at timestamptz;

-- The event table's guard, with the one change erasure needs: every payload column set to
-- NULL and erased_at set, by the erase_event function (which sets the flag), nothing else.
CREATE FUNCTION {schema}.guard_event() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF TG_OP = 'UPDATE'
       AND current_setting({guc_erasing}, true) = 'on'
       AND OLD.erased_at IS NULL AND NEW.erased_at IS NOT NULL
       AND NEW.row_key IS NULL AND NEW.old IS NULL AND NEW.new IS NULL AND NEW.changed IS NULL
       AND NEW.actor_id IS NULL AND NEW.reason IS NULL AND NEW.context IS NULL
       AND (NEW.stream, NEW.seq, NEW.event_id, NEW.commit_lsn, NEW.commit_time, NEW.xid,
            NEW.kind, NEW.schema_name, NEW.table_name, NEW.context_missing, NEW.payload_hash,
            NEW.prev_hash, NEW.hash, NEW.signature, NEW.key_id, NEW.sealed_at)
           IS NOT DISTINCT FROM
           (OLD.stream, OLD.seq, OLD.event_id, OLD.commit_lsn, OLD.commit_time, OLD.xid,
            OLD.kind, OLD.schema_name, OLD.table_name, OLD.context_missing, OLD.payload_hash,
            OLD.prev_hash, OLD.hash, OLD.signature, OLD.key_id, OLD.sealed_at)
    THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'cdc-audit: % on %.% is refused: the audit trail is append-only',
        TG_OP, TG_TABLE_SCHEMA, TG_TABLE_NAME
        USING ERRCODE = 'CA002';
END
$fn$;

DROP TRIGGER append_only ON {schema}.event;
CREATE TRIGGER append_only BEFORE UPDATE OR DELETE ON {schema}.event
    FOR EACH ROW EXECUTE FUNCTION {schema}.guard_event();
