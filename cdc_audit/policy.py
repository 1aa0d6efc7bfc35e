"""The policy file: pydantic models, loading, and validation with line-precise errors.

Loading happens in three passes so that every problem in a file is reported at once:
the YAML is composed with positions (policy_yaml), cross-field rules are checked on the
raw values (they must not wait for the rest of the file to be valid), and the models
validate the structure. Each problem names the file, the line, the dotted key and what
would be valid there.
"""

from __future__ import annotations

import difflib
import hashlib
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Final, Literal, TypeVar, get_args, get_origin

from apscheduler.triggers.cron import CronTrigger
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    PlainSerializer,
    PlainValidator,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError, core_schema

from cdc_audit.archive_store import parse_archive_uri
from cdc_audit.errors import PolicyError, PolicyProblem
from cdc_audit.policy_yaml import (
    YamlDocument,
    YamlPath,
    decode_policy_bytes,
    format_path,
    read_yaml,
)
from cdc_audit.predicate import (
    Predicate,
    TableName,
    parse_column_name,
    parse_table_name,
    parse_when,
    quote_identifier,
)

__all__ = [
    "CONTEXT_FIELDS",
    "OPERATIONS",
    "ArchivePolicy",
    "CheckpointPolicy",
    "ContextField",
    "ContextPolicy",
    "Duration",
    "JobsPolicy",
    "LoadedPolicy",
    "Operation",
    "Policy",
    "StreamPolicy",
    "StreamRef",
    "TablePolicy",
    "load_policy",
    "parse_policy",
]

Operation = Literal["insert", "update", "delete", "truncate"]
ContextField = Literal[
    "actor_id",
    "actor_role",
    "reason",
    "on_behalf_of",
    "session_id",
    "client_ip",
    "trace_id",
    "approval",
]
OnMissing = Literal["record", "reject"]

OPERATIONS: Final[tuple[Operation, ...]] = get_args(Operation)
CONTEXT_FIELDS: Final[tuple[ContextField, ...]] = get_args(ContextField)
_DEFAULT_REQUIRE: Final[tuple[ContextField, ...]] = ("actor_id",)
_T = TypeVar("_T")

# Validation context key set while loading a file: cross-field rules then run on the raw
# YAML (see _raw_facts) so they are reported even when other parts of the file are invalid.
_FROM_FILE: Final = "cdc_audit.from_file"

_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,39}\Z")
_STREAM_NAME = re.compile(r"[a-z][a-z0-9_]{0,39}\Z")
_SLOT_NAME = re.compile(r"[a-z0-9_]{1,63}\Z")
# Schemas that belong to PostgreSQL itself: neither a home for the trail nor auditable.
_SYSTEM_SCHEMAS = frozenset({"information_schema", "pg_catalog", "pg_toast"})


def _refuse(message: str) -> PydanticCustomError:
    """A validation error whose message is ours, verbatim (braces in input stay literal)."""
    return PydanticCustomError("cdc_audit", "{reason}", {"reason": message})


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.75)
    return f"; did you mean '{close[0]}'?" if close else ""


# ----------------------------------------------------------------------------- durations

_DURATION = re.compile(r"([0-9]{1,9})(s|min|h|d|w|mo|y)\Z")
_UNIT_SECONDS: Final = {
    "s": 1,
    "min": 60,
    "h": 3600,
    "d": 86_400,
    "w": 604_800,
    "mo": 2_629_746,  # 1/12 of an average Gregorian year
    "y": 31_556_952,  # 365.2425 days
}
_UNIT_WORDS: Final = {
    "s": "seconds",
    "min": "minutes",
    "h": "hours",
    "d": "days",
    "w": "weeks",
    "mo": "months",
    "y": "years",
}
_DURATION_HELP = "use a number and a unit: s, min, h, d, w, mo, y (e.g. 400d, 7y, 12h)"
_MAX_DURATION_SECONDS: Final = 1000 * _UNIT_SECONDS["y"]


