"""SQL names and `when` row filters from the policy file, checked before they reach SQL.

Table and column names follow PostgreSQL's own lexical rules (unquoted names fold to lower
case, quoted names are kept exactly), so what the policy names is what the catalog holds.

A `when` predicate becomes a publication row filter, so it must be a single immutable
boolean expression over the table's own columns. It is parsed with sqlglot (dialect
postgres), walked against an allow-list of node types and functions, and re-generated from
the AST: the SQL that reaches the database is never the user's raw text.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import sqlglot
import sqlglot.expressions as exp
from sqlglot.errors import SqlglotError
from sqlglot.tokenizer_core import Token, TokenType

__all__ = [
    "ALLOWED_FUNCTIONS",
    "Predicate",
    "TableName",
    "parse_column_name",
    "parse_table_name",
    "parse_when",
    "quote_identifier",
]

# PostgreSQL keeps at most NAMEDATALEN - 1 bytes of a name and silently truncates longer
# ones; refusing them avoids auditing a table other than the one the policy names.
MAX_NAME_BYTES = 63

# Keywords that are not "unreserved" (pg_get_keywords() catcode <> 'U') on PostgreSQL 15,
# plus those added by 16 and 17, so a name rendered here stays valid on newer servers.
# quote_ident() quotes exactly these when they appear as a bare name.
_QUOTED_KEYWORD_TEXT = """
    all analyse analyze and any array as asc asymmetric authorization between bigint binary
    bit boolean both case cast char character check coalesce collate collation column
    concurrently constraint create cross current_catalog current_date current_role
    current_schema current_time current_timestamp current_user dec decimal default
    deferrable desc distinct do else end except exists extract false fetch float for foreign
    freeze from full grant greatest group grouping having ilike in initially inner inout int
    integer intersect interval into is isnull join lateral leading least left like limit
    localtime localtimestamp national natural nchar none normalize not notnull null nullif
    numeric offset on only or order out outer overlaps overlay placing position precision
    primary real references returning right row select session_user setof similar smallint
    some substring symmetric table tablesample then time timestamp to trailing treat trim
    true union unique user using values varchar variadic verbose when where window with
    xmlattributes xmlconcat xmlelement xmlexists xmlforest xmlnamespaces xmlparse xmlpi
    xmlroot xmlserialize xmltable
    system_user json_array json_arrayagg json_object json_objectagg
    json json_exists json_query json_scalar json_serialize json_table json_value merge_action
