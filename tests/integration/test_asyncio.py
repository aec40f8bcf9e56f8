"""asyncio: ``AsyncSession(sync_session_class=ShardedSession)`` over async drivers.

Clusters of aiosqlite, asyncpg, psycopg's async mode and aiomysql shards (real servers):
get, an ordered fan-out and an aggregate, bulk INSERT, an atomic commit across shards
(both branches committed; a failure on one rolls back both) and recovery of planted
in-doubt transactions with :func:`shardsession.coordinator.arecover`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Integer, String, create_engine, event, func, insert, select
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from shardsession import HashSharding, Placement, ShardedSession
from shardsession.backends import DecisionRow, Outcome, adapter_for
from shardsession.coordinator import ain_doubt, arecover, recover
from shardsession.coordinator.decisions import admin_connection
from shardsession.coordinator.identity import ensure_identity
from shardsession.coordinator.xid import Xid, new_gtrid, participants_text
from shardsession.exc import FanoutTimeoutError, NonAtomicCommitWarning, PrepareFailed

from ._2pc_mixes import _drop

pytest.importorskip("greenlet")


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "aio_accounts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))
    balance: Mapped[int] = mapped_column(Integer)


_ASYNC = {"postgresql": "postgresql+asyncpg", "postgresql-psycopg": "postgresql+psycopg_async",
          "mysql": "mysql+aiomysql", "sqlite": "sqlite+aiosqlite"}
_SYNC = {"postgresql": "postgresql+psycopg2", "mysql": "mysql+pymysql", "sqlite": "sqlite"}

#: cluster name -> shard name -> (URL source, async driver key)
CLUSTERS = {
    "sqlite": {"s0": ("sqlite", "sqlite"), "s1": ("sqlite", "sqlite")},
    "asyncpg": {"s0": ("pg_url_a", "postgresql"), "s1": ("pg_url_b", "postgresql")},
    "psycopg_async": {"s0": ("pg_url_a", "postgresql-psycopg"),
                      "s1": ("pg_url_b", "postgresql-psycopg")},
    "asyncpg+aiomysql": {"s0": ("pg_url_a", "postgresql"), "s1": ("mariadb_url", "mysql")},
    "aiosqlite+asyncpg+aiomysql": {"s0": ("sqlite", "sqlite"), "s1": ("pg_url_a", "postgresql"),
                                   "s2": ("mariadb_url", "mysql")},
}
ATOMIC = [c for c in CLUSTERS if c != "sqlite"]
#: three PostgreSQL shards for the phase timing (two of them prepare)
THREE_PG = {"s0": ("pg_url_a", "postgresql"), "s1": ("pg_url_b", "postgresql"),
            "s2": ("pg_extra", "postgresql")}


class Cluster:
    def __init__(self, sync: dict[str, Engine], aio: dict[str, AsyncEngine]) -> None:
        self.sync = sync
        self.aio = aio

    def maker(self, **kw: Any) -> async_sessionmaker[Any]:
        if all(e.dialect.name == "sqlite" for e in self.sync.values()):
            kw.setdefault("atomic", "best_effort")  # two SQLite files cannot be atomic
        return async_sessionmaker(
            sync_session_class=ShardedSession, shards=self.aio, expire_on_commit=False,
            placement=Placement({Account: HashSharding(Account.id)}), **kw)

    async def dispose(self) -> None:
        """Close the pooled connections while their event loop runs (each test runs
        one loop: asyncio drivers' connections belong to the loop that opened them)."""
        for ae in self.aio.values():
            await ae.dispose()

    def ids(self, shard: str) -> set[int]:
        with self.sync[shard].connect() as c:
            return {r[0] for r in c.execute(select(Account.id))}

    def all_ids(self) -> set[int]:
        return set().union(*(self.ids(s) for s in self.sync))


def _urls(request: pytest.FixtureRequest, name: str, tmp_path: Any) -> dict[str, tuple[str, str]]:
    out = {}
    for shard, (source, driver) in (THREE_PG if name == "three_pg" else CLUSTERS[name]).items():
        if source == "sqlite":
            url = f"sqlite:///{tmp_path / (shard + '.db')}"
        elif source == "pg_extra":  # a second database on pg_server_a
            server: Any = request.getfixturevalue("pg_server_a")
            url = server.create_database()
            request.addfinalizer(functools.partial(_drop, server, url))
        else:
            url = request.getfixturevalue(source)
        base = make_url(url)
        out[shard] = (
            base.set(drivername=_SYNC[base.get_backend_name()]).render_as_string(False),
            base.set(drivername=_ASYNC[driver]).render_as_string(False),
        )
    return out


def _build(request: pytest.FixtureRequest, name: str, tmp_path: Any) -> Iterator[Cluster]:
    urls = _urls(request, name, tmp_path)
    sync = {s: create_engine(u) for s, (u, _) in urls.items()}
    aio = {s: create_async_engine(a) for s, (_, a) in urls.items()}
    for e in sync.values():
        Base.metadata.drop_all(e)
        Base.metadata.create_all(e)
    try:
        yield Cluster(sync, aio)
    finally:
        for e in sync.values():
            e.dispose()


@pytest.fixture(params=list(CLUSTERS))
def cluster(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Cluster]:
    yield from _build(request, request.param, tmp_path)


@pytest.fixture(params=ATOMIC)
def atomic_cluster(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Cluster]:
    yield from _build(request, request.param, tmp_path)


def _spread(n: int, shards: int) -> list[int]:
    """``n`` ids per shard under HashSharding over ``shards`` shards."""
    placement = Placement({Account: HashSharding(Account.id)})
    names = [f"s{i}" for i in range(shards)]
    placement.bind(names)
    seen: dict[str, list[int]] = {s: [] for s in names}
    i = 0
    while any(len(v) < n for v in seen.values()):
        i += 1
        shard = placement.shards_for_identity(Account.__mapper__, (i,))[0]
        if len(seen[shard]) < n:
            seen[shard].append(i)
    return [x for name in names for x in seen[name]]  # s0's first: see _s0_first


def _s0_first(ids: list[int], shards: int) -> list[int]:
    """``ids`` with those placed on s0 first. A flush's first-written shard begins
    before the transaction is known to span shards, so a MariaDB shard written first
    runs without XA (it can only decide); where s0 is the SQLite shard, which can only
    decide too, the flush must write it first for the commit to be atomic."""
    placement = Placement({Account: HashSharding(Account.id)})
    placement.bind([f"s{i}" for i in range(shards)])
    return sorted(ids, key=lambda i: placement.shards_for_identity(Account.__mapper__, (i,))[0])


def test_get_fanout_aggregate_and_bulk(cluster: Cluster) -> None:
    async def main() -> None:
        maker = cluster.maker()
        async with maker() as s:
            s.add_all([Account(id=i, name=f"n{i}", balance=i * 10)
                       for i in _s0_first(list(range(1, 21)), len(cluster.sync))])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NonAtomicCommitWarning)
                await s.commit()
        assert len({s for s in cluster.sync if cluster.ids(s)}) == len(cluster.sync)
        async with maker() as s:
            got = await s.get(Account, 7)
            assert got is not None and got.name == "n7"
            top = (await s.scalars(
                select(Account).order_by(Account.balance.desc()).limit(5))).all()
            assert [a.id for a in top] == [20, 19, 18, 17, 16]
            total = (await s.execute(select(func.count(), func.sum(Account.balance)))).one()
            assert tuple(total) == (20, sum(i * 10 for i in range(1, 21)))
        async with maker() as s:
            await s.execute(insert(Account), [
                {"id": i, "name": f"b{i}", "balance": 1}
                for i in _s0_first(list(range(100, 110)), len(cluster.sync))])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NonAtomicCommitWarning)
                await s.commit()
        assert cluster.all_ids() == set(range(1, 21)) | set(range(100, 110))
        await cluster.dispose()

    asyncio.run(main())


