#!/usr/bin/env bash
# Makes sure the pgbouncer binary is on this machine. The PgBouncer tests and the context
# latency benchmark start their own pgbouncer in front of their throwaway cluster.
set -euo pipefail

have_pgbouncer() {
  command -v pgbouncer >/dev/null 2>&1 || test -x /usr/sbin/pgbouncer
}

if have_pgbouncer; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "pgbouncer is missing (the PgBouncer tests will be skipped): install it, e.g. 'sudo apt-get install pgbouncer'" >&2
  exit 0
fi
echo "installing pgbouncer with apt-get ..." >&2
apt-get update -qq
apt-get install -y -qq --no-install-recommends pgbouncer >/dev/null
# Debian enables a system service on install; the tests never use it.
have_pgbouncer || { echo "pgbouncer install finished but the binary is still missing" >&2; exit 1; }
