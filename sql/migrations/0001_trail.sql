-- The trail and the tables that describe the installation.
-- Runs as the audit owner; placeholders are identifiers filled by psycopg.sql.

CREATE TABLE {schema}.schema_migration (
    version     integer     PRIMARY KEY,
    name        text        NOT NULL,
    checksum    text        NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);

-- One row per captured fact. Partitioned by month of commit time so that a retention purge
-- is a DROP of whole partitions. (stream, seq) is gapless per stream; the primary key must
-- carry the partition key, so uniqueness of seq alone is proven by the hash chain.
CREATE TABLE {schema}.event (
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

CREATE TABLE {schema}.checkpoint (
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

CREATE TABLE {schema}.signing_key (
    key_id      text        PRIMARY KEY,
    public_key  text        NOT NULL,
    algorithm   text        NOT NULL DEFAULT 'ed25519',
    added_at    timestamptz NOT NULL DEFAULT now(),
    added_by    text        NOT NULL DEFAULT session_user,
    retired_at  timestamptz
);

-- Where the worker is: the end LSN of the last whole transaction sealed, and how far it got
-- inside a transaction it was sealing in batches.
CREATE TABLE {schema}.progress (
    slot_name    text        PRIMARY KEY,
    end_lsn      pg_lsn      NOT NULL DEFAULT '0/0',
    partial_lsn  pg_lsn,
    partial_done bigint,
    updated_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE {schema}.policy_version (
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
CREATE TABLE {schema}.audited_table (
    schema_name                text        NOT NULL,
    table_name                 text        NOT NULL,
    stream                     text        NOT NULL,
    definition_sha256          text        NOT NULL,
    original_replica_identity  text        NOT NULL,
    installed_at               timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (schema_name, table_name)
);

CREATE TABLE {schema}.install_setting (
    key    text PRIMARY KEY,
    value  text NOT NULL
);

-- The trail is append-only for everyone but a superuser, and what a superuser does to it is
-- caught by the hash chain and the external anchors.
CREATE FUNCTION {schema}.refuse_change() RETURNS trigger
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
CREATE FUNCTION {schema}.refuse_key_change() RETURNS trigger
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

CREATE TRIGGER append_only BEFORE UPDATE OR DELETE ON {schema}.event
    FOR EACH ROW EXECUTE FUNCTION {schema}.refuse_change();
CREATE TRIGGER append_only_truncate BEFORE TRUNCATE ON {schema}.event
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.refuse_change();
CREATE TRIGGER append_only BEFORE UPDATE OR DELETE ON {schema}.checkpoint
    FOR EACH ROW EXECUTE FUNCTION {schema}.refuse_change();
CREATE TRIGGER append_only_truncate BEFORE TRUNCATE ON {schema}.checkpoint
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.refuse_change();
CREATE TRIGGER append_only BEFORE UPDATE OR DELETE ON {schema}.policy_version
    FOR EACH ROW EXECUTE FUNCTION {schema}.refuse_change();
CREATE TRIGGER append_only_truncate BEFORE TRUNCATE ON {schema}.policy_version
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.refuse_change();
CREATE TRIGGER retire_only BEFORE UPDATE OR DELETE ON {schema}.signing_key
    FOR EACH ROW EXECUTE FUNCTION {schema}.refuse_key_change();
CREATE TRIGGER append_only_truncate BEFORE TRUNCATE ON {schema}.signing_key
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.refuse_change();
