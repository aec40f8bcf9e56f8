"""Savepoints (``Session.begin_nested()``) on every shard a sharded session touches.

Written the way SQLAlchemy's "Using SAVEPOINT" section uses them, on SQLite shards (the
atomic local cluster, and plain files with the pysqlite savepoint recipe) and on
PostgreSQL + MariaDB shards. Every check reads the stored rows back through separate
engines, one per shard, after the session is gone.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, String, create_engine, event, inspect, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from shardsession import Placement, RangeSharding, ShardedSession
from shardsession.coordinator import in_doubt
from shardsession.coordinator.local import local_sqlite_engines
from shardsession.exc import NonAtomicCommitWarning


class Base(DeclarativeBase):
    pass


class Owner(Base):
    __tablename__ = "sp_owners"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40), unique=True)


def shard_of(ident: int) -> str:
    """Owners 1-99 live on shard ``a``, 100 and up on ``b``."""
    return "a" if ident < 100 else "b"


def sqlite_savepoint_recipe(engine: Engine) -> Engine:
    """SQLAlchemy's documented pysqlite recipe for working SAVEPOINTs."""

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, record: Any) -> None:
        dbapi_conn.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN")

    return engine


@dataclass
class Cluster:
    mix: str
    #: the engines the session uses
    shards: dict[str, Engine]
    #: a separate engine per shard, only to read what is stored
    readers: dict[str, Callable[[], Engine]]
    #: whether two written shards commit atomically
    atomic: bool
    #: "choosers" (the drop-in constructor) or "placement" (whose flushes that write
    #: several shards begin their transactions early, see coordinator.early)
    routing: str = "choosers"

    def session(self, **kw: Any) -> ShardedSession:
        atomic = "require" if self.atomic else "best_effort"
        if self.routing == "placement":
            placement = Placement({Owner: RangeSharding(Owner.id, [(100, "a"), (None, "b")])})
            return ShardedSession(placement=placement, shards=self.shards, atomic=atomic, **kw)
        return ShardedSession(
            shard_chooser=lambda mapper, instance, **k: shard_of(instance.id),
            identity_chooser=lambda mapper, pk, **k: [shard_of(pk[0])],
            execute_chooser=lambda ctx: list(self.shards),
            shards=self.shards,
            atomic=atomic,
            **kw,
        )

    def stored(self) -> dict[str, set[int]]:
        """The owner ids stored on each shard, read by an engine of its own."""
        out = {}
        for name, make in self.readers.items():
            engine = make()
            with engine.connect() as c:
                out[name] = set(c.scalars(select(Owner.id)))
            engine.dispose()
        return out

    def decisions(self) -> int:
        """Decision rows on all shards (one per atomic commit of several writers, until
        recovery deletes it)."""
        total = 0
        for make in self.readers.values():
            engine = make()
            with engine.connect() as c:
                if inspect(c).has_table("shardsession_decisions"):
                    total += int(c.exec_driver_sql(
                        "SELECT count(*) FROM shardsession_decisions").scalar() or 0)
            engine.dispose()
        return total

    def commit(self, s: ShardedSession, *, writers: int,
               rolled_back: tuple[str, ...] = ()) -> None:
        """``s.commit()``, checking it committed as ``writers`` written shards commit:
        one writer in one phase; two atomically with a decision row, or where they cannot
        be atomic (plain SQLite files) by best effort, one after another with its warning.

        ``rolled_back``: shards whose only writes were rolled back to a savepoint. They
        commit as readers, except on PostgreSQL, where the transaction id their writes
        took stays assigned: asked whether the branch wrote, the server says yes, and it
        is prepared like a writer (one round trip more, never a refusal: it can prepare).
        So is a MariaDB shard that joined a transaction already begun on another shard:
        its session's counters of rows written moved, and whether a routine wrote before
        the savepoint, unseen by the statements, cannot be told from the rollback's undoing.
        """
        writers += sum(1 for n in rolled_back
                       if self.shards[n].dialect.name in ("postgresql", "mysql", "mariadb"))
        before = self.decisions()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            s.commit()
        non_atomic = [w for w in seen if issubclass(w.category, NonAtomicCommitWarning)]
        assert len(non_atomic) == (1 if writers > 1 and not self.atomic else 0), non_atomic
        two_phase = writers > 1 and self.mix not in ("sqlite_local", "sqlite_files")
        assert self.decisions() - before == (1 if two_phase else 0)

    def no_branch_in_doubt(self) -> None:
        servers = {n: e for n, e in self.shards.items() if e.dialect.name != "sqlite"}
        if servers:
            assert in_doubt(servers) == []


