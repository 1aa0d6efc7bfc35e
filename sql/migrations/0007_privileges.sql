-- Privilege snapshots and drift checks, written by the privileges job (`cdc-audit drift`, or
-- the worker's schedule). Roles, role memberships and GRANTs of roles fire no event trigger:
-- they are snapshotted, and each difference from the previous snapshot becomes an event of
-- the trail. These tables are the job's memory, not the evidence (the events are).

-- One row each time the privilege state differs from the previous row (the first row is the
-- baseline). `state` is canonical and sorted; `digest` is the SHA-256 of its canonical JSON.
CREATE TABLE {schema}.privilege_snapshot (
    id        bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    taken_at  timestamptz NOT NULL DEFAULT now(),
    state     jsonb       NOT NULL,
    digest    text        NOT NULL
);

-- One row per drift check: what differed from the applied policy (an empty array: nothing).
CREATE TABLE {schema}.drift_check (
    id                 bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    checked_at         timestamptz NOT NULL DEFAULT now(),
    findings           jsonb       NOT NULL,
    policy_version_id  bigint
);

CREATE INDEX drift_check_checked_at ON {schema}.drift_check (checked_at);

-- The next diff is computed against the last snapshot: rewriting it would hide a change.
CREATE TRIGGER append_only BEFORE UPDATE OR DELETE ON {schema}.privilege_snapshot
    FOR EACH ROW EXECUTE FUNCTION {schema}.refuse_change();
CREATE TRIGGER append_only_truncate BEFORE TRUNCATE ON {schema}.privilege_snapshot
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.refuse_change();
CREATE TRIGGER append_only BEFORE UPDATE OR DELETE ON {schema}.drift_check
    FOR EACH ROW EXECUTE FUNCTION {schema}.refuse_change();
CREATE TRIGGER append_only_truncate BEFORE TRUNCATE ON {schema}.drift_check
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.refuse_change();

-- The job runs as the worker's role (runtime/privileges.sql grants the same on every apply
-- that changes the runtime).
GRANT SELECT, INSERT ON {schema}.privilege_snapshot, {schema}.drift_check TO {writer};
GRANT SELECT ON {schema}.privilege_snapshot, {schema}.drift_check TO {auditor};