@pytest.mark.parametrize("name", ["asyncpg", "psycopg_async"])
def test_fanout_overlaps_shards(request: pytest.FixtureRequest, tmp_path: Any, name: str) -> None:
    """The shards' waits overlap on the event loop: two shards each sleeping 0.4 s in one
    fan-out take about 0.4 s, not 0.8 s (one after another, as before)."""
    cluster = next(_build(request, name, tmp_path))
    ids = _spread(1, 2)
    for e in cluster.sync.values():
        with e.begin() as c:
            c.exec_driver_sql("CREATE FUNCTION aio_slow() RETURNS int LANGUAGE sql "
                              "AS 'SELECT 1 FROM pg_sleep(0.4)'")

    async def main() -> tuple[float, float]:
        async with cluster.maker()() as s:
            s.add_all([Account(id=i, name="x", balance=1) for i in ids])
            await s.commit()
            slow = select(Account.id).where(func.aio_slow() == 1)
            started = time.monotonic()
            for shard in cluster.sync:  # the same statement, shard after shard
                await s.execute(slow, bind_arguments={"shard_id": shard})
            serial = time.monotonic() - started
            started = time.monotonic()
            got = (await s.scalars(slow.order_by(Account.id))).all()
            fanned = time.monotonic() - started
            assert got == sorted(ids)
        await cluster.dispose()
        return serial, fanned

    serial, fanned = asyncio.run(main())
    assert serial >= 0.75
    assert fanned < 0.65, (serial, fanned)


