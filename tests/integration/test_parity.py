"""A one-shard ShardedSession behaves like a plain Session (issue 19).

Each test states what a plain ``Session`` does (checked in the same test where it can be)
and asserts the sharded session does the same; they are the regressions SQLAlchemy's own
ORM suite found (``tests/sa_suite``), written out small.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest.mock import Mock, call

import pytest
from sqlalchemy import (
    Column,
    Engine,
    ForeignKey,
    Integer,
    String,
    create_engine,
    delete,
    event,
    lambda_stmt,
    select,
    text,
    update,
)
from sqlalchemy.exc import UnboundExecutionError
from sqlalchemy.orm import (
    Session,
    declarative_base,
    events,
    relationship,
    scoped_session,
    sessionmaker,
)
from sqlalchemy.orm.exc import UnmappedClassError, UnmappedInstanceError

from shardsession import (
    AtomicityUnavailableError,
    HashSharding,
    Placement,
    RoutingError,
    ShardedScopedSession,
    ShardedSession,
)

Base: Any = declarative_base()


class Item(Base):  # type: ignore[misc]
    __tablename__ = "parity_item"
    id = Column(Integer, primary_key=True)
    name = Column(String(30))


class NotMapped:
    pass


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, sqlite_dir: Path) -> Iterator[Engine]:
    if request.param == "sqlite":
        url = f"sqlite:///{sqlite_dir / 'one.db'}"
    else:
        url = request.getfixturevalue("pg_url_a")
    found = create_engine(url)
    Base.metadata.create_all(found)
    yield found
    found.dispose()


def one_shard(bind: Engine, **kw: Any) -> ShardedSession:
    """A ShardedSession with ``bind`` as its only shard, every chooser answering it."""
    return ShardedSession(
        shards={"only": bind},
        shard_chooser=lambda mapper, instance, **k: "only",
        identity_chooser=lambda *a, **k: ["only"],
        execute_chooser=lambda orm_context: ["only"],
        **kw,
    )


def _seed(session: Session) -> None:
    session.add_all([Item(id=1, name="a"), Item(id=2, name="b"), Item(id=3, name="c")])
    session.commit()


# --- get_bind ---------------------------------------------------------------------------


def test_get_bind_accepts_a_mapped_class(engine: Engine) -> None:
    # Session.get_bind(mapper=...) takes a mapped class as well as a mapper (SQLAlchemy's
    # test_versioning opens a connection with bind_arguments=dict(mapper=Node))
    session = one_shard(engine)
    assert session.get_bind(Item) is engine
    assert session.get_bind(mapper=Item) is engine
    conn = session.connection(bind_arguments={"mapper": Item})
    assert conn.engine is engine
    session.close()


def test_get_bind_of_a_mapped_class_asks_the_chooser_with_its_mapper(engine: Engine) -> None:
    seen: list[Any] = []

    def chooser(mapper: Any, instance: Any, **kw: Any) -> str:
        seen.append(mapper)
        return "only"

    # (two shards: with one, there is nothing to choose and the chooser is not asked)
    session = ShardedSession(
        shards={"only": engine, "other": engine},
        shard_chooser=chooser,
        identity_chooser=lambda *a, **k: ["only"],
        execute_chooser=lambda orm_context: ["only"],
    )
    session.get_bind(Item)
    assert seen == [Item.__mapper__]


def test_get_bind_of_an_unmapped_class_raises_unmapped_class_error(engine: Engine) -> None:
    plain = Session(binds={Item: engine})  # no single bind: Session looks at the mapper
    with pytest.raises(UnmappedClassError):
        plain.get_bind(NotMapped)
    with pytest.raises(UnmappedClassError):
        one_shard(engine).get_bind(NotMapped)


def test_an_unmapped_instance_raises_unmapped_instance_error(engine: Engine) -> None:
    with pytest.raises(UnmappedInstanceError):
        Session(engine).add(NotMapped())
    session = one_shard(engine)
    with pytest.raises(UnmappedInstanceError):
        session.add(NotMapped())
    with pytest.raises(UnmappedInstanceError):
        session.get_bind(instance=NotMapped())


def test_get_bind_is_called_as_by_a_plain_session(engine: Engine) -> None:
    """A one-shard session's statements call ``get_bind`` with the arguments a plain
    Session's do (SQLAlchemy's ``SessionBindTest`` wraps it in a mock and compares them);
    ``shard_id=`` was added."""
    with Session(engine) as seeding:
        _seed(seeding)
    calls: dict[str, list[Any]] = {}
    for name, session in (("plain", Session(engine)), ("sharded", one_shard(engine))):
        get_bind = Mock(side_effect=session.get_bind)
        session.get_bind = get_bind  # type: ignore[method-assign]
        session.scalars(select(Item)).all()
        session.query(Item.id).count()
        session.get(Item, 2)
        session.execute(update(Item).where(Item.id == 1).values(name="x"))
        calls[name] = [c.kwargs.keys() for c in get_bind.mock_calls]
        session.rollback()
        session.close()
    assert calls["sharded"] == calls["plain"]
    assert all("shard_id" not in c for c in calls["sharded"])


def test_a_session_without_shards_raises_as_an_unbound_session(engine: Engine) -> None:
    """No shard at all: what a plain Session without a bind raises
    (``UnboundExecutionError``; ``UnmappedClassError`` for an unmapped mapper argument),
    not ``UnknownShardError``."""
    unbound = ShardedSession(
        shards={},
        shard_chooser=lambda mapper, instance, **k: "only",
        identity_chooser=lambda *a, **k: ["only"],
        execute_chooser=lambda orm_context: ["only"],
    )
    for session in (Session(), unbound):
        session.add(Item(id=9, name="x"))
        with pytest.raises(UnboundExecutionError, match="mapper"):
            session.flush()
        session.rollback()
        with pytest.raises(UnboundExecutionError):
            session.execute(select(Item))
        with pytest.raises(UnboundExecutionError):
            session.execute(text("SELECT 1"))
        with pytest.raises(UnboundExecutionError):
            session.get_bind(Item)
        with pytest.raises(UnmappedClassError):
            session.execute(text("SELECT 1"), bind_arguments={"mapper": NotMapped})
        with pytest.raises(UnmappedClassError):
            session.connection(bind_arguments={"mapper": NotMapped})
        session.close()


def test_bulk_methods_of_a_session_without_shards_raise_as_an_unbound_session() -> None:
    """bulk_save_objects / bulk_insert_mappings / bulk_update_mappings with no shard at
    all: UnboundExecutionError as a plain Session without a bind (they raised
    RoutingError and UnknownShardError: attack 12, break 9)."""
    unbound = ShardedSession(
        shards={},
        shard_chooser=lambda mapper, instance, **k: "only",
        identity_chooser=lambda *a, **k: ["only"],
        execute_chooser=lambda orm_context: ["only"],
    )
    for session in (Session(), unbound):
        with pytest.raises(UnboundExecutionError, match="mapper"):
            session.bulk_save_objects([Item(id=10, name="y")])
        session.rollback()
        with pytest.raises(UnboundExecutionError, match="mapper"):
            session.bulk_insert_mappings(Item, [{"id": 11, "name": "z"}])
        session.rollback()
        with pytest.raises(UnboundExecutionError, match="mapper"):
            session.bulk_update_mappings(Item, [{"id": 11, "name": "z"}])
        session.close()


# --- UPDATE / DELETE in other forms -----------------------------------------------------


def test_update_newstyle_lambda(engine: Engine) -> None:
    session = one_shard(engine)
    _seed(session)
    item = session.get(Item, 1)
    result = session.execute(
        lambda_stmt(lambda: update(Item).where(Item.id == 1).values(name="x"))
    )
    assert result.rowcount == 1  # type: ignore[attr-defined]
    assert item is not None and item.name == "x"  # synchronize_session="auto" ran
    session.commit()
    with Session(engine) as plain:
        assert plain.scalar(select(Item.name).where(Item.id == 1)) == "x"


def test_delete_newstyle_lambda(engine: Engine) -> None:
    session = one_shard(engine)
    _seed(session)
    result = session.execute(lambda_stmt(lambda: delete(Item).where(Item.id == 2)))
    assert result.rowcount == 1  # type: ignore[attr-defined]
    session.commit()
    with Session(engine) as plain:
        assert plain.scalars(select(Item.id).order_by(Item.id)).all() == [1, 3]


def _update_returning_from_statement(session: Session) -> tuple[Any, ...]:
    _seed(session)
    item = session.get(Item, 3)
    stmt = select(Item).from_statement(
        update(Item).where(Item.id == 3).values(name="z").returning(Item)
    )
    rows = session.execute(stmt).scalars().all()
    seen = (rows == [item], item.name if item is not None else None)
    session.commit()
    assert item is not None
    return (*seen, item.name)


def test_update_returning_from_statement(engine: Engine) -> None:
    plain = _update_returning_from_statement(Session(engine))
    with engine.begin() as conn:
        conn.execute(delete(Item.__table__))
    sharded = _update_returning_from_statement(one_shard(engine))
    # the identity map's object comes back, not refreshed before the commit (no
    # populate_existing), then expired: the same with a plain Session
    assert sharded == plain == (True, "c", "z")


# --- class-level events -----------------------------------------------------------------


def remove_orm_events_globally() -> None:
    """What SQLAlchemy's test fixture ``RemoveORMEventsGlobally`` does after each test."""
    events.MapperEvents._clear()
    events.InstanceEvents._clear()
    events.SessionEvents._clear()
    events.InstrumentationEvents._clear()
    events.QueryEvents._clear()


