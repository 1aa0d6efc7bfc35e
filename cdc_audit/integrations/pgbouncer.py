"""A private, throwaway PgBouncer in transaction pooling mode, for tests and benchmarks.

It runs from a temporary directory on a free loopback port in front of a cluster's port, as
the `postgres` user when the caller is root (PgBouncer refuses to run as root), and is stopped
by its own pid. `find_pgbouncer()` returns None when the binary is missing
(scripts/ensure-pgbouncer.sh installs it).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from ..ephemeral import free_port

CANDIDATES = ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer", "/usr/local/bin/pgbouncer")


def find_pgbouncer() -> str | None:
    found = shutil.which("pgbouncer")
    if found:
        return found
    return next((c for c in CANDIDATES if os.access(c, os.X_OK)), None)


class PgBouncer:
    """`with PgBouncer(server_port=cluster.port, pool_size=2) as bouncer: bouncer.dsn(db)`."""

    def __init__(
        self,
        server_port: int,
        *,
        pool_size: int = 2,
        users: tuple[str, ...] = ("postgres",),
        binary: str | None = None,
    ) -> None:
        self.server_port = server_port
        self.pool_size = pool_size
        self.users = users
        self.binary = binary or find_pgbouncer()
        self.port = 0
        self.base_dir = Path()
        self.process: subprocess.Popen[bytes] | None = None

    def dsn(self, dbname: str, user: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} dbname={dbname} user={user} connect_timeout=10"

    def start(self) -> PgBouncer:
        if self.binary is None:
            raise FileNotFoundError("pgbouncer not found: run scripts/ensure-pgbouncer.sh")
        owner = pwd.getpwnam("postgres") if os.geteuid() == 0 else None
        self.base_dir = Path(tempfile.mkdtemp(prefix="cdc-audit-pgbouncer-"))
        self.port = free_port()
        (self.base_dir / "userlist.txt").write_text(
            "".join(f'"{user}" ""\n' for user in self.users)
        )
        (self.base_dir / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = host=127.0.0.1 port={self.server_port}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {self.base_dir / 'userlist.txt'}\n"
            "pool_mode = transaction\n"
            f"default_pool_size = {self.pool_size}\n"
            "max_client_conn = 500\n"
            f"logfile = {self.base_dir / 'pgbouncer.log'}\n"
            "ignore_startup_parameters = extra_float_digits,options\n"
        )
        if owner is not None:
            for path in (self.base_dir, *self.base_dir.iterdir()):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        self.process = subprocess.Popen(
            [self.binary, str(self.base_dir / "pgbouncer.ini")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            user=owner.pw_uid if owner else None,
            group=owner.pw_gid if owner else None,
            extra_groups=[] if owner else None,
        )
        self._wait_listening()
        return self

    def _wait_listening(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                log = self.base_dir / "pgbouncer.log"
                tail = log.read_text()[-500:] if log.exists() else ""
                raise RuntimeError(f"pgbouncer exited with {self.process.returncode}: {tail}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"pgbouncer did not listen on port {self.port}")

    def stop(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            self.process = None
        if self.base_dir != Path() and self.base_dir.exists():
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> PgBouncer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
