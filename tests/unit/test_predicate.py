"""Table names, column names and `when` row filters: what is accepted, kept, or refused."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from psycopg import sql

from cdc_audit.predicate import (
    Predicate,
    TableName,
    parse_column_name,
    parse_table_name,
    parse_when,
    quote_identifier,
)

ACCOUNTS = TableName("public", "accounts")


# ------------------------------------------------------------------------- table names


@pytest.mark.parametrize(
    ("text", "schema", "name"),
    [
        ("accounts", "public", "accounts"),
        ("Accounts", "public", "accounts"),
        ("Public.Accounts", "public", "accounts"),
        ("sales.orders", "sales", "orders"),
        ("  sales . orders  ", "sales", "orders"),
        ('"Sales"."Order Items"', "Sales", "Order Items"),
        ('sales."Order Items"', "sales", "Order Items"),
        ('"we""ird"', "public", 'we"ird'),
        ('"a.b"', "public", "a.b"),
        ('"drop table x; --"', "public", "drop table x; --"),
        ("order_items$2", "public", "order_items$2"),
        ("public.user", "public", "user"),
        # PostgreSQL folds only ASCII letters in a UTF-8 database.
        ("Über", "public", "Über"),
        ("x" * 63, "public", "x" * 63),
    ],
)
def test_table_names_fold_like_postgresql(text: str, schema: str, name: str) -> None:
    assert parse_table_name(text) == TableName(schema, name)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty table name"),
        ("   ", "empty table name"),
        ('""', "empty name"),
        ("db.sales.orders", "it has 3 parts"),
        ("accounts; drop table x", "unexpected '; drop table x' after 'accounts'"),
        ("a b", "unexpected 'b' after 'a'"),
        ("*", "unexpected '*'"),
        ("public.*", "unexpected '*'"),
        ("public.", "a name is missing after '.'"),
        (".accounts", "unexpected '.'"),
        ("1accounts", "unexpected '1'"),
        ('"unterminated', "a double quote is not closed"),
        ('U&"d\\0061t"', "unexpected '&"),
        ("x" * 64, "is 64 bytes long; PostgreSQL names are at most 63 bytes"),
        ("é" * 32, "is 64 bytes long"),
        ('"a\x00b"', "NUL"),
        ("accounts\n; drop", "unexpected '; drop'"),
    ],
)
def test_bad_table_names_are_refused_with_the_reason(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=r"invalid table name|empty table name") as caught:
        parse_table_name(text)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("table", "shown"),
    [
        (TableName("public", "accounts"), "public.accounts"),
        (TableName("Sales", "Order Items"), '"Sales"."Order Items"'),
        (TableName("public", 'we"ird'), 'public."we""ird"'),
        (TableName("public", "user"), 'public."user"'),  # reserved word
        (TableName("public", "name"), "public.name"),  # unreserved keyword: no quotes
        (TableName("public", "1a"), 'public."1a"'),
        (TableName("public", "a$b"), 'public."a$b"'),
        (TableName("public", "café"), 'public."café"'),
    ],
)
def test_qualified_quotes_only_where_needed(table: TableName, shown: str) -> None:
    assert table.qualified() == shown
    assert str(table) == shown


@pytest.mark.parametrize("name", ["Order Items", 'we"ird', "user", "1a", "x;drop", "é"])
def test_quoting_matches_psycopg_identifier(name: str) -> None:
    assert quote_identifier(name) == sql.Identifier(name).as_string()


_names = st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters="\x00"),
    min_size=1,
    max_size=20,
)


@given(schema=_names, name=_names)
def test_qualified_names_read_back_as_the_same_table(schema: str, name: str) -> None:
    table = TableName(schema, name)
    if len(schema.encode()) > 63 or len(name.encode()) > 63:
        return
    assert parse_table_name(table.qualified()) == table
    assert parse_column_name(quote_identifier(name)) == name


# ------------------------------------------------------------------------ column names


@pytest.mark.parametrize(
    ("text", "exact"),
    [("email", "email"), ("Email", "email"), ('"Email"', "Email"), ('"a""b"', 'a"b')],
)
def test_column_names_fold_like_postgresql(text: str, exact: str) -> None:
    assert parse_column_name(text) == exact


@pytest.mark.parametrize("text", ["", "a.b", "a b", "email;", "*", '"x', "x" * 64])
def test_bad_column_names_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="column name"):
        parse_column_name(text)


# --------------------------------------------------------------------- when predicates


@pytest.mark.parametrize(
    ("text", "expected_sql", "columns"),
    [
        ("status <> 'draft'", "status <> 'draft'", {"status"}),
        ("amount > 100 AND NOT archived", "amount > 100 AND NOT archived", {"amount", "archived"}),
        ("kind IN ('a','b')", "kind IN ('a', 'b')", {"kind"}),
        ("kind NOT IN ('a', 'b')", "NOT kind IN ('a', 'b')", {"kind"}),
        ("deleted_at IS NULL", "deleted_at IS NULL", {"deleted_at"}),
        ("deleted_at IS NOT NULL", "deleted_at IS NOT NULL", {"deleted_at"}),
        ("archived IS NOT TRUE", "NOT archived IS TRUE", {"archived"}),
        ("lower(email) LIKE '%@corp.com'", "LOWER(email) LIKE '%@corp.com'", {"email"}),
        ("name ILIKE 'a%'", "name ILIKE 'a%'", {"name"}),
        ("name LIKE 'a!%' ESCAPE '!'", "name LIKE 'a!%' ESCAPE '!'", {"name"}),
        ("x BETWEEN 1 AND 5", "x BETWEEN 1 AND 5", {"x"}),
        ("a + b * 2 > c % 3", "a + b * 2 > c % 3", {"a", "b", "c"}),
        ("-x < 3", "-x < 3", {"x"}),
        ("amount::numeric(10,2) > 1", "CAST(amount AS DECIMAL(10, 2)) > 1", {"amount"}),
        ("coalesce(a, b) = 1", "COALESCE(a, b) = 1", {"a", "b"}),
        ("nullif(a, '') IS NULL", "NULLIF(a, '') IS NULL", {"a"}),
        ("btrim(a) = ''", "TRIM(a) = ''", {"a"}),
        ("char_length(a) > 1", "LENGTH(a) > 1", {"a"}),
        ("abs(x) > upper(y)::int", "ABS(x) > CAST(UPPER(y) AS INT)", {"x", "y"}),
        ("x IS DISTINCT FROM y", "x IS DISTINCT FROM y", {"x", "y"}),
        ("(x = 1 OR y = 2) AND z", "(x = 1 OR y = 2) AND z", {"x", "y", "z"}),
        ("archived", "archived", {"archived"}),
        # Unquoted names fold; quoted ones are kept and re-quoted; literals are untouched.
        ("Status = 'Draft'", "status = 'Draft'", {"status"}),
        ('"Status" = 1', '"Status" = 1', {"Status"}),
        ('"order" = 1', '"order" = 1', {"order"}),
        ('"we""ird" IS NULL', '"we""ird" IS NULL', {'we"ird'}),
        # Quotes and comment markers inside a literal are data, kept exactly.
        ("name <> 'O''Brien'", "name <> 'O''Brien'", {"name"}),
        ("note = '-- not a comment /* */'", "note = '-- not a comment /* */'", {"note"}),
        ("path = 'C:\\temp'", "path = 'C:\\temp'", {"path"}),
    ],
)
def test_accepted_predicates_are_regenerated(
    text: str, expected_sql: str, columns: set[str]
) -> None:
    predicate = parse_when(text)
    assert predicate == Predicate(expected_sql, frozenset(columns))
    # The generated SQL is a fixed point: it reads back as itself.
    assert parse_when(predicate.sql) == predicate


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1=1; DROP TABLE accounts", "only one expression is allowed"),
        ("status = 'x';", "only one expression is allowed"),
        ("status = 'x' --", "comments are not allowed"),
        ("status = 'x' -- or 1=1", "comments are not allowed"),
        ("status = 'x' /* c */", "comments are not allowed"),
        ("/**/status = 'x'", "comments are not allowed"),
        ("(SELECT 1) = 1", "subqueries are not allowed"),
        ("x IN (SELECT id FROM other)", "IN takes a list of literal values"),
        ("EXISTS (SELECT 1)", "subqueries are not allowed"),
        ("SELECT 1", "subqueries are not allowed"),
        ("DROP TABLE accounts", "not a SQL statement"),
        ("pg_sleep(10) IS NULL", "function pg_sleep() is not allowed; allowed functions: abs,"),
        ("now() > created_at", "is not allowed"),
        ("random() < 0.5", "is not allowed"),
        # sqlglot would quietly translate these to PostgreSQL functions; they are not ones.
        ("ifnull(a, 1) = 1", "function ifnull() is not allowed"),
        ("lcase(a) = 'x'", "function lcase() is not allowed"),
        ("ltrim(a) = ''", "function ltrim() is not allowed"),
        ("status = $$x$$", "dollar-quoted strings are not allowed"),
        ("status = $tag$x$tag$", "dollar-quoted strings are not allowed"),
        ("status = $1", "parameters"),
        ("status = %s", "parameters and placeholders are not allowed"),
        ("status = ?", "placeholders"),
        ("status = :name", "parameters and placeholders are not allowed"),
        ("*", "* is not allowed"),
        ("accounts.* IS NULL", "* is not allowed"),
        ("other.status = 'x'", "write the column status without other."),
        ("status = E'x'", "only plain 'text' string literals"),
        ("status = 'a' 'b'", "string concatenation is not allowed"),
        ("status = 'a' || 'b'", "string concatenation is not allowed"),
        ("status ~ 'a'", "regular expressions are not allowed"),
        ("x IN (y, 1)", "IN takes a list of literal values"),
        ("x::date > '2024-01-01'", "cast to DATE is not allowed"),
        ("x::int[] = y", "is not allowed"),
        ("ctid = '(0,1)'", "system column ctid"),
        ("order = 1", 'order is an SQL keyword; if it is a column, write it as "order"'),
        ("IS", "is an SQL keyword"),
        ("lower(x) COLLATE \"C\" = 'a'", "is not allowed"),
        ("length(x, 'UTF8') > 1", "does not take encoding"),
        ("x + 1", "it must be a condition"),
        ("'draft'", "it must be a condition"),
        ("NULL", "it must be a condition"),
        ("status draft", "unexpected text after the expression"),
        ("status = 'x' AND", "cannot read it as SQL"),
        ("", "empty predicate"),
        ("   ", "empty predicate"),
        ("x = 1" + " AND x = 1" * 600, "longer than 4000 characters"),
    ],
)
def test_hostile_or_unsupported_predicates_are_refused(text: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_when(text)
    assert message in str(caught.value)


def test_columns_may_be_qualified_by_the_audited_table_only() -> None:
    assert parse_when("accounts.status = 'x'", ACCOUNTS).sql == "status = 'x'"
    assert parse_when("public.accounts.status = 'x'", ACCOUNTS).sql == "status = 'x'"
    assert parse_when('"Accounts".status = 1', TableName("public", "Accounts")).sql == (
        "status = 1"
    )
    with pytest.raises(ValueError, match="refers to another table"):
        parse_when("roles.status = 'x'", ACCOUNTS)
    with pytest.raises(ValueError, match="refers to another table"):
        parse_when("audit.accounts.status = 'x'", ACCOUNTS)


def test_the_refusal_names_the_input() -> None:
    with pytest.raises(ValueError) as caught:
        parse_when("status = 'x' --")
    assert str(caught.value).startswith("invalid predicate \"status = 'x' --\": ")


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=60))
def test_any_text_is_either_a_checked_predicate_or_a_value_error(text: str) -> None:
    try:
        predicate = parse_when(text)
    except ValueError:
        return
    assert parse_when(predicate.sql) == predicate


_atoms = st.sampled_from(
    ["x", "Y", '"Z z"', "1", "'a'", "'it''s'", "NULL", "TRUE", "lower(x)", "t.x", "$1", "*"]
)
_ops = st.sampled_from(
    ["=", "<>", "<", "AND", "OR", "+", "||", "IS", "IS NOT", "LIKE", ";", "--", "::int", ","]
)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(_atoms, _ops, st.sampled_from(["(", ")", "NOT"])), max_size=12))
def test_sql_like_token_soup_never_escapes_the_checks(parts: list[str]) -> None:
    text = " ".join(parts)
    try:
        predicate = parse_when(text, ACCOUNTS)
    except ValueError:
        return
    assert predicate.columns <= {"x", "y", "Z z"}
    assert ";" not in predicate.sql and "--" not in predicate.sql
    assert parse_when(predicate.sql, ACCOUNTS) == predicate
