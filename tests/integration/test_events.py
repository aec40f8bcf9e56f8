"""Events of the commit protocol, recovery and the fan-out (``shardsession_*``), next to
SQLAlchemy's session events, on a real two-phase commit over PostgreSQL + MariaDB."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Integer, String, create_engine, event, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from shardsession import HashSharding, Placement, PrepareFailed, ShardedSession
from shardsession.backends import adapter_for
from shardsession.coordinator import recover
from shardsession.coordinator.identity import ensure_identity
from shardsession.coordinator.xid import Xid, new_gtrid, parse_gid


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "ev_items"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))


SHARDS = ("pg", "maria")


@pytest.fixture
def engines(pg_url_a: str, mariadb_url: str) -> Iterator[dict[str, Engine]]:
    out = {"pg": create_engine(pg_url_a), "maria": create_engine(mariadb_url)}
    for e in out.values():
        Base.metadata.create_all(e)
    yield out
    for e in out.values():
        e.dispose()


def _placement() -> Placement:
    return Placement({Item: HashSharding(Item.id)})


def _ids() -> dict[str, int]:
    """One id per shard, in SHARDS order."""
    p = _placement()
    p.bind(list(SHARDS))
    out: dict[str, int] = {}
    i = 0
    while len(out) < len(SHARDS):
        i += 1
        out.setdefault(p.shards_for_identity(Item.__mapper__, (i,))[0], i)
    return out


class Recorder:
    """Records every shardsession_* event and SQLAlchemy's commit events of a target."""

    NAMES = ("shardsession_before_prepare", "shardsession_after_prepare",
             "shardsession_after_decision", "shardsession_fanout_started",
             "shardsession_fanout_finished")

    def __init__(self, target: Any) -> None:
        self.target = target
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self._fns: list[tuple[str, Any]] = []
        for name in (*self.NAMES, "before_commit", "after_commit"):
            fn = self._recorder(name)
            event.listen(target, name, fn)
            self._fns.append((name, fn))

    def _recorder(self, name: str) -> Any:
        def fn(*args: Any) -> None:
            self.calls.append((name, args))
        return fn

    def of(self, name: str) -> list[tuple[Any, ...]]:
        return [a for n, a in self.calls if n == name]

    def names(self) -> list[str]:
        return [n for n, _ in self.calls]

    def remove(self) -> None:
        for name, fn in self._fns:
            event.remove(self.target, name, fn)


def test_two_phase_commit_events(engines: dict[str, Engine]) -> None:
    maker = sessionmaker(class_=ShardedSession, shards=engines, placement=_placement(),
                         atomic="require")
    rec = Recorder(maker)
    try:
        ids = _ids()
        with maker() as s:
            s.add_all([Item(id=ids["pg"], name="a"), Item(id=ids["maria"], name="b")])
            s.commit()
        names = [n for n in rec.names() if n.startswith("shardsession_") and "fanout" not in n]
        assert names == ["shardsession_before_prepare", "shardsession_after_prepare",
                         "shardsession_after_decision"]
        (session, gtrid, prepared, decider), = rec.of("shardsession_before_prepare")
        assert isinstance(session, ShardedSession)
        assert parse_gid(Xid.branch(gtrid, 0).gid) is not None
        assert decider in SHARDS and list(prepared) == [x for x in SHARDS if x != decider]
        assert rec.of("shardsession_after_prepare") == [(session, gtrid, prepared, [])]
        assert rec.of("shardsession_after_decision") == [(session, gtrid, "commit", decider)]
        # SQLAlchemy's session events fire as in a plain Session: once per commit
        assert rec.of("before_commit") == [(session,)]
        assert rec.of("after_commit") == [(session,)]
        # the events came in protocol order, inside SQLAlchemy's commit
        order = rec.names()
        assert order.index("before_commit") < order.index("shardsession_before_prepare")
        assert order.index("shardsession_after_decision") < order.index("after_commit")
    finally:
        rec.remove()


