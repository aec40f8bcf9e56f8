# mypy: warn-unused-ignores
"""The public API's static types, checked by mypy --strict (issue 12, item 7).

The ``_check_*`` functions below are never called by pytest for their assertions: mypy
reads them. ``typing_extensions.assert_type`` fails the mypy run when an expression's
type is not exactly the one written (``Any`` included: an ``Any`` here is the
regression this module exists to catch), and each ``# type: ignore[...]`` marks a call
that must stay a type error (``warn-unused-ignores``, turned on for this file in its
first line, fails the run when it is not; the package keeps its own setting, off, for
ignores that only one SQLAlchemy version needs).
:func:`test_public_api_types_check_under_mypy_strict` runs mypy on this file; the other
test runs the same calls on SQLite shards, so every typed call is also a real one.

The expected types are SQLAlchemy 2.1's (rows typed with ``TypeVarTuple``); under
SQLAlchemy 2.0 the mypy test is skipped, saying so.

(This directory has no ``__init__.py`` on purpose: ``tests/`` is on ``sys.path`` (see
``tests/conftest.py``), where a regular package named ``typing`` would shadow the
standard library's.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from sqlalchemy import Engine, ForeignKey, String, select
from sqlalchemy.engine import Connection, Result, Row, ScalarResult
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Mapper,
    ORMExecuteState,
    Query,
    mapped_column,
    relationship,
    selectinload,
    sessionmaker,
)
from sqlalchemy.sql import ClauseElement
from typing_extensions import assert_type

import shardsession
from shardsession import (
    Broadcast,
    CommitIncomplete,
    CrossShardError,
    DirectorySharding,
    ExecuteChooser,
    FanoutTimeoutError,
    Follows,
    HashSharding,
    IdentityChooser,
    OutcomeUnknown,
    Pinned,
    Placement,
    PrepareFailed,
    RangeSharding,
    ShardChooser,
    ShardedSession,
    ShardKeyMissingError,
    UnknownShardError,
    UnsupportedQueryError,
)
from shardsession.config import Cluster
from shardsession.coordinator import TransactionCoordinator
from shardsession.query import Page, paginate
from shardsession.session import AtomicMode

ROOT = Path(__file__).resolve().parents[2]


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "typed_users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    orders: Mapped[list[Order]] = relationship(back_populates="user")


class Order(Base):
    __tablename__ = "typed_orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("typed_users.id"))
    user: Mapped[User] = relationship(back_populates="orders")


class Country(Base):
    __tablename__ = "typed_countries"
    code: Mapped[str] = mapped_column(String(2), primary_key=True)


# -- what mypy checks -------------------------------------------------------------------


def _check_session(session: ShardedSession) -> None:
    # The methods ShardedSession overrides: SQLAlchemy's types, keywords included.
    assert_type(session.get(User, 1), User | None)
    assert_type(session.get_one(User, 1), User)
    assert_type(
        session.get(
            User,
            (1,),
            options=[selectinload(User.orders)],
            populate_existing=True,
            with_for_update={"nowait": True},
            execution_options={"shardsession_timeout": 5.0},
            bind_arguments={"shard_id": "a"},
            identity_token="a",
        ),
        User | None,
    )
    assert_type(session.get_one(User, 1, execution_options={}), User)
    assert_type(session.get_bind(User), Engine | Connection)
    assert_type(session.get_bind(shard_id="a"), Engine | Connection)
    assert_type(session.connection_callable(None, shard_id="a"), Connection)

    # The methods it inherits: nothing of ours may hide SQLAlchemy's types.
    assert_type(session.scalars(select(User)), ScalarResult[User])
    assert_type(session.scalars(select(User)).all(), Sequence[User])
    assert_type(session.scalar(select(User).limit(1)), User | None)
    assert_type(session.execute(select(User.id, User.name)), Result[int, str])
    assert_type(session.execute(select(User.id, User.name)).one(), Row[int, str])
    assert_type(session.merge(User(id=1, name="x")), User)
    assert_type(session.query(User), Query[User])
    assert_type(session.query(User).first(), User | None)

    # shardsession's own surface
    assert_type(session.shards, Mapping[str, Engine | Connection])
    assert_type(session.placement, Placement | None)
    assert_type(session.atomic, AtomicMode)
    assert_type(session.fanout_max_workers, int | None)
    assert_type(session.fanout_timeout, float | None)
    assert_type(session.shard_chooser, ShardChooser)
    assert_type(session.identity_chooser, IdentityChooser)
    assert_type(session.execute_chooser, ExecuteChooser)


def _shard_chooser(mapper: Mapper[Any] | None, instance: Any, clause: ClauseElement | None) -> str:
    return "a"


def _identity_chooser(mapper: Mapper[Any], primary_key: Any, **kw: Any) -> list[str]:
    return ["a", "b"]


def _execute_chooser(orm_context: ORMExecuteState) -> Iterable[str]:
    return ["a", "b"]


def _check_choosers(engines: dict[str, Engine]) -> ShardedSession:
    shard_chooser: ShardChooser = _shard_chooser
    identity_chooser: IdentityChooser = _identity_chooser
    execute_chooser: ExecuteChooser = _execute_chooser
    return ShardedSession(
        shard_chooser=shard_chooser,
        identity_chooser=identity_chooser,
        execute_chooser=execute_chooser,
        shards=engines,
    )


def _check_placement() -> Placement:
    hashed = HashSharding(User.id, ["a", "b"], weights={"a": 2})
    assert_type(hashed.shard_for(5), str)
    assert_type(hashed.key, tuple[str, ...])
    RangeSharding(("id", Order.user_id), [(100, "a"), (None, "b")])
    DirectorySharding("id", {1: "a"}, assign=lambda key: "b")
    Follows(Order.user)
    placement = Placement({User: hashed}, default=Pinned("a"))
    assert_type(placement.add(Country, Broadcast(read_from="a")), Placement)
    assert_type(placement.add(Order, Follows("user")), Placement)

    class MyPlacement(Placement):
        pass

    assert_type(MyPlacement().add(User.__mapper__, Pinned("a")), MyPlacement)
    return placement


def _check_cluster(cluster: Cluster, placement: Placement) -> None:
    assert_type(cluster.coordinator(), TransactionCoordinator)
    assert_type(cluster.engines, dict[str, Engine])
    assert_type(cluster.sessionmaker(placement), sessionmaker[ShardedSession])
    assert_type(cluster.sessionmaker(placement)(), ShardedSession)
    cluster.create_all(Base.metadata)
    assert_type(Cluster.from_toml("cluster.toml"), Cluster)

    class MyCluster(Cluster):
        pass

    assert_type(MyCluster.from_dict({"shards": {"a": {"url": "sqlite://"}}}), MyCluster)


def _check_paginate(session: ShardedSession) -> None:
    page = paginate(session, select(User).order_by(User.name), page_size=2)
    assert_type(page, Page[User])
    assert_type(page.items, list[User])
    assert_type(page.next_token, str | None)
    ids = paginate(session, select(User.id), page_size=2)
    assert_type(ids.items, list[int])
    pairs = paginate(session, select(User.id, User.name), page_size=2, token=page.next_token)
    assert_type(pairs.items, list[Row[int, str]])


def _check_exceptions(err: Exception) -> None:
    if isinstance(err, CommitIncomplete | OutcomeUnknown):
        assert_type(err.gtrid, str | None)
        assert_type(err.pending_shards, Sequence[str])
    elif isinstance(err, PrepareFailed):
        assert_type(err.failed_shards, Sequence[str])
    elif isinstance(err, ShardKeyMissingError):
        assert_type(err.shard_id, str | None)
        assert_type(err.mapper, str | None)
        assert_type(err.key, tuple[str, ...] | None)
    elif isinstance(err, CrossShardError):
        assert_type(err.shard_ids, Sequence[str])
    elif isinstance(err, UnknownShardError):
        assert_type(err.shard_id, str | None)
    elif isinstance(err, FanoutTimeoutError):
        assert_type(err.pending_shards, Sequence[str])
        assert_type(err.timeout, float | None)
    elif isinstance(err, UnsupportedQueryError):
        assert_type(err.construct, str | None)
    # the fields are the constructors' keywords
    raise CommitIncomplete("committed; b is being completed", gtrid="g", pending_shards=["b"])


def _check_refused(session: ShardedSession, cluster: Cluster, engines: dict[str, Engine]) -> None:
    # Type errors, as they are under SQLAlchemy's own signatures (each ignore must be
    # needed: --warn-unused-ignores).
    session.get(User, 1, populate_existng=True)  # type: ignore[call-arg]
    session.get(User, 1, populate_existing="yes")  # type: ignore[arg-type]
    session.get_one(User, 1, options=42)  # type: ignore[arg-type]
    session.get(User, 1, bind_arguments=["a"])  # type: ignore[arg-type]

    def wrong(mapper: Mapper[Any]) -> str:
        return "a"

    ShardedSession(shard_chooser=wrong, shards=engines)  # type: ignore[arg-type]
    ShardedSession(execute_chooser=lambda statement, shard: ["a"])  # type: ignore[arg-type,misc]
    HashSharding(42)  # type: ignore[arg-type]
    Follows(3)  # type: ignore[arg-type]
    Placement().add("Order", Follows())  # type: ignore[arg-type]
    paginate(session, select(User), page_size="10")  # type: ignore[call-overload]
    CommitIncomplete("committed", gtrid="g")  # type: ignore[call-arg]
    UnknownShardError("no such shard", shard="x")  # type: ignore[call-arg]
    FanoutTimeoutError("late", pending_shards=["a"], timeout="5s")  # type: ignore[arg-type]


# -- the tests ------------------------------------------------------------------------------


def test_public_api_types_check_under_mypy_strict() -> None:
    """mypy --strict finds no error in this file (on today's code it did: get() was Any)."""
    if sqlalchemy.__version__.split(".")[:2] < ["2", "1"]:
        pytest.skip("the expected types are SQLAlchemy 2.1's (TypeVarTuple rows)")
    env = {**os.environ, "MYPYPATH": str(ROOT)}  # this checkout's shardsession, not another
    proc = subprocess.run(
        [
            sys.executable, "-m", "mypy",
            "--config-file", str(ROOT / "pyproject.toml"),
            "--strict", "--no-warn-unused-ignores", "--no-error-summary",
            "--cache-dir", str(ROOT / ".mypy_cache"),
            __file__,
        ],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr
    checked = Path(shardsession.__file__).resolve().parent
    assert checked == ROOT / "shardsession", f"imported {checked}, checked {ROOT}"


def test_typed_calls_run_on_sqlite_shards(tmp_path: Path) -> None:
    """The calls the types were checked on are real calls (SQLite shards)."""
    cluster = Cluster(
        {"a": f"sqlite:///{tmp_path}/a.db", "b": f"sqlite:///{tmp_path}/b.db"},
        atomic="best_effort",  # (two SQLite shards cannot prepare)
    )
    try:
        placement = _check_placement()
        cluster.create_all(Base.metadata)
        with cluster.sessionmaker(placement)() as session:
            session.add_all([User(id=i, name=f"u{i}") for i in range(1, 6)])
            session.add(Country(code="nl"))
            session.commit()
            assert isinstance(session.get(User, 1), User)
            assert session.get(User, 99) is None
            assert session.get_one(User, 2, populate_existing=True).name == "u2"
            assert len(session.scalars(select(User)).all()) == 5
            assert session.execute(select(User.id, User.name)).all()
            page = paginate(session, select(User).order_by(User.id), page_size=2)
            assert [u.id for u in page.items] == [1, 2] and page.next_token is not None
            pairs = paginate(session, select(User.id, User.name), page_size=10)
            assert [tuple(r) for r in pairs.items][:1] == [(1, "u1")]
            assert set(session.shards) == {"a", "b"}
        engines = cluster.engines
        with _check_choosers(engines) as plain:
            assert plain.get_bind(shard_id="b") is engines["b"]
        assert isinstance(cluster.coordinator(), TransactionCoordinator)
    finally:
        cluster.dispose()
