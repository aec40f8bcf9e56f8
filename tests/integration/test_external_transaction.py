"""Joining a sharded session into external transactions (SQLAlchemy's recipe for test
suites), with every ``join_transaction_mode``.

Each scenario runs twice: with a plain ``Session`` bound to one shard's Connection, and
with a :class:`~shardsession.ShardedSession` whose ``shards=`` are Connections with an
outer ``begin()``; what the sharded session leaves on each shard must be what the plain
Session leaves on its one. Stored rows are read by separate engines. The pytest fixture
of ``docs/session.md`` is copied here verbatim (a test compares the two) and used as
written.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, create_engine, select
from sqlalchemy.orm import Session

from shardsession import HashSharding, Placement, ShardedSession
from shardsession.coordinator import in_doubt
from shardsession.coordinator.local import local_sqlite_engines

from .test_savepoints import Base, Owner, shard_of, sqlite_savepoint_recipe

MODES = ["conditional_savepoint", "create_savepoint", "rollback_only", "control_fully"]
DOCS = Path(__file__).resolve().parents[2] / "docs" / "session.md"


@dataclass
class Shards:
    mix: str
    engines: dict[str, Engine]
    readers: dict[str, Callable[[], Engine]]

    def stored(self) -> dict[str, set[int]]:
        out = {}
        for name, make in self.readers.items():
            engine = make()
            with engine.connect() as c:
                out[name] = set(c.scalars(select(Owner.id)))
            engine.dispose()
        return out

    def no_branch_in_doubt(self) -> None:
        servers = {n: e for n, e in self.engines.items() if e.dialect.name != "sqlite"}
        if servers:
            assert in_doubt(servers) == []


@pytest.fixture(params=["sqlite_local", "sqlite_files", "pg+mariadb"])
def shards(request: pytest.FixtureRequest, sqlite_dir: Path) -> Iterator[Shards]:
    mix = request.param
    if mix == "sqlite_local":
        engines = local_sqlite_engines(sqlite_dir / "local", ["a", "b"])
        readers = {n: (lambda n=n: create_engine(f"sqlite:///{sqlite_dir / 'local' / n}.db"))
                   for n in engines}
    elif mix == "sqlite_files":
        urls = {n: f"sqlite:///{sqlite_dir / n}.db" for n in ("a", "b")}
        engines = {n: sqlite_savepoint_recipe(create_engine(u)) for n, u in urls.items()}
        readers = {n: (lambda u=u: create_engine(u)) for n, u in urls.items()}
    else:
        urls = {"a": request.getfixturevalue("pg_url_a"),
                "b": request.getfixturevalue("mariadb_url")}
        engines = {n: create_engine(u) for n, u in urls.items()}
        readers = {n: (lambda u=u: create_engine(u)) for n, u in urls.items()}
    for e in engines.values():
        Base.metadata.drop_all(e)
        Base.metadata.create_all(e)
    yield Shards(mix, engines, readers)
    for e in engines.values():
        e.dispose()


def sharded(connections: dict[str, Connection], mode: str) -> ShardedSession:
    return ShardedSession(
        shard_chooser=lambda mapper, instance, **k: shard_of(instance.id),
        identity_chooser=lambda mapper, pk, **k: [shard_of(pk[0])],
        execute_chooser=lambda ctx: list(connections),
        shards=connections,
        join_transaction_mode=mode,  # type: ignore[arg-type]
    )


def scenario(make_session: Callable[[dict[str, Connection], str], Session],
             engines: dict[str, Engine], ids: dict[str, tuple[int, int, int]], mode: str,
             stored: Callable[[], dict[str, set[int]]], *,
             session_rollback: bool = True) -> dict[str, Any]:
    """A test's life under the recipe; what is observed, by shard.

    ``ids[shard]``: three owner ids placed on that shard. ``session_rollback``: the test
    calls ``Session.rollback()`` once (which ends the outer transaction itself under
    ``"rollback_only"``, in a plain Session too: the recipe uses ``"create_savepoint"``).
    """
    seen: dict[str, Any] = {}
    connections = {n: engines[n].connect() for n in ids}
    outer = {n: c.begin() for n, c in connections.items()}
    s = make_session(connections, mode)
    try:
        # commit() inside the test
        s.add_all([Owner(id=i[0], name=f"o{i[0]}") for i in ids.values()])
        s.commit()
        seen["outer active after commit"] = {n: t.is_active for n, t in outer.items()}
        seen["stored after commit"] = stored()
        # flush, then rollback()
        s.add_all([Owner(id=i[1], name=f"o{i[1]}") for i in ids.values()])
        s.flush()
        if session_rollback:
            s.rollback()
        else:
            for o in list(s.new):
                s.expunge(o)
            s.execute(Owner.__table__.delete().where(Owner.id.in_([i[1] for i in ids.values()])))
        seen["outer active after rollback"] = {n: t.is_active for n, t in outer.items()}
        seen["session sees after rollback"] = sorted(s.scalars(select(Owner.id)))
        # a savepoint rolled back, another released, and a last commit()
        sp = s.begin_nested()
        s.add_all([Owner(id=i[2], name=f"x{i[2]}") for i in ids.values()])
        s.flush()
        sp.rollback()
        with s.begin_nested():
            s.add_all([Owner(id=i[2], name=f"o{i[2]}") for i in ids.values()])
        s.commit()
        seen["session sees at the end"] = sorted(s.scalars(select(Owner.id)))
    finally:
        s.close()
        seen["outer active after close"] = {n: t.is_active for n, t in outer.items()}
        for t in outer.values():
            if t.is_active:
                t.rollback()
        for c in connections.values():
            c.close()
    seen["stored after the outer rollback"] = stored()
    return seen


IDS = {"a": (1, 2, 3), "b": (101, 102, 103)}


def by_shard(seen: dict[str, Any], shard: str) -> dict[str, Any]:
    """The observations of one shard, ids made comparable across shards (``b``'s ids are
    ``a``'s plus 100)."""
    shift = IDS[shard][0] - IDS["a"][0]

    def one(v: Any) -> Any:
        if isinstance(v, dict):
            return one(v[shard])
        if isinstance(v, set):
            return {i - shift for i in v}
        if isinstance(v, list):
            return sorted(i - shift for i in v if shard_of(i) == shard)
        return v

    return {k: one(v) for k, v in seen.items()}


@pytest.mark.parametrize("session_rollback", [True, False], ids=["rollback", "no_rollback"])
@pytest.mark.parametrize("mode", MODES)
def test_same_as_a_plain_session_on_every_shard(shards: Shards, mode: str,
                                                session_rollback: bool) -> None:
    # The plain Session on shard a alone: what SQLAlchemy does with this mode.
    plain = scenario(
        lambda connections, m: Session(bind=connections["a"], join_transaction_mode=m),  # type: ignore[arg-type]
        shards.engines, {"a": IDS["a"]}, mode,
        lambda: {"a": shards.stored()["a"]}, session_rollback=session_rollback,
    )
    # clean slate for the sharded run (some modes commit for real)
    for e in shards.engines.values():
        with e.begin() as c:
            c.execute(Owner.__table__.delete())
    ours = scenario(sharded, shards.engines, IDS, mode, shards.stored,
                    session_rollback=session_rollback)
    expected = by_shard(plain, "a")
    for shard in IDS:
        assert by_shard(ours, shard) == expected, shard
    if mode == "control_fully":
        # the session controls the outer transactions: its commit is a real one
        assert ours["stored after commit"] == {"a": {1}, "b": {101}}
    else:
        # commit() of an outer transaction the session does not control is no commit
        assert ours["stored after commit"] == {"a": set(), "b": set()}
        if mode == "create_savepoint" or not session_rollback:
            # and after the outer rollback nothing is left on any shard
            assert ours["stored after the outer rollback"] == {"a": set(), "b": set()}
    shards.no_branch_in_doubt()


def test_expectations_of_the_plain_session(shards: Shards) -> None:
    """What the parity test compares against, spelled out for the modes the recipe uses
    (so the comparison cannot pass on two equally wrong runs)."""
    for mode, session_rollback in (("create_savepoint", True), ("rollback_only", False)):
        seen = scenario(
            lambda connections, m: Session(bind=connections["a"], join_transaction_mode=m),  # type: ignore[arg-type]
            shards.engines, {"a": IDS["a"]}, mode, lambda: {"a": shards.stored()["a"]},
            session_rollback=session_rollback,
        )
        assert seen["stored after commit"] == {"a": set()}
        assert seen["outer active after commit"] == {"a": True}
        assert seen["stored after the outer rollback"] == {"a": set()}
    seen = scenario(
        lambda connections, m: Session(bind=connections["a"], join_transaction_mode=m),  # type: ignore[arg-type]
        shards.engines, {"a": IDS["a"]}, "create_savepoint", lambda: {"a": shards.stored()["a"]},
    )
    assert seen["session sees after rollback"] == [1]  # only back to the savepoint
    assert seen["session sees at the end"] == [1, 3]


# --- the fixture recipe of docs/session.md, verbatim ---------------------------------------

# (what the documented fixture expects a test suite to define)
placement = Placement({Owner: HashSharding(Owner.id)})


@pytest.fixture
def shard_engines(shards: Shards) -> dict[str, Engine]:
    return shards.engines


@pytest.fixture
def session(shard_engines):  # type: ignore[no-untyped-def]
    # One connection per shard, each in an outer transaction the test never commits.
    connections = {name: engine.connect() for name, engine in shard_engines.items()}
    outer = [connection.begin() for connection in connections.values()]
    session = ShardedSession(
        placement=placement,
        shards=connections,
        join_transaction_mode="create_savepoint",
    )
    yield session
    session.close()
    for transaction in outer:
        transaction.rollback()  # everything the test did, commit() included, goes away
    for connection in connections.values():
        connection.close()


def test_the_documented_fixture_is_this_one() -> None:
    text = DOCS.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    documented = next(b for b in blocks if "def session(shard_engines)" in b)
    source = inspect.getsource(session.__wrapped__)  # type: ignore[attr-defined]
    source = "@pytest.fixture\n" + source.split("\n", 1)[1]
    strip = re.compile(r"  # type: ignore\[[^]]*\]")
    assert strip.sub("", source).strip() in documented


def test_recipe_commit_inside_a_test(session: ShardedSession) -> None:
    owners = [Owner(id=i, name=f"o{i}") for i in range(1, 9)]
    session.add_all(owners)
    session.commit()
    assert {o.id for o in session.scalars(select(Owner))} == set(range(1, 9))
    session.delete(owners[0])
    session.commit()
    assert session.get(Owner, 1) is None and session.get(Owner, 2) is not None


def test_recipe_rollback_inside_a_test(session: ShardedSession) -> None:
    session.add_all([Owner(id=i, name=f"o{i}") for i in range(1, 9)])
    session.flush()
    session.rollback()
    session.add(Owner(id=20, name="after"))
    session.commit()
    assert [o.id for o in session.scalars(select(Owner))] == [20]


def test_recipe_leaves_nothing_behind(shards: Shards) -> None:
    """The recipe's fixture, driven by hand as pytest drives it, around a test that
    commits on every shard: afterwards no shard holds a row."""
    gen = session.__wrapped__(shards.engines)  # type: ignore[attr-defined]
    s = next(gen)
    s.add_all([Owner(id=i, name=f"o{i}") for i in range(1, 9)])
    s.commit()
    assert len(s.scalars(select(Owner)).all()) == 8
    written = {n for n, ids in ((n, {o.id for o in s.scalars(select(Owner))
                                     if placement.shards_for_identity(Owner.__mapper__, (o.id,))
                                     == [n]}) for n in shards.engines) if ids}
    assert written == set(shards.engines)  # the eight owners reached both shards
    with pytest.raises(StopIteration):
        next(gen)
    assert shards.stored() == {"a": set(), "b": set()}
    shards.no_branch_in_doubt()
