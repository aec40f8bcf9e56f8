"""The PostgreSQL adapter under both drivers SQLAlchemy offers for PostgreSQL: psycopg2
(``postgresql+psycopg2://``) and psycopg 3 (``postgresql+psycopg://``, SQLAlchemy 2.1's
default for ``postgresql://``), whatever ``SHARDSESSION_PG_DRIVER`` chose for the rest of the
suite. Real servers; each step of the protocol and of recovery is run through the adapter on
raw DBAPI connections and checked on the server and in the driver's own state."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import IntegrityError

from shardsession.backends import DecisionRow, Outcome, adapter_for
from shardsession.coordinator.decisions import admin_connection
from shardsession.coordinator.xid import Xid, new_cluster_id, new_gtrid

from .conftest import prepared_gids, row_ids

#: libpq's PQTRANS_IDLE / PQTRANS_INTRANS, as both drivers' ``info.transaction_status``
IDLE, INTRANS = 0, 2

pg = adapter_for("postgresql")


@pytest.fixture(params=["psycopg2", "psycopg"])
def engine(request: pytest.FixtureRequest, pg_url_a: str) -> Iterator[Engine]:
    e = create_engine(make_url(pg_url_a).set(drivername=f"postgresql+{request.param}"))
    assert e.dialect.driver == request.param
    with e.begin() as c:
        c.exec_driver_sql("CREATE TABLE t (id int primary key)")
    yield e
    e.dispose()


def _xid(index: int = 1) -> Xid:
    return Xid.branch(new_gtrid("alpha", cluster=new_cluster_id()), index)


def _prepare_row(c: Any, row: int, xid: Xid) -> Any:
    c.execute(text("INSERT INTO t VALUES (:i)"), {"i": row})
    dbapi = c.connection.dbapi_connection
    pg.prepare(dbapi, xid)
    return dbapi


@pytest.mark.parametrize("settle", [True, False], ids=["settled", "unsettled"])
@pytest.mark.parametrize("commit", [True, False], ids=["commit", "rollback"])
def test_prepare_and_finish_on_the_same_connection(engine: Engine, settle: bool,
                                                   commit: bool) -> None:
    xid = _xid()
    with engine.connect() as c:
        dbapi = _prepare_row(c, 1, xid)
        assert prepared_gids(engine) == {xid.gid}
        if settle:
            pg.settle_prepared(dbapi)
        if commit:
            pg.commit_prepared_here(dbapi, xid)
        else:
            pg.rollback_prepared_here(dbapi, xid)
        # nothing left for the pool: idle on the server, back to transactional mode
        assert dbapi.info.transaction_status == IDLE
        assert dbapi.autocommit is False
        c.commit()
    assert prepared_gids(engine) == set()
    assert row_ids(engine) == ({1} if commit else set())


def test_finish_prepared_from_another_connection(engine: Engine) -> None:
    xid = _xid()
    with engine.connect() as c:
        dbapi = _prepare_row(c, 2, xid)
        pg.settle_prepared(dbapi)
        c.commit()
    with admin_connection(engine) as admin:
        listed = pg.list_in_doubt(admin)
        assert [d.raw for d in listed] == [xid.gid]
        assert listed[0].age is not None and listed[0].age >= 0
        assert pg.finish_prepared(admin, xid, commit=True) is True
        # already finished: SQLSTATE 42704, classified as an unknown xid
        assert pg.finish_prepared(admin, xid, commit=True) is False
        assert pg.finish_prepared(admin, xid, commit=False) is False
    assert row_ids(engine) == {2}


def test_decision_table_round_trip(engine: Engine) -> None:
    g1, g2, g3 = (new_gtrid("alpha", cluster=new_cluster_id()) for _ in range(3))
    with admin_connection(engine) as admin:
        assert pg.read_decisions(admin) == []  # no table yet: nothing decided here
        pg.ensure_decision_table(admin)
        pg.ensure_decision_table(admin)
        assert pg.detect(admin).can_prepare
    with engine.connect() as c:
        dbapi = c.connection.dbapi_connection
        # several statements with bound values in one execute (SET LOCAL ...; INSERT)
        pg.insert_decision(dbapi, DecisionRow(g1, Outcome.COMMIT, 1.5, "b001,b002"),
                           lock_timeout=1.0)
        pg.insert_decision(dbapi, DecisionRow(g2, Outcome.ABORT, 2.5, ""))
        pg.insert_decision(dbapi, DecisionRow(g3, Outcome.ABORT, 3.5, ""))
        dbapi.commit()  # the driver's transaction: SQLAlchemy's Connection began none
        assert pg.read_decision(dbapi, g1) == DecisionRow(g1, "C", 1.5, "b001,b002")
        dbapi.rollback()
    with admin_connection(engine) as admin:
        assert {r.gtrid for r in pg.read_decisions(admin)} == {g1, g2, g3}
        assert pg.delete_decisions(admin, [g1, g3, "not-there"]) == 2
        assert [r.gtrid for r in pg.read_decisions(admin)] == [g2]


def test_read_decisions_without_table_in_a_transaction_raises(engine: Engine) -> None:
    with engine.connect() as c:
        dbapi = c.connection.dbapi_connection
        with pytest.raises(Exception) as ei:
            pg.read_decisions(dbapi)  # the error aborted the transaction: not hidden
        assert not pg.is_duplicate_key(ei.value)
        dbapi.rollback()


def test_error_classification(engine: Engine) -> None:
    gtrid = new_gtrid("alpha", cluster=new_cluster_id())
    with admin_connection(engine) as admin:
        pg.ensure_decision_table(admin)
    with engine.connect() as holder, engine.connect() as other:
        held, dbapi = holder.connection.dbapi_connection, other.connection.dbapi_connection
        pg.insert_decision(held, DecisionRow(gtrid, Outcome.COMMIT, time.time(), ""))
        # the holder's row is uncommitted: the claim waits lock_timeout, then 55P03
        with pytest.raises(Exception) as ei:
            pg.insert_decision(dbapi, DecisionRow(gtrid, Outcome.ABORT, time.time(), ""),
                               lock_timeout=0.1)
        assert pg.is_lock_timeout(ei.value)
        assert not pg.is_duplicate_key(ei.value) and not pg.is_unknown_xid(ei.value)
        dbapi.rollback()
        held.commit()
        with pytest.raises(Exception) as ei:
            pg.insert_decision(dbapi, DecisionRow(gtrid, Outcome.ABORT, time.time(), ""))
        assert pg.is_duplicate_key(ei.value) and not pg.is_lock_timeout(ei.value)
        dbapi.rollback()
        # through SQLAlchemy's wrapper too (``.orig``)
        with pytest.raises(IntegrityError) as sa_error:
            other.execute(text("INSERT INTO shardsession_decisions VALUES (:g, 'A', 0, '')"),
                          {"g": gtrid})
        assert pg.is_duplicate_key(sa_error.value)
        other.rollback()
    assert not pg.is_busy(RuntimeError("no SQLSTATE"))


def test_early_begin_only_on_an_idle_transactional_connection(engine: Engine) -> None:
    with engine.connect() as c:
        dbapi = c.connection.dbapi_connection
        run = pg.early_begin(dbapi)
        assert run is not None
        run()
        assert dbapi.info.transaction_status == INTRANS  # the server opened it
        assert pg.early_begin(dbapi) is None  # in a transaction now
        c.execute(text("INSERT INTO t VALUES (3)"))  # runs in the same transaction
        c.rollback()
        assert dbapi.info.transaction_status == IDLE
    assert row_ids(engine) == set()
    with admin_connection(engine) as admin:
        assert pg.early_begin(admin) is None  # autocommit: the driver sends no BEGIN
