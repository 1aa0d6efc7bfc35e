"""A private, throwaway PostgreSQL cluster for tests, the demo and benchmarks.

It runs initdb and the postmaster in a temporary directory on a free loopback port, as the
`postgres` user when the caller is root (PostgreSQL refuses to run as root), configured for
logical decoding. It is stopped by the postmaster's pid, never by touching any other cluster.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CdcAuditError

SERVER_SETTINGS: dict[str, str] = {
    "wal_level": "logical",
    "max_replication_slots": "40",
    "max_wal_senders": "20",
    "max_connections": "200",
    "fsync": "off",
    "full_page_writes": "off",
    "shared_buffers": "256MB",
    "logging_collector": "off",
    "log_min_messages": "warning",
}


class ClusterError(CdcAuditError):
    """The throwaway cluster could not be started or stopped."""


def find_pg_bin() -> Path:
    """Directory holding initdb/pg_ctl: PATH first, then Debian's versioned layout (newest)."""
    on_path = shutil.which("pg_ctl")
    if on_path:
        return Path(os.path.realpath(on_path)).parent
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
        key=lambda p: (
            int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0
        ),
    )
    if not candidates:
        raise ClusterError(
            "PostgreSQL server binaries not found: install PostgreSQL"
            " (e.g. apt-get install postgresql)"
        )
    return Path(candidates[-1]).parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _run_as() -> pwd.struct_passwd | None:
    """The account to run the server as: `postgres` when we are root, else ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError as exc:
        raise ClusterError(
            "running as root needs a 'postgres' system user to own the cluster"
        ) from exc


@dataclass
class EphemeralCluster:
    """A cluster that lives in its own temporary directory until `stop()`."""

    superuser: str = "postgres"
    settings: dict[str, str] = field(default_factory=dict)
    port: int = 0
    base_dir: Path = field(default_factory=Path)
    pid: int | None = None
    bin_dir: Path = field(default_factory=Path)

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    @property
    def log_file(self) -> Path:
        return self.base_dir / "server.log"

    def dsn(self, dbname: str = "postgres", user: str | None = None) -> str:
        return (
            f"host=127.0.0.1 port={self.port} dbname={dbname} user={user or self.superuser} "
            "connect_timeout=10"
        )

    def start(self) -> EphemeralCluster:
        self.bin_dir = find_pg_bin()
        owner = _run_as()
        self.base_dir = Path(tempfile.mkdtemp(prefix="cdc-audit-pg-"))
        if owner is not None:
            os.chown(self.base_dir, owner.pw_uid, owner.pw_gid)
        self._initdb(owner)
        self._write_settings()
        self._start_postmaster(owner)
        return self

    def _command(self, owner: pwd.struct_passwd | None, *args: str) -> list[str]:
        if owner is None:
            return list(args)
        return ["runuser", "-u", owner.pw_name, "--", *args]

    def _initdb(self, owner: pwd.struct_passwd | None) -> None:
        cmd = self._command(
            owner,
            str(self.bin_dir / "initdb"),
            "-D",
            str(self.data_dir),
            "-U",
            self.superuser,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        )
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise ClusterError(f"initdb failed: {result.stderr.strip().splitlines()[-1:]}")

    def _write_settings(self) -> None:
        self.port = self.port or free_port()
        settings = {
            **SERVER_SETTINGS,
            "port": str(self.port),
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{self.base_dir}'",
            **self.settings,
        }
        with (self.data_dir / "postgresql.auto.conf").open("a") as conf:
            for key, value in settings.items():
                conf.write(f"{key} = {value}\n")

    def _start_postmaster(self, owner: pwd.struct_passwd | None) -> None:
        cmd = self._command(
            owner,
            str(self.bin_dir / "pg_ctl"),
            "-D",
            str(self.data_dir),
            "-l",
            str(self.log_file),
            "-w",
            "-t",
            "60",
            "start",
        )
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise ClusterError(f"PostgreSQL did not start; see {self.log_file}")
        self.pid = int((self.data_dir / "postmaster.pid").read_text().split()[0])

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown by pid, then immediate if it lingers; removes the directory."""
        if self.pid is not None:
            _signal_and_wait(self.pid, signal.SIGINT, timeout)
            _signal_and_wait(self.pid, signal.SIGQUIT, 5.0)
            self.pid = None
        if self.base_dir != Path() and self.base_dir.exists():
            shutil.rmtree(self.base_dir, ignore_errors=True)


def _signal_and_wait(pid: int, sig: signal.Signals, timeout: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            os.kill(pid, 0)
            time.sleep(0.05)


@contextlib.contextmanager
def ephemeral_cluster(**settings: str) -> Iterator[EphemeralCluster]:
    cluster = EphemeralCluster(settings=settings)
    try:
        yield cluster.start()
    finally:
        cluster.stop()