@dataclass(frozen=True)
class Duration:
    """A retention period as written in the policy: a count and a unit ("400d", "7y")."""

    count: int
    unit: str

    @classmethod
    def parse(cls, text: str) -> Duration:
        """Parse "400d", "12h", "90min", "6mo", "7y"; ValueError says what is valid."""
        match = _DURATION.match(text)
        if match is None:
            hint = ""
            if re.fullmatch(r"[0-9]+m", text):
                hint = " ('m' is ambiguous: write min for minutes or mo for months)"
            raise ValueError(f"invalid duration '{text}'; {_DURATION_HELP}{hint}")
        duration = cls(int(match.group(1)), match.group(2))
        if duration.count == 0:
            raise ValueError(
                f"invalid duration '{text}': it must be longer than zero "
                "(leave retention out to keep events forever)"
            )
        if duration.approx_seconds > _MAX_DURATION_SECONDS:
            raise ValueError(
                f"invalid duration '{text}': more than 1000 years "
                "(leave retention out to keep events forever)"
            )
        return duration

    @property
    def approx_seconds(self) -> int:
        """Length in seconds, with months and years at their average Gregorian length."""
        return self.count * _UNIT_SECONDS[self.unit]

    @property
    def pg_interval(self) -> str:
        """The same period as PostgreSQL interval input, e.g. '400 days', '6 months'."""
        return f"{self.count} {_UNIT_WORDS[self.unit]}"

    def __str__(self) -> str:
        return f"{self.count}{self.unit}"

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            _duration_value,
            serialization=core_schema.plain_serializer_function_ser_schema(str),
        )


def _duration_value(value: object) -> Duration:
    if isinstance(value, Duration):
        return value
    text = _scalar_text(value, "a duration such as 400d")
    try:
        return Duration.parse(text)
    except ValueError as error:
        raise _refuse(str(error)) from None


def _scalar_text(value: object, expected: str) -> str:
    """A scalar as the user probably wrote it; lists and mappings are refused outright."""
    if value is None or isinstance(value, (list, tuple, dict)):
        raise _refuse(f"expected {expected}, got {_describe(value)}")
    return value if isinstance(value, str) else _plain(value)


