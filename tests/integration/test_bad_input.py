"""Bad-input matrix: each mistake gets its own specific error, early, with nothing written."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import Float, ForeignKey, Integer, String, create_engine, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker

from shardsession import (
    ConfigurationError,
    CrossShardError,
    HashSharding,
    NoShardChosenError,
    Pinned,
    Placement,
    RangeSharding,
    RoutingError,
    ShardedSession,
    ShardKeyMissingError,
    UnknownShardError,
)

from ._models import SHARDS, Base, Cluster, Event, Order, Tenant, User, build_cluster

TABLES = [t.name for t in Base.metadata.sorted_tables]


@pytest.fixture
def cluster(tmp_path: Any) -> Iterator[Cluster]:
    yield from build_cluster([f"sqlite:///{tmp_path}/{s}.db" for s in SHARDS])


def assert_nothing_written(cluster: Cluster) -> None:
    for shard in SHARDS:
        for table in TABLES:
            assert cluster.rows(shard, f"SELECT * FROM {table}") == [], (shard, table)


def flush_fails(
    cluster: Cluster, exc: type[Exception], *objs: Any, match: str | None = None
) -> Exception:
    """Add a valid user plus ``objs`` and commit: the commit raises ``exc`` and no shard
    received a single row (the valid user is not written either)."""
    Session = cluster.session_factory()
    with Session() as s:
        s.add(User(id=999, name="valid"))
        s.add_all(objs)
        with pytest.raises(exc, match=match) as ei:
            s.commit()
    assert_nothing_written(cluster)
    return ei.value


def test_missing_shard_key(cluster: Cluster) -> None:
    err = flush_fails(cluster, ShardKeyMissingError, User(name="no id"), match="User")
    assert isinstance(err, ShardKeyMissingError) and err.key == ("id",)


def test_child_without_parent_or_key(cluster: Cluster) -> None:
    flush_fails(cluster, ShardKeyMissingError, Order(id=1, amount=3))


def test_range_key_above_last_bound(tmp_path: Any) -> None:
    engines = {s: create_engine(f"sqlite:///{tmp_path}/{s}.db") for s in SHARDS}
    for e in engines.values():
        Base.metadata.create_all(e)
    placement = Placement({Event: RangeSharding(Event.day, [(10, "s0"), (20, "s1")])})
    Session = sessionmaker(class_=ShardedSession, shards=engines, placement=placement)
    with Session() as s:
        s.add(Event(id=1, day=5, what="ok"))
        s.add(Event(id=2, day=25, what="too late"))
        with pytest.raises(RoutingError, match="above the last range bound"):
            s.commit()
    for e in engines.values():
        with e.connect() as c:
            assert c.execute(text("SELECT count(*) FROM events")).scalar() == 0


def test_directory_unknown_key(cluster: Cluster) -> None:
    flush_fails(cluster, RoutingError, Tenant(code="umbrella", title="?"), match="directory")


def test_unplaceable_key_type(cluster: Cluster) -> None:
    err = flush_fails(cluster, RoutingError, User(id=1.5, name="x"))  # type: ignore[arg-type]
    assert "float" in str(err)


def test_cross_shard_relationship(cluster: Cluster) -> None:
    Session = cluster.session_factory()
    hs = HashSharding("id", list(SHARDS))
    a, b = 1, next(i for i in range(2, 100) if hs.shard_for(i) != hs.shard_for(1))
    with Session.begin() as s:
        ua = User(id=a, name="a")
        ua.orders.append(Order(id=10, amount=1))
        s.add_all([ua, User(id=b, name="b")])
    with Session() as s:
        order = s.get(Order, 10)
        if order is None:  # not pruned by pk: found through the parent
            order = s.scalars(select(Order).where(Order.user_id == a)).one()
        order.user = s.get(User, b)
        with pytest.raises(CrossShardError) as ei:
            s.commit()
        assert set(ei.value.shard_ids) == {hs.shard_for(a), hs.shard_for(b)}
    owner = hs.shard_for(a)
    assert cluster.rows(owner, "SELECT user_id FROM orders WHERE id = 10") == [(a,)]


def test_changed_shard_key_refused(cluster: Cluster) -> None:
    Session = cluster.session_factory()
    hs = HashSharding("id", list(SHARDS))
    new_id = next(i for i in range(100, 200) if hs.shard_for(i) != hs.shard_for(1))
    with Session.begin() as s:
        s.add(User(id=1, name="one"))
    with Session() as s:
        u = s.get(User, 1)
        assert u is not None
        u.id = new_id
        with pytest.raises(RoutingError, match="would move it"):
            s.commit()
    assert cluster.rows(hs.shard_for(1), "SELECT id FROM users") == [(1,)]


def test_unknown_shard_in_bind_arguments(cluster: Cluster) -> None:
    Session = cluster.session_factory()
    with Session() as s, pytest.raises(UnknownShardError) as ei:
        s.execute(select(User), bind_arguments={"shard_id": "s9"})
    assert ei.value.shard_id == "s9"


def test_connection_without_shard(cluster: Cluster) -> None:
    Session = cluster.session_factory()
    with Session() as s, pytest.raises(RoutingError, match="shard_id"):
        s.connection()


def test_pinned_to_unknown_shard_fails_at_setup(cluster: Cluster) -> None:
    with pytest.raises(ConfigurationError, match="unknown shard"):
        ShardedSession(shards=cluster.engines, placement=Placement({User: Pinned("s7")}))


def test_key_attribute_that_does_not_exist(cluster: Cluster) -> None:
    placement = Placement({User: HashSharding("nope")})
    Session = sessionmaker(class_=ShardedSession, shards=cluster.engines, placement=placement)
    with Session() as s:
        s.add(User(id=1, name="x"))
        with pytest.raises(ConfigurationError, match="no column attribute 'nope'"):
            s.commit()
    assert_nothing_written(cluster)


@pytest.mark.parametrize(
    "make",
    [
        lambda: RangeSharding("day", [(20, "s0"), (10, "s1")]),
        lambda: RangeSharding("day", [(None, "s0"), (10, "s1")]),
        lambda: RangeSharding("day", []),
        lambda: RangeSharding("day", [(1, 2)]),  # type: ignore[list-item]
        lambda: HashSharding("id", ["s0", "s0"]),
        lambda: HashSharding("id", ["s0"], weights={"s0": 0}),
        lambda: HashSharding(42),
        lambda: Pinned(""),
    ],
    ids=[
        "range-decreasing",
        "range-open-middle",
        "range-empty",
        "range-bad-item",
        "hash-repeat",
        "hash-weight",
        "hash-bad-key",
        "pinned-empty",
    ],
)
def test_misconfigured_strategy(make: Callable[[], Any]) -> None:
    with pytest.raises(ConfigurationError):
        make()


def test_placement_and_choosers_together(cluster: Cluster) -> None:
    with pytest.raises(ConfigurationError, match="not both"):
        ShardedSession(
            shard_chooser=lambda *a, **k: "s0",
            shards=cluster.engines,
            placement=Placement({User: HashSharding("id")}),
        )


def test_bad_atomic_mode(cluster: Cluster) -> None:
    with pytest.raises(ConfigurationError, match="atomic"):
        ShardedSession(
            shards=cluster.engines,
            placement=Placement({User: HashSharding("id")}),
            atomic="sometimes",  # type: ignore[arg-type]
        )


def test_placement_reused_with_other_shards(cluster: Cluster) -> None:
    placement = Placement({User: HashSharding("id")})
    ShardedSession(shards=cluster.engines, placement=placement)
    fewer = {k: v for k, v in cluster.engines.items() if k != "s2"}
    with pytest.raises(ConfigurationError, match="bound to shards"):
        ShardedSession(shards=fewer, placement=placement)


class _Other(DeclarativeBase):
    pass


class Loose(_Other):
    __tablename__ = "loose"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    score: Mapped[float] = mapped_column(Float)


class Parent(_Other):
    __tablename__ = "parents"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    kids: Mapped[list[Kid]] = relationship()


class Kid(_Other):
    __tablename__ = "kids"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("parents.id"))
    name: Mapped[str] = mapped_column(String(10))


def _other_session(tmp_path: Any, placement: Placement) -> tuple[Any, dict[str, Any]]:
    engines = {s: create_engine(f"sqlite:///{tmp_path}/o-{s}.db") for s in SHARDS}
    for e in engines.values():
        _Other.metadata.create_all(e)
    return sessionmaker(class_=ShardedSession, shards=engines, placement=placement), engines


def _count(engines: dict[str, Any], table: str) -> int:
    total = 0
    for e in engines.values():
        with e.connect() as c:
            total += c.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()
    return total


def test_mapper_without_any_rule(tmp_path: Any) -> None:
    Session, engines = _other_session(tmp_path, Placement({Parent: HashSharding("id")}))
    with Session() as s:
        s.add(Loose(id=1, score=1.0))
        with pytest.raises(ConfigurationError, match="no placement rule for Loose"):
            s.commit()
    assert _count(engines, "loose") == 0


def test_child_in_two_parents_on_different_shards(tmp_path: Any) -> None:
    hs = HashSharding("id", list(SHARDS))
    b = next(i for i in range(2, 100) if hs.shard_for(i) != hs.shard_for(1))
    Session, engines = _other_session(tmp_path, Placement({Parent: HashSharding("id")}))
    with Session() as s:
        kid = Kid(id=1, name="k")
        p1, p2 = Parent(id=1), Parent(id=b)
        p1.kids.append(kid)
        p2.kids.append(kid)  # one-to-many without backref: both collections hold it
        s.add_all([p1, p2])
        with pytest.raises(CrossShardError):
            s.commit()
    assert _count(engines, "parents") == 0 and _count(engines, "kids") == 0


def test_dropin_chooser_returning_none_or_unknown(cluster: Cluster) -> None:
    for answer, exc in ((None, NoShardChosenError), ("moon", UnknownShardError)):
        Session = sessionmaker(
            class_=ShardedSession,
            shards=cluster.engines,
            shard_chooser=lambda m, i, clause=None, _a=answer: _a,
            identity_chooser=lambda *a, **k: list(SHARDS),
            execute_chooser=lambda ctx: list(SHARDS),
        )
        with Session() as s:
            s.add(User(id=5, name="x"))
            with pytest.raises(exc):
                s.commit()
        assert_nothing_written(cluster)


@pytest.mark.parametrize("answer", [[], None, ["s0", "pluto"]])
def test_dropin_execute_chooser_bad_answers(cluster: Cluster, answer: Any) -> None:
    Session = sessionmaker(
        class_=ShardedSession,
        shards=cluster.engines,
        shard_chooser=lambda m, i, clause=None: "s0",
        identity_chooser=lambda *a, **k: list(SHARDS),
        execute_chooser=lambda ctx: answer,
    )
    with Session() as s, pytest.raises((NoShardChosenError, UnknownShardError)):
        s.execute(select(User)).all()
