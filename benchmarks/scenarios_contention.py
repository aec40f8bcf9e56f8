"""Contention scenario: cross-shard transfers between hot accounts from 16 threads.

``transfers_contended``: each transfer moves an amount between two accounts on different
shards of three PostgreSQL databases (over the two servers), in one atomic commit, through
:func:`shardsession.run_transaction`; most transfers touch a few hot accounts, in random
order, so cross-shard deadlocks happen all the time and the distributed deadlock detector
breaks them (default server lock settings, default ``deadlock_timeout``). A recovery worker
runs ``recover()`` meanwhile. The baseline: the same transfers over the same accounts in
one PostgreSQL database with plain Sessions (PostgreSQL's own deadlock detector, 1 s).

``ours`` / ``baseline`` are seconds per committed transfer (1 / throughput), so the ratio
reads like the other scenarios' (lower is better). ``SHARDSESSION_CONTENDED_SECONDS`` sets
each side's duration (default 30 s); ``rounds`` is not used (one run per side).
"""

from __future__ import annotations

import contextlib
import os
import random
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Column, Integer, MetaData, Table, create_engine, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from shardsession import CommitIncomplete, run_transaction
from shardsession.coordinator import TransactionCoordinator, deadlock, in_doubt, recover

from ._env import BenchEnv

THREADS = 16
ACCOUNTS_PER_SHARD = 20
HOT_PER_SHARD = 4
HOT_SHARE = 0.5
START = 1000

md = MetaData()
accounts = Table("bench_accounts", md,
                 Column("id", Integer, primary_key=True, autoincrement=False),
                 Column("balance", Integer, nullable=False))


def _pick(rnd: random.Random) -> int:
    if rnd.random() < HOT_SHARE:
        return rnd.randrange(HOT_PER_SHARD)
    return rnd.randrange(ACCOUNTS_PER_SHARD)


def _move(s: Session, bind: Engine, account: int, amount: int) -> None:
    s.connection(bind_arguments={"bind": bind}).execute(
        accounts.update().where(accounts.c.id == account)
        .values(balance=accounts.c.balance + amount))


def _drive(seconds: float, make: Callable[[], Session],
           transfer: Callable[[Session, random.Random], None]) -> dict[str, Any]:
    deadline = time.monotonic() + seconds
    latencies: list[float] = []
    retries = [0]
    incomplete = [0]
    failures: list[str] = []
    lock = threading.Lock()

    def worker(seed: int) -> None:
        rnd = random.Random(seed)
        attempts = [0]

        def unit(s: Session) -> None:
            attempts[0] += 1
            transfer(s, rnd)

        while time.monotonic() < deadline:
            attempts[0] = 0

            t0 = time.perf_counter()
            try:
                run_transaction(make, unit, retries=50)
            except CommitIncomplete:
                with lock:  # committed; recovery finishes the named branches
                    incomplete[0] += 1
            except Exception as e:
                with lock:
                    failures.append(f"{type(e).__name__}: {e}"[:200])
                continue
            took = time.perf_counter() - t0
            with lock:
                latencies.append(took)
                retries[0] += attempts[0] - 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 300)
    elapsed = time.monotonic() - t0
    latencies.sort()
    p99 = latencies[int(0.99 * (len(latencies) - 1))] if latencies else float("nan")
    return {"committed": len(latencies), "elapsed": elapsed, "retries": retries[0],
            "incomplete": incomplete[0],
            "failures": len(failures), "failure_sample": failures[:3],
            "committed_per_s": len(latencies) / elapsed,
            "p50_ms": 1000 * statistics.median(latencies) if latencies else float("nan"),
            "p99_ms": 1000 * p99}


def _total(engines: list[Engine]) -> int:
    total = 0
    for e in engines:
        with e.connect() as c:
            total += int(c.scalar(select(func.sum(accounts.c.balance))) or 0)
    return total


