"""Scenario 6a, hostile policy files: whatever bytes the loader is given, it returns a policy or
raises PolicyError whose every problem is one line naming the file, the line and the key, and
`cdc-audit check` exits 0 or 2 with no traceback.

The unit tests fuzz `parse_policy` on text; this goes through files and bytes (encodings, NUL,
BOMs, tags, anchors, deep nesting, huge values) and through the command line.
"""

from __future__ import annotations

import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdc_audit import cli
from cdc_audit.errors import PolicyError
from cdc_audit.policy import LoadedPolicy, load_policy

from .scale import scaled

pytestmark = pytest.mark.reliability

VALID = """\
version: 1
schema: cdc_audit
context:
  require: [actor_id]
  on_missing: record
streams:
  user:  {retention: 400d, sign: checkpoint}
  admin: {retention: 7y, sign: every_row, require: [actor_id, reason]}
tables:
  - table: public.accounts
    stream: user
    operations: [insert, update, delete, truncate]
    old_values: full
    exclude: [updated_at]
    redact: {email: hash, ssn: mask}
    when: "status <> 'draft'"
  - table: '"Billing"."Invoices"'
    stream: admin
ddl: {stream: admin}
app_events: {stream: user}
checkpoints: {every_events: 10000, every_seconds: 60, anchor_dir: /var/lib/cdc-audit/anchors}
jobs: {purge: "0 3 * * *", verify: "*/15 * * * *", snapshot: "0 * * * *"}
"""
VALID_DATA = yaml.safe_load(VALID)
_YAML_LINE_BREAK = re.compile("\r\n|[\r\n\x85\u2028\u2029]")

KEYS = [
    "version", "schema", "slot", "context", "streams", "tables", "ddl", "app_events",
    "checkpoints", "jobs", "user", "admin", "table", "stream", "operations", "old_values",
    "exclude", "redact", "when", "retention", "sign", "require", "on_missing", "purge",
    "verify", "snapshot", "every_events", "every_seconds", "anchor_dir", "schema_name", "line",
    "<<", "Email", "a\nb", "ключ", "x'; DROP TABLE t; --", "",
]  # fmt: skip
HOSTILE_SCALARS = [
    "400d", "0d", "-1d", "99999999999y", "7 years", "insert", "upsert", "full", "key", "hash",
    "mask", "record", "reject", "every_row", "actor_id", "public.accounts", '"A"."B"',
    '"a""b".c', "pg_catalog.pg_class", "a.b.c.d", "status <> 'draft'", "1=1; DROP TABLE t",
    "(SELECT 1) = 1", "pg_sleep(10) IS NULL", "x = ANY('{1}')", "0 3 * * *", "* * *",
    "61 * * * *", "", " ", "\t", "\x00", "\r\n", "\u2028", "\ufeff", "'", '"', "\\", "${HOME}",
    "%s", "{}", "[]", "~", "null", "yes", "0x1F", "1e309", "-0", "ünïcödé", "😀" * 3,
    "x" * 70, "x" * 5000,
]  # fmt: skip
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=16),
    st.sampled_from(HOSTILE_SCALARS),
)
DOCUMENTS = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), inner, max_size=5),
    ),
    max_leaves=30,
)

# Byte-level damage to a valid file: what an editor, a bad merge or an attacker might leave.
SNIPPETS = [
    b"\x00", b"\xff", b"\xc3(", b"\xef\xbb\xbf", b"\t", b"\r", b"\n", b"\r\n", b"\xe2\x80\xa8",
    b": ", b"- ", b"{", b"}", b"[", b"]", b"&a ", b"*a", b"<<: *a\n", b"!!python/object:os.system",
    b"!!binary ", b"!!set ", b"!!timestamp ", b"!!bool ", b"!!int ", b"!!float ", b"!custom ",
    b"%YAML 1.1\n", b"---\n", b"...\n",
    b"? ", b"|\n", b">-\n", b"#", b"'", b'"', b"\\", b"@", b"`", b"version: 2\n", b"  " * 40,
    b"[" * 100, b"{a: " * 70, b"x" * 10_000,
]  # fmt: skip


def damage(original: bytes, rnd: random.Random, edits: int) -> bytes:
    """`original` with a few insertions, deletions, duplications and byte flips."""
    data = bytearray(original)
    for _ in range(edits):
        where = rnd.randrange(len(data) + 1)
        action = rnd.randrange(5)
        if action == 0:
            data[where:where] = rnd.choice(SNIPPETS)
        elif action == 1 and data:
            del data[where : where + rnd.randrange(1, 40)]
        elif action == 2:
            start = data.rfind(b"\n", 0, where) + 1
            end = data.find(b"\n", where)
            end = len(data) if end < 0 else end + 1
            data[start:start] = data[start:end]  # a duplicated line (repeated key)
        elif action == 3 and data:
            index = min(where, len(data) - 1)
            data[index] ^= 1 << rnd.randrange(8)
        else:
            start = data.rfind(b"\n", 0, where) + 1
            data[start:start] = b" " * rnd.choice((1, 2, 4))  # mis-indented line
    return bytes(data)


