"""Scenario 6c, hostile values: context and row values with quotes, backslashes, control
characters, CR/LF, U+2028, 1 MB strings and JSON look-alikes go through a real trail (capture,
worker, online verify, export, offline verify) and come out stored faithfully: no injection,
no record split in the export, values byte for byte as in the source rows, and hashes that an
independent re-computation from the export reproduces.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from cdc_audit import cli, installer
from cdc_audit.policy import load_policy
from cdc_audit.verify import verify_stream

from ..integration.fix_policy import WritePolicy
from ..integration.pg import Database
from .scale import scaled

pytestmark = pytest.mark.reliability

TABLES = "  - {table: public.hostile, stream: user, old_values: full}\n"
EXTRA = "app_events: {stream: user}\n"
SCHEMA_SQL = """
CREATE TABLE hostile (
    id int PRIMARY KEY, actor text, t text, j jsonb, js json, ta text[], note text, big text
);
ALTER TABLE hostile REPLICA IDENTITY FULL;
CREATE TABLE bystander (id int);
"""
CONTROL = "".join(chr(c) for c in range(1, 32)) + "\x7f\x85"
HOSTILE = [
    "O'Brien",
    'say "hi"',
    "back\\slash \\\\ \\n \\u0000 \\x00",
    "line\nfeed",
    "carriage\rreturn\r\n",
    "separator\u2028paragraph\u2029end",
    CONTROL,
    "'); DROP TABLE bystander; --",
    '"}, "actor_id": "forged", "x": {"',
    '{"a": ',  # invalid JSON, next to the json columns
    "\\ud800 \\udfff literally",
    "ünïcödé 😀 \u202eRTL\u202c \ufeff",
    "$1 %s %(x)s {0} ${HOME}",
    "NULL",
    "\t",
]
MEGABYTE = ("x'\"\\\n\u2028" * 200_000)[: 1024 * 1024]


def _rows() -> list[dict[str, Any]]:
    rows = []
    for i, text in enumerate(HOSTILE):
        other = HOSTILE[-1 - i]
        rows.append(
            {
                "id": i,
                "actor": f"{text}#{i}",
                "t": text,
                "j": {text: text, "n": [1, "2.50", None, True], "nested": {"k": [text, other]}},
                # json keeps its text: spacing, key order and duplicate keys included.
                "js": (
                    f'{{ "dup": {json.dumps(text)}, "dup": 2.50, "e": 1E+2 }}'
                    if i % 3 == 0
                    else json.dumps({"s": text, "big": 12345678901234567890, "f": 0.1})
                    if i != 4
                    # Escapes jsonb refuses (a lone surrogate, NUL) but json keeps.
                    else '{"lone": "\\ud800", "nul": "\\u0000", "ok": "\\u00e9"}'
                ),
                "ta": [text, None, "NULL", "a,b", '"{}"', other, "\\", "nb\xa0sp"],
                "note": other,
                "big": MEGABYTE if i == 0 else text * 3,
                "reason": MEGABYTE if i == 1 else other,
                "extra": {text: other, "nested": {"list": [text, 1, None]}},
            }
        )
    return rows


@pytest.fixture
def trail(database: Database, write_policy: WritePolicy) -> Database:
    database.execute(SCHEMA_SQL)
    installer.apply(database.dsn, load_policy(write_policy(TABLES, EXTRA)))
    return database


def _write(db: Database, rows: list[dict[str, Any]]) -> None:
    with db.connect() as conn:
        for row in rows:
            with conn.transaction():
                conn.execute(
                    "SELECT cdc_audit.set_context(actor_id => %s, reason => %s, extra => %s)",
                    (row["actor"], row["reason"], json.dumps(row["extra"])),
                )
                conn.execute(
                    "INSERT INTO hostile VALUES (%s, %s, %s, %s::jsonb, %s::json, %s, %s, %s)",
                    (
                        row["id"],
                        row["actor"],
                        row["t"],
                        json.dumps(row["j"]),
                        row["js"],
                        row["ta"],
                        row["note"],
                        row["big"],
                    ),
                )
        with conn.transaction():
            conn.execute("SELECT cdc_audit.set_context(actor_id => %s)", (HOSTILE[7],))
            conn.execute("UPDATE hostile SET t = note, note = t WHERE id % 2 = 0")
            conn.execute("DELETE FROM hostile WHERE id = 1")


def _cli(db: Database, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cdc_audit.cli", *args],
        env={**os.environ, "CDC_AUDIT_DSN": db.dsn, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


# An encoder written from the chain spec (docs/tamper-evidence.md), independent of
# cdc_audit.canonical: sorted keys, no whitespace, only '"', '\\' and controls escaped.
class _Number(str):
    """A JSON number kept as its text."""


def _canonical(value: Any) -> str:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, _Number):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ",".join(_canonical(v) for v in value) + "]"
    assert isinstance(value, dict), type(value)
    return "{" + ",".join(f"{_canonical(k)}:{_canonical(value[k])}" for k in sorted(value)) + "}"


def _load_line(line: bytes) -> dict[str, Any]:
    record = json.loads(line, parse_float=_Number, parse_int=lambda t: int(t))
    assert isinstance(record, dict)
    return record


PAYLOAD = ("actor_id", "changed", "context", "new", "old", "reason", "row_key")
HEADER = (
    "commit_lsn", "commit_time", "context_missing", "event_id", "kind", "payload_hash",
    "schema_name", "seq", "stream", "table_name", "xid",
)  # fmt: skip


def _recomputed(record: dict[str, Any]) -> tuple[str, str]:
    """(payload_hash, hash) of an export line, from its own fields."""
    payload = {k: record[k] for k in PAYLOAD}
    payload_hash = hashlib.sha256(_canonical(payload).encode()).hexdigest()
    header = {k: record[k] for k in HEADER} | {"payload_hash": payload_hash}
    chained = bytes.fromhex(record["prev_hash"]) + _canonical(header).encode()
    return payload_hash, hashlib.sha256(chained).hexdigest()


def _same_json(stored: Any, source: str) -> bool:
    """A trail value equals the source json text (numbers compared exactly)."""
    if isinstance(stored, str):
        return stored == source  # kept as text (duplicate keys)
    parsed = json.loads(source, parse_float=Decimal, parse_int=Decimal)
    again = json.loads(_canonical(stored), parse_float=Decimal, parse_int=Decimal)
    return bool(parsed == again)


def _signing_key(db: Database, out: Path) -> tuple[str, str]:
    """A registered signing key: (private key file, public key file)."""
    assert cli.main(["keygen", "--out", str(out)]) == 0
    public = str(out / "signing_key.pub.pem")
    assert cli.main(["--dsn", db.dsn, "keys", "add", public]) == 0
    return str(out / "signing_key.pem"), public


def test_hostile_values_are_stored_exported_and_verified_faithfully(
    trail: Database, tmp_path: Path
) -> None:
    rows = _rows()
    _write(trail, rows)
    private, public = _signing_key(trail, tmp_path / "key")
    drained = _cli(trail, "worker", "--drain", CDC_AUDIT_SIGNING_KEY_FILE=private)
    assert drained.returncode == 0, drained.stderr

    # No injection: the statements did what they said and nothing else.
    assert trail.scalar("SELECT count(*) FROM hostile") == len(rows) - 1
    assert trail.scalar("SELECT to_regclass('public.bystander') IS NOT NULL")
    source = {
        r[0]: r
        for r in trail.execute(
            "SELECT id, actor, t, j::text, js::text, ta, note, big FROM hostile ORDER BY id"
        )
    }

    with trail.connect() as conn:
        verdict = verify_stream(conn, "cdc_audit", "user")
    assert verdict.ok, f"online verification failed: {verdict}"
    export = tmp_path / "user.jsonl"
    exported = _cli(trail, "export", "--stream", "user", "--output", str(export))
    assert exported.returncode == 0, exported.stderr
    offline = _cli(trail, "verify", "--file", str(export), "--public-key", public)
    assert offline.returncode == 0, f"offline verification failed: {offline.stdout}{offline.stderr}"

    # One event per physical line, whichever way a reader splits lines.
    raw = export.read_bytes()
    assert raw.endswith(b"\n")
    lines = raw.split(b"\n")[:-1]
    with export.open(encoding="utf-8") as text_mode:
        assert sum(1 for _ in text_mode) == len(lines), "text-mode reading splits a record"
    assert b"\r" not in raw, "a raw CR in the export"
    records = [_load_line(line) for line in lines]
    events = [r for r in records if r["type"] == "event"]
    assert any(r["type"] == "checkpoint" for r in records), "no signed checkpoint exported"
    expected = len(rows) + (len(rows) + 1) // 2 + 1  # inserts, updates of even ids, one delete
    stored = trail.scalar("SELECT count(*) FROM cdc_audit.event WHERE stream = 'user'")
    assert len(events) == stored == expected, (
        f"{len(events)} exported, {stored} stored, {expected} written: lost or split records"
    )

    # Hashes: recomputed from the export alone, equal to the trail's.
    in_trail = dict(
        trail.execute("SELECT seq, encode(hash, 'hex') FROM cdc_audit.event WHERE stream = 'user'")
    )
    for event in events:
        payload_hash, chained = _recomputed(event)
        where = f"seq {event['seq']}"
        assert payload_hash == event["payload_hash"], f"{where}: payload hash differs"
        assert chained == event["hash"] == in_trail[event["seq"]], f"{where}: hash differs"
    again = tmp_path / "again.jsonl"
    assert _cli(trail, "export", "--stream", "user", "--output", str(again)).returncode == 0
    assert again.read_bytes() == raw, "a second export of the same trail differs"

    # Values and context, byte for byte against what was written and what the table holds.
    inserts = {e["row_key"]["id"]: e for e in events if e["kind"] == "insert"}
    assert sorted(inserts) == [r["id"] for r in rows], "an insert is missing or duplicated"
    for row in rows:
        event, where = inserts[row["id"]], f"row {row['id']}"
        new = event["new"]
        assert event["actor_id"] == row["actor"], f"{where}: actor_id altered"
        assert event["reason"] == row["reason"], f"{where}: reason altered"
        assert event["context"]["extra"] == row["extra"], f"{where}: extra context altered"
        assert not event["context_missing"], where
        for column in ("actor", "t", "note", "big"):
            assert new[column] == row[column], f"{where}: {column} altered"
        assert new["ta"] == row["ta"], f"{where}: array altered"
        assert _same_json(new["j"], json.dumps(row["j"])), f"{where}: jsonb altered"
        assert _same_json(new["js"], row["js"]), f"{where}: json altered: {new['js']!r}"
        if row["id"] % 3 == 0:
            assert new["js"] == row["js"], f"{where}: json with duplicate keys not kept as text"
        current = source.get(row["id"])
        if current is not None and row["id"] % 2:
            _, actor, t, j, js, ta, note, big = current
            assert (new["actor"], new["t"], new["note"], new["big"]) == (actor, t, note, big)
            assert new["ta"] == ta and _same_json(new["js"], js) and _same_json(new["j"], j)
    updates = [e for e in events if e["kind"] == "update"]
    for event in updates:
        row = rows[event["row_key"]["id"]]
        assert event["actor_id"] == HOSTILE[7]
        assert (event["old"]["t"], event["new"]["t"]) == (row["t"], row["note"])
        assert event["new"]["big"] == row["big"], "an unchanged 1 MB value was lost in an update"


@pytest.mark.parametrize("rounds", [scaled(1, 5)])
def test_hostile_app_events_and_identifiers_are_faithful(trail: Database, rounds: int) -> None:
    """App events carry application text into the trail too: the same care applies."""
    with trail.connect() as conn:
        for _ in range(rounds):
            for i, text in enumerate(HOSTILE):
                with conn.transaction():
                    conn.execute("SELECT cdc_audit.set_context(actor_id => %s)", (text,))
                    conn.execute(
                        "SELECT cdc_audit.log_event('hostile.value', %s, 'success', %s)",
                        (text, json.dumps({"i": i, text: HOSTILE[-1 - i]})),
                    )
    drained = _cli(trail, "worker", "--drain")
    assert drained.returncode == 0, drained.stderr
    found = trail.execute(
        "SELECT actor_id, new FROM cdc_audit.event WHERE kind = 'app' ORDER BY seq"
    )
    assert len(found) == rounds * len(HOSTILE), "app events lost or duplicated"
    for number, (actor_id, new) in enumerate(found):
        i = number % len(HOSTILE)
        assert actor_id == HOSTILE[i]
        assert new["resource"] == HOSTILE[i]
        assert new["details"] == {"i": i, HOSTILE[i]: HOSTILE[-1 - i]}
    with trail.connect() as conn:
        assert verify_stream(conn, "cdc_audit", "user").ok


IDENTIFIER_SQL = '''
CREATE SCHEMA "Sch ""ema"" ü";
CREATE TABLE "Sch ""ema"" ü"."Tab'le; --" (
    "I d" int PRIMARY KEY, "co,l ""x""" text, "{}" jsonb, "ñ ☃" text[]
);
'''
IDENTIFIER_TABLES = '''\
  - table: '"Sch ""ema"" ü"."Tab''le; --"'
    stream: user
    redact: {'"co,l ""x"""': mask}
