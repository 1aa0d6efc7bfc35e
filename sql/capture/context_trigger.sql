-- The statement trigger that emits the transaction's context ahead of its rows. The WHEN
-- clause keeps it to once per transaction and stream, and once more after each set_context.
CREATE OR REPLACE TRIGGER {trigger}
    BEFORE {events} ON {table}
    FOR EACH STATEMENT
    WHEN (coalesce(current_setting({emitted_setting}, true), '')
          <> 'e' || coalesce(current_setting({guc_gen}, true), ''))
    EXECUTE FUNCTION {schema}.capture_context({stream}, {on_missing}, {required})
