#!/bin/sh
# Runs once, when the data directory is created: the audited table of compose/policy.yaml and
# the worker's login role. REPLICATION is a role attribute that membership cannot pass on, so
# the login role carries it itself; the `grant` service adds cdc_audit_writer after `apply`.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v worker_password="$CDC_WORKER_PASSWORD" <<'SQL'
CREATE TABLE public.accounts (
    id bigint PRIMARY KEY,
    owner text NOT NULL,
    email text,
    status text NOT NULL DEFAULT 'open',
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE ROLE cdc_worker LOGIN REPLICATION PASSWORD :'worker_password';
SQL
