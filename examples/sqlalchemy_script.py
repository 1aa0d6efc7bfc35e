"""A batch job with SQLAlchemy: every transaction of the engine carries the current actor.

Run `python examples/sqlalchemy_script.py` with CDC_AUDIT_DSN set (see README.md).
"""

from __future__ import annotations

import os

from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session

from cdc_audit.integrations import acting_as
from cdc_audit.integrations import sqlalchemy as audit_sa


def url_from_dsn(dsn: str) -> str:
    parts = dict(part.split("=", 1) for part in dsn.split())
    host, port = parts.get("host", "localhost"), parts.get("port", "5432")
    return f"postgresql+psycopg://{parts.get('user', 'postgres')}@{host}:{port}/{parts['dbname']}"


engine = create_engine(
    url_from_dsn(os.environ.get("CDC_AUDIT_DSN", "dbname=app")),
    connect_args={"prepare_threshold": None},  # safe behind PgBouncer in transaction mode
)
audit_sa.instrument(engine)

with acting_as(actor_id="batch:nightly-close", reason="month-end closing"):
    with Session(engine) as session, session.begin():  # BEGIN; set_context(...); UPDATE; COMMIT
        session.execute(text("UPDATE accounts SET note = 'closed' WHERE note IS NULL"))
    with acting_as(on_behalf_of="carol", reason="carol asked by mail"), engine.begin() as conn:
        conn.execute(text("UPDATE accounts SET note = 'reopened' WHERE id = 1"))

print("done: now run `cdc-audit worker --drain` and query cdc_audit.event (README.md)")
