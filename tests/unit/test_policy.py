"""The policy file as a user meets it: what loads, and what each mistake reports."""

from __future__ import annotations

import hashlib
import textwrap
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from cdc_audit.errors import InvalidInput, PolicyError, PolicyProblem
from cdc_audit.policy import (
    CheckpointPolicy,
    ContextPolicy,
    Duration,
    JobsPolicy,
    Policy,
    StreamPolicy,
    StreamRef,
    TablePolicy,
    load_policy,
    parse_policy,
)
from cdc_audit.predicate import Predicate, TableName

POLICIES = Path(__file__).parent / "policies"
MINIMAL = "version: 1\nstreams:\n  user: {}\n"


def problems_of(text: str, source: str = "policy.yaml") -> list[PolicyProblem]:
    with pytest.raises(PolicyError) as caught:
        parse_policy(textwrap.dedent(text), source)
    return caught.value.problems


def only_problem(text: str) -> PolicyProblem:
    found = problems_of(text)
    assert len(found) == 1, found
    return found[0]


# ------------------------------------------------------------------------ valid policies


def test_the_design_example_loads_with_every_value() -> None:
    path = POLICIES / "design_example.yaml"
    loaded = load_policy(path)
    policy = loaded.policy

    assert loaded.source == str(path)
    assert loaded.text == path.read_text()
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert policy.version == 1
    assert policy.schema_name == "cdc_audit"
    assert policy.slot is None
    assert policy.context == ContextPolicy(require=["actor_id"], on_missing="record")
    assert policy.streams == {
        "user": StreamPolicy(retention=Duration(400, "d"), sign="checkpoint"),
        "admin": StreamPolicy(
            retention=Duration(7, "y"), sign="every_row", require=["actor_id", "reason"]
        ),
    }
    accounts, roles = policy.tables
    assert accounts.table == TableName("public", "accounts")
    assert accounts.stream == "user"
    assert accounts.operations == ("insert", "update", "delete", "truncate")
    assert accounts.old_values == "full"
    assert accounts.exclude == ["updated_at"]
    assert accounts.redact == {"email": "hash", "ssn": "mask"}
    assert accounts.when == Predicate("status <> 'draft'", frozenset({"status"}))
    assert accounts.line == 10
    assert roles.table == TableName("public", "roles")
    assert (roles.stream, roles.exclude, roles.redact, roles.when) == ("admin", [], {}, None)
    assert roles.line == 17
    assert policy.ddl == StreamRef(stream="admin")
    assert policy.app_events == StreamRef(stream="user")
    assert policy.checkpoints == CheckpointPolicy(
        every_events=10000, every_seconds=60, anchor_dir=Path("/var/lib/cdc-audit/anchors")
    )
    assert policy.jobs == JobsPolicy(purge="0 3 * * *", verify="*/15 * * * *", snapshot="0 * * * *")


def test_a_minimal_policy_gets_the_documented_defaults() -> None:
    policy = parse_policy(MINIMAL)
    assert policy.schema_name == "cdc_audit"
    assert policy.context.require == ["actor_id"]
    assert policy.context.on_missing == "record"
    assert policy.streams["user"] == StreamPolicy()
    assert policy.streams["user"].retention is None  # keep forever
    assert policy.tables == []
    assert policy.ddl is None and policy.app_events is None
    assert policy.checkpoints == CheckpointPolicy(every_events=10000, every_seconds=60)
    assert policy.jobs == JobsPolicy()


def test_empty_sections_mean_their_defaults() -> None:
    policy = parse_policy("version: 1\ncontext:\nstreams:\n  user:\ntables:\njobs:\n")
    assert policy.streams == {"user": StreamPolicy()}
    assert policy.tables == []
    assert policy.context == ContextPolicy()


