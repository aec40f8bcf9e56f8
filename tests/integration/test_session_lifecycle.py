"""What a session costs to make and to drop: no reference cycles, root transactions keep
their fast attribute layout, and the shortcut for arguments a sessionmaker repeats still
refuses a configuration that changed."""

from __future__ import annotations

import gc
import sys
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, func, select
from sqlalchemy.orm import sessionmaker

from shardsession import HashSharding, Placement, ShardedSession
from shardsession.exc import ConfigurationError

from ._models import Base, Order, User


@pytest.fixture
def engines(sqlite_dir: Path) -> Iterator[dict[str, Engine]]:
    found = {n: create_engine(f"sqlite:///{sqlite_dir / n}.db") for n in ("a", "b")}
    for e in found.values():
        Base.metadata.create_all(e, tables=[User.__table__, Order.__table__])
    yield found
    for e in found.values():
        e.dispose()


def _placement() -> Placement:
    return Placement({User: HashSharding(User.id), Order: HashSharding(Order.user_id)})


def _dict_materialized(obj: object, attribute: str) -> bool:
    # CPython 3.11/3.12 keep an instance's attributes as inline values until its __dict__
    # is read (or its __class__ assigned); then the garbage collector's referents include
    # the dict object, and every later attribute read of the object is slower.
    return any(type(r) is dict and attribute in r for r in gc.get_referents(obj))


def test_root_transactions_keep_their_inline_attribute_layout(
    engines: dict[str, Engine],
) -> None:
    # A root transaction is created as the coordinated class (no __class__ assignment) and
    # our marks on it are attributes (never set through __dict__): either would turn the
    # transaction's inline attribute values into a dict for good, and SQLAlchemy's many
    # attribute reads of it would become several times slower. (SQLAlchemy itself gives
    # the Session, Connection and Engine a dict: its event dispatcher is stored there.)
    layout_known = sys.implementation.name == "cpython" and (3, 11) <= sys.version_info < (3, 13)
    maker = sessionmaker(class_=ShardedSession, shards=engines, placement=_placement())
    for i in range(1, 3):  # the first session takes the long path, the second not
        with maker.begin() as s:
            user = s.get(User, 1) or User(id=1, name="u")
            s.add(user)
            s.add(User(id=10 + i, name="new"))
            s.flush()  # first connection noted, flush connections cached
            root = s.get_transaction()
            assert root is not None
            if layout_known:
                assert not _dict_materialized(root, "_connections"), f"session {i}"
        if layout_known:
            assert not _dict_materialized(root, "_connections"), f"session {i}, closed"


def test_a_used_session_is_freed_without_the_garbage_collector(
    engines: dict[str, Engine],
) -> None:
    maker = sessionmaker(class_=ShardedSession, shards=engines, placement=_placement())
    gc.disable()
    try:
        refs = []
        for i in range(1, 4):  # the first session takes the long path, the others not
            with maker.begin() as s:
                s.add(User(id=i, name=f"u{i}"))
            with maker.begin() as s:
                user = s.get(User, i)
                assert user is not None
                user.name += "!"
                root = s.get_transaction()
                assert root is not None
                refs.append((weakref.ref(s), weakref.ref(root)))
            del s, user, root
        # Freed by reference counting alone: nothing of a session is left in a cycle.
        assert [r() for pair in refs for r in pair] == [None] * 6
    finally:
        gc.enable()
    with maker() as s:
        assert sorted(u.name for u in s.scalars(select(User))) == ["u1!", "u2!", "u3!"]


def test_a_repeated_configuration_is_checked_again_when_it_changed(
    engines: dict[str, Engine],
) -> None:
    shards: dict[str, object] = dict(engines)
    maker = sessionmaker(class_=ShardedSession, shards=shards, placement=_placement())
    maker().close()
    maker().close()  # the shortcut
    shards["c"] = "not an engine"
    with pytest.raises(ConfigurationError):
        maker()
    # the placement is bound to shards a and b: a third engine-backed shard is refused
    shards["c"] = create_engine("sqlite://")
    with pytest.raises(ConfigurationError, match="bound to shards"):
        maker()
    del shards["c"]
    with maker() as s:  # back to the validated configuration
        assert s.scalar(select(func.count()).select_from(User)) == 0


def test_sessions_of_one_maker_do_not_share_their_shard_maps(
    engines: dict[str, Engine],
) -> None:
    maker = sessionmaker(class_=ShardedSession, shards=engines, placement=_placement())
    first, second = maker(), maker()
    first.bind_shard("extra", create_engine("sqlite://"))
    assert "extra" in first.shards and "extra" not in second.shards
    assert "extra" not in maker().shards
