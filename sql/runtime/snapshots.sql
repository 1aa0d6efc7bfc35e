-- Hashed snapshots: the scheduled job runs in the worker, which appends them; auditors read
-- them to reconcile. Re-run on every change of the runtime, so it must be idempotent. The
-- table comes with migration 0006, which grants the same: an installation still at an older
-- schema version has none yet.
DO $grant$
BEGIN
    IF to_regclass(format('%I.snapshot', {schema_name})) IS NOT NULL THEN
        GRANT SELECT, INSERT ON {schema}.snapshot TO {writer};
        GRANT SELECT ON {schema}.snapshot TO {auditor};
    END IF;
END
$grant$;
