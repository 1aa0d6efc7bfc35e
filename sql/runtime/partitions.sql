-- Monthly partitions of the trail, created ahead of time so that sealing never fails at a
-- month boundary. Boundaries are in UTC whatever the session's TimeZone.

CREATE OR REPLACE FUNCTION {schema}.ensure_event_partition(moment timestamptz) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    month_start timestamptz := date_trunc('month', moment, 'UTC');
    month_end   timestamptz := month_start + interval '1 month';
    partition   text := 'event_' || to_char(month_start AT TIME ZONE 'UTC', 'YYYY_MM');
BEGIN
    IF to_regclass(format('%I.%I', {schema_name}, partition)) IS NOT NULL THEN
        RETURN false;
    END IF;
    EXECUTE format('CREATE TABLE %I.%I PARTITION OF %I.event FOR VALUES FROM (%L) TO (%L)',
                   {schema_name}, partition, {schema_name}, month_start, month_end);
    -- Statement triggers are not inherited: a TRUNCATE of one partition needs its own guard.
    EXECUTE format('CREATE TRIGGER append_only_truncate BEFORE TRUNCATE ON %I.%I '
                   'FOR EACH STATEMENT EXECUTE FUNCTION %I.refuse_change()',
                   {schema_name}, partition, {schema_name});
    RETURN true;
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

CREATE OR REPLACE FUNCTION {schema}.missing_event_partitions(months_ahead integer DEFAULT 3)
RETURNS integer
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT count(*)::integer
      FROM generate_series(-1, months_ahead) AS m
     WHERE to_regclass(format('%I.%I', {schema_name},
               'event_' || to_char(date_trunc('month', now() + make_interval(months => m), 'UTC')
                                    AT TIME ZONE 'UTC', 'YYYY_MM'))) IS NULL
$fn$;
