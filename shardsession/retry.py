"""Retrying whole units of work: :func:`run_transaction` and :func:`arun_transaction`.

A transaction that lost a lock cycle, a serialization check or a race with recovery
committed nothing, and running the *whole* function again may succeed. Statements are never
replayed on their own (that loses updates: the function must read again what it writes),
and a transaction whose outcome is unknown is never run again (it may have committed).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from sqlalchemy import exc as sa_exc

from .exc import ConfigurationError, OutcomeUnknown, ShardSessionError

__all__ = ["arun_transaction", "is_retryable", "run_transaction"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: SQLSTATEs of a transaction the server aborted so that it may run again: serialization
#: failure, deadlock detected (PostgreSQL; MariaDB reports 40001 for its deadlock too)
_RETRY_SQLSTATES = frozenset({"40001", "40P01"})
#: MySQL/MariaDB error codes: deadlock found (1213), lock wait timeout (1205)
_RETRY_MYSQL_CODES = frozenset({1213, 1205})


def _driver_retryable(orig: BaseException) -> bool:
    # psycopg 3: ``sqlstate``; psycopg2: ``pgcode``; asyncpg: ``sqlstate`` (through
    # SQLAlchemy's adapter, on ``__cause__``); PyMySQL / aiomysql: ``args[0]`` is the code
    code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if code in _RETRY_SQLSTATES:
        return True
    args: tuple[Any, ...] = getattr(orig, "args", ())
    return bool(args) and isinstance(args[0], int) and args[0] in _RETRY_MYSQL_CODES


def is_retryable(error: BaseException) -> bool:
    """Whether running the whole unit of work again may succeed after ``error``.

    True for an error of ours whose class is ``retryable`` (see :mod:`shardsession.exc`)
    and for a driver's serialization failure or deadlock (SQLSTATE 40001 / 40P01; MySQL
    and MariaDB 1213, and 1205 the lock wait timeout), raised as SQLAlchemy's
    ``DBAPIError`` (or in its chain of causes). An error of ours decides by its class
    alone, whatever caused it: never :class:`~shardsession.exc.OutcomeUnknown` nor
    :class:`~shardsession.exc.CommitIncomplete`.
    """
    seen: set[int] = set()
    cur: BaseException | None = error
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, ShardSessionError):
            # ours decide (CommitIncomplete caused by a driver's deadlock committed)
            return cur.retryable and not isinstance(cur, OutcomeUnknown)
        if isinstance(cur, sa_exc.DBAPIError):
            orig = cur.orig
            if orig is not None and (_driver_retryable(orig)
                                     or _driver_retryable(orig.__cause__ or orig)):
                return True
        cur = cur.__cause__ or cur.__context__
    return False


def _check(retries: int, base_delay: float, max_delay: float) -> None:
    if retries < 0:
        raise ConfigurationError(f"retries must be >= 0, not {retries!r}")
    if base_delay < 0 or max_delay < base_delay:
        raise ConfigurationError(
            f"need 0 <= base_delay <= max_delay, not {base_delay!r}, {max_delay!r}")


def _delay(attempt: int, base_delay: float, max_delay: float) -> float:
    # "full jitter": uniform in [0, min(max, base * 2**attempt)], so that the losers of
    # one conflict do not meet again at the same moment
    return random.uniform(0.0, min(max_delay, base_delay * (2 ** attempt)))


def run_transaction(
    sessionmaker: Callable[[], Any],
    fn: Callable[[Any], T],
    *,
    retries: int = 10,
    base_delay: float = 0.01,
    max_delay: float = 1.0,
    retry_on: Callable[[BaseException], bool] = is_retryable,
) -> T:
    """Run ``fn(session)`` in a new session's transaction and commit it; on a retryable
    error, roll back and run the whole of ``fn`` again, in a new session, after a
    jittered exponential backoff.

    :param sessionmaker: makes a session (a ``sessionmaker`` of
        :class:`~shardsession.ShardedSession`, or of a plain Session).
    :param fn: the unit of work; called once per attempt, so it must read what it writes
        and have no side effects outside the session (or make them idempotent).
    :param retries: attempts after the first (0: never retry).
    :param base_delay: seconds; the backoff before attempt ``n`` is uniform in
        ``[0, min(max_delay, base_delay * 2**n)]``.
    :param retry_on: which errors to retry (default :func:`is_retryable`).
    :returns: what ``fn`` returned in the attempt that committed.

    Failure semantics: an attempt that raises is rolled back in full (a retryable error
    means nothing of it was committed). When the retries are exhausted, the last error is
    raised. :class:`~shardsession.exc.OutcomeUnknown` is raised at once, never retried:
    recovery settles that attempt, which may have committed.
    :class:`~shardsession.exc.CommitIncomplete` is raised as is (the attempt committed).
    """
    _check(retries, base_delay, max_delay)
    attempt = 0
    while True:
        session = sessionmaker()
        try:
            with session.begin():
                result = fn(session)
            return result
        except BaseException as e:
            if attempt >= retries or not isinstance(e, Exception) or not retry_on(e):
                raise
            log.info("run_transaction: attempt %d failed (%s: %s); retrying",
                     attempt + 1, type(e).__name__, e)
        finally:
            session.close()
        time.sleep(_delay(attempt, base_delay, max_delay))
        attempt += 1


async def arun_transaction(
    sessionmaker: Callable[[], Any],
    fn: Callable[[Any], Awaitable[T]],
    *,
    retries: int = 10,
    base_delay: float = 0.01,
    max_delay: float = 1.0,
    retry_on: Callable[[BaseException], bool] = is_retryable,
) -> T:
    """The asyncio twin of :func:`run_transaction`: ``sessionmaker`` makes an
    ``AsyncSession`` (e.g. ``async_sessionmaker(sync_session_class=ShardedSession, ...)``)
    and ``await fn(session)`` is the unit of work. Same retries and failure semantics;
    the backoff is an ``asyncio.sleep``.
    """
    _check(retries, base_delay, max_delay)
    attempt = 0
    while True:
        session = sessionmaker()
        try:
            async with session.begin():
                result = await fn(session)
            return result
        except BaseException as e:
            if attempt >= retries or not isinstance(e, Exception) or not retry_on(e):
                raise
            log.info("arun_transaction: attempt %d failed (%s: %s); retrying",
                     attempt + 1, type(e).__name__, e)
        finally:
            await session.close()
        await asyncio.sleep(_delay(attempt, base_delay, max_delay))
        attempt += 1
