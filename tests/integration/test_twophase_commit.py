"""Atomic commit across real servers: commit, rollback, savepoints, single writer, pool hygiene."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, func, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shardsession.coordinator import TransactionCoordinator, in_doubt, recover
from shardsession.exc import AtomicityUnavailableError, NonAtomicCommitWarning

from ._2pc_mixes import MIXES, THREE_WAY, mix_urls

md = MetaData()
T = {n: Table(f"ss_rows_{n}", md, Column("id", Integer, primary_key=True), Column("v", String(20)))
     for n in ("alpha", "beta", "gamma")}


@pytest.fixture(params=MIXES)
def cluster(request: pytest.FixtureRequest) -> Iterator[dict[str, Engine]]:
    urls = mix_urls(request, request.param)
    engines = {n: create_engine(u) for n, u in urls.items()}
    for n, e in engines.items():
        T[n].drop(e, checkfirst=True)
        T[n].create(e)
    yield engines
    for e in engines.values():
        e.dispose()


def session(engines: dict[str, Engine], coord: TransactionCoordinator) -> Session:
    s = Session()
    names = {e: n for n, e in engines.items()}
    coord.install(s, names.__getitem__)
    return s


def insert(s: Session, engines: dict[str, Engine], name: str, key: int) -> None:
    s.connection(bind_arguments={"bind": engines[name]}).execute(
        T[name].insert().values(id=key, v=name))


def count(engines: dict[str, Engine], name: str, key: int | None = None) -> int:
    with engines[name].connect() as c:
        q = select(func.count()).select_from(T[name])
        if key is not None:
            q = q.where(T[name].c.id == key)
        return int(c.scalar(q) or 0)


def decisions(engine: Engine) -> int:
    with engine.connect() as c:
        try:
            n = c.exec_driver_sql("SELECT count(*) FROM shardsession_decisions").scalar()
            return int(n or 0)
        except Exception:
            return 0


def assert_pool_clean(engines: dict[str, Engine]) -> None:
    """A pooled connection starts a fresh transaction of each kind without error."""
    for name, e in engines.items():
        with e.connect() as c:
            if e.dialect.name == "mysql":
                c.exec_driver_sql("XA START X'7373',X'7373',7")
                c.exec_driver_sql("XA END X'7373',X'7373',7")
                c.exec_driver_sql("XA ROLLBACK X'7373',X'7373',7")
                assert c.exec_driver_sql("SELECT @@session.tx_isolation").scalar()
            if e.dialect.name == "postgresql":
                assert c.exec_driver_sql("SHOW synchronous_commit").scalar() == "on"
            c.execute(select(func.count()).select_from(T[name]))
            c.rollback()


def test_two_writers_commit_atomically(cluster: dict[str, Engine]) -> None:
    coord = TransactionCoordinator()
    s = session(cluster, coord)
    insert(s, cluster, "alpha", 1)
    insert(s, cluster, "beta", 1)
    s.commit()
    assert count(cluster, "alpha", 1) == count(cluster, "beta", 1) == 1
    assert sum(decisions(e) for e in cluster.values()) == 1
    assert in_doubt(cluster) == []
    report = recover(cluster, grace_period=0)
    assert report.resolved and report.decisions_deleted == 1
    assert sum(decisions(e) for e in cluster.values()) == 0
    assert_pool_clean(cluster)


def test_rollback_and_failed_flush_leave_nothing(cluster: dict[str, Engine]) -> None:
    coord = TransactionCoordinator()
    s = session(cluster, coord)
    insert(s, cluster, "alpha", 2)
    insert(s, cluster, "beta", 2)
    s.rollback()
    s = session(cluster, coord)
    insert(s, cluster, "alpha", 3)
    insert(s, cluster, "beta", 3)
    with pytest.raises(IntegrityError):
        insert(s, cluster, "beta", 3)  # duplicate key on the second shard
    s.rollback()
    assert count(cluster, "alpha") == count(cluster, "beta") == 0
    assert in_doubt(cluster) == []
    assert_pool_clean(cluster)


def test_with_begin_and_savepoints(cluster: dict[str, Engine]) -> None:
    coord = TransactionCoordinator()
    s = session(cluster, coord)
    with s.begin():
        insert(s, cluster, "alpha", 4)
        sp = s.begin_nested()
        insert(s, cluster, "beta", 40)
        sp.rollback()
        sp = s.begin_nested()
        insert(s, cluster, "beta", 4)
        sp.commit()
    assert count(cluster, "alpha", 4) == count(cluster, "beta", 4) == 1
    assert count(cluster, "beta", 40) == 0
    assert_pool_clean(cluster)


def test_single_writer_is_one_phase_without_decision(cluster: dict[str, Engine]) -> None:
    coord = TransactionCoordinator()
    s = session(cluster, coord)
    s.connection(bind_arguments={"bind": cluster["alpha"]}).execute(select(T["alpha"].c.id))
    insert(s, cluster, "beta", 5)
    s.commit()
    assert count(cluster, "beta", 5) == 1
    assert sum(decisions(e) for e in cluster.values()) == 0
    assert in_doubt(cluster) == []
    assert_pool_clean(cluster)


def test_write_after_protocol_raises(cluster: dict[str, Engine]) -> None:
    coord = TransactionCoordinator()
    s = session(cluster, coord)
    insert(s, cluster, "alpha", 6)
    insert(s, cluster, "beta", 6)
    s.commit()
    # a new transaction is fine
    insert(s, cluster, "alpha", 7)
    s.rollback()
    assert count(cluster, "alpha", 7) == 0


def test_text_statements_count_as_writes(cluster: dict[str, Engine]) -> None:
    coord = TransactionCoordinator()
    s = session(cluster, coord)
    s.connection(bind_arguments={"bind": cluster["alpha"]}).execute(
        text("INSERT INTO ss_rows_alpha (id, v) VALUES (8, 't')"))
    insert(s, cluster, "beta", 8)
    s.commit()
    assert sum(decisions(e) for e in cluster.values()) == 1


def test_two_sqlite_writers_require_vs_best_effort(sqlite_dir: Any) -> None:
    engines = {n: create_engine(f"sqlite:///{sqlite_dir / n}.db") for n in ("alpha", "beta")}
    for n, e in engines.items():
        T[n].create(e)
    s = session(engines, TransactionCoordinator(atomic="require"))
    insert(s, engines, "alpha", 1)
    insert(s, engines, "beta", 1)
    with pytest.raises(AtomicityUnavailableError) as ei:
        s.commit()
    assert sorted(ei.value.shard_ids) == ["alpha", "beta"]
    assert count(engines, "alpha") == count(engines, "beta") == 0
    s = session(engines, TransactionCoordinator(atomic="best_effort"))
    insert(s, engines, "alpha", 1)
    insert(s, engines, "beta", 1)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        s.commit()
    assert any(issubclass(x.category, NonAtomicCommitWarning) for x in w)
    assert count(engines, "alpha") == count(engines, "beta") == 1


@pytest.fixture
def three_way(request: pytest.FixtureRequest) -> Iterator[dict[str, Engine]]:
    urls = mix_urls(request, THREE_WAY)
    engines = {n: create_engine(u) for n, u in urls.items()}
    for n, e in engines.items():
        T[n].drop(e, checkfirst=True)
        T[n].create(e)
    yield engines
    for e in engines.values():
        e.dispose()


@pytest.mark.postgresql
@pytest.mark.mysql
def test_three_way_sqlite_decides(three_way: dict[str, Engine]) -> None:
    s = session(three_way, TransactionCoordinator())
    for n in ("gamma", "alpha", "beta"):  # SQLite begins first
        insert(s, three_way, n, 1)
    s.commit()
    assert {n: count(three_way, n, 1) for n in three_way} == dict.fromkeys(three_way, 1)
    assert decisions(three_way["gamma"]) == 1
    assert decisions(three_way["alpha"]) == decisions(three_way["beta"]) == 0
    assert in_doubt(three_way) == []
    assert recover(three_way, grace_period=0).decisions_deleted == 1
    # rollback and savepoints over all three
    s = session(three_way, TransactionCoordinator())
    with s.begin():
        for n in ("gamma", "alpha", "beta"):
            insert(s, three_way, n, 2)
        sp = s.begin_nested()
        for n in ("gamma", "alpha", "beta"):
            insert(s, three_way, n, 20)
        sp.rollback()
    assert {n: count(three_way, n) for n in three_way} == dict.fromkeys(three_way, 2)
    assert_pool_clean(three_way)


@pytest.mark.postgresql
@pytest.mark.mysql
def test_three_way_late_sqlite_writer_decides(three_way: dict[str, Engine]) -> None:
    """The MariaDB branch fixes the decider at its XA START; when the session's shards are
    known, the SQLite shard (it cannot prepare) is named then, before it joins, so a
    SQLite writer that joins later holds the decision (issue 11, item 9; this test used
    to assert the refusal). Without the shards the coordinator cannot know of it: the
    late SQLite writer is still refused, with nothing committed."""
    s = session(three_way, TransactionCoordinator())
    for n in ("alpha", "beta", "gamma"):
        insert(s, three_way, n, 3)
    with pytest.raises(AtomicityUnavailableError):
        s.commit()
    assert {n: count(three_way, n) for n in three_way} == dict.fromkeys(three_way, 0)
    assert in_doubt(three_way) == []
    s = Session()
    names = {e: n for n, e in three_way.items()}
    TransactionCoordinator().install(s, names.__getitem__, shards=three_way)
    for n in ("alpha", "beta", "gamma"):
        insert(s, three_way, n, 3)
    s.commit()
    assert {n: count(three_way, n) for n in three_way} == dict.fromkeys(three_way, 1)
    assert decisions(three_way["gamma"]) == 1
    assert in_doubt(three_way) == []
    assert_pool_clean(three_way)


def test_mariadb_read_committed_holds_the_decision(request: pytest.FixtureRequest) -> None:
    """XA branches need REPEATABLE READ or stricter: a MariaDB shard at READ COMMITTED
    runs without XA (as a plain Session's connection) and cannot prepare, but it can
    hold the decision, so with PostgreSQL the commit is still atomic under "require"
    (before: CapabilityError; two such shards are refused, see test_isolation_levels)."""
    urls = mix_urls(request, "pg+mariadb")
    engines = {"alpha": create_engine(urls["alpha"]),
               "beta": create_engine(urls["beta"], isolation_level="READ COMMITTED")}
    for n, e in engines.items():
        T[n].create(e)
    s = session(engines, TransactionCoordinator())
    insert(s, engines, "beta", 1)
    s.commit()  # one writer: one phase
    s = session(engines, TransactionCoordinator())
    insert(s, engines, "alpha", 2)
    insert(s, engines, "beta", 2)
    s.commit()
    assert count(engines, "alpha") == 1 and count(engines, "beta") == 2
    assert decisions(engines["beta"]) == 1 and decisions(engines["alpha"]) == 0
    assert in_doubt(engines) == []
    assert_pool_clean(engines)
    for e in engines.values():
        e.dispose()


@pytest.mark.postgresql
@pytest.mark.mysql
def test_mariadb_first_shard_runs_without_xa_and_holds_the_decision(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A transaction's first MariaDB shard begins like a plain Session's (no XA START):
    alone it commits one phase; when a PostgreSQL shard joins, it is the decider (the
    decision row is written in its own transaction and its COMMIT is the commit point)."""
    from shardsession.backends.mysql import MySQLAdapter

    urls = mix_urls(request, "pg+mariadb")
    engines = {n: create_engine(u) for n, u in urls.items()}
    for n, e in engines.items():
        T[n].drop(e, checkfirst=True)
        T[n].create(e)
    started: list[str] = []
    real_begin = MySQLAdapter.begin_branch

    def spy(self: MySQLAdapter, dbapi_conn: Any, xid: Any) -> None:
        started.append(xid.bqual)
        real_begin(self, dbapi_conn, xid)

    monkeypatch.setattr(MySQLAdapter, "begin_branch", spy)
    before = decisions(engines["beta"])

    s = session(engines, TransactionCoordinator())
    insert(s, engines, "beta", 30)  # MariaDB alone
    s.commit()
    assert started == [] and count(engines, "beta", 30) == 1
    assert decisions(engines["beta"]) == before

    s = session(engines, TransactionCoordinator())
    insert(s, engines, "beta", 31)  # MariaDB first, then PostgreSQL
    insert(s, engines, "alpha", 31)
    s.commit()
    assert started == []  # the MariaDB branch never entered XA
    assert count(engines, "beta", 31) == 1 and count(engines, "alpha", 31) == 1
    assert decisions(engines["beta"]) == before + 1  # it held the decision
    assert decisions(engines["alpha"]) == 0

    s = session(engines, TransactionCoordinator())
    insert(s, engines, "alpha", 32)  # PostgreSQL first: a later MariaDB branch is XA
    insert(s, engines, "beta", 32)
    s.commit()
    assert len(started) == 1
    assert count(engines, "beta", 32) == 1 and count(engines, "alpha", 32) == 1
    assert in_doubt(engines) == []
    assert_pool_clean(engines)
    for e in engines.values():
        e.dispose()
