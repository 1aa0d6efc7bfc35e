-- The read side's base: one view over the trail that shows each role what it may see. Every
-- curated view and every query of cdc-audit's reader reads through it. The auditor role (and
-- the owner) see every stream with every field; the reader role sees only the streams the
-- policy marks `readers: true`, without the context's details (client address, session,
-- application name: the `db` facts) and without signatures.

-- The streams `who` may see; NULL means all of them.
CREATE FUNCTION {schema}.visible_streams(who name) RETURNS text[]
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT CASE
        WHEN pg_has_role(who, {owner_name}, 'MEMBER')
          OR pg_has_role(who, {auditor_name}, 'MEMBER')
          OR (SELECT rolsuper FROM pg_roles WHERE rolname = who)
        THEN NULL
        ELSE coalesce((SELECT string_to_array(value, ',') FROM {schema}.install_setting
                        WHERE key = 'reader_streams' AND value <> ''), '{{}}'::text[])
    END
$fn$;

CREATE VIEW {schema}.visible_event WITH (security_barrier = true) AS
    WITH who AS (SELECT {schema}.visible_streams(current_user) AS streams)
    SELECT e.stream, e.seq, e.event_id, e.commit_lsn, e.commit_time, e.xid, e.kind,
           e.schema_name, e.table_name, e.row_key, e.old, e.new, e.changed, e.actor_id,
           e.reason,
           CASE WHEN who.streams IS NULL THEN e.context ELSE e.context - 'db' END AS context,
           e.context_missing, e.payload_hash, e.prev_hash, e.hash,
           CASE WHEN who.streams IS NULL THEN e.signature END AS signature,
           CASE WHEN who.streams IS NULL THEN e.key_id END AS key_id,
           e.sealed_at, e.erased_at
      FROM {schema}.event e, who
     WHERE who.streams IS NULL OR e.stream = ANY (who.streams);

COMMENT ON VIEW {schema}.visible_event IS
    'Every event the current role may see: auditors all, readers the streams marked readers: true';

REVOKE ALL ON FUNCTION {schema}.visible_streams(name) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION {schema}.visible_streams(name) TO {reader}, {auditor};
GRANT SELECT ON {schema}.visible_event TO {reader}, {auditor};
