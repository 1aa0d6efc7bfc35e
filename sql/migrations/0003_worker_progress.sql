-- What the worker needs to resume exactly where it stopped and to report how far behind it is.
ALTER TABLE {schema}.progress
    -- The policy in force at end_lsn: a restart behind a later apply seals with the old one
    -- until the stream reaches that apply.
    ADD COLUMN policy_version_id bigint,
    -- Commit time of the last transaction sealed, for the lag in seconds.
    ADD COLUMN last_commit_time  timestamptz,
    -- Which worker process wrote last (host and pid), for status.
    ADD COLUMN worker            text;