"""
_QUOTED_KEYWORDS = frozenset(_QUOTED_KEYWORD_TEXT.split())

_SIMPLE_NAME = re.compile(r"[a-z_][a-z0-9_]*\Z")
# PostgreSQL's scanner: ident_start [A-Za-z\200-\377_], ident_cont adds [0-9$]. Every
# non-ASCII character is a letter to it, whatever the Unicode category.
_UNQUOTED_NAME = re.compile(r"[A-Za-z_\u0080-\U0010ffff][A-Za-z0-9_$\u0080-\U0010ffff]*")
_SPACE = " \t\n\r\f\v"
# PostgreSQL folds only ASCII letters in a UTF-8 database; str.lower() would also fold
# letters such as 'É' that the server keeps as they are.
_ASCII_FOLD = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_NAME_HELP = 'quote mixed-case or special names with double quotes, e.g. "Sales"."Order Items"'


def quote_identifier(name: str) -> str:
    """Render `name` as PostgreSQL's quote_ident() would: bare when safe, else quoted.

    A quoted rendering doubles embedded double quotes, exactly as psycopg.sql.Identifier.
    """
    if _SIMPLE_NAME.match(name) and name not in _QUOTED_KEYWORDS:
        return name
    return '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True)
class TableName:
    """A table as the catalog names it: exact schema and relation name, no quoting."""

    schema: str
    name: str

    def qualified(self) -> str:
        """Display form, quoted only where needed: public.accounts, "Sales"."Order Items"."""
        return f"{quote_identifier(self.schema)}.{quote_identifier(self.name)}"

    def __str__(self) -> str:
        return self.qualified()


def parse_table_name(text: str) -> TableName:
    """Parse `schema.table` or `table` (schema public) with PostgreSQL's folding rules.

    Raises ValueError naming the input and what is wrong with it.
    """
    parts = _parse_name_chain(text, "table name")
    if len(parts) > 2:
        raise ValueError(
            f"invalid table name {_show(text)}: it has {len(parts)} parts; "
            "write table or schema.table (a database name is not allowed)"
        )
    if len(parts) == 1:
        return TableName("public", parts[0])
    return TableName(parts[0], parts[1])


def parse_column_name(text: str) -> str:
    """Parse one column name: unquoted folds to lower case, "Quoted" is kept exactly.

    Raises ValueError for anything that is not exactly one identifier.
    """
    parts = _parse_name_chain(text, "column name")
    if len(parts) != 1:
        raise ValueError(
            f"invalid column name {_show(text)}: a column name is a single name, "
            "without a table or schema in front"
        )
    return parts[0]


def _show(text: str) -> str:
    """Quote user input for a message; control characters are escaped to stay on one line."""
    shown = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)
    return f'"{shown}"' if "'" in shown else f"'{shown}'"


def _parse_name_chain(text: str, what: str) -> list[str]:
    """Split a dotted chain of PostgreSQL identifiers into exact names."""
    if not isinstance(text, str):
        raise ValueError(f"a {what} must be text, got {type(text).__name__}")
    if not text.strip(_SPACE):
        raise ValueError(f"empty {what}")
    parts: list[str] = []
    pos = _skip_space(text, 0)
    while True:
        name, pos = _scan_identifier(text, pos, what)
        _check_name_length(name, text, what)
        parts.append(name)
        pos = _skip_space(text, pos)
        if pos == len(text):
            return parts
        if text[pos] != ".":
            raise ValueError(
                f"invalid {what} {_show(text)}: unexpected {_show(text[pos:])} "
                f"after {_show(text[:pos].rstrip(_SPACE))}; {_NAME_HELP}"
            )
        pos = _skip_space(text, pos + 1)


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _SPACE:
        pos += 1
    return pos


def _scan_identifier(text: str, pos: int, what: str) -> tuple[str, int]:
    """Read one quoted or unquoted identifier starting at `pos`."""
    if pos == len(text):
        raise ValueError(f"invalid {what} {_show(text)}: a name is missing after '.'")
    if text[pos] == '"':
        return _scan_quoted(text, pos, what)
    match = _UNQUOTED_NAME.match(text, pos)
    if match is None:
        raise ValueError(
            f"invalid {what} {_show(text)}: unexpected {_show(text[pos])} "
            f"at position {pos + 1}; {_NAME_HELP}"
        )
    return match.group().translate(_ASCII_FOLD), match.end()


def _scan_quoted(text: str, pos: int, what: str) -> tuple[str, int]:
    chunks: list[str] = []
    i = pos + 1
    while True:
        end = text.find('"', i)
        if end < 0:
            raise ValueError(f"invalid {what} {_show(text)}: a double quote is not closed")
        chunks.append(text[i:end])
        if text.startswith('""', end):
            chunks.append('"')
            i = end + 2
            continue
        name = "".join(chunks)
        if not name:
            raise ValueError(f'invalid {what} {_show(text)}: "" is an empty name')
        return name, end + 1


def _check_name_length(name: str, text: str, what: str) -> None:
    if "\x00" in name:
        raise ValueError(f"invalid {what} {_show(text)}: names cannot contain a NUL character")
    size = len(name.encode("utf-8"))
    if size > MAX_NAME_BYTES:
        raise ValueError(
            f"invalid {what} {_show(text)}: {_show(name)} is {size} bytes long; "
            f"PostgreSQL names are at most {MAX_NAME_BYTES} bytes"
        )


# --------------------------------------------------------------------------- predicates


@dataclass(frozen=True)
class Predicate:
    """A checked row filter: SQL re-generated from the AST, and the columns it reads."""

    sql: str
    columns: frozenset[str]

    def __str__(self) -> str:
        return self.sql


# The functions a `when` may call, as written by users; sqlglot maps several spellings onto
# one node (btrim/trim -> Trim, char_length/length -> Length). All are immutable built-ins,
# which PostgreSQL requires of a publication row filter.
ALLOWED_FUNCTIONS = (
    "abs",
    "btrim",
    "char_length",
    "coalesce",
    "length",
    "lower",
    "nullif",
    "trim",
    "upper",
)
# Node type -> the arguments it may carry (anything else, e.g. Length's encoding or Trim's
# collation, is refused).
_FUNCTION_ARGS: dict[type[exp.Expr], frozenset[str]] = {
    exp.Lower: frozenset({"this"}),
    exp.Upper: frozenset({"this"}),
    exp.Length: frozenset({"this"}),
    exp.Trim: frozenset({"this", "expression", "position"}),
    exp.Abs: frozenset({"this"}),
    exp.Coalesce: frozenset({"this", "expressions"}),
    exp.Nullif: frozenset({"this", "expression"}),
}
_COMPARISONS: tuple[type[exp.Expr], ...] = (
    exp.EQ,
    exp.NEQ,
    exp.GT,
    exp.GTE,
    exp.LT,
    exp.LTE,
    exp.NullSafeEQ,
    exp.NullSafeNEQ,
)
_BOOLEAN_NODES: tuple[type[exp.Expr], ...] = (
    *_COMPARISONS,
    exp.Is,
    exp.In,
    exp.Between,
    exp.Like,
    exp.ILike,
    exp.Escape,
    exp.Boolean,
)
_ARITHMETIC: tuple[type[exp.Expr], ...] = (exp.Add, exp.Sub, exp.Mul, exp.Div, exp.Mod, exp.Neg)
_STRUCTURE: tuple[type[exp.Expr], ...] = (
    exp.And,
    exp.Or,
    exp.Not,
    exp.Paren,
    exp.Column,
    exp.Identifier,
    exp.Literal,
    exp.Null,
    exp.Cast,
    exp.DataType,
    exp.DataTypeParam,
)
_ALLOWED_NODES = frozenset((*_BOOLEAN_NODES, *_ARITHMETIC, *_STRUCTURE, *_FUNCTION_ARGS))

# Cast targets worth having in a row filter. PostgreSQL refuses casts done through text I/O
# there (text -> uuid, date, ...), and date/time input depends on DateStyle/TimeZone anyway,
# so those types are left out: compare with a plain string literal instead. Whether a given
# column's cast is allowed is for the server to say when the publication is created.
_CAST_TYPES = {
    exp.DataType.Type.TEXT: "text",
    exp.DataType.Type.VARCHAR: "varchar",
    exp.DataType.Type.CHAR: "char",
    exp.DataType.Type.SMALLINT: "smallint",
    exp.DataType.Type.INT: "integer",
    exp.DataType.Type.BIGINT: "bigint",
    exp.DataType.Type.DECIMAL: "numeric",
    exp.DataType.Type.FLOAT: "real",
    exp.DataType.Type.DOUBLE: "double precision",
    exp.DataType.Type.BOOLEAN: "boolean",
}
_PARAMETERISED_TYPES = {
    exp.DataType.Type.VARCHAR,
    exp.DataType.Type.CHAR,
    exp.DataType.Type.DECIMAL,
}

# System columns cannot appear in a row filter.
_SYSTEM_COLUMNS = frozenset({"ctid", "xmin", "xmax", "cmin", "cmax", "tableoid", "oid"})

# Generous for a row filter, small enough that a runaway value fails fast.
MAX_PREDICATE_LENGTH = 4000

_TOKEN_REFUSALS = {
    TokenType.SEMICOLON: "only one expression is allowed: remove ';' and what follows it",
    TokenType.HEREDOC_STRING: "dollar-quoted strings are not allowed; use 'text' and "
    "double a quote inside it ('O''Brien')",
    TokenType.PARAMETER: "parameters ($1, @name) are not allowed; write the value itself",
    TokenType.PLACEHOLDER: "placeholders (?) are not allowed; write the value itself",
}


_T = TypeVar("_T")


class _Refused(Exception):
    """Raised inside the walk; becomes the ValueError that parse_when reports."""


def parse_when(text: str, table: TableName | None = None) -> Predicate:
    """Check a `when` row filter and return it re-generated from its AST.

    Column references may be qualified only by `table` (its bare name or schema.name); the
    qualifier is dropped from the generated SQL. Without `table`, every qualified reference
    is refused. Raises ValueError naming what is not allowed and what is.
    """
    if not isinstance(text, str):
        raise ValueError(f"expected SQL text, got {type(text).__name__}")
    if not text.strip(_SPACE):
        raise ValueError("empty predicate; write a condition such as status <> 'draft'")
    if len(text) > MAX_PREDICATE_LENGTH:
        raise ValueError(f"predicate is longer than {MAX_PREDICATE_LENGTH} characters")
    try:
        tree = _parse_expression(text)
        columns = _check_tree(tree, table)
        _require_boolean(tree)
        sql = _sqlglot(lambda: tree.sql(dialect="postgres"))
        _check_round_trip(tree, sql)
    except _Refused as refused:
        raise ValueError(f"invalid predicate {_show(text)}: {refused}") from None
    except RecursionError:
        raise ValueError(f"invalid predicate {_show(text)}: nested too deeply") from None
    return Predicate(sql=sql, columns=frozenset(columns))


def _parse_expression(text: str) -> exp.Expr:
    """Tokenize and parse with the postgres dialect; exactly one expression, no comments."""
    tokens = _sqlglot(lambda: sqlglot.tokenize(text, read="postgres"))
    _check_tokens(text, tokens)
    statements = _sqlglot(lambda: sqlglot.parse(text, read="postgres"))
    found = [statement for statement in statements if statement is not None]
    if len(found) != 1:
        raise _Refused("write exactly one expression")
    return found[0]


def _sqlglot(step: Callable[[], _T]) -> _T:
    """Run one sqlglot step; any failure in it is the input's fault, reported as such."""
    try:
        return step()
    except SqlglotError as error:
        raise _Refused(f"cannot read it as SQL ({_first_line(error)})") from None
    except RecursionError:
        raise
    except Exception as error:
        # sqlglot is lenient rather than hardened: hostile input can fail deep inside it
        # with any exception type, and that must surface as a refusal, not a crash.
        raise _Refused(f"cannot read it as SQL ({type(error).__name__})") from None