def test_failed_prepare_events_and_listener_errors(
    engines: dict[str, Engine], caplog: pytest.LogCaptureFixture
) -> None:
    with engines["pg"].begin() as c:  # a row named 'boom' fails at PREPARE (deferred)
        c.exec_driver_sql(
            "CREATE FUNCTION ev_boom() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "IF NEW.name = 'boom' THEN RAISE EXCEPTION 'boom refused'; END IF; "
            "RETURN NEW; END $$")
        c.exec_driver_sql(
            "CREATE CONSTRAINT TRIGGER ev_boom AFTER INSERT ON ev_items "
            "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION ev_boom()")
    maker = sessionmaker(class_=ShardedSession, shards=engines, placement=_placement(),
                         atomic="require", decider="maria")
    ids = _ids()
    with maker() as s:
        rec = Recorder(s)  # on one session

        def broken(*args: Any) -> None:
            raise RuntimeError("listener bug")

        event.listen(s, "shardsession_before_prepare", broken)
        s.add_all([Item(id=ids["pg"], name="boom"), Item(id=ids["maria"], name="b")])
        with caplog.at_level(logging.ERROR, "shardsession.events"), \
                pytest.raises(PrepareFailed):
            s.commit()
        s.rollback()
    assert "listener bug" in caplog.text  # logged, and the protocol went on
    (_, gtrid, prepared, decider), = rec.of("shardsession_before_prepare")
    assert (list(prepared), decider) == (["pg"], "maria")
    assert rec.of("shardsession_after_prepare") == [(s, gtrid, ["pg"], ["pg"])]
    assert rec.of("shardsession_after_decision") == [(s, gtrid, "abort", "maria")]
    assert rec.of("after_commit") == []
    for e in engines.values():
        with e.connect() as c:
            assert c.scalar(select(func.count()).select_from(Item)) == 0


def test_fanout_events(engines: dict[str, Engine]) -> None:
    seen: list[tuple[str, Any]] = []

    @event.listens_for(ShardedSession, "shardsession_fanout_started")
    def started(session: Any, statement: Any, shard_ids: Any) -> None:
        seen.append(("started", sorted(shard_ids)))

    @event.listens_for(ShardedSession, "shardsession_fanout_finished")
    def finished(session: Any, statement: Any, shard_ids: Any, elapsed: float,
                 error: Any) -> None:
        seen.append(("finished", (sorted(shard_ids), elapsed >= 0, error)))

    try:
        maker = sessionmaker(class_=ShardedSession, shards=engines, placement=_placement())
        with maker() as s:
            assert s.scalar(select(func.count()).select_from(Item)) == 0
        assert seen == [("started", sorted(SHARDS)),
                        ("finished", (sorted(SHARDS), True, None))]
    finally:
        event.remove(ShardedSession, "shardsession_fanout_started", started)
        event.remove(ShardedSession, "shardsession_fanout_finished", finished)


def test_in_doubt_resolved_event(engines: dict[str, Engine]) -> None:
    old = time.time() - 3600
    cluster = ensure_identity(adapter_for("postgresql"), engines["pg"])[0]
    gtrid = new_gtrid("pg", cluster=cluster, now=old)  # no decision row: presumed abort
    xid = Xid.branch(gtrid, 1)
    raw: Any = engines["maria"].raw_connection()
    cur = raw.dbapi_connection.cursor()
    cur.execute(f"XA START {xid.xa_literal}")
    cur.execute("INSERT INTO ev_items VALUES (1, 'x')")
    cur.execute(f"XA END {xid.xa_literal}")
    cur.execute(f"XA PREPARE {xid.xa_literal}")
    raw.invalidate()
    seen: list[tuple[Any, ...]] = []

    def resolved(*args: Any) -> None:
        seen.append(args)

    event.listen(ShardedSession, "shardsession_in_doubt_resolved", resolved)
    try:
        report = recover(engines, grace_period=0)
    finally:
        event.remove(ShardedSession, "shardsession_in_doubt_resolved", resolved)
    assert report.resolved
    assert seen == [(gtrid, "maria", xid.bqual, "rollback")]
