"""Connections, with failures turned into one-line errors that keep the SQLSTATE."""

from __future__ import annotations

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import TupleRow

from .errors import DatabaseError, InvalidInput


def connect(
    dsn: str | None, *, autocommit: bool = False, application_name: str = "cdc-audit"
) -> psycopg.Connection[TupleRow]:
    if not dsn:
        raise InvalidInput("no database given: use --dsn or set CDC_AUDIT_DSN")
    try:
        conn: psycopg.Connection[TupleRow] = psycopg.connect(
            dsn,
            autocommit=autocommit,
            application_name=application_name,
            client_encoding="utf8",
        )
    except psycopg.ProgrammingError as exc:
        raise InvalidInput(f"invalid DSN: {_first_line(exc)}") from exc
    except psycopg.OperationalError as exc:
        raise DatabaseError(f"cannot connect: {_first_line(exc)}") from exc
    # psycopg reads dates and times only in ISO style: a database, role or PGDATESTYLE default
    # of SQL or Postgres style would make every timestamp unreadable. Ours to pin, after the
    # startup parameters (which PGDATESTYLE sets) have been applied.
    conn.execute("SET DateStyle = 'ISO, YMD'")
    if not autocommit:
        conn.commit()
    return conn


# TCP keepalives of long-lived connections (the worker's), unless the DSN sets its own: a
# peer that vanished without closing the connection is noticed within about a minute, not
# after the operating system's two hours.
_KEEPALIVES = {
    "keepalives": "1",
    "keepalives_idle": "30",
    "keepalives_interval": "10",
    "keepalives_count": "3",
}


def with_keepalives(dsn: str) -> str:
    """`dsn` with client-side TCP keepalives, where it does not set them."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        raise InvalidInput(f"invalid DSN: {_first_line(exc)}") from exc
    return make_conninfo(**{**_KEEPALIVES, **{k: str(v) for k, v in params.items()}})


def database_error(exc: psycopg.Error, doing: str) -> DatabaseError:
    return DatabaseError(f"{doing} failed: {_first_line(exc)}", exc.sqlstate)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
