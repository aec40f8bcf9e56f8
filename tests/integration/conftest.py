"""Fixtures shared by the integration tests of cross-shard queries."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from . import test_query_property as qp


class _Databases:
    """Databases a test created on the harness's servers (dropped afterwards)."""

    def __init__(self) -> None:
        self.made: list[tuple[Any, str]] = []

    def new(self, server: Any) -> str:
        url = str(server.create_database())
        self.made.append((server, url))
        return url

    def drop(self) -> None:
        for server, url in self.made:
            server.drop_database(make_url(url).database)


@pytest.fixture
def databases() -> Iterator[_Databases]:
    d = _Databases()
    yield d
    d.drop()


@pytest.fixture
def pg_cluster(pg_server_a: Any, pg_server_b: Any, databases: _Databases) -> Iterator[qp.Cluster]:
    """Three PostgreSQL shards over the two servers, and a PostgreSQL oracle."""
    urls = {
        "p0": databases.new(pg_server_a),
        "p1": databases.new(pg_server_b),
        "p2": databases.new(pg_server_a),
    }
    cluster = qp.make_cluster(urls, databases.new(pg_server_b))
    yield cluster
    qp.dispose(cluster)