def _plain(value: object) -> str:
    """How a YAML scalar that was read as a non-string was probably written."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# ----------------------------------------------------------------- field-level validators


def _table_name_value(value: object) -> TableName:
    if isinstance(value, TableName):
        return value
    if not isinstance(value, str):
        raise _refuse(f"expected a table name such as public.accounts, got {_describe(value)}")
    try:
        table = parse_table_name(value)
    except ValueError as error:
        raise _refuse(str(error)) from None
    if table.schema in _SYSTEM_SCHEMAS or table.schema.startswith("pg_"):
        raise _refuse(f"{table.qualified()} is a system table; system catalogs cannot be audited")
    return table


def _column_name_value(value: object) -> str:
    if not isinstance(value, str):
        raise _refuse(f"expected a column name, got {_describe(value)}")
    try:
        return parse_column_name(value)
    except ValueError as error:
        raise _refuse(str(error)) from None


def _stream_name_value(value: object) -> str:
    if not isinstance(value, str) or not _STREAM_NAME.match(value):
        shown = _scalar_text(value, "a stream name")
        raise _refuse(
            f"invalid stream name '{shown}'; use 1-40 lower-case letters, digits and _, "
            "starting with a letter"
        )
    return value


def _schema_name_value(value: object) -> str:
    if not isinstance(value, str) or not _SCHEMA_NAME.match(value):
        shown = _scalar_text(value, "a schema name")
        raise _refuse(
            f"invalid schema name '{shown}'; use 1-40 lower-case letters, digits and _, "
            "starting with a letter or _ (role, slot and setting names derive from it)"
        )
    if value.startswith("pg_") or value in _SYSTEM_SCHEMAS or value == "public":
        raise _refuse(
            f"schema '{value}' cannot hold the audit trail; choose a dedicated schema "
            "such as cdc_audit"
        )
    return value


def _slot_name_value(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _SLOT_NAME.match(value):
        shown = _scalar_text(value, "a slot name")
        raise _refuse(
            f"invalid replication slot name '{shown}'; use 1-63 lower-case letters, digits and _"
        )
    return value


def _version_value(value: object) -> Literal[1]:
    # bool is an int in Python: `version: true` must not pass as version 1.
    if type(value) is int and value == 1:
        return 1
    shown = _scalar_text(value, "version: 1")
    raise _refuse(f"unsupported version '{shown}'; this cdc-audit reads version: 1")


def _cron_value(value: object) -> str | None:
    if value is None:
        return None
    example = 'e.g. "0 3 * * *" (minute hour day-of-month month day-of-week)'
    if not isinstance(value, str):
        raise _refuse(f"expected a cron expression in quotes, {example}")
    fields = value.split()
    if len(fields) != 5:
        raise _refuse(
            f"invalid cron expression '{value}': it has {len(fields)} fields, not 5; {example}"
        )
    if re.search(r"[0-9]", fields[4]):
        # APScheduler 3 counts weekday 0 as Monday, crontab as Sunday: refuse the ambiguity.
        raise _refuse(
            f"invalid cron expression '{value}': write the day of week by name "
            "(mon-fri, sun), not by number"
        )
    try:
        CronTrigger.from_crontab(value, timezone="UTC")
    except (ValueError, TypeError, KeyError, IndexError) as error:
        raise _refuse(f"invalid cron expression '{value}': {error}; {example}") from None
    return value


def _anchor_dir_value(value: object) -> Path | None:
    if value is None or isinstance(value, Path):
        return value
    if not isinstance(value, str) or not value.strip():
        raise _refuse(f"expected a directory path, got {_describe(value)}")
    return Path(value)


def _archive_uri_value(value: object) -> str:
    if not isinstance(value, str):
        raise _refuse(
            f"expected an archive location (file:///abs/path, a path or s3://bucket/prefix),"
            f" got {_describe(value)}"
        )
    try:
        parse_archive_uri(value)
    except ValueError as error:
        raise _refuse(str(error)) from None
    return value


def _when_value(value: object, info: ValidationInfo) -> Predicate | None:
    if value is None or isinstance(value, Predicate):
        return value
    if not isinstance(value, str):
        raise _refuse(f"expected a SQL condition in quotes, got {_describe(value)}")
    table = info.data.get("table")
    try:
        return parse_when(value, table if isinstance(table, TableName) else None)
    except ValueError as error:
        raise _refuse(str(error)) from None


def _reject_from_file(value: object, info: ValidationInfo) -> int | None:
    # `line` is filled in by the loader; a file must not set it.
    if info.context and info.context.get(_FROM_FILE):
        raise PydanticCustomError("extra_forbidden", "unknown key")
    if value is not None and type(value) is not int:
        raise _refuse("line must be a whole number")
    return value


def _unique(items: Iterable[Any]) -> list[Any]:
    return list(dict.fromkeys(items))


TableNameField = Annotated[
    TableName, PlainValidator(_table_name_value), PlainSerializer(TableName.qualified)
]
# Serialised quoted where needed, so a dumped policy validates back to the same names.
ColumnName = Annotated[str, PlainValidator(_column_name_value), PlainSerializer(quote_identifier)]
StreamName = Annotated[str, PlainValidator(_stream_name_value)]
CronExpression = Annotated[str | None, PlainValidator(_cron_value)]
WhenField = Annotated[
    Predicate | None,
    PlainValidator(_when_value),
    PlainSerializer(lambda p: None if p is None else p.sql),
]


# --------------------------------------------------------------------------------- models


class _Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, validate_by_alias=True, validate_by_name=True
    )


class ContextPolicy(_Model):
    """What context a change must carry, and what happens when it does not."""

    require: list[ContextField] = Field(default_factory=lambda: list(_DEFAULT_REQUIRE))
    on_missing: OnMissing = "record"

    @field_validator("require")
    @classmethod
    def _dedupe(cls, value: list[ContextField]) -> list[ContextField]:
        return _unique(value)


class StreamPolicy(_Model):
    """One hash-chained stream; require/on_missing override the global context policy."""

    retention: Duration | None = None
    sign: Literal["checkpoint", "every_row"] = "checkpoint"
    readers: bool = Field(False, strict=True)
    """Whether the reader role sees this stream (through the curated views); auditors see all."""
    require: list[ContextField] | None = None
    on_missing: OnMissing | None = None

    @field_validator("require")
    @classmethod
    def _dedupe(cls, value: list[ContextField] | None) -> list[ContextField] | None:
        return None if value is None else _unique(value)


class TablePolicy(_Model):
    """One audited table: which stream, which operations, and the column policy."""

    table: TableNameField
    stream: str
    operations: tuple[Operation, ...] = OPERATIONS
    old_values: Literal["full", "key"] = "full"
    exclude: list[ColumnName] = Field(default_factory=list)
    redact: dict[ColumnName, Literal["hash", "mask"]] = Field(default_factory=dict)
    when: WhenField = None
    require_approval: bool = Field(False, strict=True)
    """A change is accepted only while its actor holds an unexpired approval (cdc-audit approve)."""
    line: Annotated[int | None, PlainValidator(_reject_from_file)] = Field(
        default=None, exclude=True
    )

    @field_validator("operations")
    @classmethod
    def _canonical_operations(cls, value: tuple[Operation, ...]) -> tuple[Operation, ...]:
        if not value:
            raise _refuse(
                "list at least one of insert, update, delete, truncate "
                "(leave operations out to audit all four)"
            )
        # A stable order keeps the generated publication and triggers deterministic.
        return tuple(op for op in OPERATIONS if op in value)

    @field_validator("exclude")
    @classmethod
    def _dedupe_exclude(cls, value: list[str]) -> list[str]:
        return _unique(value)


class StreamRef(_Model):
    """Routes a kind of event (DDL, application events) to a stream."""

    stream: str


class CheckpointPolicy(_Model):
    """How often the worker signs a checkpoint, and where it anchors it outside the db."""

    every_events: int = Field(10_000, gt=0, strict=True)
    every_seconds: int = Field(60, gt=0, strict=True)
    anchor_dir: Annotated[Path | None, PlainValidator(_anchor_dir_value)] = None


class ArchivePolicy(_Model):
    """Where sealed events are archived (before a purge, and by the archive job)."""

    to: Annotated[str, PlainValidator(_archive_uri_value)]
    lock_days: int | None = Field(None, gt=0, strict=True)
    """Object Lock retention (COMPLIANCE) of each archived object, where the bucket has it."""


class JobsPolicy(_Model):
    """Schedules (5-field cron, UTC) of the worker's periodic jobs; None = not scheduled."""

    purge: CronExpression = None
    archive: CronExpression = None
    verify: CronExpression = None
    snapshot: CronExpression = None
    privileges: CronExpression = None
    """The privilege snapshot diff and the drift check."""