def _record(seen: list[Any], name: str, *args: Any) -> None:
    seen.append((name, *args))


def test_atomic_commit_both_branches(atomic_cluster: Cluster) -> None:
    ids = _spread(1, len(atomic_cluster.sync))

    async def main() -> None:
        try:
            async with atomic_cluster.maker(atomic="require")() as s:
                # the protocol's events, listened for on the AsyncSession itself
                for name in ("shardsession_after_prepare", "shardsession_after_decision"):
                    event.listen(s, name, functools.partial(_record, seen, name))
                s.add_all([Account(id=i, name="x", balance=1) for i in ids])
                await s.commit()
            assert await ain_doubt(atomic_cluster.aio) == []
        finally:
            await atomic_cluster.dispose()

    seen: list[Any] = []
    asyncio.run(main())
    assert atomic_cluster.all_ids() == set(ids)
    for shard in atomic_cluster.sync:
        assert len(atomic_cluster.ids(shard)) == 1
    assert [x[0] for x in seen] == ["shardsession_after_prepare", "shardsession_after_decision"]
    assert seen[1][3] == "commit"


def _failing_trigger(engine: Engine) -> None:
    """A deferred constraint trigger on PostgreSQL: a row named 'boom' fails at PREPARE
    (or at COMMIT when this shard decides), after every statement succeeded."""
    with engine.begin() as c:
        c.exec_driver_sql(
            "CREATE FUNCTION aio_boom() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "IF NEW.name = 'boom' THEN RAISE EXCEPTION 'boom refused'; END IF; "
            "RETURN NEW; END $$")
        c.exec_driver_sql(
            "CREATE CONSTRAINT TRIGGER aio_boom AFTER INSERT ON aio_accounts "
            "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION aio_boom()")


def test_failure_on_one_shard_rolls_back_all(atomic_cluster: Cluster) -> None:
    shards = list(atomic_cluster.sync)
    pg = next(s for s in shards if atomic_cluster.sync[s].dialect.name == "postgresql")
    _failing_trigger(atomic_cluster.sync[pg])
    ids = _spread(1, len(shards))
    placement = Placement({Account: HashSharding(Account.id)})
    placement.bind(shards)

    async def main() -> None:
        try:
            async with atomic_cluster.maker(atomic="require")() as s:
                for i in ids:
                    shard = placement.shards_for_identity(Account.__mapper__, (i,))[0]
                    s.add(Account(id=i, name="boom" if shard == pg else "ok", balance=1))
                with pytest.raises((PrepareFailed, DBAPIError)) as info:
                    await s.commit()
                await s.rollback()
            err = info.value
            assert "boom refused" in f"{err} {err.__cause__}"
            assert atomic_cluster.all_ids() == set()
            assert await ain_doubt(atomic_cluster.aio) == []
            # the pool's connections are clean: a good commit works on them
            async with atomic_cluster.maker(atomic="require")() as s:
                s.add_all([Account(id=i, name="ok", balance=1) for i in ids])
                await s.commit()
        finally:
            await atomic_cluster.dispose()

    asyncio.run(main())
    assert atomic_cluster.all_ids() == set(ids)


