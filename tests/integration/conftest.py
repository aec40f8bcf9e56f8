"""Fixtures and helpers shared by the integration tests."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy.engine import Engine, make_url

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


def prepared_gids(engine: Engine) -> set[str]:
    """GIDs of the transactions left prepared in ``engine``'s PostgreSQL database."""
    with engine.connect() as c:
        return set(c.exec_driver_sql(
            "SELECT gid FROM pg_prepared_xacts WHERE database = current_database()").scalars())


def row_ids(engine: Engine) -> set[int]:
    """The ids in table ``t`` (the table the 2PC driver and recovery tests write)."""
    with engine.connect() as c:
        return set(c.exec_driver_sql("SELECT id FROM t").scalars())
