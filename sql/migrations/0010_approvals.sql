-- Time-bounded approvals: an approver allows one actor to change one table until a deadline.
-- Tables whose policy says `require_approval: true` accept a change only while the acting
-- actor holds an unexpired approval for them; the change's events carry the approval's id.
-- Rows are written by {schema}.approve() only (runtime/approvals.sql), which also records
-- the approval as an event in the trail, so an approval is itself audited.
CREATE TABLE {schema}.approval (
    approval_id  bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    actor_id     text        NOT NULL,
    schema_name  text        NOT NULL,
    table_name   text        NOT NULL,
    approver     text        NOT NULL,
    reason       text        NOT NULL,
    granted_at   timestamptz NOT NULL,
    expires_at   timestamptz NOT NULL,
    -- Who ran approve(): the login and the role it acted as.
    granted_by   text        NOT NULL,
    CHECK (approver <> actor_id),
    CHECK (expires_at > granted_at),
    CHECK (actor_id <> '' AND approver <> '' AND reason <> '')
);

-- The check on every audited statement looks up the actor's approvals of one table.
CREATE INDEX approval_lookup ON {schema}.approval (actor_id, schema_name, table_name, expires_at);

-- Append-only, like the rest of the trail: an approval ends by expiring.
CREATE TRIGGER append_only BEFORE UPDATE OR DELETE ON {schema}.approval
    FOR EACH ROW EXECUTE FUNCTION {schema}.refuse_change();
CREATE TRIGGER append_only_truncate BEFORE TRUNCATE ON {schema}.approval
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.refuse_change();

GRANT SELECT ON {schema}.approval TO {auditor};