class Policy(_Model):
    """A whole policy file (version 1)."""

    version: Annotated[Literal[1], PlainValidator(_version_value)]
    schema_name: Annotated[str, PlainValidator(_schema_name_value)] = Field(
        "cdc_audit", alias="schema"
    )
    slot: Annotated[str | None, PlainValidator(_slot_name_value)] = None
    context: ContextPolicy = Field(default_factory=ContextPolicy)
    streams: dict[StreamName, StreamPolicy]
    tables: list[TablePolicy] = Field(default_factory=list)
    ddl: StreamRef | None = None
    app_events: StreamRef | None = None
    read_audit: StreamRef | None = None
    """Record every read through cdc-audit's query functions as an app event in this stream."""
    checkpoints: CheckpointPolicy = Field(default_factory=CheckpointPolicy)
    jobs: JobsPolicy = Field(default_factory=JobsPolicy)
    archive: ArchivePolicy | None = None
    """Archive sealed events here; a purge then archives what it drops first."""

    @model_validator(mode="before")
    @classmethod
    def _empty_sections(cls, data: Any) -> Any:
        """An empty YAML section (`tables:` with nothing under it) means its defaults."""
        if not isinstance(data, dict):
            return data
        data = {k: v for k, v in data.items() if not (v is None and k in _DEFAULTED)}
        streams = data.get("streams")
        if streams is None and "streams" in data:
            data["streams"] = {}
        elif isinstance(streams, dict):
            data["streams"] = {k: ({} if v is None else v) for k, v in streams.items()}
        return data

    @field_validator("streams")
    @classmethod
    def _at_least_one_stream(cls, value: dict[str, StreamPolicy]) -> dict[str, StreamPolicy]:
        if not value:
            raise _refuse("define at least one stream, e.g. streams: {user: {retention: 400d}}")
        return value

    @model_validator(mode="after")
    def _cross_checks(self, info: ValidationInfo) -> Policy:
        if info.context and info.context.get(_FROM_FILE):
            return self  # already checked on the raw file, with line numbers
        found = _check_facts(_model_facts(self))
        if found:
            raise ValueError("; ".join(f"{format_path(p)}: {m}" for p, m, _ in found))
        return self

    def requirements(self, stream: str) -> tuple[list[str], str]:
        """(required context fields, on_missing) for `stream`: its own, else the global.

        Raises KeyError for a stream the policy does not define.
        """
        own = self.streams[stream]
        require = own.require if own.require is not None else self.context.require
        on_missing = own.on_missing if own.on_missing is not None else self.context.on_missing
        return list(require), on_missing


