"""Fixtures of the reliability suite: private clusters for scenarios that stop or crash one.

The session's shared cluster (`pg_cluster`) is never stopped or crashed: a scenario that needs
to do that, or to change a server setting, gets a cluster of its own from `private_cluster`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from cdc_audit.ephemeral import EphemeralCluster

PrivateCluster = Callable[..., EphemeralCluster]


@pytest.fixture
def private_cluster() -> Iterator[PrivateCluster]:
    """Start a throwaway cluster with extra server settings; all are stopped at teardown."""
    clusters: list[EphemeralCluster] = []

    def start(**settings: str) -> EphemeralCluster:
        cluster = EphemeralCluster(settings=settings)
        clusters.append(cluster)
        return cluster.start()

    try:
        yield start
    finally:
        for cluster in clusters:
            cluster.stop()
