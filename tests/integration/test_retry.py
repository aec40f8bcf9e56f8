"""run_transaction / arun_transaction: whole units of work retried on retryable errors, on
real servers (a PostgreSQL deadlock 40P01, a MariaDB deadlock 1213, both from the driver),
never after an unknown outcome; the last error once the retries are exhausted."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, create_engine, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, sessionmaker

from shardsession import (
    CommitIncomplete,
    ConfigurationError,
    DistributedDeadlock,
    OutcomeUnknown,
    PrepareFailed,
    arun_transaction,
    is_retryable,
    run_transaction,
)

md = MetaData()
t = Table("retry_rows", md,
          Column("id", Integer, primary_key=True, autoincrement=False),
          Column("v", Integer, nullable=False))


def _ready(url: str) -> Engine:
    e = create_engine(url)
    md.create_all(e)
    with e.begin() as c:
        c.execute(t.insert(), [{"id": 1, "v": 0}, {"id": 2, "v": 0}])
    return e


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Iterator[Engine]:
    e = _ready(f"sqlite:///{tmp_path / 'retry.db'}")
    yield e
    e.dispose()


def _bump(s: Session, row: int, by: int = 1) -> None:
    s.execute(t.update().where(t.c.id == row).values(v=t.c.v + by))


def _values(e: Engine) -> list[int]:
    with e.connect() as c:
        return list(c.scalars(select(t.c.v).order_by(t.c.id)))


def _local_deadlock(engine: Engine) -> tuple[dict[int, Any], list[int]]:
    """Two threads update rows 1 and 2 of one database in opposite order through
    run_transaction: the server's own detector aborts one, whose unit runs again."""
    maker = sessionmaker(engine)
    barrier = threading.Barrier(2)
    calls = [0, 0]
    results: dict[int, Any] = {}

    def worker(i: int) -> None:
        def unit(s: Session) -> int:
            calls[i] += 1
            _bump(s, 1 + i, 1)
            if calls[i] == 1:
                barrier.wait(30)
            _bump(s, 2 - i, 1)
            return calls[i]

        try:
            results[i] = run_transaction(maker, unit, retries=5)
        except BaseException as e:
            results[i] = e

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    return results, calls


@pytest.mark.postgresql
def test_postgresql_deadlock_is_retried(pg_url_a: str) -> None:
    e = _ready(pg_url_a)
    try:
        results, calls = _local_deadlock(e)
        assert sum(calls) >= 3 and min(calls) == 1, (results, calls)  # one retried
        assert all(isinstance(r, int) for r in results.values()), results
        assert _values(e) == [2, 2]  # each unit applied exactly once
    finally:
        e.dispose()


@pytest.mark.mysql
def test_mariadb_deadlock_is_retried(mariadb_url: str) -> None:
    e = _ready(mariadb_url)
    try:
        results, calls = _local_deadlock(e)
        assert sum(calls) >= 3 and min(calls) == 1, (results, calls)  # one retried
        assert all(isinstance(r, int) for r in results.values()), results
        assert _values(e) == [2, 2]
    finally:
        e.dispose()


def test_outcome_unknown_is_never_retried(sqlite_engine: Engine) -> None:
    calls = [0]

    def unit(s: Session) -> None:
        calls[0] += 1
        _bump(s, 1)
        raise OutcomeUnknown("lost reply", gtrid="g", pending_shards=["b"])

    with pytest.raises(OutcomeUnknown):
        run_transaction(sessionmaker(sqlite_engine), unit, retries=5)
    assert calls == [1]
    assert _values(sqlite_engine) == [0, 0]  # rolled back


def test_commit_incomplete_is_never_retried(sqlite_engine: Engine) -> None:
    calls = [0]

    def unit(s: Session) -> None:
        calls[0] += 1
        raise CommitIncomplete("committed", gtrid="g", pending_shards=["b"])

    with pytest.raises(CommitIncomplete):
        run_transaction(sessionmaker(sqlite_engine), unit, retries=5)
    assert calls == [1]