def _first_line(error: Exception) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def _check_tokens(text: str, tokens: list[Token]) -> None:
    """Refuse comments and lexical constructs the grammar walk could not see."""
    previous_end = 0
    for index, token in enumerate(tokens):
        gap = text[previous_end : token.start]
        if token.comments or gap.strip(_SPACE):
            raise _Refused("comments are not allowed")
        refusal = _TOKEN_REFUSALS.get(token.token_type)
        if refusal is not None:
            raise _Refused(refusal)
        following = tokens[index + 1] if index + 1 < len(tokens) else None
        if following is not None and following.token_type == TokenType.L_PAREN:
            _check_function_name(token)
        previous_end = token.end + 1
    if text[previous_end:].strip(_SPACE):
        raise _Refused("comments are not allowed")


def _check_function_name(token: Token) -> None:
    """Check a function call by the name as written.

    sqlglot maps foreign names (ifnull, lcase, ltrim) onto allowed nodes; without this check
    they would be accepted although PostgreSQL has no such functions.
    """
    name = token.text.lower()
    if token.token_type == TokenType.VAR and name not in (*ALLOWED_FUNCTIONS, "cast"):
        raise _Refused(_function_refusal(name))


def _function_refusal(name: str) -> str:
    return f"function {name}() is not allowed; allowed functions: " + ", ".join(ALLOWED_FUNCTIONS)


