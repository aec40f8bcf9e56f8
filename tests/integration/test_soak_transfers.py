"""Concurrency soak (Jepsen's bank test, after quiescence): cross-shard transfers from 8
threads over PostgreSQL x2 and MariaDB while a recovery worker runs ``recover()`` in a loop.

Every transfer moves an amount between two accounts on different shards in one atomic
commit, with the servers' default lock settings. Conflicts (deadlocks across shards, broken
by the distributed deadlock detector; serialization failures; a prepare that loses against
a recovery claim) are retried as whole units of work, never by replaying statements. At
the end the total balance is unchanged and nothing of ours is in doubt.
``SHARDSESSION_SOAK_SECONDS`` sets the duration (default 30 s).
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg2
import pymysql
import pytest
from sqlalchemy import Column, Integer, MetaData, Table, create_engine, func, select
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, registry, sessionmaker

from shardsession import HashSharding, Placement, ShardedSession, is_retryable
from shardsession.coordinator import TransactionCoordinator, deadlock, in_doubt, recover
from shardsession.exc import CommitIncomplete, OutcomeUnknown, ShardSessionError

pytestmark = [pytest.mark.slow, pytest.mark.postgresql, pytest.mark.mysql]

ACCOUNTS_PER_SHARD = 20
START_BALANCE = 1000
THREADS = 8

md = MetaData()
accounts = Table("soak_accounts", md,
                 Column("id", Integer, primary_key=True, autoincrement=False),
                 Column("balance", Integer, nullable=False))

def _retryable(e: BaseException) -> bool:
    return is_retryable(e)


@dataclass
class Stats:
    commits: int = 0
    retries: int = 0
    incomplete: int = 0
    unknown: int = 0
    failures: list[str] = field(default_factory=list)
    recovery_passes: int = 0
    recovery_errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, name: str, n: int = 1) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + n)


@pytest.fixture
def bank(request: pytest.FixtureRequest) -> Iterator[dict[str, Engine]]:
    urls = {"alpha": request.getfixturevalue("pg_url_a"),
            "beta": request.getfixturevalue("pg_url_b"),
            "gamma": request.getfixturevalue("mariadb_url")}
    engines: dict[str, Engine] = {}
    for n, u in urls.items():
        e = _engine(u)
        md.create_all(e)
        with e.begin() as c:
            c.execute(accounts.insert(), [{"id": i, "balance": START_BALANCE}
                                          for i in range(ACCOUNTS_PER_SHARD)])
        engines[n] = e
    yield engines
    for e in engines.values():
        e.dispose()


def _engine(url: str, **kw: Any) -> Engine:
    """An engine with the servers' default lock settings (PostgreSQL waits forever,
    InnoDB 50 s): cross-shard deadlocks are seen by no server; the coordinator's
    distributed deadlock detector breaks them, and the transfer is retried."""
    return create_engine(url, pool_size=THREADS + 2, **kw)


def _total(engines: dict[str, Engine]) -> int:
    total = 0
    for e in engines.values():
        with e.connect() as c:
            total += int(c.scalar(select(func.sum(accounts.c.balance))) or 0)
    return total


def _transfer(coord: TransactionCoordinator, engines: dict[str, Engine],
              names: dict[Engine, str], rnd: random.Random) -> None:
    src, dst = rnd.sample(list(engines), 2)
    a, b = rnd.randrange(ACCOUNTS_PER_SHARD), rnd.randrange(ACCOUNTS_PER_SHARD)
    amount = rnd.randint(1, 50)
    s = Session()
    coord.install(s, names.__getitem__)
    try:
        s.connection(bind_arguments={"bind": engines[src]}).execute(
            accounts.update().where(accounts.c.id == a)
            .values(balance=accounts.c.balance - amount))
        s.connection(bind_arguments={"bind": engines[dst]}).execute(
            accounts.update().where(accounts.c.id == b)
            .values(balance=accounts.c.balance + amount))
        s.commit()
    finally:
        s.close()


def test_concurrent_transfers_with_recovery_worker(bank: dict[str, Engine]) -> None:
    seconds = float(os.environ.get("SHARDSESSION_SOAK_SECONDS", "30"))
    engines = bank
    names = {e: n for n, e in engines.items()}
    initial = _total(engines)
    assert initial == 3 * ACCOUNTS_PER_SHARD * START_BALANCE
    coord = TransactionCoordinator()
    broken = deadlock.deadlocks_broken()
    stats = Stats()
    stop = threading.Event()
    deadline = time.monotonic() + seconds

    def worker(seed: int) -> None:
        rnd = random.Random(seed)
        while time.monotonic() < deadline:
            for _attempt in range(50):
                try:
                    _transfer(coord, engines, names, rnd)
                    stats.add("commits")
                    break
                except CommitIncomplete:
                    stats.add("incomplete")  # committed; recovery finishes it
                    break
                except OutcomeUnknown:
                    stats.add("unknown")  # all or nothing: the total holds either way
                    break
                except (DBAPIError, ShardSessionError) as e:
                    if not _retryable(e):
                        with stats.lock:
                            stats.failures.append(f"{type(e).__name__}: {e}"[:300])
                        break
                    stats.add("retries")
                    time.sleep(rnd.random() * 0.01)

    def recovery_worker() -> None:
        while not stop.is_set():
            try:
                report = recover(engines, grace_period=5.0)
                if report.errors:
                    with stats.lock:
                        stats.recovery_errors.extend(report.errors)
            except Exception as e:  # keep going, like the CLI's --watch loop
                with stats.lock:
                    stats.recovery_errors.append(f"{type(e).__name__}: {e}")
            stats.add("recovery_passes")
            stop.wait(0.2)

    rec = threading.Thread(target=recovery_worker, name="soak-recovery")
    rec.start()
    threads = [threading.Thread(target=worker, args=(i,), name=f"soak-{i}")
               for i in range(THREADS)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 120)
    elapsed = time.monotonic() - t0
    stop.set()
    rec.join(60)
    coord.close()

    for _ in range(5):
        if recover(engines, grace_period=0).resolved and not in_doubt(engines):
            break
        time.sleep(1)
    assert in_doubt(engines) == []
    assert _total(engines) == initial
    assert not stats.failures, stats.failures[:5]
    assert not stats.recovery_errors, stats.recovery_errors[:5]
    assert stats.commits > 0 and stats.recovery_passes > 10
    print(f"\nsoak: {elapsed:.1f}s commits={stats.commits} retries={stats.retries} "
          f"incomplete={stats.incomplete} unknown={stats.unknown} "
          f"recovery_passes={stats.recovery_passes} "
          f"deadlocks_broken={deadlock.deadlocks_broken() - broken} "
          f"throughput={stats.commits / elapsed:.1f} commits/s")


# --- the same bank, through the ORM, while connections are being killed ------------------

chaos_md = MetaData()
chaos_accounts = Table("chaos_accounts", chaos_md,
                       Column("id", Integer, primary_key=True, autoincrement=False),
                       Column("balance", Integer, nullable=False))


class Account:
    id: int
    balance: int


registry().map_imperatively(Account, chaos_accounts)


def _kill_some(url: str, rnd: random.Random) -> int:
    """Terminate one random application connection to ``url``'s database (not this one)."""
    u = make_url(url)
    if u.get_backend_name() == "postgresql":
        c = psycopg2.connect(host=u.host, port=u.port, user=u.username, dbname=u.database)
        try:
            c.autocommit = True
            with c.cursor() as cur:
                cur.execute("SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                            " AND pid <> pg_backend_pid()")
                pids = [r[0] for r in cur.fetchall()]
                if pids:
                    cur.execute("SELECT pg_terminate_backend(%s)", (rnd.choice(pids),))
            return len(pids) and 1
        finally:
            c.close()
    m = pymysql.connect(host=u.host, port=u.port or 3306, user=u.username or "root",
                        password=u.password or "", autocommit=True)
    try:
        with m.cursor() as cur:
            cur.execute("SELECT ID FROM information_schema.PROCESSLIST WHERE DB = %s "
                        "AND ID <> CONNECTION_ID()", (u.database,))
            ids = [int(r[0]) for r in cur.fetchall()]
            if ids:
                try:
                    cur.execute(f"KILL CONNECTION {rnd.choice(ids)}")
                except pymysql.err.OperationalError:
                    return 0  # it ended on its own meanwhile
        return len(ids) and 1
    finally:
        m.close()


def _lost_connection(e: BaseException) -> bool:
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, DBAPIError) and cur.connection_invalidated:
            return True
        if isinstance(cur, psycopg2.OperationalError | psycopg2.InterfaceError
                      | pymysql.err.OperationalError | pymysql.err.InterfaceError):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def test_orm_transfers_while_connections_are_killed(
        request: pytest.FixtureRequest) -> None:
    """Jepsen's bank test with faults: ORM transfers through ShardedSession between
    accounts on PostgreSQL x2 and MariaDB, while a chaos thread terminates a random
    application connection every 0.3 s and a recovery worker runs. Whatever each client
    was told (success, a lost connection before the commit point, CommitIncomplete,
    OutcomeUnknown), after recovery the total is unchanged and nothing is in doubt."""
    seconds = float(os.environ.get("SHARDSESSION_SOAK_SECONDS", "30"))
    urls = {"alpha": request.getfixturevalue("pg_url_a"),
            "beta": request.getfixturevalue("pg_url_b"),
            "gamma": request.getfixturevalue("mariadb_url")}
    engines = {n: _engine(u, pool_pre_ping=True) for n, u in urls.items()}
    placement = Placement({Account: HashSharding(Account.id)})  # type: ignore[arg-type]
    ids: dict[str, list[int]] = {n: [] for n in urls}
    placement.bind(list(urls))
    i = 0
    while min(len(v) for v in ids.values()) < ACCOUNTS_PER_SHARD:
        i += 1
        shard = placement.shards_for_identity(Account.__mapper__, (i,))[0]  # type: ignore[attr-defined]
        if len(ids[shard]) < ACCOUNTS_PER_SHARD:
            ids[shard].append(i)
    for n, e in engines.items():
        chaos_md.drop_all(e)
        chaos_md.create_all(e)
        with e.begin() as c:
            c.execute(chaos_accounts.insert(), [{"id": k, "balance": START_BALANCE}
                                                for k in ids[n]])
    factory = sessionmaker(class_=ShardedSession, shards=engines, placement=placement,
                           coordinator=TransactionCoordinator())
    initial = _chaos_total(engines)
    stats = Stats()
    stop = threading.Event()
    deadline = time.monotonic() + seconds
    kills = [0]

    def worker(seed: int) -> None:
        rnd = random.Random(seed)
        while time.monotonic() < deadline:
            src, dst = rnd.sample(list(ids), 2)
            a, b = rnd.choice(ids[src]), rnd.choice(ids[dst])
            amount = rnd.randint(1, 50)
            for _attempt in range(50):
                try:
                    with factory.begin() as s:
                        # FOR UPDATE: the ORM writes the balances it read (a lost
                        # update would change the total as surely as a torn commit)
                        one = s.get(Account, a, with_for_update=True)
                        two = s.get(Account, b, with_for_update=True)
                        assert one is not None and two is not None
                        one.balance -= amount
                        two.balance += amount
                    stats.add("commits")
                    break
                except CommitIncomplete:
                    stats.add("incomplete")
                    break
                except OutcomeUnknown:
                    stats.add("unknown")
                    break
                except Exception as e:
                    if not (_retryable(e) or _lost_connection(e)):
                        with stats.lock:
                            stats.failures.append(f"{type(e).__name__}: {e}"[:300])
                        break
                    stats.add("retries")
                    time.sleep(rnd.random() * 0.01)

    def chaos() -> None:
        rnd = random.Random(99)
        while not stop.wait(0.3):
            try:
                kills[0] += _kill_some(urls[rnd.choice(list(urls))], rnd)
            except Exception as e:  # a chaos hiccup is not the system under test
                with stats.lock:
                    stats.recovery_errors.append(f"chaos: {e}")

    def recovery_worker() -> None:
        while not stop.is_set():
            with contextlib.suppress(Exception):  # connections die under it too
                recover(engines, grace_period=5.0)
            stats.add("recovery_passes")
            stop.wait(0.2)

    helpers = [threading.Thread(target=chaos), threading.Thread(target=recovery_worker)]
    for t in helpers:
        t.start()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 180)
    stop.set()
    for t in helpers:
        t.join(60)

    for _ in range(10):
        try:
            if recover(engines, grace_period=0).resolved and not in_doubt(engines):
                break
        except Exception:
            pass
        time.sleep(1)
    try:
        assert in_doubt(engines) == []
        assert _chaos_total(engines) == initial
        assert not stats.failures, stats.failures[:5]
        assert stats.commits > 0 and kills[0] > 10
        print(f"\nchaos soak: commits={stats.commits} retries={stats.retries} "
              f"incomplete={stats.incomplete} unknown={stats.unknown} kills={kills[0]}")
    finally:
        for e in engines.values():
            e.dispose()


def _chaos_total(engines: dict[str, Engine]) -> int:
    total = 0
    for e in engines.values():
        with e.connect() as c:
            total += int(c.scalar(select(func.sum(chaos_accounts.c.balance))) or 0)
    return total
