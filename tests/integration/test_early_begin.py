"""Early BEGIN: a flush writing several idle PostgreSQL shards opens their transactions in
parallel (shardsession.coordinator.early). Real servers; what is checked is the outcome on
every shard, the state of pooled connections afterwards, and which shards got one.

Driver-aware: the PostgreSQL engines use the harness's driver (``SHARDSESSION_PG_DRIVER``:
psycopg2 or psycopg 3). Both send BEGIN as a round trip of its own and both get early
BEGINs; transaction states are read through ``connection.info.transaction_status`` (libpq's
status as the server last reported it), which both drivers have.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Integer, String, create_engine, event, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from shardsession import Pinned, Placement, ShardedSession
from shardsession.coordinator import TransactionCoordinator, early, in_doubt

#: libpq's PQTRANS_IDLE / PQTRANS_INTRANS (psycopg2 TRANSACTION_STATUS_*, psycopg 3
#: pq.TransactionStatus)
PQTRANS_IDLE = 0
PQTRANS_INTRANS = 2


class _Base(DeclarativeBase):
    pass


class A(_Base):
    __tablename__ = "early_a"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    v: Mapped[str] = mapped_column(String(20))


class B(_Base):
    __tablename__ = "early_b"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    v: Mapped[str] = mapped_column(String(20))


class C(_Base):
    __tablename__ = "early_c"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    v: Mapped[str] = mapped_column(String(20))


PLACED = {A: "a", B: "b", C: "c"}


@pytest.fixture
def engines(request: pytest.FixtureRequest, pg_url_a: str, pg_url_b: str,
            pg_server_a: Any) -> Iterator[dict[str, Engine]]:
    third = pg_server_a.create_database()
    urls = {"a": pg_url_a, "b": pg_url_b, "c": third}
    extra: str | None = None
    if getattr(request, "param", None) == "mariadb":
        urls["c"] = request.getfixturevalue("mariadb_url")
    if getattr(request, "param", None) == "two_mariadb":
        server = request.getfixturevalue("mariadb_server")
        urls["b"] = request.getfixturevalue("mariadb_url")
        urls["c"] = extra = server.create_database()
    out = {n: create_engine(u) for n, u in urls.items()}
    for e in out.values():
        _Base.metadata.create_all(e)
    yield out
    for e in out.values():
        e.dispose()
    pg_server_a.drop_database(third.rsplit("/", 1)[1])
    if extra is not None:
        request.getfixturevalue("mariadb_server").drop_database(extra.rsplit("/", 1)[1])


#: without the deadlock detector's branch labels, whose jobs would count among the early
#: BEGINs (a label job makes a branch's early BEGIN; test_distributed_deadlock checks them)
_COORDINATOR = TransactionCoordinator(label_branches=False)


def _session(engines: dict[str, Engine], seen: list[int]) -> ShardedSession:
    s = ShardedSession(shards=engines, coordinator=_COORDINATOR,
                       placement=Placement({cls: Pinned(n) for cls, n in PLACED.items()}))

    @event.listens_for(s, "before_flush")
    def _count(session: Any, ctx: Any, objs: Any) -> None:
        # instance listeners run after shardsession's class-level one
        seen.append(len(session._early))

    return s


def _rows(engines: dict[str, Engine]) -> dict[str, int]:
    out = {}
    for (cls, name) in PLACED.items():
        with engines[name].connect() as c:
            out[name] = int(c.scalar(select(func.count()).select_from(cls.__table__)) or 0)
    return out


def _assert_pool_idle(engines: dict[str, Engine]) -> None:
    """Every connection the pool holds is outside any transaction on the server."""
    for e in engines.values():
        if e.dialect.name != "postgresql":
            continue
        for _ in range(e.pool.checkedin()):
            raw = e.raw_connection()
            try:
                assert raw.dbapi_connection.info.transaction_status == PQTRANS_IDLE
                cur = raw.cursor()
                cur.execute("SELECT count(*) FROM pg_prepared_xacts")
                cur.close()
                raw.rollback()
            finally:
                raw.close()


def test_flush_over_three_shards_begins_two_early_and_commits(engines: dict[str, Engine]) -> None:
    seen: list[int] = []
    s = _session(engines, seen)
    s.add_all([A(id=1, v="a"), B(id=1, v="b"), C(id=1, v="c")])
    s.commit()
    s.close()
    assert seen == [2]  # the first shard's BEGIN is left to the flush's first INSERT
    assert _rows(engines) == {"a": 1, "b": 1, "c": 1}
    assert in_doubt(engines) == []
    _assert_pool_idle(engines)


def test_early_begin_opens_the_server_transaction_before_the_flush(
        engines: dict[str, Engine]) -> None:
    """Once the early BEGINs are joined, before any flush statement, the server reports a
    transaction open on the shards that got one (b and c) and none on the first (a); the
    flush's rows then live in that transaction (a rollback removes them)."""
    states: dict[str, int] = {}
    s = _session(engines, [])

    @event.listens_for(s, "before_flush")
    def _states(session: Any, ctx: Any, objs: Any) -> None:
        early.join(list(session._early))  # a copy: the session still joins its own list
        for name in PLACED.values():
            conn = session.connection(bind_arguments={"shard_id": name})
            states[name] = conn.connection.dbapi_connection.info.transaction_status

    s.add_all([A(id=8, v="a"), B(id=8, v="b"), C(id=8, v="c")])
    s.flush()
    assert states == {"a": PQTRANS_IDLE, "b": PQTRANS_INTRANS, "c": PQTRANS_INTRANS}
    s.rollback()
    s.close()
    assert _rows(engines) == {"a": 0, "b": 0, "c": 0}
    _assert_pool_idle(engines)