def test_requirements_prefer_the_stream_then_the_global_context() -> None:
    policy = parse_policy(
        """\
        version: 1
        context: {require: [actor_id, reason], on_missing: reject}
        streams:
          user: {}
          admin: {require: [actor_id, trace_id]}
          bulk: {require: [], on_missing: record}
        """.replace("        ", "")
    )
    assert policy.requirements("user") == (["actor_id", "reason"], "reject")
    assert policy.requirements("admin") == (["actor_id", "trace_id"], "reject")
    assert policy.requirements("bulk") == ([], "record")


def test_names_in_tables_fold_like_postgresql() -> None:
    policy = parse_policy(
        MINIMAL
        + textwrap.dedent(
            """\
            tables:
              - table: '"Sales"."Order Items"'
                stream: user
                operations: [delete, insert, delete]
                exclude: [Updated_At, '"Notes"', updated_at]
                redact: {Email: hash, '"SSN"': mask}
                when: "Status <> 'Draft' AND \\"Order Items\\".qty > 0"
            """
        )
    )
    (table,) = policy.tables
    assert table.table == TableName("Sales", "Order Items")
    assert table.table.qualified() == '"Sales"."Order Items"'
    assert table.operations == ("insert", "delete")
    assert table.exclude == ["updated_at", "Notes"]
    assert table.redact == {"email": "hash", "SSN": "mask"}
    assert table.when == Predicate("status <> 'Draft' AND qty > 0", frozenset({"status", "qty"}))


def test_a_utf8_bom_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + MINIMAL.encode())
    assert load_policy(path).policy.streams == {"user": StreamPolicy()}


def test_anchors_and_merge_keys_work() -> None:
    policy = parse_policy(
        MINIMAL
        + textwrap.dedent(
            """\
            tables:
              - &base {table: a, stream: user, old_values: key, redact: {email: mask}}
              - <<: *base
                table: b
            """
        )
    )
    assert [(t.table.name, t.old_values, t.redact) for t in policy.tables] == [
        ("a", "key", {"email": "mask"}),
        ("b", "key", {"email": "mask"}),
    ]


def test_a_dumped_policy_validates_back_to_the_same_policy() -> None:
    policy = load_policy(POLICIES / "design_example.yaml").policy
    text = parse_policy(
        MINIMAL + "tables: [{table: '\"A b\"', stream: user, redact: {'\"E\"': hash}}]\n"
    )
    for original in (policy, text):
        dumped = original.model_dump(mode="json", by_alias=True)
        again = Policy.model_validate(dumped)
        assert again.model_dump() == original.model_dump()


def test_policies_built_in_python_get_the_same_cross_checks() -> None:
    with pytest.raises(ValidationError, match="unknown stream 'usr'; defined streams: user"):
        Policy(
            version=1,
            streams={"user": StreamPolicy()},
            tables=[TablePolicy(table=TableName("public", "t"), stream="usr")],
        )