def test_exhausted_retries_raise_the_last_error(sqlite_engine: Engine) -> None:
    calls = [0]

    def unit(s: Session) -> None:
        calls[0] += 1
        _bump(s, 1)
        raise DistributedDeadlock(f"attempt {calls[0]}", gtrid="g", shard_ids=["a", "b"])

    with pytest.raises(DistributedDeadlock, match="attempt 3"):
        run_transaction(sessionmaker(sqlite_engine), unit, retries=2, base_delay=0.001)
    assert calls == [3]
    assert _values(sqlite_engine) == [0, 0]  # every attempt rolled back


def test_retry_then_commit_keeps_only_the_last_attempt(sqlite_engine: Engine) -> None:
    calls = [0]

    def unit(s: Session) -> str:
        calls[0] += 1
        _bump(s, 1)
        if calls[0] < 3:
            raise PrepareFailed("no vote", gtrid="g", failed_shards=["b"])
        return "ok"

    assert run_transaction(sessionmaker(sqlite_engine), unit, base_delay=0.001) == "ok"
    assert calls == [3] and _values(sqlite_engine) == [1, 0]


def test_bad_arguments_are_refused(sqlite_engine: Engine) -> None:
    with pytest.raises(ConfigurationError):
        run_transaction(sessionmaker(sqlite_engine), lambda s: None, retries=-1)
    with pytest.raises(ConfigurationError):
        run_transaction(sessionmaker(sqlite_engine), lambda s: None, base_delay=2,
                        max_delay=1)


def test_non_retryable_errors_pass_through_at_once(sqlite_engine: Engine) -> None:
    calls = [0]

    def unit(s: Session) -> None:
        calls[0] += 1
        s.execute(t.insert().values(id=1, v=0))  # duplicate key: IntegrityError

    with pytest.raises(DBAPIError):
        run_transaction(sessionmaker(sqlite_engine), unit)
    assert calls == [1]


def test_is_retryable_classification() -> None:
    assert is_retryable(DistributedDeadlock("x"))
    assert is_retryable(PrepareFailed("x", failed_shards=[]))
    assert not is_retryable(OutcomeUnknown("x", pending_shards=[]))
    assert not is_retryable(CommitIncomplete("x", pending_shards=[]))
    assert not is_retryable(ValueError("x"))
    # an error of ours decides whatever caused it
    try:
        try:
            raise DistributedDeadlock("cause")
        except DistributedDeadlock as cause:
            raise OutcomeUnknown("x", pending_shards=[]) from cause
    except OutcomeUnknown as e:
        assert not is_retryable(e)


def test_arun_transaction_retries(tmp_path: Path) -> None:
    _ready(f"sqlite:///{tmp_path / 'a.db'}").dispose()

    async def main() -> tuple[str, list[int]]:
        engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'a.db'}")
        maker = async_sessionmaker(engine)
        calls = [0]

        async def unit(s: AsyncSession) -> str:
            calls[0] += 1
            await s.execute(t.update().where(t.c.id == 1).values(v=t.c.v + 1))
            if calls[0] == 1:
                raise DistributedDeadlock("first attempt loses")
            return "ok"

        out = await arun_transaction(maker, unit, base_delay=0.001)
        async with engine.connect() as c:
            values = list((await c.execute(select(t.c.v).order_by(t.c.id))).scalars())
        await engine.dispose()
        assert calls == [2]
        return out, values

    out, values = asyncio.run(main())
    assert out == "ok" and values == [1, 0]


def test_every_error_of_the_tree_says_whether_it_is_retryable() -> None:
    from shardsession import exc

    classes = [getattr(exc, n) for n in exc.__all__
               if isinstance(getattr(exc, n), type)
               and issubclass(getattr(exc, n), exc.ShardSessionError)]
    assert all(isinstance(c.retryable, bool) for c in classes)
    assert {c.__name__ for c in classes if c.retryable} == {
        "DistributedDeadlock", "PrepareFailed", "StaleTenantDirectoryError"}
