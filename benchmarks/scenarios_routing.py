"""Routing scenarios: flush cost over SQLite shards, one-shard transaction cost on PostgreSQL."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Integer, String, create_engine, delete, select
from sqlalchemy.ext.horizontal_shard import ShardedSession as SAShardedSession
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from shardsession import HashSharding, Placement, ShardedSession

from ._env import BenchEnv, median_pair


class _Base(DeclarativeBase):
    pass


class Item(_Base):
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))
    qty: Mapped[int] = mapped_column(Integer)


def routing_flush_10k(env: BenchEnv, rounds: int) -> dict[str, Any]:
    """ORM flush of 10,000 objects over 4 SQLite shards: ours vs horizontal_shard.

    The baseline's shard chooser places by the same stable hash, so both sides route the
    same rows to the same files; only the session machinery differs.
    """
    shards = [f"s{i}" for i in range(4)]
    folder = Path(tempfile.mkdtemp(prefix="ss-bench-"))
    engines = {s: create_engine(f"sqlite:///{folder / s}.db") for s in shards}
    for e in engines.values():
        _Base.metadata.create_all(e)
    hasher = HashSharding("id", shards)

    def chooser(mapper: Any, instance: Any, clause: Any = None) -> str:
        return hasher.shard_for(instance.id)

    baseline_maker = sessionmaker(
        class_=SAShardedSession,
        shards=engines,
        shard_chooser=chooser,
        identity_chooser=lambda *a, **k: shards,
        execute_chooser=lambda ctx: shards,
    )
    ours_maker = sessionmaker(
        class_=ShardedSession,
        shards=engines,
        placement=Placement({Item: HashSharding(Item.id)}),
        atomic="best_effort",  # four SQLite files cannot commit atomically; same as baseline
    )

    def clear() -> None:
        for e in engines.values():
            with e.begin() as conn:
                conn.execute(delete(Item))

    def run(maker: Any) -> float:
        clear()
        objs = [Item(id=i, name=f"item-{i}", qty=i % 7) for i in range(10_000)]
        with maker() as s:
            t0 = time.perf_counter()
            s.add_all(objs)
            s.flush()
            elapsed = time.perf_counter() - t0
            s.commit()
        return elapsed

    res: dict[str, Any] = median_pair(lambda: run(ours_maker), lambda: run(baseline_maker), rounds)
    with ours_maker() as s:
        res["rows_checked"] = sum(
            len(s.scalars(select(Item.id), bind_arguments={"shard_id": sh}).all()) for sh in shards
        )
    for e in engines.values():
        e.dispose()
    return res


def single_shard_txn(env: BenchEnv, rounds: int) -> dict[str, Any]:
    """A small transaction (get, update, insert, commit) on one PostgreSQL shard:
    ours (two-shard placement, transaction touching one) vs a plain Session."""
    return _single_shard(env.pg_databases(2), rounds)


def single_shard_txn_mariadb(env: BenchEnv, rounds: int) -> dict[str, Any]:
    """The same small transaction on one MariaDB shard (no target of its own: a first
    MariaDB shard begins without XA, so it should cost what single_shard_txn costs)."""
    server = env.server("mysql")
    return _single_shard([server.create_database(), server.create_database()], rounds)


def _single_shard(urls: list[str], rounds: int) -> dict[str, Any]:
    engines = {"a": create_engine(urls[0]), "b": create_engine(urls[1])}
    for e in engines.values():
        _Base.metadata.create_all(e)
    placement = Placement({Item: HashSharding(Item.id)})
    placement.bind(list(engines))
    ours_maker = sessionmaker(class_=ShardedSession, shards=engines, placement=placement)
    home = placement.shards_for_identity(Item.__mapper__, (1,))[0]
    plain_maker = sessionmaker(bind=engines[home])
    with plain_maker.begin() as s:
        s.add(Item(id=1, name="counter", qty=0))
    same_shard_ids = [i for i in range(2, 400_000) if hasher_of(placement, i) == home]
    next_id = iter(same_shard_ids)

    def one(maker: Any) -> float:
        t0 = time.perf_counter()
        s: Session
        with maker.begin() as s:
            item = s.get(Item, 1)
            item.qty += 1
            s.add(Item(id=next(next_id), name="x", qty=1))
        return time.perf_counter() - t0

    # Reference: SQLAlchemy's own sharded session on the same two engines, with choosers
    # that route exactly as the placement does (the cost of do_orm_execute-based routing).
    sa_maker = sessionmaker(
        class_=SAShardedSession,
        shards=engines,
        shard_chooser=lambda m, inst, clause=None: hasher_of(placement, inst.id),
        identity_chooser=lambda m, pk, **kw: [hasher_of(placement, pk[0])],
        execute_chooser=lambda ctx: [home],
    )
    makers = {"ours": ours_maker, "plain": plain_maker, "sa": sa_maker}
    for maker in makers.values():  # warm pools and caches
        for _ in range(100):
            one(maker)
    # Transactions of the three sides alternate one by one, so a noisy moment of this
    # shared machine (or of the server) hits all of them alike; medians per transaction.
    times: dict[str, list[float]] = {k: [] for k in makers}
    for _ in range(300 * max(1, rounds)):
        for name, maker in makers.items():
            times[name].append(one(maker))
    med = {k: statistics.median(v) for k, v in times.items()}
    res: dict[str, Any] = {
        "ours": med["ours"],
        "baseline": med["plain"],
        "ratio": med["ours"] / med["plain"],
        "horizontal_shard_ratio": round(med["sa"] / med["plain"], 3),
        "per": "transaction",
        "transactions_per_side": len(times["ours"]),
    }
    for e in engines.values():
        e.dispose()
    return res


def hasher_of(placement: Placement, i: int) -> str:
    return placement.shards_for_identity(Item.__mapper__, (i,))[0]