@pytest.mark.parametrize("name", ["asyncpg", "psycopg_async"])
def test_a_caught_error_on_an_async_postgresql_branch_refuses_the_commit(
    request: pytest.FixtureRequest, tmp_path: Any, name: str,
) -> None:
    """The application catches an IntegrityError on s1 and commits: PostgreSQL aborted
    s1's transaction, and would answer its PREPARE with ROLLBACK, which the asyncio
    facades do not report. The commit must fail before any decision, nothing committed
    (before, under asyncpg: s0 committed, s1's rows lost, commit() returned)."""
    from sqlalchemy.exc import IntegrityError

    cluster = next(_build(request, name, tmp_path))
    ids = _spread(2, 2)
    placement = Placement({Account: HashSharding(Account.id)})
    placement.bind(["s0", "s1"])
    on_s1 = [i for i in ids if placement.shards_for_identity(Account.__mapper__, (i,))[0] == "s1"]
    with cluster.sync["s1"].begin() as c:
        c.execute(Account.__table__.insert().values(id=on_s1[1], name="there", balance=0))

    async def main() -> None:
        try:
            maker = cluster.maker()
            async with maker() as s:  # (the engines' capabilities are known from here)
                s.add_all([Account(id=1000 + i, name="w", balance=1) for i in ids])
                await s.commit()
            async with maker() as s:
                await s.execute(Account.__table__.delete().where(Account.id >= 1000),
                                bind_arguments={"shard_id": "s0"})
                await s.execute(Account.__table__.delete().where(Account.id >= 1000),
                                bind_arguments={"shard_id": "s1"})
                await s.commit()
            async with maker() as s:
                s.add_all([Account(id=i, name="x", balance=1) for i in ids if i != on_s1[1]])
                await s.flush()
                conn = await s.connection(bind_arguments={"shard_id": "s1"})
                with pytest.raises(IntegrityError):
                    await conn.execute(Account.__table__.insert().values(
                        id=on_s1[1], name="dup", balance=1))
                with pytest.raises(PrepareFailed) as info:
                    await s.commit()
                assert info.value.failed_shards == ["s1"]
                assert "aborted" in str(info.value)
                await s.rollback()
            assert await ain_doubt(cluster.aio) == []
        finally:
            await cluster.dispose()

    asyncio.run(main())
    assert cluster.all_ids() == {on_s1[1]}


@pytest.fixture
def planted(pg_url_a: str, pg_url_b: str, mariadb_url: str) -> Iterator[dict[str, str]]:
    urls = {"alpha": pg_url_a, "beta": pg_url_b, "gamma": mariadb_url}
    for u in urls.values():
        e = create_engine(u)
        with e.begin() as c:
            c.exec_driver_sql("CREATE TABLE t (id int primary key)")
        e.dispose()
    yield urls


def _plant_pg(url: str, gid: str, row: int) -> None:
    from harness.servers import client_cursor

    e = create_engine(url)
    raw: Any = e.raw_connection()
    try:
        cur = client_cursor(raw.dbapi_connection)
        cur.execute("INSERT INTO t VALUES (%s)", (row,))
        cur.execute("PREPARE TRANSACTION %s", (gid,))
        raw.commit()
    finally:
        raw.close()
        e.dispose()


def _plant_xa(url: str, xid: Xid, row: int) -> None:
    e = create_engine(url)
    raw: Any = e.raw_connection()
    cur = raw.dbapi_connection.cursor()
    cur.execute(f"XA START {xid.xa_literal}")
    cur.execute("INSERT INTO t VALUES (%s)", (row,))
    cur.execute(f"XA END {xid.xa_literal}")
    cur.execute(f"XA PREPARE {xid.xa_literal}")
    raw.invalidate()  # a prepared XA branch survives its connection
    e.dispose()


def _rows(url: str) -> set[int]:
    e = create_engine(url)
    try:
        with e.connect() as c:
            return {r[0] for r in c.exec_driver_sql("SELECT id FROM t")}
    finally:
        e.dispose()


