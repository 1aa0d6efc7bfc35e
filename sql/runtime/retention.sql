-- Retention: a purge first records what it is about to drop as an event of the purged stream
-- (chained and signed with what remains, so verification can start after it), then drops the
-- partition. Both steps run as the audit owner through these functions.

CREATE OR REPLACE FUNCTION {schema}.record_purge(content jsonb) RETURNS pg_lsn
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    RETURN pg_logical_emit_message(true, {msg_purge},
        ({schema}.current_context() || content
         || jsonb_build_object('v', 1, 'db', {schema}.database_facts()))::text);
END
$fn$;

-- Drops one partition of the trail, refusing unless every event in it is older than `cutoff`
-- and, for each stream in it, the sealed purge event recording its last event exists.
CREATE OR REPLACE FUNCTION {schema}.drop_event_partition(leaf text, cutoff timestamptz)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    found     record;
    dropped   bigint := 0;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM {schema}.event_leaves() l WHERE l.leaf_name = leaf) THEN
        RAISE EXCEPTION 'cdc-audit: % is not a partition of the trail', leaf USING ERRCODE = '22023';
    END IF;
    FOR found IN EXECUTE format(
        'SELECT stream, max(seq) AS last_seq, max(commit_time) AS newest, count(*) AS n'
        ' FROM %I.%I GROUP BY stream', {schema_name}, leaf)
    LOOP
        IF found.newest >= cutoff THEN
            RAISE EXCEPTION 'cdc-audit: % holds events of stream % younger than %',
                leaf, found.stream, cutoff USING ERRCODE = '22023';
        END IF;
        IF NOT EXISTS (SELECT 1 FROM {schema}.event e
                        WHERE e.stream = found.stream AND e.kind = 'purge'
                          AND e.new ->> 'partition' = leaf
                          AND (e.new ->> 'last_seq')::bigint = found.last_seq) THEN
            RAISE EXCEPTION 'cdc-audit: no sealed purge event records % of stream %',
                leaf, found.stream USING ERRCODE = '22023';
        END IF;
        dropped := dropped + found.n;
    END LOOP;
    EXECUTE format('DROP TABLE %I.%I', {schema_name}, leaf);
    RETURN dropped;
END
$fn$;

REVOKE ALL ON FUNCTION {schema}.record_purge(jsonb),
                       {schema}.drop_event_partition(text, timestamptz) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION {schema}.record_purge(jsonb),
                          {schema}.drop_event_partition(text, timestamptz),
                          {schema}.event_leaves(),
                          {schema}.trail_stream_names(),
                          {schema}.default_holds(text, text) TO {writer};
-- The tables come with migration 0005; an installation held at an older schema has none.
DO $do$
BEGIN
    IF to_regclass({schema_name} || '.purge_log') IS NOT NULL THEN
        GRANT SELECT, INSERT ON {schema}.purge_log, {schema}.verification TO {writer};
    END IF;
END
$do$;
