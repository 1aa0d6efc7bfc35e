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

-- Drops one partition of the trail, refusing unless its month ended by `cutoff` (so every
-- event in it is older) and, for each stream in it, the sealed purge event recording its last
-- event exists. Reads only the primary key index, never the rows: a month of a busy stream
-- goes in milliseconds.
CREATE OR REPLACE FUNCTION {schema}.drop_event_partition(leaf text, cutoff timestamptz)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    month_end   timestamptz;
    held        text;
    newest_seq  bigint;
    oldest_seq  bigint;
    dropped     bigint := 0;
BEGIN
    SELECT l.range_to INTO month_end FROM {schema}.event_leaves() l WHERE l.leaf_name = leaf;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'cdc-audit: % is not a partition of the trail', leaf USING ERRCODE = '22023';
    END IF;
    IF month_end > cutoff THEN
        RAISE EXCEPTION 'cdc-audit: % may hold events younger than %', leaf, cutoff
            USING ERRCODE = '22023';
    END IF;
    FOR held IN EXECUTE format(
        'WITH RECURSIVE s(stream) AS ('
        ' (SELECT stream FROM %1$I.%2$I ORDER BY stream LIMIT 1)'
        ' UNION ALL SELECT (SELECT e.stream FROM %1$I.%2$I e WHERE e.stream > s.stream'
        ' ORDER BY e.stream LIMIT 1) FROM s WHERE s.stream IS NOT NULL)'
        ' SELECT stream FROM s WHERE stream IS NOT NULL', {schema_name}, leaf)
    LOOP
        EXECUTE format('SELECT (SELECT seq FROM %1$I.%2$I WHERE stream = $1 ORDER BY seq DESC LIMIT 1),'
                       ' (SELECT seq FROM %1$I.%2$I WHERE stream = $1 ORDER BY seq LIMIT 1)',
                       {schema_name}, leaf)
            INTO newest_seq, oldest_seq USING held;
        IF NOT EXISTS (SELECT 1 FROM {schema}.event e
                        WHERE e.stream = held AND e.kind = 'purge'
                          AND e.new ->> 'last_seq' = newest_seq::text
                          AND e.new ->> 'partition' = leaf) THEN
            RAISE EXCEPTION 'cdc-audit: no sealed purge event records % of stream %',
                leaf, held USING ERRCODE = '22023';
        END IF;
        dropped := dropped + newest_seq - oldest_seq + 1;
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