@pytest.fixture
def clean_session_events() -> Iterator[None]:
    yield
    remove_orm_events_globally()


@pytest.mark.usefixtures("clean_session_events")
@pytest.mark.parametrize("use_insert", [True, False])
def test_sessionmaker_gen_after_session_listen(engine: Engine, use_insert: bool) -> None:
    # SQLAlchemy's test_events: a class-level event's dispatch called with no arguments
    # reaches every listener of the class; ours must not fail on it
    m1, m2 = Mock(), Mock()
    event.listen(ShardedSession, "before_flush", m1, insert=use_insert)
    factory = sessionmaker(
        class_=ShardedSession,
        shards={"only": engine},
        shard_chooser=lambda *a, **k: "only",
        identity_chooser=lambda *a, **k: ["only"],
        execute_chooser=lambda orm_context: ["only"],
    )
    event.listen(factory, "before_flush", m2, insert=use_insert)
    session = factory()
    for name in ("before_flush", "after_flush", "after_begin", "do_orm_execute"):
        getattr(session.dispatch, name)()
    assert m1.mock_calls == [call()]
    assert m2.mock_calls == [call()]


def _placed_session(engines: dict[str, Engine]) -> ShardedSession:
    return ShardedSession(shards=engines, placement=Placement({Item: HashSharding("id")}))