_DEFAULTED = frozenset(
    {"context", "tables", "checkpoints", "jobs", "ddl", "app_events", "read_audit"}
)


# ------------------------------------------------------------------- cross-field rules


@dataclass
class _TableFacts:
    """What the cross-field rules need to know about one `tables` entry."""

    index: int
    line: int | None
    table: TableName | None
    exclude: set[str] = field(default_factory=set)
    redact: list[tuple[str, str]] = field(default_factory=list)  # (as written, exact)


@dataclass
class _Facts:
    """The cross-field view of a policy, from a validated model or from raw YAML."""

    schema: str | None
    streams: list[str] | None
    refs: list[tuple[YamlPath, object]]  # where a stream is named, and the name given
    tables: list[_TableFacts]


def _try(parse: Callable[[str], _T], value: object) -> _T | None:
    """Best-effort parse for cross-field checks; the field's own check reports failures."""
    if not isinstance(value, str):
        return None
    try:
        return parse(value)
    except ValueError:
        return None


def _raw_facts(data: Mapping[str, Any], doc: YamlDocument) -> _Facts:
    streams = data.get("streams")
    raw_tables = data.get("tables")
    entries = list(enumerate(raw_tables)) if isinstance(raw_tables, list) else []
    refs: list[tuple[YamlPath, object]] = [
        (("tables", index, "stream"), entry["stream"])
        for index, entry in entries
        if isinstance(entry, dict) and "stream" in entry
    ]
    for section in ("ddl", "app_events", "read_audit"):
        ref = data.get(section)
        if isinstance(ref, dict) and "stream" in ref:
            refs.append(((section, "stream"), ref["stream"]))
    schema = data.get("schema", data.get("schema_name", "cdc_audit"))
    return _Facts(
        schema=schema if isinstance(schema, str) else None,
        streams=list(streams) if isinstance(streams, dict) and streams else None,
        refs=refs,
        tables=[
            _raw_table_facts(index, entry, doc)
            for index, entry in entries
            if isinstance(entry, dict)
        ],
    )


