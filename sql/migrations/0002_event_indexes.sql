-- Indexes for the questions auditors ask. Created on the partitioned table, so every
-- partition, present and future, gets them.

-- Who did what, recently.
CREATE INDEX event_actor_time ON {schema}.event (actor_id, commit_time);
-- The history of one row.
CREATE INDEX event_row_time ON {schema}.event (schema_name, table_name, row_key, commit_time);
-- Look-up of one event, for proofs.
CREATE INDEX event_event_id ON {schema}.event (event_id);
-- Time windows over the whole trail: commit time grows with insertion order, BRIN stays tiny.
CREATE INDEX event_time_brin ON {schema}.event USING brin (commit_time);
