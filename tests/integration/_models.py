"""Models and cluster helpers shared by the routing tests."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import (
    Engine,
    ForeignKey,
    Integer,
    String,
    create_engine,
    event,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker

from shardsession import (
    Broadcast,
    DirectorySharding,
    Follows,
    HashSharding,
    Pinned,
    Placement,
    RangeSharding,
    ShardedSession,
)

SHARDS = ("s0", "s1", "s2")
TENANTS = {"acme": "s1", "globex": "s2", "initech": "s0"}


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))
    orders: Mapped[list[Order]] = relationship(back_populates="user")


class Order(Base):
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    amount: Mapped[int] = mapped_column(Integer)
    user: Mapped[User] = relationship(back_populates="orders")


class Event(Base):
    __tablename__ = "events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    day: Mapped[int] = mapped_column(Integer)
    what: Mapped[str] = mapped_column(String(50))


class Tenant(Base):
    __tablename__ = "tenants"
    code: Mapped[str] = mapped_column(String(20), primary_key=True)
    title: Mapped[str] = mapped_column(String(50))


class Country(Base):
    __tablename__ = "countries"
    code: Mapped[str] = mapped_column(String(2), primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


class AuditLog(Base):
    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    message: Mapped[str] = mapped_column(String(100))


def make_placement() -> Placement:
    return Placement(
        {
            User: HashSharding(User.id),
            Order: Follows(Order.user),
            Event: RangeSharding(Event.day, [(100, "s0"), (200, "s1"), (None, "s2")]),
            Tenant: DirectorySharding(Tenant.code, TENANTS),
            Country: Broadcast(),
            AuditLog: Pinned("s2"),
        }
    )


@dataclass
class Cluster:
    engines: dict[str, Engine]
    statements: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def session_factory(self, **kw: Any) -> sessionmaker[ShardedSession]:
        if all(e.dialect.name == "sqlite" for e in self.engines.values()):
            # separate SQLite files cannot commit atomically together
            kw.setdefault("atomic", "best_effort")
        return sessionmaker(
            class_=ShardedSession, shards=self.engines, placement=make_placement(), **kw
        )

    def rows(self, shard: str, sql: str) -> list[tuple[Any, ...]]:
        with self.engines[shard].connect() as conn:
            return [tuple(r) for r in conn.execute(text(sql))]

    def where(self, sql: str) -> dict[str, list[tuple[Any, ...]]]:
        """Run ``sql`` on every shard directly; the shards that returned rows."""
        out = {}
        for s in self.engines:
            rows = self.rows(s, sql)
            if rows:
                out[s] = rows
        return out

    def reset_log(self) -> None:
        self.statements.clear()

    def touched(self, prefix: str = "") -> set[str]:
        return {
            s
            for s, stmts in self.statements.items()
            if any(st.lstrip().upper().startswith(prefix.upper()) for st in stmts)
        }


def shard_urls(request: pytest.FixtureRequest, backend: str, tmp_path: Any) -> list[str]:
    if backend == "sqlite":
        return [f"sqlite:///{tmp_path}/{s}.db" for s in SHARDS]
    if backend == "postgresql":
        a = request.getfixturevalue("pg_server_a")
        b = request.getfixturevalue("pg_server_b")
        return [a.create_database(), a.create_database(), b.create_database()]
    if backend == "mysql":
        m = request.getfixturevalue("mariadb_server")
        return [m.create_database() for _ in SHARDS]
    raise AssertionError(backend)


def build_cluster(urls: list[str]) -> Iterator[Cluster]:
    engines = {s: create_engine(u) for s, u in zip(SHARDS, urls, strict=True)}
    cluster = Cluster(engines)
    for s, e in engines.items():
        Base.metadata.drop_all(e)
        Base.metadata.create_all(e)

        def log(conn: Any, cursor: Any, statement: str, *a: Any, _s: str = s) -> None:
            cluster.statements[_s].append(statement)

        event.listen(e, "before_cursor_execute", log)
    cluster.reset_log()
    try:
        yield cluster
    finally:
        for e in engines.values():
            e.dispose()