def _raw_table_facts(index: int, entry: Mapping[str, Any], doc: YamlDocument) -> _TableFacts:
    facts = _TableFacts(
        index, doc.line_of(("tables", index)), _try(parse_table_name, entry.get("table"))
    )
    exclude = entry.get("exclude")
    for name in exclude if isinstance(exclude, list) else []:
        exact = _try(parse_column_name, name)
        if exact is not None:
            facts.exclude.add(exact)
    redact = entry.get("redact")
    for key in redact if isinstance(redact, dict) else {}:
        exact = _try(parse_column_name, key)
        if exact is not None:
            facts.redact.append((key, exact))
    return facts


def _model_facts(policy: Policy) -> _Facts:
    refs: list[tuple[YamlPath, object]] = [
        (("tables", i, "stream"), t.stream) for i, t in enumerate(policy.tables)
    ]
    if policy.ddl is not None:
        refs.append((("ddl", "stream"), policy.ddl.stream))
    if policy.app_events is not None:
        refs.append((("app_events", "stream"), policy.app_events.stream))
    if policy.read_audit is not None:
        refs.append((("read_audit", "stream"), policy.read_audit.stream))
    tables = [
        _TableFacts(i, t.line, t.table, set(t.exclude), [(c, c) for c in t.redact])
        for i, t in enumerate(policy.tables)
    ]
    return _Facts(policy.schema_name, list(policy.streams), refs, tables)


# (path, message, whether the problem is about the mapping key rather than its value)
_Found = tuple[YamlPath, str, bool]


def _check_facts(facts: _Facts) -> list[_Found]:
    """Rules that span fields: stream references, duplicates, column conflicts."""
    found = _unknown_streams(facts)
    found.extend(_duplicate_tables(facts.tables))
    for table in facts.tables:
        found.extend(_column_conflicts(table))
        if table.table is not None and table.table.schema == facts.schema:
            message = (
                f"{table.table.qualified()} is in the audit schema itself; "
                "the trail cannot audit its own tables"
            )
            found.append((("tables", table.index, "table"), message, False))
    return found


def _unknown_streams(facts: _Facts) -> list[_Found]:
    if facts.streams is None:
        return []  # no usable streams: that is reported on its own
    defined = ", ".join(sorted(facts.streams))
    return [
        (
            path,
            f"unknown stream '{name}'; defined streams: {defined}" + _suggest(name, facts.streams),
            False,
        )
        for path, name in facts.refs
        if isinstance(name, str) and name not in facts.streams
    ]


def _where(table: _TableFacts) -> str:
    label = f"tables[{table.index}]"
    return f"{label} on line {table.line}" if table.line is not None else label


def _duplicate_tables(tables: list[_TableFacts]) -> list[_Found]:
    found: list[_Found] = []
    first: dict[TableName, _TableFacts] = {}
    for table in tables:
        if table.table is None:
            continue
        earlier = first.setdefault(table.table, table)
        if earlier is not table:
            found.append(
                (
                    ("tables", table.index, "table"),
                    f"table {table.table.qualified()} is listed twice ({_where(earlier)} and "
                    f"{_where(table)}); merge the two entries",
                    False,
                )
            )
    return found


def _column_conflicts(table: _TableFacts) -> list[_Found]:
    found: list[_Found] = []
    seen: dict[str, str] = {}
    for written, exact in table.redact:
        path: YamlPath = ("tables", table.index, "redact", written)
        if exact in table.exclude:
            found.append(
                (
                    path,
                    f"column '{exact}' is both excluded and redacted; "
                    "keep it in exclude (never stored) or in redact (stored masked), not both",
                    True,
                )
            )
        if exact in seen:
            found.append(
                (
                    path,
                    f"column '{exact}' is redacted twice (as '{seen[exact]}' and '{written}')",
                    True,
                )
            )
        seen.setdefault(exact, written)
    return found


