"""A Flask app behind an auth proxy that sets X-Forwarded-User: every write carries the user.

Run `python examples/flask_app.py` with CDC_AUDIT_DSN set (see README.md): it sends three
requests through Flask's test client, then `cdc-audit worker --drain` seals them.
"""

from __future__ import annotations

import os
from typing import Any

import psycopg
from flask import Flask, request

import cdc_audit
from cdc_audit.integrations import acting_as
from cdc_audit.integrations import psycopg as audit_pg
from cdc_audit.integrations.wsgi import AuditContextMiddleware

DSN = os.environ.get("CDC_AUDIT_DSN", "dbname=app")

app = Flask(__name__)
app.wsgi_app = AuditContextMiddleware(app.wsgi_app)  # type: ignore[method-assign]


def connect() -> psycopg.Connection[Any]:
    # prepare_threshold=None keeps it correct behind PgBouncer in transaction mode.
    return psycopg.connect(DSN, autocommit=True, prepare_threshold=None)


@app.post("/accounts/<int:account_id>")
def open_account(account_id: int) -> str:
    with connect() as conn, audit_pg.transaction(conn):  # BEGIN; set_context(...); ...
        conn.execute(
            "INSERT INTO accounts (id, owner) VALUES (%s, %s)",
            (account_id, request.headers.get("X-Forwarded-User")),
        )
    return "created\n"


@app.post("/accounts/<int:account_id>/note")
def write_note(account_id: int) -> str:
    with (
        acting_as(reason=request.form.get("reason")),
        connect() as conn,
        audit_pg.transaction(conn),
    ):
        conn.execute(
            "UPDATE accounts SET note = %s WHERE id = %s", (request.form["note"], account_id)
        )
    return "noted\n"


@app.post("/login")
def login() -> tuple[str, int]:
    with connect() as conn:
        try:
            with audit_pg.transaction(conn):
                cdc_audit.log_event(
                    conn,
                    "auth.login.failed",
                    "web",
                    outcome="failure",
                    details={"username": request.form["username"]},
                    durable=True,  # survives the rollback below
                )
                raise PermissionError("bad password")
        except PermissionError:
            return "denied\n", 403


if __name__ == "__main__":
    client = app.test_client()
    client.post("/accounts/1", headers={"X-Forwarded-User": "alice", "X-Request-ID": "req-1"})
    client.post(
        "/accounts/1/note",
        data={"note": "VIP", "reason": "ticket 7"},
        headers={"X-Forwarded-User": "bob", "X-Request-ID": "req-2"},
    )
    client.post("/login", data={"username": "mallory"}, headers={"X-Request-ID": "req-3"})
    print("done: now run `cdc-audit worker --drain` and query cdc_audit.event (README.md)")
