"""The SQL a fresh install runs, rendered offline and compared with reviewed golden files.

Regenerate after a reviewed change with `make golden` (UPDATE_GOLDEN=1).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cdc_audit import plan
from cdc_audit.catalog import Installed, Relation, TableInfo
from cdc_audit.names import InstallNames
from cdc_audit.policy import LoadedPolicy, TablePolicy, load_policy

GOLDEN = Path(__file__).parent / "golden"
VERBATIM = ("migrate", "runtime")
CASES = sorted(p.stem for p in GOLDEN.glob("*.yaml"))


def offline_table(table: TablePolicy, oid: int) -> TableInfo:
    """A catalog entry with just the columns the policy names, as a database would have it."""
    columns = {"id", *table.exclude, *table.redact, *(table.when.columns if table.when else ())}
    relation = Relation(table.table.schema, table.table.name, oid, "d")
    return TableInfo(relation, "r", frozenset(columns), ("id",), None, ())


def fresh_install_plan(loaded: LoadedPolicy) -> str:
    names = InstallNames(loaded.policy.schema_name, "shop", loaded.policy.slot)
    installed = Installed(names=names, server_version=150000)
    installed.tables = {
        (t.table.schema, t.table.name): offline_table(t, 16384 + i)
        for i, t in enumerate(loaded.policy.tables)
    }
    targets = plan.resolve_tables(loaded, installed.tables, installed.server_version)
    built = plan.build_apply_plan(loaded, installed, targets)
    # Migrations and functions are the templates verbatim; the golden files keep what the
    # policy shapes. The policy's hash depends on the file's bytes, the fixture's own.
    shaped = plan.Plan(
        tuple(
            plan.Step(s.kind, s.target, s.description, ()) if s.kind in VERBATIM else s
            for s in built.steps
        )
    )
    return shaped.render().replace(loaded.sha256, "<sha256>").replace(loaded.sha256[:12], "<sha>")


@pytest.mark.parametrize("case", CASES)
def test_fresh_install_sql_matches_golden(case: str) -> None:
    loaded = load_policy(GOLDEN / f"{case}.yaml")
    rendered = fresh_install_plan(loaded).replace(loaded.text, "<policy text>")
    expected = GOLDEN / f"{case}.sql"
    if os.environ.get("UPDATE_GOLDEN"):
        expected.write_text(rendered)
    assert rendered == expected.read_text(), f"regenerate with `make golden` and review {expected}"


def test_plans_render_without_a_connection_and_quote_every_identifier() -> None:
    loaded = load_policy(GOLDEN / "full_policy.yaml")
    text = fresh_install_plan(loaded)
    assert 'ALTER PUBLICATION "cdc_audit" ADD TABLE "Sales"."Order Items";' in text
    assert 'ON "Sales"."Order Items"' in text
    assert "BEFORE INSERT OR UPDATE ON" in text
    assert 'ADD TABLE "public"."accounts" WHERE (status <> \'draft\')' in text
    assert text.count("pg_create_logical_replication_slot('cdc_audit_shop', 'pgoutput')") == 1