@pytest.fixture
def two_sqlite(sqlite_dir: Path) -> Iterator[dict[str, Engine]]:
    found = {n: create_engine(f"sqlite:///{sqlite_dir / n}.db") for n in ("a", "b")}
    for e in found.values():
        Base.metadata.create_all(e)
    yield found
    for e in found.values():
        e.dispose()


def _check_routing_and_commit(engines: dict[str, Engine], session: ShardedSession) -> None:
    """What the four hooks do, observed: placement at flush (before_flush), exact
    fan-out (do_orm_execute), the commit protocol (after_begin)."""
    hs = HashSharding("id", list(engines))
    ids = list(range(1, 9))
    for i in ids:  # one transaction per row: each writes one shard
        session.add(Item(id=i, name=f"n{i}"))
        session.commit()
    for name, e in engines.items():
        with Session(e) as plain:
            expected = {i for i in ids if hs.shard_for(i) == name}
            assert set(plain.scalars(select(Item.id))) == expected
    # a fan-out merged exactly, not concatenated
    assert session.scalars(select(Item.id).order_by(Item.id.desc()).limit(3)).all() == [8, 7, 6]
    # a shard key changed so that the row would move: refused at flush by the placement
    item = session.get(Item, 1)
    assert item is not None
    item.id = next(i for i in range(100, 200) if hs.shard_for(i) != hs.shard_for(1))
    with pytest.raises(RoutingError, match="would move it"):
        session.flush()
    session.rollback()
    # a transaction writing both SQLite shards goes through the coordinator, which refuses
    # it with atomic='require' (without it each shard would commit on its own)
    for i in ids:
        found = session.get(Item, i)
        assert found is not None
        found.name = "changed"
    with pytest.raises(AtomicityUnavailableError):
        session.commit()
    session.rollback()
    for e in engines.values():
        with Session(e) as plain:
            assert "changed" not in set(plain.scalars(select(Item.name)))


