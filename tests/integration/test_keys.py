"""keygen and keys add|list|retire against a real PostgreSQL."""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path

import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cdc_audit import keys
from cdc_audit.errors import CdcAuditError, InvalidInput, NotInstalled

from .fix_policy import WritePolicy
from .pg import Database, run_cli

TABLES = "  - {table: public.accounts, stream: user}\n"


@pytest.fixture
def installed(database: Database, write_policy: WritePolicy) -> Database:
    database.execute("CREATE TABLE accounts (id int PRIMARY KEY, owner text)")
    result = run_cli("apply", "--dsn", database.dsn, "--policy", str(write_policy(TABLES)))
    assert result.returncode == 0, result.stderr
    return database


def keygen(out: Path) -> tuple[str, Path, Path]:
    result = run_cli("keygen", "--out", str(out))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3, result.stdout
    kid = lines[0].removeprefix("key id: ")
    private = Path(lines[1].removeprefix("private key: "))
    public = Path(lines[2].removeprefix("public key: "))
    assert re.fullmatch(r"[0-9a-f]{32}", kid)
    assert (private, public) == (out / "signing_key.pem", out / "signing_key.pub.pem")
    return kid, private, public


def no_traceback(result: object) -> None:
    assert "Traceback" not in getattr(result, "stderr", "")


def test_keygen_add_list_retire(installed: Database, tmp_path: Path) -> None:
    db = installed
    kid, _, public = keygen(tmp_path / "keys")

    added = run_cli("keys", "add", str(public), "--dsn", db.dsn)
    assert added.returncode == 0, added.stderr
    assert added.stderr == f"registered key {kid} in cdc_audit.signing_key\n"
    stored = db.execute(
        "SELECT key_id, public_key, algorithm, retired_at FROM cdc_audit.signing_key"
    )
    assert stored == [(kid, public.read_text(), "ed25519", None)]

    text = run_cli("keys", "list", "--dsn", db.dsn)
    assert text.returncode == 0, text.stderr
    assert re.fullmatch(rf"{kid}  ed25519  added \S+ by \S+  active\n", text.stdout)

    listed = run_cli("keys", "list", "--dsn", db.dsn, "--format", "json")
    assert listed.returncode == 0, listed.stderr
    [row] = json.loads(listed.stdout)
    assert row["key_id"] == kid and row["algorithm"] == "ed25519"
    assert row["retired_at"] is None and row["added_by"]
    assert datetime.fromisoformat(row["added_at"]).tzinfo is not None

    again = run_cli("keys", "add", str(public), "--dsn", db.dsn)
    assert again.returncode == 0, again.stderr
    assert "already registered" in again.stderr and "nothing to do" in again.stderr
    assert db.scalar("SELECT count(*) FROM cdc_audit.signing_key") == 1

    retired = run_cli("keys", "retire", kid, "--dsn", db.dsn)
    assert retired.returncode == 0, retired.stderr
    assert retired.stderr.startswith(f"retired key {kid}")
    after = json.loads(run_cli("keys", "list", "--dsn", db.dsn, "--format", "json").stdout)
    assert after[0]["retired_at"] is not None
    assert "  retired " in run_cli("keys", "list", "--dsn", db.dsn).stdout

    twice = run_cli("keys", "retire", kid, "--dsn", db.dsn)
    assert twice.returncode == 2
    assert re.fullmatch(rf"cdc-audit: key {kid} was already retired at \S+\n", twice.stderr)

    re_add = run_cli("keys", "add", str(public), "--dsn", db.dsn)
    assert re_add.returncode == 2
    assert f"key {kid} is registered in cdc_audit.signing_key but was retired at" in (re_add.stderr)
    assert len(re_add.stderr.splitlines()) == 1
    for result in (added, text, listed, again, retired, twice, re_add):
        no_traceback(result)


def test_unknown_key_id_and_wrong_files_are_exit_2(installed: Database, tmp_path: Path) -> None:
    db = installed
    unknown = run_cli("keys", "retire", "0" * 32, "--dsn", db.dsn)
    assert unknown.returncode == 2
    assert unknown.stderr == (
        f"cdc-audit: no key {'0' * 32} is registered in cdc_audit.signing_key;"
        " cdc-audit keys list shows them\n"
    )
    hostile = run_cli("keys", "retire", "x'; DROP TABLE accounts; --\n", "--dsn", db.dsn)
    assert hostile.returncode == 2
    assert len(hostile.stderr.splitlines()) == 1
    assert db.scalar("SELECT to_regclass('public.accounts') IS NOT NULL") is True

    _, private, _ = keygen(tmp_path / "k")
    wrong = run_cli("keys", "add", str(private), "--dsn", db.dsn)
    assert wrong.returncode == 2
    assert wrong.stderr.startswith(f"cdc-audit: {private}: is a private key, not a public key")
    missing = run_cli("keys", "add", str(tmp_path / "nope.pem"), "--dsn", db.dsn)
    assert (missing.returncode, missing.stderr) == (
        2,
        f"cdc-audit: {tmp_path / 'nope.pem'}: no such file\n",
    )
    empty = run_cli("keys", "list", "--dsn", db.dsn)
    assert (empty.returncode, empty.stdout) == (0, "")
    assert "no keys registered" in empty.stderr
    for result in (unknown, hostile, wrong, missing, empty):
        no_traceback(result)