@pytest.mark.parametrize(
    ("text", "count", "unit", "seconds", "interval"),
    [
        ("400d", 400, "d", 400 * 86400, "400 days"),
        ("7y", 7, "y", 7 * 31_556_952, "7 years"),
        ("12h", 12, "h", 12 * 3600, "12 hours"),
        ("90min", 90, "min", 90 * 60, "90 minutes"),
        ("6mo", 6, "mo", 6 * 2_629_746, "6 months"),
        ("2w", 2, "w", 2 * 604_800, "2 weeks"),
        ("30s", 30, "s", 30, "30 seconds"),
    ],
)
def test_durations(text: str, count: int, unit: str, seconds: int, interval: str) -> None:
    duration = Duration.parse(text)
    assert (duration.count, duration.unit) == (count, unit)
    assert str(duration) == text
    assert duration.approx_seconds == seconds
    assert duration.pg_interval == interval


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10 days", "invalid duration '10 days'; use a number and a unit: s, min, h, d, w, mo"),
        ("30m", "'m' is ambiguous"),
        ("0d", "longer than zero"),
        ("1001y", "more than 1000 years"),
        ("7Y", "invalid duration '7Y'"),
        ("-1d", "invalid duration"),
        ("", "invalid duration"),
    ],
)
def test_bad_durations(text: str, message: str) -> None:
    with pytest.raises(ValueError, match="duration") as caught:
        Duration.parse(text)
    assert message in str(caught.value)


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("text", "line", "key", "message"),
    [
        pytest.param(
            "version: 1\nstreams:\n  user: {retention: 10 days}\n",
            3,
            "streams.user.retention",
            "invalid duration '10 days'; use a number and a unit: s, min, h, d, w, mo, y "
            "(e.g. 400d, 7y, 12h)",
            id="duration",
        ),
        pytest.param(
            MINIMAL + "tables:\n  - table: t\n    stream: user\n    opertions: [insert]\n",
            7,
            "tables[0].opertions",
            "unknown key 'opertions'; valid keys: table, stream, operations, old_values, "
            "exclude, redact, when, require_approval; did you mean 'operations'?",
            id="unknown-table-key",
        ),
        pytest.param(
            "version: 1\nstreams: {user: {}, admin: {}}\ntables:\n  - {table: t, stream: usr}\n",
            4,
            "tables[0].stream",
            "unknown stream 'usr'; defined streams: admin, user; did you mean 'user'?",
            id="unknown-stream",
        ),
        pytest.param(
            MINIMAL + "tables:\n  - table: t\n    stream: user\n    operations: [insert, upsert]\n",
            7,
            "tables[0].operations[1]",
            "'upsert' is not one of insert, update, delete, truncate",
            id="operation",
        ),
        pytest.param(
            MINIMAL + "tables:\n  - table: t\n    stream: user\n    operations:\n"
            "      - insert\n      - upsert\n",
            9,
            "tables[0].operations[1]",
            "'upsert' is not one of insert, update, delete, truncate",
            id="operation-block-list",
        ),
        pytest.param(
            MINIMAL + "tables:\n  - {table: t, stream: user, operations: []}\n",
            5,
            "tables[0].operations",
            "list at least one of insert, update, delete, truncate",
            id="no-operations",
        ),
        pytest.param(
            MINIMAL + "tables:\n  - stream: user\n    old_values: full\n",
            5,
            "tables[0].table",
            "missing required key 'table'",
            id="missing-key-points-at-its-mapping",
        ),
        pytest.param(
            "schema: cdc_audit\nstreams: {user: {}}\n",
            1,
            "version",
            "missing required key 'version'; start the file with 'version: 1'",
            id="missing-version",
        ),
        pytest.param(
            "version: 2\nstreams: {user: {}}\n",
            1,
            "version",
            "unsupported version '2'; this cdc-audit reads version: 1",
            id="version",
        ),
        pytest.param(
            "version: 1\nstreams: {}\n",
            2,
            "streams",
            "define at least one stream",
            id="no-streams",
        ),
        pytest.param(
            "version: 1\nstreams:\n  User: {}\n",
            3,
            "streams.User",
            "invalid stream name 'User'; use 1-40 lower-case letters, digits and _",
            id="stream-name",
        ),
        pytest.param(
            "version: 1\nschema: Audit\nstreams: {user: {}}\n",
            2,
            "schema",
            "invalid schema name 'Audit'",
            id="schema-name",
        ),
        pytest.param(
            "version: 1\nschema: public\nstreams: {user: {}}\n",
            2,
            "schema",
            "schema 'public' cannot hold the audit trail",
            id="schema-public",
        ),
        pytest.param(
            "version: 1\nslot: My-Slot\nstreams: {user: {}}\n",
            2,
            "slot",
            "invalid replication slot name 'My-Slot'",
            id="slot-name",
        ),
        pytest.param(
            "version: 1\nstreams:\n  user: {sign: always}\n",
            3,
            "streams.user.sign",
            "'always' is not one of checkpoint, every_row",
            id="sign",
        ),
        pytest.param(
            "version: 1\nstreams:\n  user: {sign: no}\n",
            3,
            "streams.user.sign",
            "'no' is not one of checkpoint, every_row",
            id="yaml-boolean-shown-as-written",
        ),
        pytest.param(
            "version: 1\ncontext:\n  require: [actor, reason]\nstreams: {user: {}}\n",
            3,
            "context.require[0]",
            "'actor' is not one of actor_id, actor_role, reason, on_behalf_of, session_id, "
            "client_ip, trace_id, approval; did you mean 'actor_id'?",
            id="context-field",
        ),
        pytest.param(
            "version: 1\ncontext:\n  on_missing: drop\nstreams: {user: {}}\n",
            3,
            "context.on_missing",
            "'drop' is not one of record, reject",
            id="on-missing",
        ),
        pytest.param(
            "version: 1\nstreams: {user: {require: actor_id}}\n",
            2,
            "streams.user.require",
            "expected a list such as [a, b], got the text 'actor_id'",
            id="list-expected",
        ),
        pytest.param(
            MINIMAL + "tables:\n  - public.accounts\n",
            5,
            "tables[0]",
            "expected a mapping (keys: table, stream, operations, old_values, exclude, "
            "redact, when, require_approval), got the text 'public.accounts'",
            id="mapping-expected",
        ),
        pytest.param(
            MINIMAL + "tables:\n  - {table: 'accounts; drop table x', stream: user}\n",
            5,
            "tables[0].table",
            "invalid table name 'accounts; drop table x': unexpected '; drop table x'",
            id="hostile-table",
        ),
        pytest.param(
            MINIMAL + "tables:\n  - {table: pg_catalog.pg_class, stream: user}\n",
            5,
            "tables[0].table",
            "pg_catalog.pg_class is a system table",
            id="system-table",
        ),
        pytest.param(
            MINIMAL + "tables:\n  - {table: cdc_audit.event, stream: user}\n",
            5,
            "tables[0].table",
            "cdc_audit.event is in the audit schema itself",
            id="audit-schema-table",
        ),
        pytest.param(
            MINIMAL + "tables:\n  - table: t\n    stream: user\n    redact:\n"
            "      email: hash\n      'a.b': mask\n",
            9,
            "tables[0].redact['a.b']",
            "invalid column name 'a.b': a column name is a single name",
            id="redact-key",
        ),
        pytest.param(
            MINIMAL + "tables:\n  - table: t\n    stream: user\n    redact: {ssn: scramble}\n",
            7,
            "tables[0].redact.ssn",
            "'scramble' is not one of hash, mask",
            id="redact-mode",
        ),
        pytest.param(
            MINIMAL + "tables:\n  - table: t\n    stream: user\n    exclude: [email]\n"
            "    redact: {Email: hash}\n",
            8,
            "tables[0].redact.Email",
            "column 'email' is both excluded and redacted",
            id="excluded-and-redacted",
        ),
        pytest.param(
            MINIMAL
            + "tables:\n  - table: t\n    stream: user\n    redact: {Email: hash, email: mask}\n",
            7,
            "tables[0].redact.email",
            "column 'email' is redacted twice (as 'Email' and 'email')",
            id="redacted-twice",
        ),
        pytest.param(
            MINIMAL + "tables:\n  - table: t\n    stream: user\n"
            '    when: "1=1; DROP TABLE accounts"\n',
            7,
            "tables[0].when",
            "only one expression is allowed",
            id="when-two-statements",
        ),
        pytest.param(
            MINIMAL + 'tables:\n  - table: accounts\n    stream: user\n    when: "roles.admin"\n',
            7,
            "tables[0].when",
            "roles.admin refers to another table; a row filter can only read columns of "
            "public.accounts",
            id="when-other-table",
        ),
        pytest.param(
            MINIMAL + "tables:\n  - {table: t, stream: user, line: 3}\n",
            5,
            "tables[0].line",
            "unknown key 'line'",
            id="line-is-not-a-file-key",
        ),
        pytest.param(
            MINIMAL + "checkpoints:\n  every_events: 0\n",
            5,
            "checkpoints.every_events",
            "must be greater than 0, got '0'",
            id="every-events",
        ),
        pytest.param(
            MINIMAL + "checkpoints:\n  every_seconds: '60'\n",
            5,
            "checkpoints.every_seconds",
            "expected a whole number, got the text '60'",
            id="every-seconds-text",
        ),
        pytest.param(
            MINIMAL + "jobs:\n  purge: '0 3 * *'\n",
            5,
            "jobs.purge",
            "invalid cron expression '0 3 * *': it has 4 fields, not 5",
            id="cron-fields",
        ),
        pytest.param(
            MINIMAL + "jobs:\n  verify: '61 * * * *'\n",
            5,
            "jobs.verify",
            "invalid cron expression '61 * * * *'",
            id="cron-value",
        ),
        pytest.param(
            MINIMAL + "jobs:\n  snapshot: '0 0 * * 0'\n",
            5,
            "jobs.snapshot",
            "write the day of week by name",
            id="cron-numeric-weekday",
        ),
        pytest.param(
            MINIMAL + "ddl: {stream: adm}\n",
            4,
            "ddl.stream",
            "unknown stream 'adm'; defined streams: user",
            id="ddl-stream",
        ),
        pytest.param(
            MINIMAL + "app_events: {stream: user, sign: checkpoint}\n",
            4,
            "app_events.sign",
            "unknown key 'sign'; valid keys: stream",
            id="app-events-key",
        ),
        pytest.param(
            MINIMAL + "schema_name: audit\n",
            4,
            "schema_name",
            "unknown key 'schema_name'; valid keys: version, schema,",
            id="field-name-is-not-a-file-key",
        ),
        pytest.param(
            MINIMAL + "retention: 7y\n",
            4,
            "retention",
            "unknown key 'retention'; valid keys: version, schema, slot, context, streams, "
            "tables, ddl, app_events, read_audit, checkpoints, jobs",
            id="unknown-top-level-key",
        ),
    ],
)
def test_each_mistake_names_line_key_and_what_is_valid(
    text: str, line: int, key: str, message: str
) -> None:
    problem = only_problem(text)
    assert (problem.file, problem.line, problem.key) == ("policy.yaml", line, key)
    assert message in problem.message
    assert "Input should be" not in problem.message