def test_hooks_survive_sqlalchemys_listener_cleanup(two_sqlite: dict[str, Engine]) -> None:
    # SQLAlchemy's ORM fixtures (RemoveORMEventsGlobally) clear every class-level Session
    # listener after each test; a user's suite built on them does the same. A session
    # made afterwards must still route, place and coordinate.
    remove_orm_events_globally()
    session = _placed_session(two_sqlite)
    _check_routing_and_commit(two_sqlite, session)
    session.close()


def test_hooks_survive_cleanup_for_a_session_made_before(two_sqlite: dict[str, Engine]) -> None:
    session = _placed_session(two_sqlite)
    assert session.scalars(select(Item)).all() == []
    session.close()
    remove_orm_events_globally()
    # its next transaction begins with the hooks back (a flush is its first statement)
    _check_routing_and_commit(two_sqlite, session)
    session.close()


# --- scoped_session ---------------------------------------------------------------------


def test_scoped_session_proxies_the_sharded_session(engine: Engine) -> None:
    placement = Placement({Item: HashSharding(Item.id)})
    other = create_engine("sqlite://")
    registry = ShardedScopedSession(
        sessionmaker(class_=ShardedSession, shards={"only": engine}, placement=placement)
    )
    assert isinstance(registry, scoped_session)
    assert registry.shards == {"only": engine}
    assert registry.placement is placement
    assert registry.atomic == "require"
    registry.bind_shard("other", other)
    assert registry().shards == {"only": engine, "other": other}
    registry.fanout_timeout = 5.0
    assert registry().fanout_timeout == 5.0
    assert registry.get_bind(Item) is registry().get_bind(Item)
    registry.remove()
    assert registry.shards == {"only": engine}  # a new session from the factory
    registry.remove()
    other.dispose()


# --- one shard, no choice to make ---------------------------------------------------------


def test_connection_without_mapper_is_the_one_shards(engine: Engine) -> None:
    # Session.connection() / get_bind() with nothing to go by answer the session's bind;
    # with one shard there is nothing to choose either
    session = one_shard(engine)
    assert session.get_bind() is engine
    assert session.connection().engine is engine
    session.close()


def test_get_bind_without_mapper_still_refused_with_two_shards(
    two_sqlite: dict[str, Engine],
) -> None:
    session = _placed_session(two_sqlite)
    with pytest.raises(RoutingError, match="without a mapper or instance"):
        session.get_bind()


# --- identity-map lookups keep their passive flags -----------------------------------------


class Parent(Base):  # type: ignore[misc]
    __tablename__ = "parity_parent"
    id = Column(Integer, primary_key=True)
    name = Column(String(30))


class Child(Base):  # type: ignore[misc]
    __tablename__ = "parity_child"
    id = Column(Integer, primary_key=True)
    parent_id = Column(Integer, ForeignKey("parity_parent.id"))
    parent = relationship(Parent)


def _delete_expired_children(session: Session, engine: Engine) -> list[str]:
    # SQLAlchemy's test_unitofworkv2::test_many_to_one_delete_childonly_unloaded_expired
    parent = Parent(name="p1")
    c1, c2 = Child(parent=parent), Child(parent=parent)
    session.add_all([c1, c2, parent])
    session.flush()
    session.expire(parent)
    session.expire(c1)
    session.expire(c2)
    session.delete(c1)
    session.delete(c2)
    statements: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement.split(" WHERE")[0])

    event.listen(engine, "before_cursor_execute", record)
    try:
        session.flush()
    finally:
        event.remove(engine, "before_cursor_execute", record)
    session.rollback()
    return statements


def test_flush_does_not_load_an_expired_parent(engine: Engine) -> None:
    plain = _delete_expired_children(Session(engine), engine)
    sharded = _delete_expired_children(one_shard(engine), engine)
    assert not any("parity_parent" in s for s in plain)  # (what a plain Session sends)
    assert sharded == plain
