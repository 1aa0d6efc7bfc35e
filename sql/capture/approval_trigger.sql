-- The approval check of a table whose policy says `require_approval: true`: every statement
-- needs an unexpired approval of its actor (runtime/approvals.sql). It fires before the
-- context trigger (name order), so the context emitted for the rows names the approval.
CREATE OR REPLACE TRIGGER {trigger}
    BEFORE {events} ON {table}
    FOR EACH STATEMENT
    EXECUTE FUNCTION {schema}.check_approval({table_schema}, {table_name})
