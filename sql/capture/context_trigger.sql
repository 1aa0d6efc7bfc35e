-- The statement trigger that emits the transaction's context ahead of its rows. It has no
-- WHEN clause: PostgreSQL prepares a trigger's WHEN expression again for every statement it
-- fires on, and the gate (once per transaction and stream, and once more after each
-- set_context) cost more that way than calling the function, which checks it first and
-- returns (docs/adr/0007-a-lean-capture-trigger.md).
CREATE OR REPLACE TRIGGER {trigger}
    BEFORE {events} ON {table}
    FOR EACH STATEMENT
    EXECUTE FUNCTION {schema}.capture_context({stream}, {on_missing}, {required})