'''


def test_hostile_identifiers_are_audited_under_their_exact_names(
    database: Database, write_policy: WritePolicy
) -> None:
    database.execute(IDENTIFIER_SQL)
    installer.apply(database.dsn, load_policy(write_policy(IDENTIFIER_TABLES)))
    with database.connect() as conn, conn.transaction():
        conn.execute("SELECT cdc_audit.set_context(actor_id => 'u1')")
        conn.execute(
            'INSERT INTO "Sch ""ema"" ü"."Tab\'le; --" VALUES (1, %s, %s::jsonb, %s)',
            (HOSTILE[3], json.dumps({HOSTILE[4]: 1}), [HOSTILE[5], None]),
        )
    drained = _cli(database, "worker", "--drain")
    assert drained.returncode == 0, drained.stderr
    [(schema, table, row_key, new, actor)] = database.execute(
        "SELECT schema_name, table_name, row_key, new, actor_id FROM cdc_audit.event"
    )
    assert (schema, table, actor) == ('Sch "ema" ü', "Tab'le; --", "u1")
    assert row_key == {"I d": 1}
    assert new["{}"] == {HOSTILE[4]: 1} and new["ñ ☃"] == [HOSTILE[5], None]
    assert new['co,l "x"'] != HOSTILE[3], "a redacted column was stored in clear"
    with database.connect() as conn:
        assert verify_stream(conn, "cdc_audit", "user").ok
