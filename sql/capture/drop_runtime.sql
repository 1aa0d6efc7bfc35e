-- Uninstall without --drop-data: the capture functions go, the trail and its guards stay.
DROP FUNCTION IF EXISTS {schema}.capture_context();
DROP FUNCTION IF EXISTS {schema}.capture_ddl();
DROP FUNCTION IF EXISTS {schema}.capture_drop();
DROP FUNCTION IF EXISTS {schema}.log_event(text, text, text, jsonb, boolean);
DROP FUNCTION IF EXISTS {schema}.clear_context();
DROP FUNCTION IF EXISTS {schema}.set_context(text, text, text, text, text, text, text, jsonb, text);
DROP FUNCTION IF EXISTS {schema}.set_context(text, text, text, text, text, text, text, jsonb);
DROP FUNCTION IF EXISTS {schema}.approve(text, text, interval, text, text);
DROP FUNCTION IF EXISTS {schema}.check_approval();
DROP FUNCTION IF EXISTS {schema}.current_context();
DROP FUNCTION IF EXISTS {schema}.record_privilege_change(jsonb);
DROP FUNCTION IF EXISTS {schema}.record_purge(jsonb);
DROP FUNCTION IF EXISTS {schema}.database_facts();
DROP FUNCTION IF EXISTS {schema}.database_facts_json(text);
DELETE FROM {schema}.install_setting WHERE key = 'runtime_sha256';