def test_duplicate_tables_name_both_lines() -> None:
    problem = only_problem(
        MINIMAL + "tables:\n  - {table: accounts, stream: user}\n"
        "  - {table: t2, stream: user}\n  - {table: Public.Accounts, stream: user}\n"
    )
    assert (problem.line, problem.key) == (7, "tables[2].table")
    assert problem.message == (
        "table public.accounts is listed twice (tables[0] on line 5 and tables[2] on line 7); "
        "merge the two entries"
    )


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("", 1, "the policy file is empty"),
        ("# only a comment\n", 1, "the policy file is empty"),
        ("version: 1\nstreams:\n\tuser: {}\n", 3, "a tab character where YAML needs spaces"),
        ("version: 1\nstreams: [\n", 3, "invalid YAML"),
        ("version: 1\nstreams: {user: {}\n", 3, "invalid YAML"),
        ("version: 1\n  streams: {}\n", 2, "invalid YAML"),
        ("- version: 1\n", 1, "the top level must be a mapping"),
        ("just text\n", 1, "the top level must be a mapping"),
        ("version: 1\n---\nversion: 1\n", 2, "more than one YAML document"),
        ("version: 1\x07\n", 1, "the control character U+0007 is not allowed"),
    ],
)
def test_unreadable_yaml_is_one_problem_with_a_line(text: str, line: int, message: str) -> None:
    problem = only_problem(text)
    assert problem.line == line
    assert problem.key == ""
    assert message in problem.message


