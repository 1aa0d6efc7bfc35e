"""One throwaway PostgreSQL per test session (integration and reliability suites share it); a
fresh database per test."""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator

import psycopg
import pytest

from cdc_audit.ephemeral import EphemeralCluster

from .integration.fix_policy import write_policy  # noqa: F401  (fixture)
from .integration.pg import Database

_counter = itertools.count(1)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[EphemeralCluster]:
    cluster = EphemeralCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def database(pg_cluster: EphemeralCluster, request: pytest.FixtureRequest) -> Iterator[Database]:
    stem = re.sub(r"[^a-z0-9]+", "_", request.node.name.lower())[:40].strip("_")
    name = f"t{next(_counter):03d}_{stem}"
    with psycopg.connect(pg_cluster.dsn(), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    db = Database(name=name, cluster=pg_cluster)
    try:
        yield db
    finally:
        db.drop()