# ------------------------------------------------------- pydantic errors -> PolicyProblems


def _describe(value: object) -> str:
    if value is None:
        return "an empty value"
    if isinstance(value, bool):
        return f"the boolean {_plain(value)}"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the text '{value}'"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, date):
        return f"the date {value.isoformat()}"
    return f"a {type(value).__name__}"


def _model_at(path: YamlPath) -> type[_Model] | None:
    """The model class whose fields are valid at `path` (None when not a model)."""
    current: Any = Policy
    for part in path:
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, _Model):
            info = next((f for n, f in current.model_fields.items() if part in (n, f.alias)), None)
            if info is None:
                return None
            current = info.annotation
        elif get_origin(current) in (list, tuple) and isinstance(part, int):
            current = get_args(current)[0]
        elif get_origin(current) is dict:
            current = get_args(current)[1]
        else:
            return None
    current = _unwrap(current)
    return current if isinstance(current, type) and issubclass(current, _Model) else None


def _unwrap(annotation: Any) -> Any:
    """Strip Annotated[...] and `| None` to reach the type that validates the value."""
    while True:
        if get_origin(annotation) is Annotated:
            annotation = get_args(annotation)[0]
            continue
        args = [a for a in get_args(annotation) if a is not type(None)]
        if (
            get_origin(annotation) is not None
            and len(args) == 1
            and type(None) in get_args(annotation)
        ):
            annotation = args[0]
            continue
        return annotation


def _valid_keys(model: type[_Model]) -> list[str]:
    return [f.alias or n for n, f in model.model_fields.items() if n != "line"]


class _Translator:
    """Turns pydantic's errors into PolicyProblems located in the YAML file."""

    def __init__(self, doc: YamlDocument, source: str) -> None:
        self.doc = doc
        self.source = source

    def problem(self, path: YamlPath, message: str, on_key: bool = False) -> PolicyProblem:
        line = self.doc.key_line_of(path) if on_key else self.doc.line_of(path)
        return PolicyProblem(self.source, line, format_path(path), message)

    def translate(self, error: ValidationError) -> list[PolicyProblem]:
        problems = []
        for detail in error.errors(include_url=False):
            loc = detail["loc"]
            on_key = bool(loc) and loc[-1] == "[key]"
            path: YamlPath = tuple(p for p in loc if p != "[key]")
            if self.doc.is_unreadable(path):
                continue
            message = self.message(detail, path)
            on_key = on_key or detail["type"] == "extra_forbidden"
            problems.append(self.problem(path, message, on_key))
        return problems

    def shown(self, path: YamlPath, value: object) -> str:
        text = self.doc.text_of(path)
        if text is not None:
            return f"'{text}'"
        return _describe(value)

    def message(self, detail: ErrorDetails, path: YamlPath) -> str:
        kind = detail["type"]
        value = detail.get("input")
        ctx = detail.get("ctx") or {}
        name = str(path[-1]) if path else ""
        if kind in ("cdc_audit", "value_error"):
            return str(ctx.get("reason", ctx.get("error", detail["msg"])))
        if kind == "missing":
            return f"missing required key '{name}'" + _MISSING_HINTS.get(name, "")
        if kind == "extra_forbidden":
            return self.unknown_key(path)
        if kind == "literal_error":
            return self.not_one_of(path, value, str(ctx.get("expected", "")))
        if kind in ("model_type", "model_attributes_type", "dict_type"):
            model = _model_at(path)
            keys = f" (keys: {', '.join(_valid_keys(model))})" if model else ""
            return f"expected a mapping{keys}, got {self.described(path, value)}"
        if kind == "greater_than":
            return f"must be greater than {ctx.get('gt')}, got {self.shown(path, value)}"
        if kind in _TYPE_MESSAGES:
            return f"{_TYPE_MESSAGES[kind]}, got {self.described(path, value)}"
        return str(detail["msg"])  # rare types: pydantic's own wording is clear enough

    def not_one_of(self, path: YamlPath, value: object, expected_text: str) -> str:
        expected = re.findall(r"'([^']*)'", expected_text)
        text = self.doc.text_of(path)
        if text is None or value is None:
            return f"expected one of {', '.join(expected)}, got {_describe(value)}"
        return f"'{text}' is not one of {', '.join(expected)}" + _suggest(text, expected)

    def unknown_key(self, path: YamlPath) -> str:
        model = _model_at(path[:-1])
        keys = _valid_keys(model) if model else []
        name = str(path[-1])
        return f"unknown key '{name}'; valid keys: {', '.join(keys)}" + _suggest(name, keys)

    def described(self, path: YamlPath, value: object) -> str:
        """What was found, with the text as written when YAML typed it differently."""
        text = self.doc.text_of(path)
        if text is not None and value is not None and text != _plain(value):
            return f"{_describe(value)} ('{text}')"
        return _describe(value)