def _walk(node: exp.Expr) -> Iterator[exp.Expr]:
    yield node
    for child in node.iter_expressions():
        yield from _walk(child)


def _check_tree(tree: exp.Expr, table: TableName | None) -> set[str]:
    """Check every node against the allow-lists; normalise column references in place."""
    columns: set[str] = set()
    for node in list(_walk(tree)):
        if node.comments:
            raise _Refused("comments are not allowed")
        kind = type(node)
        if kind not in _ALLOWED_NODES:
            raise _Refused(_describe_refused(node))
        if kind in _FUNCTION_ARGS:
            _check_function_args(node)
        elif isinstance(node, exp.Column):
            columns.add(_normalise_column(node, table))
        elif isinstance(node, exp.Literal):
            _check_literal(node)
        elif isinstance(node, exp.In):
            _check_in(node)
        elif isinstance(node, exp.Is):
            _check_is(node)
        elif isinstance(node, exp.Cast):
            _check_cast(node)
        elif isinstance(node, exp.Escape) and not isinstance(node.this, (exp.Like, exp.ILike)):
            raise _Refused("ESCAPE belongs to a LIKE or ILIKE")
        elif isinstance(node, (exp.DataType, exp.DataTypeParam)) and not isinstance(
            node.parent, (exp.Cast, exp.DataType)
        ):
            raise _Refused("a type name is only allowed in a cast")
    return columns


