"""Isolation levels per shard, as a plain Session allows them, and what the commit
protocol does where two-phase commit cannot run at a level (MariaDB XA below REPEATABLE
READ): ``best_effort`` commits as SQLAlchemy does and warns, ``require`` refuses before
anything is committed. Stored rows are read by separate engines."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, select
from sqlalchemy.orm import Session

from shardsession import ShardedSession
from shardsession.coordinator import in_doubt
from shardsession.exc import CapabilityError, NonAtomicCommitWarning

from ._2pc_mixes import mix_urls
from .test_savepoints import Base, Owner, shard_of


def level_of(conn: Any) -> str:
    """The isolation level the server runs the connection's transaction at."""
    if conn.dialect.name == "postgresql":
        return str(conn.exec_driver_sql("SHOW transaction_isolation").scalar()).upper()
    return str(conn.exec_driver_sql("SELECT @@tx_isolation").scalar()).replace("-", " ")


def session(shards: dict[str, Any], **kw: Any) -> ShardedSession:
    return ShardedSession(
        shard_chooser=lambda mapper, instance, **k: shard_of(instance.id),
        identity_chooser=lambda mapper, pk, **k: [shard_of(pk[0])],
        execute_chooser=lambda ctx: list(shards),
        shards=shards, **kw,
    )


def stored(urls: dict[str, str]) -> dict[str, set[int]]:
    out = {}
    for n, u in urls.items():
        e = create_engine(u)
        with e.connect() as c:
            out[n] = set(c.scalars(select(Owner.id)))
        e.dispose()
    return out


def decisions(urls: dict[str, str]) -> dict[str, int]:
    out = {}
    for n, u in urls.items():
        e = create_engine(u)
        with e.connect() as c:
            try:
                out[n] = int(c.exec_driver_sql(
                    "SELECT count(*) FROM shardsession_decisions").scalar() or 0)
            except Exception:
                out[n] = 0
        e.dispose()
    return out


@pytest.fixture
def pg_mariadb(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    urls = mix_urls(request, "pg+mariadb")
    urls = {"a": urls["alpha"], "b": urls["beta"]}
    for u in urls.values():
        e = create_engine(u)
        Base.metadata.drop_all(e)
        Base.metadata.create_all(e)
        e.dispose()
    yield urls


@pytest.fixture
def two_mariadb(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    urls = mix_urls(request, "mariadb+mariadb")
    urls = {"a": urls["alpha"], "b": urls["beta"]}
    for u in urls.values():
        e = create_engine(u)
        Base.metadata.drop_all(e)
        Base.metadata.create_all(e)
        e.dispose()
    yield urls


@pytest.mark.parametrize("how", ["engine", "option_engine", "connection"])
@pytest.mark.parametrize("levels", [("SERIALIZABLE", "SERIALIZABLE"),
                                    ("REPEATABLE READ", "SERIALIZABLE"),
                                    ("READ COMMITTED", "REPEATABLE READ")])
def test_each_shard_runs_at_its_level_as_in_a_plain_session(
    pg_mariadb: dict[str, str], levels: tuple[str, str], how: str,
) -> None:
    wanted = dict(zip(("a", "b"), levels, strict=True))
    base = {n: create_engine(u) for n, u in pg_mariadb.items()}
    if how == "engine":
        engines: dict[str, Engine] = {
            n: create_engine(u, isolation_level=wanted[n]) for n, u in pg_mariadb.items()}
    elif how == "option_engine":
        engines = {n: base[n].execution_options(isolation_level=wanted[n]) for n in base}
    else:
        engines = base
    options = ({n: {"isolation_level": wanted[n]} for n in engines} if how == "connection"
               else dict.fromkeys(engines))
    # a plain Session per engine, as SQLAlchemy runs it
    plain = {}
    for n, e in engines.items():
        with Session(e) as p:
            plain[n] = level_of(p.connection(execution_options=options[n]))
    assert plain == wanted
    s = session(engines, atomic="require")
    for n in engines:
        conn = s.connection(bind_arguments={"shard_id": n}, execution_options=options[n])
        assert level_of(conn) == wanted[n], n
    s.add_all([Owner(id=1, name="a1"), Owner(id=101, name="b1")])
    s.commit()
    s.close()
    assert stored(pg_mariadb) == {"a": {1}, "b": {101}}
    assert in_doubt(base) == []
    for e in {*engines.values(), *base.values()}:
        e.dispose()


@pytest.mark.parametrize("atomic", ["best_effort", "require"])
def test_mariadb_read_committed_with_postgresql_is_atomic(
    pg_mariadb: dict[str, str], atomic: str,
) -> None:
    """The issue's case (MariaDB at READ COMMITTED next to PostgreSQL): the MariaDB
    shard cannot prepare at that level but can hold the decision, so the commit is
    atomic in both modes (before: CapabilityError even under best_effort)."""
    engines = {"a": create_engine(pg_mariadb["a"]),
               "b": create_engine(pg_mariadb["b"], isolation_level="READ COMMITTED")}
    s = session(engines, atomic=atomic)
    s.add(Owner(id=1, name="a1"))  # PostgreSQL first: the MariaDB shard joins second
    s.flush()
    s.add(Owner(id=101, name="b1"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s.commit()
    s.close()
    assert stored(pg_mariadb) == {"a": {1}, "b": {101}}
    assert decisions(pg_mariadb) == {"a": 0, "b": 1}  # MariaDB decided
    assert in_doubt(engines) == []
    for e in engines.values():
        e.dispose()


def test_two_mariadb_shards_below_repeatable_read(two_mariadb: dict[str, str]) -> None:
    """Two written MariaDB shards where the second runs at READ COMMITTED: no XA for it,
    and two shards that cannot prepare cannot commit atomically."""
    engines = {"a": create_engine(two_mariadb["a"]),
               "b": create_engine(two_mariadb["b"], isolation_level="READ COMMITTED")}

    def write(s: ShardedSession, ids: tuple[int, int]) -> None:
        s.add(Owner(id=ids[0], name=f"o{ids[0]}"))
        s.flush()
        s.add(Owner(id=ids[1], name=f"o{ids[1]}"))
        s.flush()

    # require: refused before anything is committed, naming the shard and the level
    s = session(engines, atomic="require")
    write(s, (1, 101))
    with pytest.raises(CapabilityError) as ei:
        s.commit()
    assert ei.value.shard_id == "b" and "REPEATABLE READ" in str(ei.value)
    s.close()
    assert stored(two_mariadb) == {"a": set(), "b": set()}

    # best effort (the drop-in default): committed one after the other, with a warning
    s = session(engines)
    write(s, (2, 102))
    with pytest.warns(NonAtomicCommitWarning):
        s.commit()
    s.close()
    assert stored(two_mariadb) == {"a": {2}, "b": {102}}

    # one writer at READ COMMITTED next to a reader: a plain one-phase commit
    s = session(engines, atomic="require")
    s.connection(bind_arguments={"shard_id": "a"}).execute(select(Owner.id))
    s.add(Owner(id=103, name="o103"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s.commit()
    s.close()
    assert stored(two_mariadb) == {"a": {2}, "b": {102, 103}}
    assert in_doubt(engines) == []
    for e in engines.values():
        e.dispose()