def test_duplicate_keys_are_reported_though_yaml_allows_them() -> None:
    found = problems_of("version: 1\nstreams:\n  user: {}\n  user: {retention: 1d}\nversion: 1\n")
    assert [(p.line, p.key, p.message) for p in found] == [
        (
            4,
            "streams.user",
            "duplicate key 'user' (first on line 3); each key may appear only once in a mapping",
        ),
        (
            5,
            "version",
            "duplicate key 'version' (first on line 1); each key may appear only once in a mapping",
        ),
    ]


@pytest.mark.parametrize(
    ("text", "line", "key", "message"),
    [
        (
            "version: 1\nstreams: !!python/object:os.system {}\n",
            2,
            "streams",
            "unsupported YAML tag",
        ),
        ("version: !!python/name:os.system 1\nstreams: {user: {}}\n", 1, "version", "YAML tag"),
        ("version: 1\nstreams: &a {user: *a}\n", 2, "streams.user", "alias refers to a node"),
        ("version: 1\nstreams: {user: {}}\n? [a, b]\n: c\n", 3, "", "a key must be a plain name"),
    ],
)
def test_non_plain_yaml_is_refused_without_follow_on_noise(
    text: str, line: int, key: str, message: str
) -> None:
    problem = only_problem(text)
    assert (problem.line, problem.key) == (line, key)
    assert message in problem.message


