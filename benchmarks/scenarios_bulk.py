"""Bulk scenarios: ORM bulk INSERT over PostgreSQL shards vs one PostgreSQL database."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import Integer, String, create_engine, func, insert, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from shardsession import HashSharding, Placement, ShardedSession

from ._env import BenchEnv, median_pair


class _Base(DeclarativeBase):
    pass


class Row(_Base):
    __tablename__ = "bulk_rows"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))
    qty: Mapped[int] = mapped_column(Integer)


ROWS = 100_000


def bulk_insert_100k(env: BenchEnv, rounds: int) -> dict[str, Any]:
    """100,000 rows by ``session.execute(insert(Row), rows)`` and commit: over 4
    PostgreSQL shards (two servers, shards in parallel, atomic commit) vs the same rows
    into one PostgreSQL database with a plain Session. Timed: the execute and the commit.
    """
    shard_urls = env.pg_databases(4)
    single_url = env.server("pg1").create_database()
    shards = {f"p{i}": create_engine(u) for i, u in enumerate(shard_urls)}
    single = create_engine(single_url)
    for e in [*shards.values(), single]:
        _Base.metadata.create_all(e)
    ours_maker = sessionmaker(class_=ShardedSession, shards=shards,
                              placement=Placement({Row: HashSharding(Row.id)}))
    plain_maker = sessionmaker(class_=Session, bind=single)
    rows = [{"id": i, "name": f"row-{i}", "qty": i % 7} for i in range(ROWS)]

    def clear() -> None:
        for e in [*shards.values(), single]:
            with e.begin() as conn:
                conn.execute(text("TRUNCATE bulk_rows"))

    def run(maker: Any) -> float:
        clear()
        with maker() as s:
            t0 = time.perf_counter()
            s.execute(insert(Row), rows)
            s.commit()
            return time.perf_counter() - t0

    res: dict[str, Any] = median_pair(lambda: run(ours_maker), lambda: run(plain_maker), rounds)
    run(ours_maker)  # (the last round may have been the baseline's, which clears the shards)
    counts = {}
    for name, e in shards.items():
        with e.connect() as conn:
            counts[name] = conn.scalar(select(func.count()).select_from(Row))
    res["rows_per_shard"] = counts
    assert sum(counts.values()) == ROWS, counts
    for e in [*shards.values(), single]:
        e.dispose()
    return res
