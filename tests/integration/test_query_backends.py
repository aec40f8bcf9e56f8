"""The merge property on PostgreSQL, MariaDB and a mix of backends.

* PostgreSQL shards (two servers) vs a PostgreSQL oracle: exact, including AVG's numeric
  scale and NULLS FIRST/LAST;
* MariaDB shards vs a MariaDB oracle: exact (no explicit NULLS FIRST/LAST: MariaDB has no
  syntax for it);
* PostgreSQL + MariaDB + SQLite shards vs an SQLite oracle: NULLs follow the documented
  mixed rule (smallest value), which is SQLite's; AVG compared to 6 decimals because each
  backend types AVG differently (Decimal vs float).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from . import test_query_property as qp
from .conftest import _Databases

SETTINGS = settings(
    derandomize=True,
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture
def mariadb_cluster(mariadb_server: Any, databases: _Databases) -> Iterator[qp.Cluster]:
    urls = {"m0": databases.new(mariadb_server), "m1": databases.new(mariadb_server)}
    cluster = qp.make_cluster(urls, databases.new(mariadb_server))
    yield cluster
    qp.dispose(cluster)


@pytest.fixture
def mixed_cluster(
    pg_server_a: Any, mariadb_server: Any, databases: _Databases, tmp_path: Any
) -> Iterator[qp.Cluster]:
    urls = {
        "a_pg": databases.new(pg_server_a),
        "b_maria": databases.new(mariadb_server),
        "c_sqlite": f"sqlite:///{tmp_path}/mixed.db",
    }
    cluster = qp.make_cluster(urls, f"sqlite:///{tmp_path}/oracle.db")
    # MariaDB's default collation (utf8mb4_general_ci) compares strings unlike SQLite's
    # BINARY and PostgreSQL's C: such a mix is refused (test_query_semantics.py).  Here
    # every shard compares by code point, as one database would.
    with cluster.engines["b_maria"].begin() as conn:
        binary = "COLLATE utf8mb4_nopad_bin"
        conn.exec_driver_sql(f"ALTER TABLE qitems MODIFY grp VARCHAR(8) {binary}")
        conn.exec_driver_sql(f"ALTER TABLE qtags MODIFY label VARCHAR(8) {binary} NOT NULL")
    yield cluster
    qp.dispose(cluster)


@SETTINGS
@given(data=qp.datasets(), spec=st.one_of(qp.row_queries(), qp.aggregate_queries()))
def test_postgresql_shards_match_one_database(
    pg_cluster: qp.Cluster, data: Any, spec: qp.QuerySpec
) -> None:
    pg_cluster.load(*data)
    qp.check_against_oracle(pg_cluster, spec)


@SETTINGS
@given(
    data=qp.datasets(),
    spec=st.one_of(
        qp.row_queries(explicit_nulls=False), qp.aggregate_queries(explicit_nulls=False)
    ),
)
def test_mariadb_shards_match_one_database(
    mariadb_cluster: qp.Cluster, data: Any, spec: qp.QuerySpec
) -> None:
    mariadb_cluster.load(*data)
    qp.check_against_oracle(mariadb_cluster, spec)


@SETTINGS
@given(
    data=qp.datasets(),
    spec=st.one_of(
        qp.row_queries(explicit_nulls=False), qp.aggregate_queries(explicit_nulls=False)
    ),
)
def test_mixed_backends_match_one_database(
    mixed_cluster: qp.Cluster, data: Any, spec: qp.QuerySpec
) -> None:
    mixed_cluster.load(*data)
    qp.check_against_oracle(mixed_cluster, spec, approx=True)


def test_postgresql_avg_keeps_numeric_scale(pg_cluster: qp.Cluster) -> None:
    rows = [{"id": i, "grp": "a", "a": 1, "b": b} for i, b in enumerate([1, 2, 2, 5, 7], 1)]
    pg_cluster.load(rows, [0, 1, 2, 0, 1])
    stmt = select(func.avg(qp.ITEMS.c.b), func.sum(qp.ITEMS.c.b))
    with pg_cluster.session() as s:
        ours = s.execute(stmt).one()
    from sqlalchemy.orm import Session

    with Session(pg_cluster.oracle) as o:
        want = o.execute(stmt).one()
    assert tuple(ours) == tuple(want)
    assert str(ours[0]) == str(want[0])
    assert type(ours[1]) is type(want[1])


def test_deadline_severs_a_shard_that_does_not_answer(
    pg_url_a: str, pg_url_b: str, fault_proxy: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shard whose server stops answering (and whose cancel request is stuck too):
    after the grace period its socket is shut down, the blocked driver call fails, and
    only then is FanoutTimeoutError raised; the session recovers after a rollback."""
    import time

    from sqlalchemy import event

    from shardsession.exc import FanoutTimeoutError
    from shardsession.query import _fanout

    monkeypatch.setattr(_fanout, "CANCEL_GRACE_SECONDS", 0.2)
    proxy = fault_proxy(pg_url_b)
    cluster = qp.make_cluster({"p0": pg_url_a, "p1": proxy.url_for(pg_url_b)}, "sqlite://")
    try:
        rows = [{"id": i, "grp": "a", "a": i, "b": 1} for i in range(1, 11)]
        cluster.load(rows, [i % 2 for i in range(10)])
        failed: list[float] = []
        event.listen(
            cluster.engines["p1"], "handle_error", lambda c: failed.append(time.monotonic())
        )
        with cluster.session() as s:
            assert s.scalar(select(func.count()).select_from(qp.Item)) == 10
            proxy.latency = 30.0  # nothing reaches the server behind p1 any more
            started = time.monotonic()
            with pytest.raises(FanoutTimeoutError) as info:
                s.execute(
                    select(qp.Item.id), execution_options={"shardsession_timeout": 0.2}
                ).all()
            raised = time.monotonic()
            assert raised - started < 5
            assert info.value.pending_shards == ["p1"]
            assert failed and max(failed) <= raised  # the worker had returned
            s.rollback()
            proxy.latency = 0.0
            assert s.scalar(select(func.count()).select_from(qp.Item)) == 10
    finally:
        proxy.latency = 0.0
        qp.dispose(cluster)


def test_statement_deadline_applies_on_one_shard(pg_url_a: str, pg_url_b: str) -> None:
    """execution_options(shardsession_timeout=...) bounds a single-shard statement too
    (a pinned read here); the session-wide fan-out timeout does not (lazy loads are never
    cut), and the session is usable after a rollback."""
    import time

    from shardsession.exc import FanoutTimeoutError

    cluster = qp.make_cluster({"p0": pg_url_a, "p1": pg_url_b}, "sqlite://")
    try:
        with cluster.session() as s:
            started = time.monotonic()
            with pytest.raises(FanoutTimeoutError) as info:
                s.execute(
                    select(func.pg_sleep(5)),
                    bind_arguments={"shard_id": "p1"},
                    execution_options={"shardsession_timeout": 0.3},
                ).all()
            assert time.monotonic() - started < 4
            assert info.value.pending_shards == ["p1"]
            s.rollback()
            assert s.scalar(select(func.count()).select_from(qp.Item)) == 0
            # without the option, a one-shard statement runs as plain SQLAlchemy does
            assert s.scalar(select(func.pg_sleep(0.1)), bind_arguments={"shard_id": "p1"}) in (
                None,
                "",
            )
    finally:
        qp.dispose(cluster)