def test_an_alias_bomb_is_stopped() -> None:
    levels = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for n in range(1, 7):
        refs = ", ".join([f"*l{n - 1}" if n > 1 else "*a"] * 10)
        levels.append(f"l{n}: &l{n} [{refs}]")
    problem = problems_of("\n".join(levels) + "\n")[-1]
    assert "too large" in problem.message


def test_every_problem_is_reported_together_in_file_order() -> None:
    path = POLICIES / "everything_wrong.yaml"
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    error = caught.value
    assert isinstance(error, InvalidInput) and error.exit_code == 2
    found = [(p.line, p.key) for p in error.problems]
    assert found == [
        (4, "streams.user.retention"),
        (10, "tables[0].stream"),
        (11, "tables[0].opertions"),
        (12, "tables[1].table"),
        (14, "tables[1].operations[1]"),
        (16, "tables[1].redact.Email"),
        (16, "tables[1].redact.ssn"),
        (17, "tables[1].when"),
        (18, "tables[2].table"),
        (19, "ddl.stream"),
        (20, "checkpoints.every_events"),
        (21, "jobs.purge"),
    ]
    assert {p.file for p in error.problems} == {str(path)}
    assert str(error) == str(error.problems[0])
    assert str(error) == (
        f"{path}:4: streams.user.retention: invalid duration '10 days'; use a number and a "
        "unit: s, min, h, d, w, mo, y (e.g. 400d, 7y, 12h)"
    )


def test_a_missing_file_is_a_policy_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="policy file not found") as caught:
        load_policy(tmp_path / "nope.yaml")
    assert caught.value.problems[0].file == str(tmp_path / "nope.yaml")
    with pytest.raises(PolicyError, match="is a directory"):
        load_policy(tmp_path)


def test_a_file_that_is_not_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("version: 1\nstreams:\n  caf\xe9: {}\n".encode("latin-1"))
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    (problem,) = caught.value.problems
    assert (problem.file, problem.line) == (str(path), 3)
    assert "not valid UTF-8" in problem.message


# ------------------------------------------------------------------------ robustness