def test_keys_follow_the_policy_schema(
    database: Database, write_policy: WritePolicy, tmp_path: Path
) -> None:
    database.execute("CREATE TABLE accounts (id int PRIMARY KEY, owner text)")
    policy = write_policy(TABLES).read_text().replace("schema: cdc_audit", "schema: audit_two")
    path = tmp_path / "two.yaml"
    path.write_text(policy)
    applied = run_cli("apply", "--dsn", database.dsn, "--policy", str(path))
    assert applied.returncode == 0, applied.stderr
    kid, _, public = keygen(tmp_path / "k")
    added = run_cli("keys", "add", str(public), "--dsn", database.dsn, "--policy", str(path))
    assert added.returncode == 0, added.stderr
    assert database.scalar("SELECT key_id FROM audit_two.signing_key") == kid
    listed = run_cli("keys", "list", "--dsn", database.dsn, "--schema", "audit_two")
    assert listed.stdout.startswith(kid)


def test_not_installed_is_a_one_line_error(database: Database, tmp_path: Path) -> None:
    result = run_cli("keys", "list", "--dsn", database.dsn)
    assert result.returncode == 3
    assert result.stderr == (
        "cdc-audit: cdc_audit.signing_key does not exist: cdc-audit is not installed in schema"
        " cdc_audit (run cdc-audit apply)\n"
    )
    with database.connect() as conn, pytest.raises(NotInstalled):
        keys.registered_keys(conn, "cdc_audit")


def test_the_guard_trigger_refuses_changing_or_removing_a_key(
    installed: Database, tmp_path: Path
) -> None:
    db = installed
    kid, _, public = keygen(tmp_path / "k")
    assert run_cli("keys", "add", str(public), "--dsn", db.dsn).returncode == 0
    other = keys.SigningKey.of(Ed25519PrivateKey.generate()).public_key()
    for statement, params in (
        ("UPDATE cdc_audit.signing_key SET public_key = %s WHERE key_id = %s", (other.pem, kid)),
        ("UPDATE cdc_audit.signing_key SET key_id = %s WHERE key_id = %s", (other.key_id, kid)),
        ("DELETE FROM cdc_audit.signing_key WHERE key_id = %s", (kid,)),
        ("TRUNCATE cdc_audit.signing_key", ()),
    ):
        with pytest.raises(psycopg.Error) as caught:
            db.execute(statement, params)
        assert caught.value.sqlstate == "CA002", statement
    with pytest.raises(psycopg.Error, match=r"DELETE on cdc_audit\.signing_key is refused"):
        db.execute("DELETE FROM cdc_audit.signing_key")
    assert run_cli("keys", "retire", kid, "--dsn", db.dsn).returncode == 0
    with pytest.raises(psycopg.Error, match="keys can only be retired"):
        db.execute("UPDATE cdc_audit.signing_key SET retired_at = NULL")
    with pytest.raises(psycopg.Error, match="keys can only be retired"):
        db.execute("UPDATE cdc_audit.signing_key SET retired_at = now()")
    assert db.scalar("SELECT public_key FROM cdc_audit.signing_key") == public.read_text()


def test_library_functions_for_the_worker_and_verify(installed: Database, tmp_path: Path) -> None:
    db = installed
    old_private, old_public, old_id = keys.generate(tmp_path / "old")
    new_private, _, new_id = keys.generate(tmp_path / "new")
    old_signer = keys.load_signing_key(old_private)
    new_signer = keys.load_signing_key(new_private)
    with db.connect(autocommit=False) as conn:
        with pytest.raises(InvalidInput) as missing:
            keys.require_registered(conn, "cdc_audit", old_signer)
        assert str(missing.value) == (
            f"signing key {old_id} is not registered in cdc_audit.signing_key:"
            " run cdc-audit keys add <public key file>"
        )
        assert keys.register(conn, "cdc_audit", keys.load_public_key(old_public)) is True
        assert keys.register(conn, "cdc_audit", new_signer.public_key()) is True
        assert keys.register(conn, "cdc_audit", new_signer.public_key()) is False
        keys.require_registered(conn, "cdc_audit", old_signer)
        signature = old_signer.sign(b"head")
        keys.retire(conn, "cdc_audit", old_id.upper())
        with pytest.raises(InvalidInput, match=rf"^signing key {old_id} was retired at "):
            keys.require_registered(conn, "cdc_audit", old_signer)
        keys.require_registered(conn, "cdc_audit", new_signer)
        registered = keys.registered_keys(conn, "cdc_audit")
        assert sorted(registered) == sorted([old_id, new_id])
        assert registered[old_id].verify(signature, b"head"), "retired keys still verify"
        assert not registered[new_id].verify(signature, b"head")
        rows = keys.list_keys(conn, "cdc_audit")
        assert {r.key_id: r.retired_at is None for r in rows} == {old_id: False, new_id: True}
        conn.commit()


def test_a_forged_key_row_is_refused_not_trusted(installed: Database, tmp_path: Path) -> None:
    db = installed
    real = keys.SigningKey.of(Ed25519PrivateKey.generate())
    forger = keys.SigningKey.of(Ed25519PrivateKey.generate()).public_key()
    db.execute(
        "INSERT INTO cdc_audit.signing_key (key_id, public_key) VALUES (%s, %s)",
        (real.key_id, forger.pem),
    )
    with db.connect(autocommit=False) as conn:
        with pytest.raises(CdcAuditError, match="holds a different public key under key id"):
            keys.registered_keys(conn, "cdc_audit")
        with pytest.raises(CdcAuditError, match="holds a different public key under key id"):
            keys.require_registered(conn, "cdc_audit", real)
        with pytest.raises(CdcAuditError, match="holds a different public key under key id"):
            keys.register(conn, "cdc_audit", real.public_key())
