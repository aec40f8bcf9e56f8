"""Bulk statements of a mapper over several tables (joined inheritance), and what a bulk
INSERT without RETURNING returns, over two shards: as SQLAlchemy does on one database.

Found by SQLAlchemy's own ``test/orm/dml`` tests run with a one-shard sharded session
(``tests/sa_suite``). Runs on two SQLite files and on PostgreSQL + MariaDB shards; stored
rows are read back through engines of their own.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, ForeignKey, String, create_engine, insert, select, update
from sqlalchemy.dialects import sqlite
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from shardsession import HashSharding, Placement, ShardedSession


class Base(DeclarativeBase):
    pass


class Animal(Base):
    __tablename__ = "bi_animals"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    kind: Mapped[str] = mapped_column(String(20))
    name: Mapped[str] = mapped_column(String(40))
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "animal"}


class Dog(Animal):
    __tablename__ = "bi_dogs"
    id: Mapped[int] = mapped_column(ForeignKey("bi_animals.id"), primary_key=True)
    bark: Mapped[str] = mapped_column(String(40))
    __mapper_args__ = {"polymorphic_identity": "dog"}


@pytest.fixture(params=["sqlite", "pg+mariadb"])
def engines(request: pytest.FixtureRequest, sqlite_dir: Path) -> Iterator[dict[str, Engine]]:
    if request.param == "sqlite":
        urls = {n: f"sqlite:///{sqlite_dir / n}.db" for n in ("a", "b")}
    else:
        urls = {"a": request.getfixturevalue("pg_url_a"),
                "b": request.getfixturevalue("mariadb_url")}
    found = {n: create_engine(u) for n, u in urls.items()}
    for e in found.values():
        Base.metadata.drop_all(e)
        Base.metadata.create_all(e)
    yield found
    for e in found.values():
        e.dispose()


def _maker(engines: dict[str, Engine]) -> Any:
    placement = Placement({Animal: HashSharding(Animal.id)})
    return sessionmaker(class_=ShardedSession, shards=engines, placement=placement,
                        atomic="best_effort")


def _spread(engines: dict[str, Engine], n: int) -> list[int]:
    """Ids, ``n`` of them on each shard."""
    strategy = HashSharding("id", sorted(engines))
    seen: dict[str, list[int]] = {s: [] for s in engines}
    i = 0
    while any(len(v) < n for v in seen.values()):
        i += 1
        if len(seen[strategy.shard_for(i)]) < n:
            seen[strategy.shard_for(i)].append(i)
    return sorted(x for v in seen.values() for x in v)


def _stored(engines: dict[str, Engine]) -> set[tuple[Any, ...]]:
    out: set[tuple[Any, ...]] = set()
    for e in engines.values():
        fresh = create_engine(e.url.render_as_string(hide_password=False))
        with fresh.connect() as c:
            out |= {tuple(r) for r in c.execute(
                select(Animal.__table__.c.id, Animal.__table__.c.name, Dog.__table__.c.bark)
                .join_from(Animal.__table__, Dog.__table__))}
        fresh.dispose()
    return out


def test_bulk_update_by_primary_key_of_a_joined_subclass(engines: dict[str, Engine]) -> None:
    """``session.execute(update(Dog), rows)`` updates both tables of each row on its
    shard (it was compiled as one UPDATE of the whole entity: a cartesian product of the
    two tables, or "Backend does not support additional tables in the SET clause")."""
    ids = _spread(engines, 2)
    with _maker(engines).begin() as s:
        s.execute(insert(Dog), [{"id": i, "name": f"d{i}", "bark": "woof"} for i in ids])
    with _maker(engines).begin() as s:
        s.execute(update(Dog), [{"id": i, "name": f"n{i}", "bark": "arf"} for i in ids])
    assert _stored(engines) == {(i, f"n{i}", "arf") for i in ids}


def test_bulk_insert_without_returning_returns_a_closed_result(
    engines: dict[str, Engine],
) -> None:
    """Without RETURNING, SQLAlchemy's ORM bulk INSERT returns an empty result that is
    already closed (its own test checks ``Result._soft_closed``); a sharded session
    returned one left open, on one shard and on several."""
    ids = _spread(engines, 2)
    with Session(engines["a"]) as plain:
        expected = plain.execute(insert(Dog), [{"id": 999, "name": "p", "bark": "b"}])
        assert expected._soft_closed
        plain.rollback()
    with _maker(engines).begin() as s:
        one = s.execute(insert(Dog), [{"id": ids[0], "name": "x", "bark": "b"}])
        many = s.execute(insert(Animal), [{"id": i, "kind": "animal", "name": "y"}
                                          for i in ids[1:]])
        assert one._soft_closed and many._soft_closed


def test_upsert_into_a_joined_subclass_refused_as_sqlalchemy_refuses(
    engines: dict[str, Engine],
) -> None:
    """SQLAlchemy refuses a bulk upsert into a mapper of several tables; a sharded session
    raises the same error before anything is sent (it sent the rows, and the dialect
    rejected them one shard at a time)."""
    stmt = sqlite.insert(Dog).on_conflict_do_nothing()
    with _maker(engines)() as s, pytest.raises(
        InvalidRequestError, match="not supported for multi-table mapper"
    ):
        s.execute(stmt, [{"id": i, "name": "u", "bark": "b"} for i in _spread(engines, 1)])
    assert _stored(engines) == set()