_TYPE_MESSAGES: Final = {
    "list_type": "expected a list such as [a, b]",
    "tuple_type": "expected a list such as [a, b]",
    "string_type": "expected text",
    "int_type": "expected a whole number",
    "int_parsing": "expected a whole number",
    "int_from_float": "expected a whole number",
    "bool_type": "expected true or false",
}

_MISSING_HINTS: Final = {
    "version": "; start the file with 'version: 1'",
    "streams": "; define at least one stream, e.g. streams: {user: {retention: 400d}}",
    "table": "; name the table, e.g. table: public.accounts",
    "stream": "; name the stream its events go to",
}


# ------------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class LoadedPolicy:
    """A validated policy with the exact file contents it came from."""

    policy: Policy
    text: str
    sha256: str
    source: str


def load_policy(path: str | Path) -> LoadedPolicy:
    """Read and validate a policy file; every problem (including I/O) is a PolicyError."""
    source = str(path)
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise _io_error(source, "policy file not found") from None
    except IsADirectoryError:
        raise _io_error(source, "is a directory, not a policy file") from None
    except OSError as error:
        raise _io_error(source, f"cannot read the policy file: {error.strerror}") from None
    text = decode_policy_bytes(raw, source)
    policy = parse_policy(text, source)
    return LoadedPolicy(policy, text, hashlib.sha256(raw).hexdigest(), source)


def _io_error(source: str, message: str) -> PolicyError:
    return PolicyError([PolicyProblem(source, None, "", message)])


def parse_policy(text: str, source: str = "<policy>") -> Policy:
    """Validate policy YAML text; raises PolicyError listing every problem found."""
    doc = read_yaml(text, source)
    translator = _Translator(doc, source)
    problems = list(doc.problems)
    data = doc.data if isinstance(doc.data, dict) else {}
    for path, message, on_key in _check_facts(_raw_facts(data, doc)):
        problems.append(translator.problem(path, message, on_key))
    if "schema_name" in data:
        # The Python field name is accepted by the model, but the file's key is `schema`.
        problems.append(
            translator.problem(("schema_name",), translator.unknown_key(("schema_name",)), True)
        )
    policy: Policy | None = None
    try:
        policy = Policy.model_validate(doc.data, context={_FROM_FILE: True})
    except ValidationError as error:
        problems.extend(translator.translate(error))
    if problems or policy is None:
        raise PolicyError(_ordered(problems))
    return _with_lines(policy, doc)


def _ordered(problems: list[PolicyProblem]) -> list[PolicyProblem]:
    """Unique problems in file order (problems without a line last)."""
    unique = list(dict.fromkeys(problems))
    return sorted(unique, key=lambda p: (p.line is None, p.line or 0))


def _with_lines(policy: Policy, doc: YamlDocument) -> Policy:
    tables = [
        table.model_copy(update={"line": doc.line_of(("tables", index))})
        for index, table in enumerate(policy.tables)
    ]
    return policy.model_copy(update={"tables": tables})
