-- Time-bounded approvals (migration 0010). approve() is the only way to grant one; the
-- statement trigger on tables whose policy says `require_approval: true` calls
-- check_approval(), which lets a statement through only while its actor holds an unexpired
-- approval of that table, and puts the approval's id into the transaction's context so the
-- change's events carry it.

CREATE OR REPLACE FUNCTION {schema}.approve(
    actor_id    text,
    table_name  text,
    expires_in  interval,
    approver    text,
    reason      text
) RETURNS TABLE (approval_id bigint, granted_at timestamptz, expires_at timestamptz)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    target      regclass;
    target_ns   text;
    target_rel  text;
    stream      text;
    said        jsonb := {schema}.current_context();
    granted     timestamptz := clock_timestamp();
    new_id      bigint;
BEGIN
    actor_id := nullif(btrim(actor_id), '');
    approver := nullif(btrim(approver), '');
    reason := nullif(btrim(reason), '');
    IF actor_id IS NULL OR approver IS NULL OR reason IS NULL THEN
        RAISE EXCEPTION 'cdc-audit: an approval needs an actor, an approver and a reason'
            USING ERRCODE = '22023';
    END IF;
    IF lower(approver) = lower(actor_id) OR lower(coalesce(said ->> 'actor_id', '')) = lower(actor_id) THEN
        RAISE EXCEPTION 'cdc-audit: % cannot approve their own changes', quote_literal(actor_id)
            USING ERRCODE = '22023';
    END IF;
    IF expires_in IS NULL OR expires_in <= interval '0' THEN
        RAISE EXCEPTION 'cdc-audit: an approval must expire after it is granted (got %)',
            coalesce(expires_in::text, 'NULL')
            USING ERRCODE = '22023';
    END IF;
    target := to_regclass(table_name);
    IF target IS NULL THEN
        RAISE EXCEPTION 'cdc-audit: table % does not exist (name it as schema.table)',
            quote_literal(table_name)
            USING ERRCODE = '22023';
    END IF;
    SELECT n.nspname, c.relname INTO target_ns, target_rel
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = target;
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = target AND tgname = {approval_trigger_name}) THEN
        RAISE EXCEPTION 'cdc-audit: %.% does not require approval (set require_approval: true on it in the policy and apply)',
            quote_ident(target_ns), quote_ident(target_rel)
            USING ERRCODE = '22023';
    END IF;
    INSERT INTO {schema}.approval AS a
           (actor_id, schema_name, table_name, approver, reason, granted_at, expires_at, granted_by)
    VALUES (actor_id, target_ns, target_rel, approver, reason, granted, granted + expires_in,
            session_user::text || CASE current_setting('role') WHEN 'none' THEN ''
                                        ELSE ' as ' || current_setting('role') END)
    RETURNING a.approval_id INTO new_id;
    -- The approval is an administrative act: recorded in the admin stream when the policy has
    -- one, else in the approved table's own stream.
    SELECT coalesce(
               (SELECT nullif(value, '') FROM {schema}.install_setting WHERE key = 'admin_streams'),
               (SELECT t.stream FROM {schema}.audited_table t
                 WHERE t.schema_name = target_ns AND t.table_name = target_rel))
      INTO stream;
    IF stream IS NOT NULL THEN
        PERFORM pg_logical_emit_message(true, {msg_app}, (said || jsonb_build_object(
            'v', 1,
            'stream', stream,
            'actor_id', approver,
            'reason', reason,
            'action', 'admin.approval.granted',
            'resource', format('%I.%I', target_ns, target_rel),
            'outcome', 'success',
            'details', jsonb_build_object(
                'approval_id', new_id,
                'actor_id', actor_id,
                'approver', approver,
                'granted_at', granted,
                'expires_at', granted + expires_in),
            'durable', false,
            'db', {schema}.database_facts()))::text);
    END IF;
    RETURN QUERY SELECT new_id, granted, granted + expires_in;
END
$fn$;

-- Statement trigger function; arguments: the audited table's schema and name (a partition's
-- trigger names its root, where approvals are granted).
CREATE OR REPLACE FUNCTION {schema}.check_approval() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    said      jsonb := {schema}.current_context();
    actor     text := nullif(said ->> 'actor_id', '');
    at        timestamptz := clock_timestamp();
    found_id  bigint;
    expired   timestamptz;
BEGIN
    IF actor IS NULL THEN
        RAISE EXCEPTION 'cdc-audit: % on %.% needs an approval, and the audit context names no actor_id',
            TG_OP, quote_ident(TG_ARGV[0]), quote_ident(TG_ARGV[1])
            USING ERRCODE = 'CA003',
                  HINT = 'call ' || quote_ident({schema_name}) || '.set_context(actor_id => ...) earlier in the same transaction';
    END IF;
    SELECT a.approval_id INTO found_id
      FROM {schema}.approval a
     WHERE a.actor_id = actor AND a.schema_name = TG_ARGV[0] AND a.table_name = TG_ARGV[1]
       AND a.expires_at > at AND a.granted_at <= at
     ORDER BY a.expires_at DESC
     LIMIT 1;
    IF found_id IS NULL THEN
        SELECT max(a.expires_at) INTO expired
          FROM {schema}.approval a
         WHERE a.actor_id = actor AND a.schema_name = TG_ARGV[0] AND a.table_name = TG_ARGV[1];
        RAISE EXCEPTION 'cdc-audit: % on %.% by % needs an unexpired approval%',
            TG_OP, quote_ident(TG_ARGV[0]), quote_ident(TG_ARGV[1]), quote_literal(actor),
            CASE WHEN expired IS NULL THEN ' (none was granted)'
                 ELSE ' (the last one expired at ' || expired::text || ')' END
            USING ERRCODE = 'CA003',
                  HINT = format('cdc-audit approve --actor %s --table %I.%I --expires 1h --approver SOMEONE_ELSE --reason ...',
                                actor, TG_ARGV[0], TG_ARGV[1]);
    END IF;
    IF said ->> 'approval_id' IS DISTINCT FROM found_id::text THEN
        PERFORM set_config({guc_ctx}, (said || jsonb_build_object('approval_id', found_id))::text, true);
        -- A new generation makes the context trigger emit the context again, approval included.
        PERFORM set_config({guc_gen},
            (coalesce(nullif(current_setting({guc_gen}, true), ''), '0')::bigint + 1)::text, true);
    END IF;
    RETURN NULL;
END
$fn$;

REVOKE ALL ON FUNCTION {schema}.approve(text, text, interval, text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION {schema}.check_approval() FROM PUBLIC;