def test_repeated_flushes_share_connections_with_early_begins(
        engines: dict[str, Engine]) -> None:
    """Many multi-shard flushes in a row, committed and rolled back in turn: each flush's
    statements meet an early BEGIN that may still be running on another thread, and every
    outcome is exact."""
    for i in range(20):
        seen: list[int] = []
        s = _session(engines, seen)
        s.add_all([A(id=100 + i, v="a"), B(id=100 + i, v="b"), C(id=100 + i, v="c")])
        if i % 2:
            s.flush()
            s.rollback()
        else:
            s.commit()
        s.close()
        assert seen == [2]
    assert _rows(engines) == {"a": 10, "b": 10, "c": 10}
    assert in_doubt(engines) == []
    _assert_pool_idle(engines)


def test_failed_flush_after_early_begin_leaves_nothing(engines: dict[str, Engine]) -> None:
    with engines["c"].begin() as c:
        c.execute(C.__table__.insert().values(id=7, v="taken"))
    seen: list[int] = []
    s = _session(engines, seen)
    s.add_all([A(id=7, v="a"), B(id=7, v="b"), C(id=7, v="c")])  # C 7 exists: the flush fails
    with pytest.raises(IntegrityError):
        s.commit()
    s.rollback()
    s.close()
    assert seen == [2]
    assert _rows(engines) == {"a": 0, "b": 0, "c": 1}
    _assert_pool_idle(engines)


def test_rollback_after_flush_leaves_nothing(engines: dict[str, Engine]) -> None:
    seen: list[int] = []
    s = _session(engines, seen)
    s.add_all([A(id=2, v="a"), B(id=2, v="b"), C(id=2, v="c")])
    s.flush()
    assert s.get(B, 2) is not None
    s.rollback()
    s.close()
    assert _rows(engines) == {"a": 0, "b": 0, "c": 0}
    _assert_pool_idle(engines)


def test_shard_already_in_a_transaction_gets_no_early_begin(engines: dict[str, Engine]) -> None:
    seen: list[int] = []
    s = _session(engines, seen)
    assert s.get(C, 99) is None  # shard c's transaction is open now
    s.add_all([A(id=3, v="a"), B(id=3, v="b"), C(id=3, v="c")])
    s.commit()
    s.close()
    assert seen == [1]  # only b: a is the flush's first, c was already begun
    assert _rows(engines) == {"a": 1, "b": 1, "c": 1}
    _assert_pool_idle(engines)


def test_several_flushes_in_one_transaction(engines: dict[str, Engine]) -> None:
    seen: list[int] = []
    s = _session(engines, seen)
    s.add_all([A(id=4, v="a"), B(id=4, v="b")])
    s.flush()
    s.add_all([A(id=5, v="a"), B(id=5, v="b"), C(id=5, v="c")])
    s.commit()
    s.close()
    assert seen == [1, 1]  # second flush: a and b are begun already, c gets one
    assert _rows(engines) == {"a": 2, "b": 2, "c": 1}
    _assert_pool_idle(engines)


@pytest.mark.parametrize("engines", ["mariadb"], indirect=True)
def test_mariadb_shard_gets_no_early_begin(engines: dict[str, Engine]) -> None:
    seen: list[int] = []
    s = _session(engines, seen)
    s.add_all([A(id=6, v="a"), B(id=6, v="b"), C(id=6, v="c")])
    s.commit()
    s.close()
    assert seen == [1]  # b (PostgreSQL) only: PyMySQL connections stay on one thread
    assert _rows(engines) == {"a": 1, "b": 1, "c": 1}
    assert in_doubt(engines) == []


@pytest.mark.parametrize("engines", ["two_mariadb"], indirect=True)
def test_two_mariadb_shards_start_their_xa_branches_together(
        engines: dict[str, Engine]) -> None:
    """b and c are MariaDB: their XA STARTs are sent together before the flush. The
    commit prepares them (XA PREPARE needs an XA START first), so a successful atomic
    commit shows they started; a failed flush and a rollback leave nothing behind."""
    seen: list[int] = []
    s = _session(engines, seen)
    s.add_all([A(id=8, v="a"), B(id=8, v="b"), C(id=8, v="c")])
    s.commit()
    s.close()
    assert _rows(engines) == {"a": 1, "b": 1, "c": 1}
    assert in_doubt(engines) == []
    with engines["c"].begin() as c:
        c.execute(C.__table__.insert().values(id=9, v="taken"))
    s = _session(engines, seen)
    s.add_all([A(id=9, v="a"), B(id=9, v="b"), C(id=9, v="c")])
    with pytest.raises(IntegrityError):
        s.commit()
    s.rollback()
    s.add_all([A(id=10, v="a"), B(id=10, v="b"), C(id=10, v="c")])
    s.flush()
    s.rollback()
    s.close()
    assert _rows(engines) == {"a": 1, "b": 1, "c": 2}
    assert in_doubt(engines) == []
    for e in engines.values():  # pooled MariaDB connections hold no XA state
        if e.dialect.name == "mysql":
            with e.connect() as c:
                c.exec_driver_sql("XA START 'ss-check'")
                c.exec_driver_sql("XA END 'ss-check'")
                c.exec_driver_sql("XA ROLLBACK 'ss-check'")
