-- Schema changes and drops, recorded in the trail when they commit.
CREATE EVENT TRIGGER {ddl_trigger} ON ddl_command_end
    EXECUTE FUNCTION {schema}.capture_ddl();
CREATE EVENT TRIGGER {drop_trigger} ON sql_drop
    EXECUTE FUNCTION {schema}.capture_drop();
