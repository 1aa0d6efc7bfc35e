-- Hashed snapshots of audited tables: for one table, the digest of every row at one
-- consistent point (a REPEATABLE READ snapshot and the WAL positions around it), signed like
-- a checkpoint. `cdc-audit reconcile` replays the trail from one snapshot to the next and
-- proves the second digest follows from the first plus the recorded events.
-- See cdc_audit/snapshot.py for the digest and the signed statement.
CREATE TABLE {schema}.snapshot (
    id                bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    schema_name       text        NOT NULL,
    table_name        text        NOT NULL,
    taken_at          timestamptz NOT NULL,
    -- WAL insert position read before the snapshot (every commit before it is visible in
    -- the snapshot) and after it (every commit visible in it lies before it).
    lsn_before        pg_lsn      NOT NULL,
    lsn_after         pg_lsn      NOT NULL,
    -- pg_current_snapshot() of the transaction that read the rows: xmin:xmax:xip,...
    txid_snapshot     text        NOT NULL,
    row_count         bigint      NOT NULL,
    -- 512 lower-case hex characters: the sum of the row hashes modulo 2^2048.
    digest            text        NOT NULL,
    statement         jsonb       NOT NULL,
    key_id            text        NOT NULL,
    signature         bytea       NOT NULL,
    -- The applied policy whose column rules shaped the rows.
    policy_version_id bigint,
    CHECK (length(digest) = 512 AND digest ~ '^[0-9a-f]+$'),
    CHECK (row_count >= 0)
);

CREATE INDEX snapshot_table ON {schema}.snapshot (schema_name, table_name, id);

-- Append-only, like the rest of the trail.
CREATE TRIGGER append_only BEFORE UPDATE OR DELETE ON {schema}.snapshot
    FOR EACH ROW EXECUTE FUNCTION {schema}.refuse_change();
CREATE TRIGGER append_only_truncate BEFORE TRUNCATE ON {schema}.snapshot
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.refuse_change();

-- The worker's scheduled job appends snapshots; auditors read them.
GRANT SELECT, INSERT ON {schema}.snapshot TO {writer};
GRANT SELECT ON {schema}.snapshot TO {auditor};