def _describe_refused(node: exp.Expr) -> str:
    if isinstance(node, (exp.Select, exp.Subquery, exp.Query, exp.Exists)):
        return "subqueries are not allowed"
    if isinstance(node, (exp.Concat, exp.DPipe)):
        return "string concatenation is not allowed"
    if isinstance(node, (exp.RegexpLike, exp.RegexpILike, exp.SimilarTo)):
        return "regular expressions are not allowed; use LIKE or ILIKE"
    if isinstance(node, exp.Star):
        return "* is not allowed; name the columns"
    if isinstance(node, (exp.Placeholder, exp.Parameter)):
        return "parameters and placeholders are not allowed; write the value itself"
    if isinstance(node, (exp.RawString, exp.ByteString, exp.UnicodeString)):
        return "only plain 'text' string literals are allowed (no E'', U&'' or $$ strings)"
    if isinstance(node, exp.Func):
        name = node.name if isinstance(node, exp.Anonymous) else node.sql_name()
        return _function_refusal(name.lower())
    if isinstance(node, exp.Alias):
        return "unexpected text after the expression (missing operator or quotes?)"
    if node.parent is None and not isinstance(node, exp.Condition):
        return "only a condition is allowed, not a SQL statement"
    try:
        label = f"{type(node).__name__} ({node.sql(dialect='postgres')[:40]})"
    except Exception:  # generating SQL for an odd node can fail; the type name will do
        label = type(node).__name__
    return (
        f"{label} is not allowed; use columns, "
        "literals, comparisons, AND/OR/NOT, IS [NOT] NULL, IN (...), BETWEEN, LIKE/ILIKE, "
        "arithmetic, casts and the functions " + ", ".join(ALLOWED_FUNCTIONS)
    )


def _check_function_args(node: exp.Expr) -> None:
    allowed = _FUNCTION_ARGS[type(node)]
    for key, value in node.args.items():
        if value in (None, False, []) or key in allowed:
            continue
        raise _Refused(f"{type(node).__name__.lower()}() does not take {key} here")
    if isinstance(node, exp.Trim) and node.args.get("collation") is not None:
        raise _Refused("COLLATE is not allowed")


def _normalise_column(node: exp.Column, table: TableName | None) -> str:
    """Return the exact column name and strip any (checked) table qualifier from the node."""
    ident = node.this
    if not isinstance(ident, exp.Identifier):
        raise _Refused("* is not allowed; name the columns")
    name = _exact_identifier(ident)
    qualifier = [
        _exact_identifier(part)
        for part in (node.args.get("catalog"), node.args.get("db"), node.args.get("table"))
        if isinstance(part, exp.Identifier)
    ]
    if qualifier:
        _check_qualifier(qualifier, name, table)
    if name in _SYSTEM_COLUMNS:
        raise _Refused(f"system column {name} cannot be used in a row filter")
    node.set("catalog", None)
    node.set("db", None)
    node.set("table", None)
    node.set("this", exp.Identifier(this=name, quoted=quote_identifier(name) != name))
    return name


def _check_qualifier(qualifier: list[str], name: str, table: TableName | None) -> None:
    written = ".".join(quote_identifier(part) for part in qualifier)
    if table is None:
        raise _Refused(f"write the column {quote_identifier(name)} without {written}.")
    allowed = ([table.name], [table.schema, table.name])
    if qualifier not in allowed:
        raise _Refused(
            f"{written}.{quote_identifier(name)} refers to another table; a row filter can "
            f"only read columns of {table.qualified()}"
        )


def _exact_identifier(ident: exp.Identifier) -> str:
    raw = ident.this
    if not isinstance(raw, str) or not raw:
        raise _Refused("empty name")
    if ident.quoted:
        name = raw
    else:
        # sqlglot's scanner is looser than PostgreSQL's; hold unquoted names to the latter.
        if not _UNQUOTED_NAME.fullmatch(raw):
            raise _Refused(f"invalid name {_show(raw)}")
        name = raw.translate(_ASCII_FOLD)
        # sqlglot also reads many SQL keywords as bare column names; PostgreSQL does not.
        if name in _QUOTED_KEYWORDS:
            raise _Refused(f'{raw} is an SQL keyword; if it is a column, write it as "{name}"')
    if "\x00" in name or len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise _Refused(f"invalid name {_show(raw)} (at most {MAX_NAME_BYTES} bytes)")
    return name


