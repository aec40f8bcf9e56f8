"""Tenancy benchmarks: the cost of a tenant-scoped request."""

from __future__ import annotations

import statistics
import time
from typing import Any

from sqlalchemy import Integer, String, create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from shardsession import Placement, ShardedSession
from shardsession.tenancy import TenantDirectory, TenantSharding, tenancy_metadata

from ._env import BenchEnv


class _Base(DeclarativeBase):
    pass


class TenantItem(_Base):
    __tablename__ = "bench_tenant_item"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    tenant_id: Mapped[str] = mapped_column(String(40))
    name: Mapped[str] = mapped_column(String(40))
    qty: Mapped[int] = mapped_column(Integer)


def tenant_request(env: BenchEnv, rounds: int) -> dict[str, Any]:
    """A typical request of one tenant (one get, one small update, commit) on
    PostgreSQL: a tenant-scoped ShardedSession (two shards, the tenant on one; the
    statement filtered by tenant, the directory's owner row checked in the
    transaction) vs a plain Session on that tenant's engine."""
    urls = env.pg_databases(2)
    engines = {"a": create_engine(urls[0]), "b": create_engine(urls[1])}
    for e in engines.values():
        _Base.metadata.create_all(e)
        tenancy_metadata.create_all(e)
    directory = TenantDirectory("a")
    placement = Placement({TenantItem: TenantSharding(TenantItem.tenant_id, directory)})
    ours_maker = sessionmaker(class_=ShardedSession, shards=engines, placement=placement)
    ours_maker().close()  # binds the directory
    directory.add("acme", "a")
    plain_maker = sessionmaker(bind=engines["a"])
    with plain_maker.begin() as s:
        s.add(TenantItem(id=1, tenant_id="acme", name="counter", qty=0))

    def ours() -> float:
        t0 = time.perf_counter()
        s: Session
        with ours_maker(tenant="acme") as s:
            item = s.get(TenantItem, 1)
            assert item is not None
            item.qty += 1
            s.commit()
        return time.perf_counter() - t0

    def plain() -> float:
        t0 = time.perf_counter()
        s: Session
        with plain_maker() as s:
            item = s.get(TenantItem, 1)
            assert item is not None
            item.qty += 1
            s.commit()
        return time.perf_counter() - t0

    for _ in range(100):  # warm pools and caches
        ours()
        plain()
    times: dict[str, list[float]] = {"ours": [], "plain": []}
    for _ in range(300 * max(1, rounds)):  # alternate one by one (a noisy shared machine)
        times["ours"].append(ours())
        times["plain"].append(plain())
    med = {k: statistics.median(v) for k, v in times.items()}
    for e in engines.values():
        e.dispose()
    return {"ours": med["ours"], "baseline": med["plain"], "ratio": med["ours"] / med["plain"]}


def move_tenant_100k(env: BenchEnv, rounds: int) -> dict[str, Any]:
    """Rows per second of move_tenant: one tenant of 100,000 rows moved between two
    PostgreSQL databases (batches of 1,000; no concurrent writers). No baseline."""
    from sqlalchemy import insert

    from shardsession.tenancy import move_tenant

    urls = env.pg_databases(2)
    engines = {"a": create_engine(urls[0]), "b": create_engine(urls[1])}
    for e in engines.values():
        _Base.metadata.create_all(e)
        tenancy_metadata.create_all(e)
    directory = TenantDirectory("a")
    placement = Placement({TenantItem: TenantSharding(TenantItem.tenant_id, directory)})
    maker = sessionmaker(class_=ShardedSession, shards=engines, placement=placement)
    maker().close()
    directory.add("big", "a")
    n = 100_000
    with engines["a"].begin() as c:
        c.execute(insert(TenantItem.__table__),
                  [{"id": i, "tenant_id": "big", "name": f"n{i}", "qty": i} for i in range(n)])
    t0 = time.perf_counter()
    report = move_tenant(maker, "big", "b", batch_size=1000)
    elapsed = time.perf_counter() - t0
    assert report.copied["bench_tenant_item"] == n
    for e in engines.values():
        e.dispose()
    return {"ours": elapsed, "baseline": None, "ratio": None,
            "rows_per_second": round(n / elapsed)}
