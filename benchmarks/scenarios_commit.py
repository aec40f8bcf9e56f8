"""Commit scenarios: atomic commit over 3 PostgreSQL shards, recovery throughput."""

from __future__ import annotations

import time
from typing import Any

from harness import servers
from sqlalchemy import Integer, String, create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.ext.horizontal_shard import ShardedSession as SAShardedSession
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from shardsession import HashSharding, Placement, ShardedSession
from shardsession.coordinator import TransactionCoordinator, in_doubt, recover

from ._env import BenchEnv, median_pair


class _Base(DeclarativeBase):
    pass


class Entry(_Base):
    __tablename__ = "bench_entries"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    note: Mapped[str] = mapped_column(String(40))


def _ids_per_shard(placement: Placement, shards: list[str], start: int, n: int) -> list[list[int]]:
    """For each of ``n`` transactions, one fresh id per shard (in shard order)."""
    pools: dict[str, list[int]] = {s: [] for s in shards}
    i = start
    while min(len(p) for p in pools.values()) < n:
        i += 1
        s = placement.shards_for_identity(Entry.__mapper__, (i,))[0]
        if len(pools[s]) < n:
            pools[s].append(i)
    return [[pools[s][k] for s in shards] for k in range(n)]


def commit_3shards_rtt2ms(env: BenchEnv, rounds: int) -> dict[str, Any]:
    """A transaction inserting one row on each of 3 PostgreSQL shards, each behind a proxy
    adding 2 ms per round trip: ours (atomic, crash-safe) vs ``Session(twophase=True)``
    (SQLAlchemy's horizontal_shard with the same hash routing)."""
    urls = env.pg_databases(3)
    shards = ["s0", "s1", "s2"]
    direct = [create_engine(u) for u in urls]
    for e in direct:
        _Base.metadata.create_all(e)
    engines = {s: create_engine(env.proxy(u, latency=0.002)[1])
               for s, u in zip(shards, urls, strict=True)}
    placement = Placement({Entry: HashSharding(Entry.id)})
    placement.bind(shards)

    def chooser(mapper: Any, instance: Any, clause: Any = None) -> str:
        return placement.shards_for_identity(Entry.__mapper__, (instance.id,))[0]

    ours_maker = sessionmaker(class_=ShardedSession, shards=engines, placement=placement,
                              coordinator=TransactionCoordinator())
    base_maker = sessionmaker(
        class_=SAShardedSession, shards=engines, shard_chooser=chooser,
        identity_chooser=lambda *a, **k: shards, execute_chooser=lambda ctx: shards,
        twophase=True,
    )
    n = 20
    ids = iter(_ids_per_shard(placement, shards, 0, n * (4 * rounds + 8)))
    one_ids = iter(range(10_000_000, 10_100_000))
    one_engine = engines["s0"]

    def run(maker: Any) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            with maker() as s:
                s.add_all([Entry(id=i, note="x") for i in next(ids)])
                s.commit()
        return (time.perf_counter() - t0) / n

    def run_one_shard() -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            with Session(one_engine) as s:
                s.add(Entry(id=next(one_ids), note="x"))
                s.commit()
        return (time.perf_counter() - t0) / n

    run(ours_maker), run(base_maker), run_one_shard()  # warm pools and caches
    res: dict[str, Any] = median_pair(lambda: run(ours_maker), lambda: run(base_maker), rounds)
    one = sorted(run_one_shard() for _ in range(rounds))[rounds // 2]
    res["one_shard_one_phase"] = one
    res["ours_vs_one_shard"] = res["ours"] / one
    res["per"] = "transaction"
    with Session(direct[0]) as s:
        res["rows_on_s0"] = s.scalar(text("SELECT count(*) FROM bench_entries"))
    for e in [*engines.values(), *direct]:
        e.dispose()
    return res


def recovery_1000(env: BenchEnv, rounds: int) -> dict[str, Any]:
    """recover() resolving 1,000 in-doubt transactions (2 PostgreSQL shards each, half
    with a COMMIT decision, half undecided and so presumed aborted)."""
    count = 1000
    # The shared benchmark servers allow 64 prepared transactions: this one needs 2,000.
    server = servers.start_postgres("bench-recovery", max_prepared_transactions=2100)
    try:
        return _recovery(server, count)
    finally:
        server.teardown()


def _recovery(server: Any, count: int) -> dict[str, Any]:
    urls = [server.create_database(), server.create_database()]
    engines = {"p0": create_engine(urls[0]), "p1": create_engine(urls[1])}
    for n, e in engines.items():
        with e.begin() as c:
            c.exec_driver_sql(f"CREATE TABLE bench_planted_{n} (id INTEGER PRIMARY KEY)")
    _plant_direct(engines, count)
    planted = len(in_doubt(engines))
    t0 = time.perf_counter()
    report = recover(engines, grace_period=0)
    elapsed = time.perf_counter() - t0
    left = len(in_doubt(engines))
    for e in engines.values():
        e.dispose()
    return {
        "ours": elapsed,
        "baseline": None,
        "in_doubt_branches": planted,
        "committed": len(report.committed),
        "rolled_back": len(report.rolled_back),
        "left_after": left,
        "errors": len(report.errors),
    }


def _plant_direct(engines: dict[str, Engine], count: int) -> None:
    """Plant with the adapters: each transaction prepared on both shards (p0 decides;
    odd ones get a COMMIT decision row, even ones none).

    Done in batches over parallel connections so planting stays quick; the transactions
    are exactly what a coordinator killed after its PREPAREs (or its decision) leaves.
    """
    from shardsession.backends import DecisionRow, Outcome, adapter_for
    from shardsession.coordinator.identity import ensure_identity
    from shardsession.coordinator.xid import Xid, new_gtrid

    adapter = adapter_for("postgresql")
    raw = {n: e.raw_connection() for n, e in engines.items()}
    try:
        with engines["p0"].connect() as c:
            c = c.execution_options(isolation_level="AUTOCOMMIT")
            adapter.ensure_decision_table(c.connection.dbapi_connection)
        cluster, _ = ensure_identity(adapter, engines["p0"])
        for i in range(count):
            gtrid = new_gtrid("p0", cluster=cluster)
            for k, (n, conn) in enumerate(raw.items()):
                cur = conn.cursor()
                cur.execute(f"INSERT INTO bench_planted_{n} (id) VALUES (%s)", (i,))
                cur.close()
                xid = Xid.branch(gtrid, k)
                adapter.prepare(conn, xid)
                conn.commit()  # resets psycopg2's transaction state (no-op on the server)
            if i % 2:
                conn0 = raw["p0"]
                adapter.insert_decision(conn0, DecisionRow(gtrid, Outcome.COMMIT, time.time()))
                conn0.commit()
    finally:
        for conn in raw.values():
            conn.close()
