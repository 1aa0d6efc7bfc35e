-- Retention and incremental verification.

-- One row per stream and partition a purge dropped: what went, and the purge event in the
-- chain that records it (the chain, not this table, is what verification trusts).
CREATE TABLE {schema}.purge_log (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    stream          text        NOT NULL,
    partition_name  text        NOT NULL,
    range_from      timestamptz NOT NULL,
    range_to        timestamptz NOT NULL,
    first_seq       bigint      NOT NULL,
    last_seq        bigint      NOT NULL,
    event_count     bigint      NOT NULL,
    last_hash       bytea       NOT NULL,
    purge_event_id  uuid        NOT NULL,
    purged_at       timestamptz NOT NULL DEFAULT now(),
    purged_by       text        NOT NULL DEFAULT session_user
);

-- The verdicts of verification runs: `verify --since-last` starts after the newest good one.
CREATE TABLE {schema}.verification (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    stream          text        NOT NULL,
    verified_at     timestamptz NOT NULL DEFAULT now(),
    first_seq       bigint      NOT NULL,
    last_seq        bigint      NOT NULL,
    checked         bigint      NOT NULL,
    ok              boolean     NOT NULL,
    first_bad_seq   bigint,
    problem         text,
    -- The newest checkpoint verified: where the next incremental run starts.
    signed_up_to    bigint      NOT NULL,
    anchored_up_to  bigint,
    verified_by     text        NOT NULL DEFAULT session_user
);
CREATE INDEX ON {schema}.verification (stream, verified_at DESC);

-- Purge records are found by the last seq they dropped (verification starts there) and by
-- the id a purge gave them: two tiny partial indexes, whatever the size of the trail.
CREATE INDEX event_purge_last_seq ON {schema}.event (stream, (new ->> 'last_seq'))
    WHERE kind = 'purge';
CREATE INDEX event_purge_id ON {schema}.event (stream, (new ->> 'purge_id'))
    WHERE kind = 'purge';

-- verify's cross-check of erasures (every erased payload has its erasure recorded) runs on
-- every incremental verification: it reads only these, whatever the size of the trail.
CREATE INDEX event_erased ON {schema}.event (event_id) WHERE erased_at IS NOT NULL;
CREATE INDEX event_erasure_target ON {schema}.event ((new ->> 'event_id')) WHERE kind = 'erasure';

CREATE TRIGGER append_only BEFORE UPDATE OR DELETE ON {schema}.purge_log
    FOR EACH ROW EXECUTE FUNCTION {schema}.refuse_change();
CREATE TRIGGER append_only_truncate BEFORE TRUNCATE ON {schema}.purge_log
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.refuse_change();
CREATE TRIGGER append_only BEFORE UPDATE OR DELETE ON {schema}.verification
    FOR EACH ROW EXECUTE FUNCTION {schema}.refuse_change();
CREATE TRIGGER append_only_truncate BEFORE TRUNCATE ON {schema}.verification
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.refuse_change();
