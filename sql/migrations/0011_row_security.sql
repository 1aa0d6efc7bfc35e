-- Row-level security on the trail: a role sees rows of `event` only through a policy naming
-- it. Auditors and the writer see every row, the reader only the streams the policy marks
-- `readers: true`, and every other role nothing — even one that is granted SELECT on the
-- table by mistake. The reader still has no privilege on `event` itself (it reads through
-- the curated views, which leave out the context's `db` facts and signatures); its policy
-- is the second wall, should that privilege ever be granted.
--
-- PostgreSQL refuses COPY FROM into a table whose row security applies to the copying role,
-- and the worker appends by COPY: the writer role is created with BYPASSRLS, and the worker
-- switches to it (SET LOCAL ROLE) for the transactions that append. The audit owner owns the
-- table, so the SECURITY DEFINER functions and the curated views (owned by it) are not
-- subject to these policies; they apply their own visibility rule (visible_streams).
ALTER TABLE {schema}.event ENABLE ROW LEVEL SECURITY;

CREATE POLICY auditor_reads_every_stream ON {schema}.event
    FOR SELECT TO {auditor} USING (true);
CREATE POLICY writer_reads_every_stream ON {schema}.event
    FOR SELECT TO {writer} USING (true);
CREATE POLICY writer_appends ON {schema}.event
    FOR INSERT TO {writer} WITH CHECK (true);
CREATE POLICY reader_reads_its_streams ON {schema}.event
    FOR SELECT TO {reader} USING (stream = ANY ({schema}.visible_streams(current_user)));