def _paths(value: object, prefix: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _paths(item, (*prefix, index))
    return found


VALID_PATHS = _paths(VALID_DATA)[1:]


def assert_policy_or_clear_error(path: Path) -> LoadedPolicy | None:
    """The loader's whole contract on one file; returns the policy when it loads."""
    # Lines as YAML counts them (a lone CR, U+0085, U+2028 and U+2029 end lines too), plus
    # the empty line after a final newline, where "unexpected end of stream" is reported.
    text = path.read_bytes().decode("utf-8", errors="replace")
    lines_in_file = len(_YAML_LINE_BREAK.findall(text)) + 1
    try:
        return load_policy(path)
    except PolicyError as error:
        assert error.problems, f"{path}: a PolicyError without problems"
        for problem in error.problems:
            text = str(problem)
            assert problem.file == str(path), f"problem names {problem.file!r}, not the file"
            assert text.startswith(f"{path}"), text
            breaks = [c for c in "\n\r\x0b\x0c\x85\u2028\u2029" if c in text]
            assert not breaks, f"a problem spans lines: {text!r}"
            assert problem.message.strip(), f"a problem without a message: {text!r}"
            if problem.line is not None:
                assert 1 <= problem.line <= lines_in_file, f"line out of the file: {text!r}"
        return None


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    return tmp_path / "policy.yaml"


@settings(
    max_examples=scaled(100, 2000),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(DOCUMENTS)
def test_random_yaml_structures(policy_file: Path, document: object) -> None:
    policy_file.write_text(yaml.safe_dump(document, allow_unicode=True), encoding="utf-8")
    assert_policy_or_clear_error(policy_file)


@settings(
    max_examples=scaled(100, 2000),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(st.lists(st.tuples(st.sampled_from(VALID_PATHS), DOCUMENTS), min_size=1, max_size=3))
def test_valid_policy_with_values_replaced(
    policy_file: Path, swaps: list[tuple[tuple[object, ...], object]]
) -> None:
    data = yaml.safe_load(VALID)
    for path, replacement in swaps:
        target = data
        try:
            for part in path[:-1]:
                target = target[part]
            target[path[-1]] = replacement
        except (KeyError, IndexError, TypeError):
            continue  # an earlier swap removed this path
    policy_file.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    assert_policy_or_clear_error(policy_file)


@settings(
    max_examples=scaled(150, 3000),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(st.randoms(use_true_random=False), st.integers(1, 6))
def test_valid_policy_with_bytes_damaged(policy_file: Path, rnd: random.Random, edits: int) -> None:
    policy_file.write_bytes(damage(VALID.encode(), rnd, edits))
    assert_policy_or_clear_error(policy_file)


@pytest.mark.parametrize(
    "text",
    [
        "a: &a [*a, *a]\n" + "".join(f"b{i}: &b{i} [*b{i - 1 if i else 0}]\n" for i in range(3)),
        "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 9)).replace(
            "*l0", "x"
        ),
        "version: 1\nstreams: !!python/object/apply:os.system ['true']\n",
        "version: 1\nstreams: {user: {}}\n" + "x: " + "[" * 5000 + "]" * 5000 + "\n",
        "version: 1\nstreams: {user: {}}\n" + "pad: " + "y" * 1_100_000 + "\n",
        "version: 1\nversion: 1\nstreams: {user: {}}\n",
        "version: 1\nstreams: {user: {}}\n---\nversion: 1\n",
        "\x00",
        "",
        # PyYAML fails these with AttributeError and KeyError of its own (found by this fuzz).
        "version: 1\nstreams: {user: {retention: !!timestamp 400d}}\n",
        "version: !!bool maybe\nstreams: {user: {}}\n",
    ],
    ids=[
        "recursive-alias",
        "alias-bomb",
        "python-tag",
        "deep",
        "huge",
        "dup-key",
        "two-docs",
        "nul",
        "empty",
        "bad-timestamp",
        "bad-bool",
    ],
)
def test_pathological_files(policy_file: Path, text: str) -> None:
    policy_file.write_text(text, encoding="utf-8")
    assert assert_policy_or_clear_error(policy_file) is None, "a pathological file was accepted"


def _cli_cases(tmp_path: Path) -> list[Path]:
    rnd = random.Random(20261128)
    cases = [tmp_path / "valid.yaml"]
    cases[0].write_text(VALID)
    for number in range(scaled(8, 40)):
        path = tmp_path / f"damaged{number}.yaml"
        path.write_bytes(damage(VALID.encode(), rnd, 1 + number % 4))
        cases.append(path)
    for name, raw in [
        ("latin1.yaml", "version: 1\nstreams:\n  caf\xe9: {}\n".encode("latin-1")),
        ("tag.yaml", b"version: 1\nstreams: !!python/object/apply:os.system ['true']\n"),
        ("nul.yaml", b"version: 1\x00\nstreams: {user: {}}\n"),
        ("bomb.yaml", "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in
                              range(1, 9)).replace("*l0", "x").encode()),
    ]:  # fmt: skip
        path = tmp_path / name
        path.write_bytes(raw)
        cases.append(path)
    return cases


def _assert_check_result(path: Path, code: int, stderr: str) -> None:
    where = f"{path.name}: exit {code}, stderr {stderr!r}"
    assert "Traceback" not in stderr, where
    if assert_policy_or_clear_error(path) is not None:
        assert code == 0 and stderr == "", where
        return
    assert code == 2, where
    lines = stderr.removesuffix("\n").split("\n")
    # One line per problem found, each naming the file (and the line when there is one).
    assert all(line.startswith(f"cdc-audit: {path}") for line in lines), where
    assert len(lines) == _problems(path), where


def test_check_command_on_hostile_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = _cli_cases(tmp_path)
    for path in cases:
        code = cli.main(["check", "--policy", str(path)])
        _assert_check_result(path, code, capsys.readouterr().err)
    # And as a user runs it: a process of its own (mostly interpreter start-up, so only two).
    chosen = [cases[0], cases[-1]]
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "cdc_audit.cli", "check", "--policy", str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for path in chosen
    ]
    for path, run in zip(chosen, runs, strict=True):
        _, stderr = run.communicate(timeout=120)
        _assert_check_result(path, run.returncode, stderr)


def _problems(path: Path) -> int:
    try:
        load_policy(path)
    except PolicyError as error:
        return len(error.problems)
    return 0