def test_arecover_planted(planted: dict[str, str]) -> None:
    """A committed gtrid (decision row on alpha) with branches prepared on beta (asyncpg)
    and gamma (aiomysql) is committed; an undecided one is rolled back."""
    old = time.time() - 3600
    e = create_engine(planted["alpha"])
    adapter = adapter_for("postgresql")
    cluster = ensure_identity(adapter, e)[0]  # the decider's identity, as a commit stores it
    g_commit = new_gtrid("alpha", cluster=cluster, now=old)
    g_orphan = new_gtrid("alpha", cluster=cluster, now=old)
    _plant_pg(planted["beta"], Xid.branch(g_commit, 1).gid, 1)
    _plant_xa(planted["gamma"], Xid.branch(g_commit, 2), 2)
    _plant_pg(planted["beta"], Xid.branch(g_orphan, 1).gid, 3)
    _plant_xa(planted["gamma"], Xid.branch(g_orphan, 2), 4)
    where = {}  # where each branch was prepared, as a commit records it
    for n in ("beta", "gamma"):
        pe = create_engine(planted[n])
        with admin_connection(pe) as dbapi:
            where[n] = adapter_for(pe.dialect.name).location(dbapi)
        pe.dispose()
    participants = participants_text([(Xid.branch(g_commit, 1), "beta"),
                                      (Xid.branch(g_commit, 2), "gamma")], where)
    with e.begin() as c:
        dbapi = c.connection.dbapi_connection
        adapter.ensure_decision_table(dbapi)
        adapter.insert_decision(dbapi, DecisionRow(g_commit, Outcome.COMMIT, old, participants))
    e.dispose()

    async def main() -> Any:
        aio = {n: create_async_engine(make_url(u).set(
            drivername=_ASYNC[make_url(u).get_backend_name()]))
            for n, u in planted.items()}
        try:
            before = await ain_doubt(aio)
            report = await arecover(aio, grace_period=0)
            after = await ain_doubt(aio)
            return before, report, after
        finally:
            for ae in aio.values():
                await ae.dispose()

    before, report, after = asyncio.run(main())
    assert len(before) == 4
    assert not report.errors, report.errors
    assert report.resolved
    assert sorted((b.shard, b.gtrid) for b in report.committed) == [
        ("beta", g_commit), ("gamma", g_commit)]
    assert sorted((b.shard, b.gtrid) for b in report.rolled_back) == [
        ("beta", g_orphan), ("gamma", g_orphan)]
    assert after == []
    assert _rows(planted["beta"]) == {1}
    assert _rows(planted["gamma"]) == {2}


def test_fanout_deadline(request: pytest.FixtureRequest, tmp_path: Any) -> None:
    """Past ``fanout_timeout`` the shards' statements are cancelled on the event loop,
    ``FanoutTimeoutError`` names them, and the session rolls back and goes on."""
    cluster = next(_build(request, "asyncpg", tmp_path))
    for e in cluster.sync.values():
        with e.begin() as c:
            c.exec_driver_sql("CREATE FUNCTION aio_slow() RETURNS int LANGUAGE sql "
                              "AS 'SELECT 1 FROM pg_sleep(2)'")

    async def main() -> None:
        try:
            async with cluster.maker(fanout_timeout=0.3)() as s:
                s.add_all([Account(id=i, name="x", balance=1) for i in _spread(1, 2)])
                await s.commit()
                started = time.monotonic()
                with pytest.raises(FanoutTimeoutError) as info:
                    await s.execute(select(Account.id).where(func.aio_slow() == 1))
                assert time.monotonic() - started < 1.5
                assert sorted(info.value.pending_shards) == ["s0", "s1"]
                await s.rollback()
                assert (await s.execute(select(func.count(Account.id)))).scalar() == 2
        finally:
            await cluster.dispose()

    asyncio.run(main())


def test_prepare_phase_overlaps(request: pytest.FixtureRequest, tmp_path: Any) -> None:
    """Phase one under asyncio: the two branches that prepare each take 0.4 s at PREPARE
    (a deferred trigger sleeps), and the phase, timed by the protocol's own events, takes
    about 0.4 s: the PREPAREs overlap on the event loop (one after another: 0.8 s)."""
    cluster = next(_build(request, "three_pg", tmp_path))
    for e in cluster.sync.values():
        with e.begin() as c:
            c.exec_driver_sql(
                "CREATE FUNCTION aio_slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$ "
                "BEGIN PERFORM pg_sleep(0.4); RETURN NEW; END $$")
            c.exec_driver_sql(
                "CREATE CONSTRAINT TRIGGER aio_slow_commit AFTER INSERT ON aio_accounts "
                "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION aio_slow_commit()")
    ids = _spread(1, 3)
    marks: dict[str, float] = {}
    prepared: list[Any] = []

    def before(session: Any, gtrid: str, shard_ids: Any, decider: Any) -> None:
        marks["before"] = time.monotonic()
        prepared.extend(shard_ids)

    def after(session: Any, gtrid: str, shard_ids: Any, failed: Any) -> None:
        marks["after"] = time.monotonic()

    async def main() -> None:
        try:
            async with cluster.maker(atomic="require")() as s:
                event.listen(s, "shardsession_before_prepare", before)
                event.listen(s, "shardsession_after_prepare", after)
                s.add_all([Account(id=i, name="x", balance=1) for i in ids])
                await s.commit()
        finally:
            await cluster.dispose()

    asyncio.run(main())
    assert cluster.all_ids() == set(ids)
    assert len(prepared) == 2
    phase_one = marks["after"] - marks["before"]
    assert 0.38 <= phase_one < 0.7, phase_one


