-- What `status` and the worker's metrics count on every call: gap events and events that
-- arrived without the required context. Both are rare, so partial indexes keep the counts
-- to a few index pages on a trail of any size (the events themselves are counted from the
-- primary key's first and last seq: a stream's seqs have no holes).
CREATE INDEX event_gap ON {schema}.event (stream, seq) WHERE kind = 'gap';
CREATE INDEX event_missing_context ON {schema}.event (stream, seq) WHERE context_missing;