def _check_literal(node: exp.Literal) -> None:
    if "\x00" in node.this:
        raise _Refused("string literals cannot contain a NUL character")


def _is_constant(node: exp.Expr) -> bool:
    if isinstance(node, exp.Paren):
        return _is_constant(node.this)
    if isinstance(node, exp.Neg):
        return isinstance(node.this, exp.Literal) and not node.this.is_string
    return isinstance(node, (exp.Literal, exp.Boolean, exp.Null))


def _check_in(node: exp.In) -> None:
    extra = [k for k, v in node.args.items() if v not in (None, False, []) and k != "this"]
    if extra != ["expressions"]:
        raise _Refused("IN takes a list of literal values, e.g. kind IN ('a', 'b')")
    if not all(_is_constant(item) for item in node.expressions):
        raise _Refused("IN takes a list of literal values, e.g. kind IN ('a', 'b')")


def _check_is(node: exp.Is) -> None:
    if not isinstance(node.expression, (exp.Null, exp.Boolean)):
        raise _Refused("IS must be followed by [NOT] NULL, TRUE or FALSE")


def _check_cast(node: exp.Cast) -> None:
    extra = [k for k, v in node.args.items() if v not in (None, False, []) and k[0] != "_"]
    target = node.args.get("to")
    allowed = ", ".join(sorted(set(_CAST_TYPES.values())))
    if sorted(extra) != ["this", "to"] or not isinstance(target, exp.DataType):
        raise _Refused(f"only simple casts are allowed, to one of: {allowed}")
    kind = target.this
    if kind not in _CAST_TYPES or target.args.get("nested"):
        raise _Refused(f"cast to {target.sql(dialect='postgres')} is not allowed; use {allowed}")
    params = target.expressions
    if params and (
        kind not in _PARAMETERISED_TYPES
        or not all(
            isinstance(p, exp.DataTypeParam)
            and isinstance(p.this, exp.Literal)
            and not p.this.is_string
            for p in params
        )
    ):
        raise _Refused(f"cast to {target.sql(dialect='postgres')} is not allowed")


def _require_boolean(node: exp.Expr) -> None:
    if not _is_boolean(node):
        raise _Refused(
            "it must be a condition (true or false for each row), e.g. status <> 'draft', "
            "amount > 100 AND NOT archived, deleted_at IS NULL"
        )


def _is_boolean(node: exp.Expr) -> bool:
    """Whether the node yields a boolean, as far as can be told without the table's types."""
    if isinstance(node, exp.Paren):
        return _is_boolean(node.this)
    if isinstance(node, (exp.And, exp.Or)):
        return _is_boolean(node.this) and _is_boolean(node.expression)
    if isinstance(node, exp.Not):
        return _is_boolean(node.this)
    if isinstance(node, exp.Coalesce):
        return all(_is_boolean(arg) for arg in [node.this, *node.expressions])
    if isinstance(node, exp.Cast):
        return bool(node.to.this == exp.DataType.Type.BOOLEAN)
    # A bare column may be boolean; the database checks its type when the filter is created.
    return isinstance(node, (*_BOOLEAN_NODES, exp.Column))


def _shape(node: object) -> object:
    """A structural fingerprint that, unlike sqlglot's ==, is case-sensitive for values."""
    if isinstance(node, exp.Expr):
        items = sorted(
            (key, _shape(value))
            for key, value in node.args.items()
            if not key.startswith("_") and value not in (None, False, [])
        )
        return (type(node).__name__, tuple(items))
    if isinstance(node, list):
        return tuple(_shape(item) for item in node)
    return (type(node).__name__, repr(node))


def _check_round_trip(tree: exp.Expr, sql: str) -> None:
    """The generated SQL must read back as the same tree, or it would not mean the same."""
    try:
        again = _sqlglot(lambda: sqlglot.parse(sql, read="postgres"))
    except _Refused:
        again = []
    if len(again) != 1 or again[0] is None or _shape(again[0]) != _shape(tree):
        raise _Refused("it cannot be rewritten safely; simplify it")