@pytest.mark.parametrize("name", ["sqlite", "aiosqlite+asyncpg+aiomysql"])
def test_failed_bulk_statement_leaves_nothing_on_aiosqlite(
    request: pytest.FixtureRequest, tmp_path: Any, name: str
) -> None:
    """A bulk INSERT that is an aiosqlite shard's first write and fails on another shard
    leaves nothing of itself on any shard: the driver's BEGIN, then a SAVEPOINT, on the
    aiosqlite shard too (it took none before: the rows before and after the failing one
    stayed, and a caller that caught the error and committed committed them)."""
    cluster = next(_build(request, name, tmp_path))
    n = len(cluster.sync)
    ids = _spread(4, n)
    placement = Placement({Account: HashSharding(Account.id)})
    placement.bind([f"s{i}" for i in range(n)])
    on_s1 = next(i for i in ids if placement.shards_for_identity(Account.__mapper__, (i,))[0]
                 == "s1")
    with cluster.sync["s1"].begin() as c:
        c.execute(insert(Account), [{"id": on_s1, "name": "first", "balance": 0}])

    async def main() -> None:
        async with cluster.maker()() as s:
            rows = [{"id": i, "name": "b", "balance": 1} for i in ids]  # on_s1 again
            with pytest.raises(DBAPIError):
                await s.execute(insert(Account), rows)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NonAtomicCommitWarning)
                await s.commit()
        await cluster.dispose()

    asyncio.run(main())
    assert cluster.all_ids() == {on_s1}


def test_cancelled_while_the_decision_commits_stays_cancelled(
    planted: dict[str, str],
) -> None:
    """asyncio.wait_for times out while the PostgreSQL decider's COMMIT runs (a deferred
    constraint trigger makes it take 2 s): the caller gets wait_for's TimeoutError (the
    cancellation propagates, asyncio's convention), with the OutcomeUnknown it replaces
    as the CancelledError's cause; recovery then settles all-or-nothing (attack 11b Q)."""
    from shardsession.exc import OutcomeUnknown

    e = create_engine(planted["alpha"])
    with e.begin() as c:
        c.exec_driver_sql("CREATE FUNCTION slow_t() RETURNS trigger LANGUAGE plpgsql AS "
                          "$$ BEGIN PERFORM pg_sleep(2); RETURN NULL; END $$")
        c.exec_driver_sql("CREATE CONSTRAINT TRIGGER slow_t AFTER INSERT ON t DEFERRABLE "
                          "INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_t()")
    e.dispose()
    urls = {n: planted[n] for n in ("alpha", "gamma")}

    async def main() -> BaseException | None:
        from sqlalchemy.ext.asyncio import AsyncSession

        aio = {n: create_async_engine(make_url(u).set(
            drivername=_ASYNC[make_url(u).get_backend_name()])) for n, u in urls.items()}
        s = AsyncSession(sync_session_class=ShardedSession, shards=aio,
                         placement=Placement({}), atomic="require")
        try:
            for n in ("alpha", "gamma"):
                await (await s.connection(bind_arguments={"shard_id": n})).execute(
                    insert_t, {"id": 1})
            try:
                await asyncio.wait_for(s.commit(), 1.0)
            except BaseException as err:
                return err
            return None
        finally:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(s.close(), 10)
            for ae in aio.values():
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(ae.dispose(), 10)

    from sqlalchemy import text as _text

    insert_t = _text("INSERT INTO t VALUES (:id)")
    err = asyncio.run(main())
    assert isinstance(err, TimeoutError), repr(err)
    assert isinstance(err.__cause__, asyncio.CancelledError), repr(err.__cause__)
    assert isinstance(err.__cause__.__cause__, OutcomeUnknown), repr(err.__cause__.__cause__)
    time.sleep(2.5)  # the decider's COMMIT finishes server-side (or not)
    sync = {n: create_engine(u) for n, u in urls.items()}
    try:
        report = recover(sync, grace_period=0)
        assert not report.errors, report.errors
        assert {n: _rows(u) for n, u in urls.items()} in (
            {"alpha": {1}, "gamma": {1}}, {"alpha": set(), "gamma": set()})
    finally:
        for se in sync.values():
            se.dispose()
