"""Query scenarios: parallel fan-out behind 5 ms of latency, and a top-k merge's memory."""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Callable
from typing import Any

from sqlalchemy import Integer, String, create_engine, insert, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.ext.horizontal_shard import ShardedSession as SAShardedSession
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from shardsession import ShardedSession

from ._env import BenchEnv, median_pair


class _Base(DeclarativeBase):
    pass


class Reading(_Base):
    __tablename__ = "readings"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    station: Mapped[str] = mapped_column(String(20))
    value: Mapped[int] = mapped_column(Integer)


def _sessions(engines: dict[str, Engine]) -> tuple[Callable[[], Session], Callable[[], Session]]:
    shards = sorted(engines)

    def ours() -> Session:
        return ShardedSession(
            shard_chooser=lambda *a, **k: shards[0],
            identity_chooser=lambda *a, **k: shards,
            execute_chooser=lambda ctx: shards,
            shards=engines,
        )

    def baseline() -> Session:
        return SAShardedSession(
            shard_chooser=lambda *a, **k: shards[0],
            identity_chooser=lambda *a, **k: shards,
            execute_chooser=lambda ctx: shards,
            shards=engines,
        )

    return ours, baseline


def _fill(engine: Engine, shard_index: int, n: int) -> None:
    _Base.metadata.drop_all(engine)
    _Base.metadata.create_all(engine)
    batch = 10_000
    with engine.begin() as conn:
        for start in range(0, n, batch):
            conn.execute(
                insert(Reading),
                [
                    {
                        "id": shard_index * 10_000_000 + i,
                        "station": f"st{i % 97}",
                        "value": (i * 7919 + shard_index * 104_729) % 1_000_003,
                    }
                    for i in range(start, min(start + batch, n))
                ],
            )
        if engine.dialect.name == "postgresql":
            conn.execute(text("ANALYZE readings"))


def fanout_4shards_rtt5ms(env: BenchEnv, rounds: int = 15) -> dict[str, Any]:
    """One ORM query over 4 PostgreSQL shards, each behind a FaultProxy adding 5 ms per
    round trip: ours (parallel, merged) vs SQLAlchemy's horizontal_shard (sequential).

    The query is ``select(Reading).where(value < k).order_by(value).limit(20)``; both
    sides run it inside an open transaction whose connections are already checked out, so
    the measurement is the query round trips, not connection setup.  Target ratio: <= 0.35.
    """
    urls = env.pg_databases(4)
    for i, url in enumerate(urls):
        _fill(create_engine(url), i, 2_000)
    engines = {}
    for i, url in enumerate(urls):
        # Out of process: the modelled network must not share our GIL (a real one does not).
        _, proxied = env.proxy(url, latency=0.005, process=True)
        engines[f"s{i}"] = create_engine(proxied, pool_size=2)
    ours_factory, baseline_factory = _sessions(engines)
    stmt = select(Reading).where(Reading.value < 500_000).order_by(Reading.value).limit(20)
    ours_session = ours_factory()
    baseline_session = baseline_factory()
    # warm up: connections, transactions begun, compiled caches
    first = [r.id for r in ours_session.scalars(stmt)]
    baseline_session.execute(stmt).all()

    def timed(session: Session) -> Callable[[], float]:
        def run() -> float:
            started = time.perf_counter()
            session.execute(stmt).all()
            return time.perf_counter() - started

        return run

    result: dict[str, Any] = dict(median_pair(timed(ours_session), timed(baseline_session), rounds))
    result["rows_ours"] = len(first)
    result["target_ratio"] = 0.35
    ours_session.close()
    baseline_session.close()
    for e in engines.values():
        e.dispose()
    return result


def topk_merge(env: BenchEnv, rounds: int = 5) -> dict[str, Any]:
    """ORDER BY value DESC LIMIT 10 over 4 shards x 100,000 rows (PostgreSQL when the
    servers are available, else SQLite files): the 10 rows are checked against one
    database's answer, and tracemalloc's peak during the merged query is reported next to
    a run over 4 x 10,000 rows, to show it does not grow with the row count."""
    try:
        urls = env.pg_databases(5)
    except Exception:  # no PostgreSQL: SQLite files keep the scenario runnable
        import tempfile

        folder = tempfile.mkdtemp(prefix="ss-topk-")
        urls = [f"sqlite:///{folder}/s{i}.db" for i in range(5)]
    out: dict[str, Any] = {"backend": create_engine(urls[0]).dialect.name}
    stmt = select(Reading.id, Reading.value).order_by(Reading.value.desc(), Reading.id).limit(10)
    for n in (10_000, 100_000):
        engines = {f"s{i}": create_engine(u) for i, u in enumerate(urls[:4])}
        for i, e in enumerate(engines.values()):
            _fill(e, i, n)
        oracle = create_engine(urls[4])
        _Base.metadata.drop_all(oracle)
        _Base.metadata.create_all(oracle)
        with oracle.begin() as conn:
            for e in engines.values():
                with e.connect() as src:
                    result = src.execute(select(Reading.__table__)).mappings()
                    rows = [dict(m) for m in result]
                conn.execute(insert(Reading), rows)
        with Session(oracle) as o:
            want = [tuple(r) for r in o.execute(stmt)]
        ours_factory, baseline_factory = _sessions(engines)
        session = ours_factory()
        got = [tuple(r) for r in session.execute(stmt)]  # warm-up
        tracemalloc.start()
        tracemalloc.reset_peak()
        times = []
        for _ in range(rounds):
            started = time.perf_counter()
            got = [tuple(r) for r in session.execute(stmt)]
            times.append(time.perf_counter() - started)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        session.close()
        base = baseline_factory()
        started = time.perf_counter()
        concatenated = base.execute(stmt).all()
        baseline_time = time.perf_counter() - started
        base.close()
        out[f"rows_per_shard_{n}"] = {
            "correct": got == want,
            "peak_bytes": peak,
            "seconds": sorted(times)[len(times) // 2],
            "baseline_seconds": baseline_time,
            "baseline_rows": len(concatenated),
        }
        for e in [*engines.values(), oracle]:
            e.dispose()
    small, big = out["rows_per_shard_10000"], out["rows_per_shard_100000"]
    out["ours"] = big["seconds"]
    out["baseline"] = big["baseline_seconds"]
    out["ratio"] = big["seconds"] / big["baseline_seconds"]
    out["correct"] = small["correct"] and big["correct"]
    out["peak_bytes"] = big["peak_bytes"]
    out["peak_growth_10x_rows"] = big["peak_bytes"] / max(small["peak_bytes"], 1)
    return out
