"""asyncio scenario: the fan-out of an AsyncSession over 4 PostgreSQL shards (asyncpg)
behind 5 ms of latency, ours vs SQLAlchemy's horizontal_shard under asyncio."""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

from sqlalchemy import create_engine, select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.ext.horizontal_shard import ShardedSession as SAShardedSession

from shardsession import ShardedSession

from ._env import BenchEnv
from .scenarios_query import Reading, _fill


def async_fanout_4shards_rtt5ms(env: BenchEnv, rounds: int = 15) -> dict[str, Any]:
    """``fanout_4shards_rtt5ms`` under asyncio: the same ORM query (ORDER BY .. LIMIT 20
    over 4 shards, 5 ms per round trip through out-of-process proxies) by an
    ``AsyncSession`` with ``sync_session_class=ShardedSession`` (the shards overlapping on
    the event loop) vs ``sync_session_class=horizontal_shard.ShardedSession`` (one shard
    after another), both inside an open transaction with connections checked out.
    Target ratio: <= 0.35."""
    urls = env.pg_databases(4)
    for i, url in enumerate(urls):
        _fill(create_engine(url), i, 2_000)
    proxied = []
    for url in urls:
        _, through = env.proxy(url, latency=0.005, process=True)
        proxied.append(make_url(through).set(drivername="postgresql+asyncpg"))
    stmt = select(Reading).where(Reading.value < 500_000).order_by(Reading.value).limit(20)

    async def main() -> dict[str, Any]:
        engines = {f"s{i}": create_async_engine(u, pool_size=2) for i, u in enumerate(proxied)}
        shards = sorted(engines)
        choosers: dict[str, Any] = dict(
            shard_chooser=lambda *a, **k: shards[0],
            identity_chooser=lambda *a, **k: shards,
            execute_chooser=lambda ctx: shards,
            shards={k: e.sync_engine for k, e in engines.items()},
        )
        ours = AsyncSession(sync_session_class=ShardedSession, **choosers)
        baseline = AsyncSession(sync_session_class=SAShardedSession, **choosers)
        first = (await ours.scalars(stmt)).all()  # warm up: connections, caches
        (await baseline.execute(stmt)).all()

        async def timed(session: AsyncSession) -> float:
            started = time.perf_counter()
            (await session.execute(stmt)).all()
            return time.perf_counter() - started

        o: list[float] = []
        b: list[float] = []
        for i in range(rounds):
            if i % 2:
                b.append(await timed(baseline))
                o.append(await timed(ours))
            else:
                o.append(await timed(ours))
                b.append(await timed(baseline))
        await ours.close()
        await baseline.close()
        for e in engines.values():
            await e.dispose()
        mo, mb = statistics.median(o), statistics.median(b)
        return {"ours": mo, "baseline": mb, "ratio": mo / mb, "rows_ours": len(first),
                "target_ratio": 0.35}

    return asyncio.run(main())
