-- Monthly partitions of the trail, created ahead of time so that sealing never fails at a
-- month boundary. Boundaries are in UTC whatever the session's TimeZone.
--
-- Each month is divided by stream (event_2026_11 -> event_2026_11_user, event_2026_11_admin,
-- and event_2026_11__default for any other stream), so that a purge drops one stream's month
-- when that stream's retention has passed, without waiting for the longest retention of all.
-- Months created before streams had partitions of their own hold every stream in one table.

-- The streams of the applied policy (apply records them in install_setting).
CREATE OR REPLACE FUNCTION {schema}.trail_stream_names() RETURNS text[]
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT coalesce((SELECT string_to_array(value, ',') FROM {schema}.install_setting
                      WHERE key = 'streams' AND value <> ''), '{{}}'::text[])
$fn$;

CREATE OR REPLACE FUNCTION {schema}.add_event_leaf(month_table text, leaf text, stream text)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF stream IS NULL THEN
        EXECUTE format('CREATE TABLE %I.%I PARTITION OF %I.%I DEFAULT',
                       {schema_name}, leaf, {schema_name}, month_table);
    ELSE
        EXECUTE format('CREATE TABLE %I.%I PARTITION OF %I.%I FOR VALUES IN (%L)',
                       {schema_name}, leaf, {schema_name}, month_table, stream);
    END IF;
    -- Statement triggers are not inherited: a TRUNCATE of one partition needs its own guard.
    EXECUTE format('CREATE TRIGGER append_only_truncate BEFORE TRUNCATE ON %I.%I '
                   'FOR EACH STATEMENT EXECUTE FUNCTION %I.refuse_change()',
                   {schema_name}, leaf, {schema_name});
END
$fn$;

CREATE OR REPLACE FUNCTION {schema}.default_holds(leaf text, stream text) RETURNS boolean
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    found boolean;
BEGIN
    IF to_regclass(format('%I.%I', {schema_name}, leaf)) IS NULL THEN
        RETURN false;
    END IF;
    EXECUTE format('SELECT EXISTS (SELECT 1 FROM %I.%I WHERE stream = %L)',
                   {schema_name}, leaf, stream) INTO found;
    RETURN found;
END
$fn$;

CREATE OR REPLACE FUNCTION {schema}.ensure_event_partition(moment timestamptz) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    month_start timestamptz := date_trunc('month', moment, 'UTC');
    month_end   timestamptz := month_start + interval '1 month';
    month_table text := 'event_' || to_char(month_start AT TIME ZONE 'UTC', 'YYYY_MM');
    created     boolean := false;
    stream      text;
BEGIN
    IF to_regclass(format('%I.%I', {schema_name}, month_table)) IS NULL THEN
        EXECUTE format('CREATE TABLE %I.%I PARTITION OF %I.event FOR VALUES FROM (%L) TO (%L) '
                       'PARTITION BY LIST (stream)',
                       {schema_name}, month_table, {schema_name}, month_start, month_end);
        PERFORM {schema}.add_event_leaf(month_table, month_table || '__default', NULL);
        created := true;
    END IF;
    IF (SELECT relkind FROM pg_class
         WHERE oid = to_regclass(format('%I.%I', {schema_name}, month_table))) = 'p' THEN
        -- A purge may have dropped it; events of an unnamed stream must still land.
        IF to_regclass(format('%I.%I', {schema_name}, month_table || '__default')) IS NULL THEN
            PERFORM {schema}.add_event_leaf(month_table, month_table || '__default', NULL);
            created := true;
        END IF;
        FOREACH stream IN ARRAY {schema}.trail_stream_names() LOOP
            -- A stream whose events already went to the default partition (its own was
            -- purged, or it is new to a month already written) keeps using it.
            IF to_regclass(format('%I.%I', {schema_name}, month_table || '_' || stream)) IS NULL
               AND NOT {schema}.default_holds(month_table || '__default', stream)
            THEN
                PERFORM {schema}.add_event_leaf(month_table, month_table || '_' || stream, stream);
                created := true;
            END IF;
        END LOOP;
    END IF;
    RETURN created;
END
$fn$;

-- The month before this one (for a worker catching up across a boundary) up to months_ahead.
CREATE OR REPLACE FUNCTION {schema}.ensure_event_partitions(months_ahead integer DEFAULT 3)
RETURNS integer
LANGUAGE sql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT count(*) FILTER (WHERE {schema}.ensure_event_partition(now() + make_interval(months => m)))::integer
      FROM generate_series(-1, months_ahead) AS m
$fn$;

-- Months (from last month to months_ahead) missing, or missing a stream's partition.
CREATE OR REPLACE FUNCTION {schema}.missing_event_partitions(months_ahead integer DEFAULT 3)
RETURNS integer
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    WITH month AS (
        SELECT 'event_' || to_char(date_trunc('month', now() + make_interval(months => m), 'UTC')
                                   AT TIME ZONE 'UTC', 'YYYY_MM') AS name
          FROM generate_series(-1, months_ahead) AS m
    )
    SELECT (SELECT count(*) FROM month
             WHERE to_regclass(format('%I.%I', {schema_name}, name)) IS NULL)::integer
         + (SELECT count(*) FROM month, unnest({schema}.trail_stream_names()) AS s(stream)
             WHERE (SELECT relkind FROM pg_class
                     WHERE oid = to_regclass(format('%I.%I', {schema_name}, name))) = 'p'
               AND to_regclass(format('%I.%I', {schema_name}, name || '_' || stream)) IS NULL
               AND NOT {schema}.default_holds(name || '__default', stream))::integer
$fn$;

-- Every table that holds events (a leaf of the partition tree) with its time range and the
-- one stream it holds (NULL: a default partition or a month shared by every stream).
CREATE OR REPLACE FUNCTION {schema}.event_leaves()
RETURNS TABLE (leaf_name text, range_from timestamptz, range_to timestamptz, stream text)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    WITH RECURSIVE tree AS (
        SELECT i.inhrelid AS relid, NULL::oid AS month_relid
          FROM pg_inherits i
         WHERE i.inhparent = to_regclass(format('%I.event', {schema_name}))
        UNION ALL
        SELECT i.inhrelid, t.relid
          FROM tree t JOIN pg_inherits i ON i.inhparent = t.relid
    ), leaf AS (
        SELECT t.relid, coalesce(t.month_relid, t.relid) AS month_relid,
               CASE WHEN t.month_relid IS NULL THEN NULL
                    ELSE (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'IN \(''(.*)''\)'))[1]
               END AS stream
          FROM tree t JOIN pg_class c ON c.oid = t.relid
         WHERE c.relkind = 'r'
    ), bounds AS (
        SELECT l.relid, l.stream,
               regexp_match(pg_get_expr(m.relpartbound, m.oid),
                            'FROM \(''([^'']+)''\) TO \(''([^'']+)''\)') AS b
          FROM leaf l JOIN pg_class m ON m.oid = l.month_relid
    )
    SELECT c.relname::text, b[1]::timestamptz, b[2]::timestamptz, stream
      FROM bounds JOIN pg_class c ON c.oid = bounds.relid
     ORDER BY 2, 1
$fn$;