_KEYS = st.sampled_from(
    [
        "version", "schema", "slot", "context", "streams", "tables", "ddl", "app_events",
        "checkpoints", "jobs", "user", "admin", "table", "stream", "operations", "old_values",
        "exclude", "redact", "when", "retention", "sign", "require", "on_missing", "purge",
        "every_events", "anchor_dir", "line", "<<", "Email",
    ]
)  # fmt: skip
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 20_000),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.sampled_from(
        [
            "400d", "7y", "10 days", "insert", "upsert", "full", "key", "hash", "mask",
            "record", "reject", "checkpoint", "actor_id", "public.accounts", '"A"."B"',
            "status <> 'draft'", "1=1; DROP TABLE t", "0 3 * * *", "* * *", "user", "admin",
        ]
    ),
)  # fmt: skip
_DOCUMENTS = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_KEYS, inner, max_size=5)),
    max_leaves=25,
)


def _only_policy_or_policy_error(text: str) -> None:
    try:
        result = parse_policy(text, "fuzz.yaml")
    except PolicyError as error:
        assert error.problems
        assert all(p.file == "fuzz.yaml" for p in error.problems)
    else:
        assert isinstance(result, Policy)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_DOCUMENTS)
def test_random_yaml_documents_give_a_policy_or_a_policy_error(document: object) -> None:
    _only_policy_or_policy_error(yaml.safe_dump(document, allow_unicode=True))


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=200))
def test_random_text_gives_a_policy_or_a_policy_error(text: str) -> None:
    _only_policy_or_policy_error(text)


_DESIGN_LINES = (POLICIES / "design_example.yaml").read_text().splitlines()


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, len(_DESIGN_LINES) - 1),
            st.sampled_from(["drop", "dup", "indent", "dedent", "junk"]),
            st.text(max_size=6),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_damaged_versions_of_a_valid_policy_never_crash(
    edits: list[tuple[int, str, str]],
) -> None:
    lines = list(_DESIGN_LINES)
    for index, action, junk in edits:
        index %= len(lines) or 1
        if not lines:
            break
        if action == "drop":
            del lines[index]
        elif action == "dup":
            lines.insert(index, lines[index])
        elif action == "indent":
            lines[index] = "  " + lines[index]
        elif action == "dedent":
            lines[index] = lines[index].lstrip()
        else:
            lines[index] = lines[index][:5] + junk + lines[index][5:]
    _only_policy_or_policy_error("\n".join(lines) + "\n")


def _paths(value: object, prefix: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _paths(item, (*prefix, index))
    return found


_DESIGN_DATA = yaml.safe_load((POLICIES / "design_example.yaml").read_text())
_DESIGN_PATHS = _paths(_DESIGN_DATA)[1:]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(_DESIGN_PATHS), _DOCUMENTS), min_size=1, max_size=3))
def test_a_valid_policy_with_values_swapped_out_never_crashes(
    swaps: list[tuple[tuple[object, ...], object]],
) -> None:
    data = yaml.safe_load(yaml.safe_dump(_DESIGN_DATA))
    for path, replacement in swaps:
        target = data
        try:
            for part in path[:-1]:
                target = target[part]
            target[path[-1]] = replacement
        except (KeyError, IndexError, TypeError):
            continue  # an earlier swap removed this path
    _only_policy_or_policy_error(yaml.safe_dump(data, allow_unicode=True))


def test_context_fields_agree_between_policy_and_application_helper() -> None:
    from cdc_audit.context import CONTEXT_FIELDS as HELPER_FIELDS
    from cdc_audit.policy import CONTEXT_FIELDS as POLICY_FIELDS

    assert HELPER_FIELDS == POLICY_FIELDS


def test_the_policy_knows_every_field_set_context_takes() -> None:
    """`require` names what set_context can set: the two lists must not drift apart (the
    context helpers keep their own copy so applications do not import the policy loader)."""
    from cdc_audit.context import CONTEXT_FIELDS as SET_CONTEXT_FIELDS
    from cdc_audit.policy import CONTEXT_FIELDS

    assert CONTEXT_FIELDS == SET_CONTEXT_FIELDS