def transfers_contended(env: BenchEnv, rounds: int) -> dict[str, Any]:
    """16 threads of cross-shard transfers between hot accounts over 3 PostgreSQL shards
    (with a recovery worker), vs the same transfers in one PostgreSQL database."""
    seconds = float(os.environ.get("SHARDSESSION_CONTENDED_SECONDS", "30"))
    urls = env.pg_databases(4)
    shard_urls, one_url = urls[:3], urls[3]
    engines = [create_engine(u, pool_size=THREADS + 4) for u in shard_urls]
    one = create_engine(one_url, pool_size=THREADS + 4)
    for e in engines:
        md.create_all(e)
        with e.begin() as c:
            c.execute(accounts.insert(), [{"id": i, "balance": START}
                                          for i in range(ACCOUNTS_PER_SHARD)])
    md.create_all(one)
    with one.begin() as c:  # shard k's account i is account k * 1000 + i here
        c.execute(accounts.insert(), [{"id": k * 1000 + i, "balance": START}
                                      for k in range(3) for i in range(ACCOUNTS_PER_SHARD)])
    initial = _total(engines)

    # --- ours: 3 shards, atomic commits, detector, recovery worker ---------------------
    coord = TransactionCoordinator()
    names = {e: f"s{k}" for k, e in enumerate(engines)}

    def make_ours() -> Session:
        s = Session()
        coord.install(s, names.__getitem__)
        return s

    def transfer_ours(s: Session, rnd: random.Random) -> None:
        src, dst = rnd.sample(range(3), 2)
        amount = rnd.randint(1, 20)
        _move(s, engines[src], _pick(rnd), -amount)
        _move(s, engines[dst], _pick(rnd), amount)

    stop = threading.Event()
    passes = [0]
    named = {f"s{k}": e for k, e in enumerate(engines)}

    def recovery_worker() -> None:
        while not stop.is_set():
            with contextlib.suppress(Exception):  # keep going, as `recover --watch` does
                recover(named, grace_period=5.0)
            passes[0] += 1
            stop.wait(0.2)

    rec = threading.Thread(target=recovery_worker)
    rec.start()
    broken0 = deadlock.deadlocks_broken()
    ours = _drive(seconds, make_ours, transfer_ours)
    ours["deadlocks_broken"] = deadlock.deadlocks_broken() - broken0
    stop.set()
    rec.join(60)
    for _ in range(10):
        if recover(named, grace_period=0).resolved and not in_doubt(named):
            break
        time.sleep(1)
    ours["in_doubt_after"] = len(in_doubt(named))
    ours["total_conserved"] = _total(engines) == initial
    ours["recovery_passes"] = passes[0]
    coord.close()

    # --- baseline: one PostgreSQL database, plain Sessions -----------------------------
    def make_plain() -> Session:
        return Session(one)

    def transfer_plain(s: Session, rnd: random.Random) -> None:
        src, dst = rnd.sample(range(3), 2)
        amount = rnd.randint(1, 20)
        _move(s, one, src * 1000 + _pick(rnd), -amount)
        _move(s, one, dst * 1000 + _pick(rnd), amount)

    base = _drive(seconds, make_plain, transfer_plain)
    base["total_conserved"] = _total([one]) == initial

    for e in [*engines, one]:
        e.dispose()
    return {
        "ours": 1.0 / ours["committed_per_s"] if ours["committed"] else float("inf"),
        "baseline": 1.0 / base["committed_per_s"] if base["committed"] else float("inf"),
        "ours_committed_per_s": round(ours["committed_per_s"], 1),
        "baseline_committed_per_s": round(base["committed_per_s"], 1),
        "ours_p99_ms": round(ours["p99_ms"], 1),
        "baseline_p99_ms": round(base["p99_ms"], 1),
        "ours_p50_ms": round(ours["p50_ms"], 1),
        "baseline_p50_ms": round(base["p50_ms"], 1),
        "deadlocks_broken": ours["deadlocks_broken"],
        "ours_retries": ours["retries"],
        "baseline_retries": base["retries"],
        "ours_failures": ours["failures"],
        "ours_commit_incomplete": ours["incomplete"],
        "baseline_failures": base["failures"],
        "failure_sample": ours["failure_sample"] + base["failure_sample"],
        "total_conserved": ours["total_conserved"] and base["total_conserved"],
        "in_doubt_after": ours["in_doubt_after"],
        "recovery_passes": ours["recovery_passes"],
        "seconds_per_side": seconds,
    }
