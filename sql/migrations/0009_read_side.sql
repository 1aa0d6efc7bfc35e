-- The read side: curated views and parameterised reads over the trail, each showing the
-- calling role what `visible_event` would show it, and the indexes they need.
--
-- Separation of readers from the trail rests on privileges, not on row-level security:
-- the reader role holds no privilege on `event` or on any of its partitions (a partition
-- is a table with privileges of its own, and none are granted on it), only on these views
-- and functions. Row-level security on `event` is not enabled because PostgreSQL refuses
-- COPY FROM into a table whose row security applies to the copying role, and the worker
-- appends by COPY. Every view below reads `visible_event` (a security_barrier view) or a
-- SECURITY DEFINER function that applies the same rule with `visible_streams`.

-- The role the session acts as: the role set by SET ROLE, else the login. Unlike
-- current_user, it is the same inside a SECURITY DEFINER function (which cannot SET ROLE),
-- so the functions below can apply the caller's visibility while reading as the owner.
CREATE FUNCTION {schema}.session_role() RETURNS name
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT CASE current_setting('role') WHEN 'none' THEN session_user
                ELSE current_setting('role')::name END
$fn$;

-- Streams whose every event is an administrative action (the policy's ddl stream); apply
-- records them in install_setting `admin_streams`. Empty when not recorded.
CREATE FUNCTION {schema}.admin_streams() RETURNS text[]
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT coalesce((SELECT string_to_array(value, ',') FROM {schema}.install_setting
                      WHERE key = 'admin_streams' AND value <> ''), '{{}}'::text[])
$fn$;

-- Kinds that are administrative in any stream: schema and privilege changes, drift,
-- erasures, purges, gaps, key changes.
CREATE FUNCTION {schema}.admin_kinds() RETURNS text[]
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT ARRAY['ddl', 'privilege', 'drift', 'erasure', 'purge', 'gap', 'key_rotation',
                 'key_added', 'key_retired', 'policy']::text[]
$fn$;

-- Events the session's role may see that match the given filters (NULL: no filter), in
-- commit order or newest first, at most max_rows (NULL: all). The filters are applied to
-- the trail itself, inside the visibility rule, so that the planner may use the indexes
-- for all of them: a filter written over the security_barrier view `visible_event` is only
-- pushed into it when its operators are leakproof, which jsonb equality is not, and an
-- ORDER BY ... LIMIT over the view sorts every visible row.
CREATE FUNCTION {schema}.visible_events_where(
    since        timestamptz DEFAULT NULL,
    until        timestamptz DEFAULT NULL,
    actor        text        DEFAULT NULL,
    in_schema    text        DEFAULT NULL,
    in_table     text        DEFAULT NULL,
    key          jsonb       DEFAULT NULL,
    of_kinds     text[]      DEFAULT NULL,
    of_streams   text[]      DEFAULT NULL,
    newest_first boolean     DEFAULT false,
    max_rows     integer     DEFAULT NULL
) RETURNS SETOF {schema}.visible_event
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    streams text[] := {schema}.visible_streams({schema}.session_role());
    full_view boolean := streams IS NULL;
    conditions text[] := ARRAY['true'];
BEGIN
    IF NOT full_view THEN
        conditions := conditions || 'e.stream = ANY ($1)'::text;
    END IF;
    IF of_streams IS NOT NULL THEN
        conditions := conditions || 'e.stream = ANY ($2)'::text;
    END IF;
    IF since IS NOT NULL THEN
        conditions := conditions || 'e.commit_time >= $3'::text;
    END IF;
    IF until IS NOT NULL THEN
        conditions := conditions || 'e.commit_time < $4'::text;
    END IF;
    IF actor IS NOT NULL THEN
        conditions := conditions || 'e.actor_id = $5'::text;
    END IF;
    IF in_schema IS NOT NULL THEN
        conditions := conditions || 'e.schema_name = $6'::text;
    END IF;
    IF in_table IS NOT NULL THEN
        conditions := conditions || 'e.table_name = $7'::text;
    END IF;
    IF key IS NOT NULL THEN
        conditions := conditions || 'e.row_key = $8'::text;
    END IF;
    IF of_kinds IS NOT NULL THEN
        conditions := conditions || 'e.kind = ANY ($9)'::text;
    END IF;
    RETURN QUERY EXECUTE format(
        'SELECT e.stream, e.seq, e.event_id, e.commit_lsn, e.commit_time, e.xid, e.kind, '
        '       e.schema_name, e.table_name, e.row_key, e.old, e.new, e.changed, e.actor_id, '
        '       e.reason, %s, e.context_missing, e.payload_hash, e.prev_hash, e.hash, %s, %s, '
        '       e.sealed_at, e.erased_at '
        '  FROM %I.event e WHERE %s ORDER BY e.commit_time %s, e.stream, e.seq %s %s',
        CASE WHEN full_view THEN 'e.context' ELSE $q$e.context - 'db'$q$ END,
        CASE WHEN full_view THEN 'e.signature' ELSE 'NULL::bytea' END,
        CASE WHEN full_view THEN 'e.key_id' ELSE 'NULL::text' END,
        {schema_name},
        array_to_string(conditions, ' AND '),
        CASE WHEN newest_first THEN 'DESC' ELSE 'ASC' END,
        CASE WHEN newest_first THEN 'DESC' ELSE 'ASC' END,
        CASE WHEN max_rows IS NULL THEN '' ELSE 'LIMIT $10' END)
    USING streams, of_streams, since, until, actor, in_schema, in_table, key, of_kinds,
          max_rows;
END
$fn$;

COMMENT ON FUNCTION {schema}.visible_events_where(timestamptz, timestamptz, text, text, text, jsonb, text[], text[], boolean, integer) IS
    'Events the session''s role may see matching the filters (NULL: any), using the trail''s indexes';

-- The newest visible events first: the last 1,000, so that "the recent 100" reads a few
-- index pages of the newest month instead of sorting the trail.
CREATE VIEW {schema}.recent_events AS
    SELECT * FROM {schema}.visible_events_where(newest_first => true, max_rows => 1000);

COMMENT ON VIEW {schema}.recent_events IS
    'The 1,000 newest events the current role may see, newest first';

-- Administrative actions: events of an administrative kind in any stream, and every event of
-- the streams recorded as administrative (the policy's ddl stream). Two branches, so that
-- each can use the trail's partitions and indexes (a month of admin actions reads the admin
-- stream's partition of that month and the small index of administrative kinds).
CREATE VIEW {schema}.admin_actions AS
    SELECT v.commit_time, v.stream, v.seq, v.kind, v.actor_id, v.reason, v.schema_name,
           v.table_name, v.row_key, v.changed, v.old, v.new, v.context, v.event_id
      FROM {schema}.visible_event v
     WHERE v.kind = ANY ({schema}.admin_kinds())
    UNION ALL
    SELECT v.commit_time, v.stream, v.seq, v.kind, v.actor_id, v.reason, v.schema_name,
           v.table_name, v.row_key, v.changed, v.old, v.new, v.context, v.event_id
      FROM {schema}.visible_event v
     WHERE v.stream = ANY ({schema}.admin_streams())
       AND v.kind <> ALL ({schema}.admin_kinds());

COMMENT ON VIEW {schema}.admin_actions IS
    'Administrative actions the current role may see: DDL, privilege changes, drift, erasures, purges, gaps, key changes, and every event of the administrative streams';

CREATE VIEW {schema}.changes_by_actor AS
    SELECT v.actor_id, v.schema_name, v.table_name, v.kind, count(*) AS events,
           min(v.commit_time) AS first_time, max(v.commit_time) AS last_time
      FROM {schema}.visible_event v
     GROUP BY v.actor_id, v.schema_name, v.table_name, v.kind;

COMMENT ON VIEW {schema}.changes_by_actor IS
    'Per actor, table and kind: how many events the current role may see, first and last commit time (a summary of the whole trail: for a time window use audited_events)';

CREATE VIEW {schema}.row_history AS
    SELECT v.schema_name, v.table_name, v.row_key, v.commit_time, v.kind, v.actor_id,
           v.reason, v.changed, v.old, v.new, v.stream, v.seq
      FROM {schema}.visible_event v
     WHERE v.row_key IS NOT NULL;

COMMENT ON VIEW {schema}.row_history IS
    'Row changes the current role may see, one row per change (for the history of one key, audited_row_history uses the row index)';

CREATE VIEW {schema}.events_missing_context AS
    SELECT v.commit_time, v.stream, v.seq, v.kind, v.schema_name, v.table_name, v.row_key,
           v.context, v.event_id
      FROM {schema}.visible_event v
     WHERE v.context_missing;

COMMENT ON VIEW {schema}.events_missing_context IS
    'Events the current role may see that arrived without the context the policy requires';

-- Reads for SQL users that leave a record: each records itself (record_read, a runtime
-- function: a no-op unless the policy asks for read_audit), then returns what
-- visible_events_where returns for the session's role.
CREATE FUNCTION {schema}.audited_row_history(
    schema_name text, table_name text, row_key jsonb
) RETURNS SETOF {schema}.visible_event
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    PERFORM {schema}.record_read('row_history', jsonb_build_object(
        'schema_name', schema_name, 'table_name', table_name, 'row_key', row_key));
    RETURN QUERY SELECT * FROM {schema}.visible_events_where(
        in_schema => schema_name, in_table => table_name, key => row_key);
END
$fn$;

CREATE FUNCTION {schema}.audited_events(
    since timestamptz, until timestamptz, actor text DEFAULT NULL
) RETURNS SETOF {schema}.visible_event
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    PERFORM {schema}.record_read('events', jsonb_build_object(
        'since', since, 'until', until, 'actor_id', actor));
    RETURN QUERY SELECT * FROM {schema}.visible_events_where(
        since => since, until => until, actor => actor);
END
$fn$;

-- "The recent 100" and "admin actions of a month": newest-first reads of the newest month.
-- Commit times grow with insertion order, so each insert lands on the index's rightmost page.
CREATE INDEX event_time ON {schema}.event (commit_time);
-- Administrative kinds are rare in every stream: a small index finds them by time.
CREATE INDEX event_admin_time ON {schema}.event (commit_time)
    WHERE kind = ANY (ARRAY['ddl', 'privilege', 'drift', 'erasure', 'purge', 'gap',
                            'key_rotation', 'key_added', 'key_retired', 'policy']::text[]);

REVOKE ALL ON FUNCTION {schema}.session_role(), {schema}.admin_streams(), {schema}.admin_kinds(),
    {schema}.visible_events_where(timestamptz, timestamptz, text, text, text, jsonb, text[], text[], boolean, integer)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION {schema}.session_role(), {schema}.admin_streams(), {schema}.admin_kinds(),
    {schema}.visible_events_where(timestamptz, timestamptz, text, text, text, jsonb, text[], text[], boolean, integer)
    TO {reader}, {auditor};
REVOKE ALL ON FUNCTION {schema}.audited_row_history(text, text, jsonb),
                       {schema}.audited_events(timestamptz, timestamptz, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION {schema}.audited_row_history(text, text, jsonb),
                          {schema}.audited_events(timestamptz, timestamptz, text)
    TO {reader}, {auditor};
GRANT SELECT ON {schema}.recent_events, {schema}.admin_actions, {schema}.changes_by_actor,
    {schema}.row_history, {schema}.events_missing_context TO {reader}, {auditor};
