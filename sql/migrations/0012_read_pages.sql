-- Pages of the two curated questions that can return many rows: an actor's events in a
-- window, and the administrative actions of a period. A view cannot take a LIMIT inside a
-- security_barrier view (the outer ORDER BY ... LIMIT sorts every visible row of the
-- period), so these functions apply the order and the limit to the trail itself, inside
-- the visibility rule, and record the read like the other audited_* functions.

-- The first max_rows events of a window (of one actor), in commit order. An overload of
-- audited_events (migration 0009) that takes a page size.
CREATE FUNCTION {schema}.audited_events(
    since timestamptz, until timestamptz, actor text, max_rows integer
) RETURNS SETOF {schema}.visible_event
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    PERFORM {schema}.record_read('events', jsonb_build_object(
        'since', since, 'until', until, 'actor_id', actor, 'max_rows', max_rows));
    RETURN QUERY SELECT * FROM {schema}.visible_events_where(
        since => since, until => until, actor => actor, max_rows => max_rows);
END
$fn$;

-- The newest max_rows administrative actions of a period, newest first: events of an
-- administrative kind in any stream, and every event of the administrative streams, as the
-- admin_actions view defines them. Each branch reads its newest rows through an index (the
-- partial index of administrative kinds; the admin streams' own partitions, pruned when the
-- query is planned); the newest of the union are the newest of both.
CREATE FUNCTION {schema}.audited_admin_actions(
    since timestamptz, until timestamptz, max_rows integer DEFAULT 100
) RETURNS SETOF {schema}.visible_event
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    PERFORM {schema}.record_read('admin_actions', jsonb_build_object(
        'since', since, 'until', until, 'max_rows', max_rows));
    RETURN QUERY
    SELECT u.* FROM (
        SELECT * FROM {schema}.visible_events_where(
            since => since, until => until, of_kinds => {schema}.admin_kinds(),
            newest_first => true, max_rows => max_rows)
        UNION
        SELECT * FROM {schema}.visible_events_where(
            since => since, until => until, of_streams => {schema}.admin_streams(),
            newest_first => true, max_rows => max_rows)
    ) u
    ORDER BY u.commit_time DESC, u.stream DESC, u.seq DESC
    LIMIT max_rows;
END
$fn$;

REVOKE ALL ON FUNCTION {schema}.audited_events(timestamptz, timestamptz, text, integer),
                       {schema}.audited_admin_actions(timestamptz, timestamptz, integer)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION {schema}.audited_events(timestamptz, timestamptz, text, integer),
                          {schema}.audited_admin_actions(timestamptz, timestamptz, integer)
    TO {reader}, {auditor};