MIXES = ["sqlite_local", "sqlite_files", "pg+mariadb", "mariadb+pg"]


@pytest.fixture(params=[(m, r) for m in MIXES for r in ("choosers", "placement")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def cluster(request: pytest.FixtureRequest, sqlite_dir: Path) -> Iterator[Cluster]:
    mix, routing = request.param
    if mix == "sqlite_local":
        shards = local_sqlite_engines(sqlite_dir / "local", ["a", "b"])
        readers = {n: (lambda n=n: create_engine(f"sqlite:///{sqlite_dir / 'local' / n}.db"))
                   for n in shards}
        atomic = True
    elif mix == "sqlite_files":
        urls = {n: f"sqlite:///{sqlite_dir / n}.db" for n in ("a", "b")}
        shards = {n: sqlite_savepoint_recipe(create_engine(u)) for n, u in urls.items()}
        readers = {n: (lambda u=u: create_engine(u)) for n, u in urls.items()}
        atomic = False
    else:
        # (shard a is the one the tests write first: "mariadb+pg" makes the MariaDB
        # shard the first, begun without XA, and PostgreSQL the one that joins)
        pg, maria = request.getfixturevalue("pg_url_a"), request.getfixturevalue("mariadb_url")
        urls = {"a": pg, "b": maria} if mix == "pg+mariadb" else {"a": maria, "b": pg}
        shards = {n: create_engine(u) for n, u in urls.items()}
        readers = {n: (lambda u=u: create_engine(u)) for n, u in urls.items()}
        atomic = True
    for e in shards.values():
        Base.metadata.drop_all(e)
        Base.metadata.create_all(e)
    yield Cluster(mix, shards, readers, atomic, routing)
    for e in shards.values():
        e.dispose()


def test_rolled_back_savepoint_leaves_no_rows_on_any_shard(cluster: Cluster) -> None:
    """The issue's reproduction: the savepoint's rows on both shards are undone."""
    s = cluster.session()
    s.add_all([Owner(id=1, name="a1"), Owner(id=101, name="b1")])
    s.flush()
    sp = s.begin_nested()
    o2, o102 = Owner(id=2, name="a2"), Owner(id=102, name="b2")
    s.add_all([o2, o102])
    s.flush()
    sp.rollback()
    assert o2 not in s and o102 not in s  # as in a plain Session: expunged
    cluster.commit(s, writers=2)
    s.close()
    assert cluster.stored() == {"a": {1}, "b": {101}}
    cluster.no_branch_in_doubt()


def test_released_savepoint_commits_on_every_shard(cluster: Cluster) -> None:
    s = cluster.session()
    s.add(Owner(id=1, name="a1"))
    with s.begin_nested():
        s.add_all([Owner(id=2, name="a2"), Owner(id=102, name="b2")])
    s.add(Owner(id=103, name="b3"))
    cluster.commit(s, writers=2)
    s.close()
    assert cluster.stored() == {"a": {1, 2}, "b": {102, 103}}
    cluster.no_branch_in_doubt()


def test_a_shard_first_touched_inside_the_savepoint(cluster: Cluster) -> None:
    """Shard b begins inside the savepoint: it must get the SAVEPOINT too, so that the
    rollback undoes its rows, and the transaction goes on on both shards."""
    s = cluster.session()
    s.add(Owner(id=1, name="a1"))
    s.flush()
    sp = s.begin_nested()
    s.add_all([Owner(id=2, name="a2"), Owner(id=101, name="b1")])
    s.flush()
    sp.rollback()
    # b is still in the transaction, with nothing of its own: only a is written so far
    s.add(Owner(id=3, name="a3"))
    cluster.commit(s, writers=1, rolled_back=("b",))
    s.close()
    assert cluster.stored() == {"a": {1, 3}, "b": set()}

    s = cluster.session()
    s.add(Owner(id=4, name="a4"))
    s.flush()
    sp = s.begin_nested()
    s.add(Owner(id=104, name="b4"))
    s.flush()
    sp.rollback()
    s.add(Owner(id=105, name="b5"))  # written after the rollback: a real second writer
    cluster.commit(s, writers=2)
    s.close()
    assert cluster.stored() == {"a": {1, 3, 4}, "b": {105}}
    cluster.no_branch_in_doubt()


def test_nested_levels(cluster: Cluster) -> None:
    s = cluster.session()
    s.add(Owner(id=1, name="a1"))
    outer = s.begin_nested()
    s.add(Owner(id=101, name="b1"))
    inner = s.begin_nested()
    s.add_all([Owner(id=2, name="a2"), Owner(id=102, name="b2")])
    s.flush()
    inner.rollback()
    inner = s.begin_nested()
    s.add_all([Owner(id=3, name="a3"), Owner(id=103, name="b3")])
    inner.commit()
    outer.commit()
    cluster.commit(s, writers=2)
    s.close()
    assert cluster.stored() == {"a": {1, 3}, "b": {101, 103}}

    # an outer rollback undoes what its released inner savepoint wrote
    s = cluster.session()
    s.add(Owner(id=4, name="a4"))
    with pytest.raises(ZeroDivisionError), s.begin_nested():
        s.add(Owner(id=104, name="b4"))
        with s.begin_nested():
            s.add_all([Owner(id=5, name="a5"), Owner(id=105, name="b5")])
        1 / 0  # noqa: B018
    cluster.commit(s, writers=1, rolled_back=("b",))
    s.close()
    assert cluster.stored() == {"a": {1, 3, 4}, "b": {101, 103}}
    cluster.no_branch_in_doubt()


def test_integrity_error_inside_a_savepoint_then_continue_and_commit(cluster: Cluster) -> None:
    """The chapter's pattern: each record in its own savepoint, the duplicates skipped.
    On PostgreSQL the failed INSERT must not abort the whole transaction."""
    s = cluster.session()
    s.add_all([Owner(id=1, name="a1"), Owner(id=101, name="b1")])
    s.flush()
    records = [Owner(id=2, name="a2"), Owner(id=3, name="a1"),  # duplicate name on a
               Owner(id=102, name="b2"), Owner(id=103, name="b1")]  # and on b
    skipped = []
    for record in records:
        try:
            with s.begin_nested():
                s.add(record)
        except IntegrityError:
            skipped.append(record.id)
    assert skipped == [3, 103]
    # a savepoint whose flush fails on one shard is undone on both
    with pytest.raises(IntegrityError), s.begin_nested():
        s.add_all([Owner(id=5, name="a5"), Owner(id=105, name="b1")])
    assert s.scalars(select(Owner.id).order_by(Owner.id)).all() == [1, 2, 101, 102]
    s.add(Owner(id=4, name="a4"))
    cluster.commit(s, writers=2)
    s.close()
    assert cluster.stored() == {"a": {1, 2, 4}, "b": {101, 102}}
    cluster.no_branch_in_doubt()


def test_session_rollback_after_savepoints_leaves_nothing(cluster: Cluster) -> None:
    s = cluster.session()
    s.add_all([Owner(id=1, name="a1"), Owner(id=101, name="b1")])
    with s.begin_nested():
        s.add_all([Owner(id=2, name="a2"), Owner(id=102, name="b2")])
    s.begin_nested()
    s.add(Owner(id=103, name="b3"))
    s.flush()
    s.rollback()
    s.close()
    assert cluster.stored() == {"a": set(), "b": set()}
    cluster.no_branch_in_doubt()


def test_commit_with_a_savepoint_still_open(cluster: Cluster) -> None:
    """``Session.commit()`` inside ``begin_nested()`` releases the savepoint and commits
    the whole transaction, on every shard, as a plain Session does."""
    s = cluster.session()
    s.add(Owner(id=1, name="a1"))
    sp = s.begin_nested()
    s.add(Owner(id=101, name="b1"))
    cluster.commit(s, writers=2)
    assert not sp.is_active and s.get_transaction() is None
    s.close()
    assert cluster.stored() == {"a": {1}, "b": {101}}
    cluster.no_branch_in_doubt()
