#!/usr/bin/env bash
# Makes sure PostgreSQL server binaries (initdb, pg_ctl, postgres) are on this machine.
# Tests and the demo start their own throwaway cluster with them; no running server is used.
set -euo pipefail

have_server() {
  command -v pg_ctl >/dev/null 2>&1 && return 0
  compgen -G '/usr/lib/postgresql/*/bin/pg_ctl' >/dev/null
}

if have_server; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "PostgreSQL server binaries (pg_ctl, initdb) are missing: install them, e.g. 'sudo apt-get install postgresql' (14 to 17 are supported)" >&2
  exit 1
fi
echo "installing PostgreSQL with apt-get ..." >&2
apt-get update -qq
apt-get install -y -qq --no-install-recommends postgresql postgresql-contrib >/dev/null
# Debian starts a system cluster on install; the tests never use it.
have_server || { echo "PostgreSQL install finished but pg_ctl is still missing" >&2; exit 1; }
