-- Least privilege. Nothing in the audit schema is reachable through PUBLIC; each role gets
-- exactly what its job needs. Re-run on every change of the runtime, so it must be idempotent.

REVOKE ALL ON SCHEMA {schema} FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA {schema} FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA {schema} FROM PUBLIC;
GRANT USAGE ON SCHEMA {schema} TO {writer}, {reader}, {auditor}, {app};

-- The worker: appends to the trail, moves its progress, reads what it needs to seal.
GRANT SELECT, INSERT ON {schema}.event, {schema}.checkpoint TO {writer};
GRANT SELECT, INSERT, UPDATE ON {schema}.progress TO {writer};
GRANT SELECT ON {schema}.signing_key, {schema}.policy_version, {schema}.audited_table,
                {schema}.install_setting, {schema}.schema_migration TO {writer};
GRANT EXECUTE ON FUNCTION {schema}.ensure_event_partition(timestamptz),
                          {schema}.ensure_event_partitions(integer),
                          {schema}.missing_event_partitions(integer),
                          {schema}.mark(text) TO {writer};

-- Auditors read everything.
GRANT SELECT ON ALL TABLES IN SCHEMA {schema} TO {auditor};

-- Applications say who is acting and log their own events; they never see the trail.
GRANT EXECUTE ON FUNCTION {schema}.set_context(text, text, text, text, text, text, text, jsonb, text),
                          {schema}.clear_context(),
                          {schema}.current_context(),
                          {schema}.log_event(text, text, text, jsonb, boolean) TO {app};
