"""Run one statement on several shards, the database round trips in parallel.

Thread safety (a Session is not thread-safe) rests on four rules:

1. Everything that changes Session state happens in the calling thread, before the
   workers start: the autoflush (once, not once per shard) and the checkout of each
   shard's Connection (``Session.connection()``, which runs ``_connection_for_bind`` and
   any ``after_begin`` hooks).  A worker's ``invoke_statement`` then only *finds* its
   connection and runs with ``autoflush=False``.
2. A worker only executes the statement and sets up the ORM result; ORM rows are turned
   into objects lazily, when the caller iterates -- in the calling thread.  Eager loaders
   (``selectinload``) therefore issue their queries from the calling thread too.  The
   drivers supported buffer results at execute time (psycopg2, PyMySQL's default cursor)
   or fetch later on the caller's thread (SQLite, server-side cursors), never both at once.
3. Two shard ids bound to the same Connection/Engine run one after the other in the same
   worker: a DBAPI connection never serves two threads at once.
4. When the statement would run user code in the worker -- another ``do_orm_execute``
   handler after shardsession's, or an ORM UPDATE/DELETE whose ``synchronize_session``
   updates objects in the identity map -- the shards run one after another in the
   calling thread instead (still merged exactly).

Failure semantics: if a shard raises, the other shards' statements still complete (they
run inside the same session transaction), their results are closed, and the first
error (in shard order) is re-raised unchanged; nothing is rolled back by the fan-out, the
caller's transaction handling decides.  If the deadline passes, statements still running
are cancelled on the server where the driver allows it (psycopg2 ``cancel()``, SQLite
``interrupt()``, MySQL ``KILL QUERY``), the fan-out waits for the workers to return, and
:class:`~shardsession.exc.FanoutTimeoutError` names the shards that had not answered;
those shards' transactions may be aborted, so roll the session back.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Connection, Result
from sqlalchemy.orm import ORMExecuteState
from sqlalchemy.pool import SingletonThreadPool, StaticPool
from sqlalchemy.sql import Executable

from .. import _compat
from ..exc import FanoutTimeoutError

__all__ = ["ShardCall", "run_on_shards"]

log = logging.getLogger(__name__)

#: how long to wait for cancelled statements to return after a deadline passed
CANCEL_GRACE_SECONDS = 5.0


@dataclass(frozen=True)
class ShardCall:
    """How to run the statement: which statement, with what per-shard parameters."""

    statement: Executable
    parallel: bool = True
    max_workers: int | None = None
    timeout: float | None = None
    #: extra bound parameters per shard id (keyset pagination's shard tie-breaker)
    shard_params: dict[Any, dict[str, Any]] | None = None


def _invoke(orm_context: ORMExecuteState, call: ShardCall, shard_id: Any) -> Result[Any]:
    params = (call.shard_params or {}).get(shard_id)
    return orm_context.invoke_statement(
        statement=call.statement,
        params=params,
        bind_arguments={"shard_id": shard_id},
        # identity_token keys loaded objects by shard, as horizontal_shard does; the
        # autoflush already ran once in the calling thread.
        execution_options={"identity_token": shard_id, "autoflush": False},
    )


def _checkout(orm_context: ORMExecuteState, shard_ids: Sequence[Any]) -> dict[Any, Connection]:
    session = orm_context.session
    conns = {}
    for shard_id in shard_ids:
        bind_arguments = dict(orm_context.bind_arguments)
        bind_arguments["shard_id"] = shard_id
        conns[shard_id] = session.connection(bind_arguments=bind_arguments)
    return conns


def _interrupt(conn: Connection) -> bool:
    """Ask the server to stop the statement running on ``conn`` (from another thread)."""
    try:
        dbapi_conn: Any = conn.connection.dbapi_connection
        driver = conn.dialect.driver
        if conn.dialect.name == "sqlite":
            dbapi_conn.interrupt()
            return True
        if driver in ("psycopg2", "psycopg"):
            dbapi_conn.cancel()
            return True
        if driver in ("pymysql", "mysqldb", "mysqlconnector"):
            thread_id = dbapi_conn.thread_id()
            with conn.engine.connect() as killer:
                killer.exec_driver_sql("KILL QUERY %s", (int(thread_id),))
            return True
    except Exception:  # a best-effort cancel must not hide the timeout itself
        log.warning("could not cancel a statement after the fan-out deadline", exc_info=True)
    return False


def _run_group(
    orm_context: ORMExecuteState, call: ShardCall, shard_ids: Sequence[Any]
) -> list[tuple[Any, Result[Any]]]:
    out = []
    for shard_id in shard_ids:
        out.append((shard_id, _invoke(orm_context, call, shard_id)))
    return out


def _close_all(results: Sequence[Result[Any]]) -> None:
    for r in results:
        try:
            r.close()
        except Exception:
            log.debug("closing a discarded shard result failed", exc_info=True)


def run_on_shards(
    orm_context: ORMExecuteState, shard_ids: Sequence[Any], call: ShardCall
) -> list[tuple[Any, Result[Any]]]:
    """Execute ``call.statement`` on each shard; return ``[(shard_id, result), ...]`` in
    the order of ``shard_ids``.

    Failure semantics: see the module docstring.
    """
    session = orm_context.session
    if call.shard_params and orm_context.parameters is None:
        # invoke_statement(params=...) merges into the statement's parameters and
        # fails on None; set once here, before any worker reads it.
        orm_context.parameters = {}
    if _compat.orm_autoflush_requested(orm_context):
        _compat.session_autoflush(session)
    conns = _checkout(orm_context, shard_ids)
    groups: dict[int, list[Any]] = {}
    conn_of_group: dict[int, Connection] = {}
    for shard_id in shard_ids:
        key = id(conns[shard_id])
        groups.setdefault(key, []).append(shard_id)
        conn_of_group[key] = conns[shard_id]

    parallel = (
        call.parallel
        and _compat.remaining_orm_execute_handlers(orm_context) == 0
        # pysqlite connections of in-memory or thread-pooled databases belong to the
        # thread that opened them, and asyncio drivers do IO only in the caller's
        # greenlet: neither may be handed to a worker thread.
        and all(_may_cross_threads(c) for c in conn_of_group.values())
    )
    if not parallel or (len(groups) == 1 and call.timeout is None):
        return _run_group(orm_context, call, shard_ids)

    started = time.monotonic()
    futures = _submit(orm_context, call, groups)
    try:
        _, pending = concurrent.futures.wait(futures, timeout=call.timeout)
        if pending:
            _expire(futures, pending, conn_of_group, groups, call.timeout, started)
        by_shard: dict[Any, Result[Any]] = {}
        errors: dict[Any, BaseException] = {}
        for future, key in futures.items():
            err = future.exception()
            if err is not None:
                errors[groups[key][0]] = err
                continue
            for shard_id, result in future.result():
                by_shard[shard_id] = result
        if errors:
            _close_all(list(by_shard.values()))
            first = next(s for s in shard_ids if s in errors)
            log.debug("fan-out failed on shard %r", first)
            raise errors[first]
        return [(s, by_shard[s]) for s in shard_ids]
    finally:
        for future in futures:
            future.cancel()  # only not-yet-started groups (after an error or deadline)


def _submit(
    orm_context: ORMExecuteState, call: ShardCall, groups: dict[int, list[Any]]
) -> dict[concurrent.futures.Future[Any], int]:
    """Start the groups on the shared pool, at most ``call.max_workers`` at a time."""
    pool = _shared_pool()
    keys = list(groups)
    limit = call.max_workers or len(keys)
    if limit >= len(keys):
        return {pool.submit(_run_group, orm_context, call, groups[k]): k for k in keys}
    # Bounded: each group waits for a slot; the slot is taken inside the worker so a
    # deadline can still cancel groups that never started.
    slots = threading.BoundedSemaphore(limit)

    def bounded(members: list[Any]) -> list[tuple[Any, Result[Any]]]:
        with slots:
            return _run_group(orm_context, call, members)

    return {pool.submit(bounded, groups[k]): k for k in keys}


_POOL: concurrent.futures.ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()
#: threads shared by all fan-outs of the process.  Workers only wait on the network, so
#: the pool is larger than the CPU count; fan-outs beyond it queue (never deadlock: a
#: worker never starts a fan-out of its own).
POOL_SIZE = 64


def _shared_pool() -> concurrent.futures.ThreadPoolExecutor:
    # Starting threads per query costs about a millisecond; a shared pool keeps them.
    global _POOL
    if _POOL is None:
        with _POOL_LOCK:
            if _POOL is None:
                _POOL = concurrent.futures.ThreadPoolExecutor(
                    max_workers=POOL_SIZE, thread_name_prefix="shardsession-fanout"
                )
    return _POOL


def _expire(
    futures: dict[concurrent.futures.Future[Any], int],
    pending: set[concurrent.futures.Future[Any]],
    conn_of_group: dict[int, Connection],
    groups: dict[int, list[Any]],
    timeout: float | None,
    started: float,
) -> None:
    pending_shards: list[Any] = []
    running = []
    for future in pending:
        key = futures[future]
        pending_shards.extend(groups[key])
        if not future.cancel():
            running.append(future)
            _interrupt(conn_of_group[key])
    if running:
        _, still = concurrent.futures.wait(running, timeout=CANCEL_GRACE_SECONDS)
        if still:
            log.error(
                "fan-out workers for shards %r did not return %.1fs after cancellation",
                pending_shards,
                CANCEL_GRACE_SECONDS,
            )
    results: list[Result[Any]] = []
    for future in futures:
        if future.done() and not future.cancelled() and future.exception() is None:
            results.extend(r for _, r in future.result())
    _close_all(results)
    elapsed = time.monotonic() - started
    raise FanoutTimeoutError(
        f"fan-out deadline of {timeout}s passed after {elapsed:.3f}s; "
        f"shards not answered: {sorted(map(str, pending_shards))}",
        pending_shards=sorted(pending_shards, key=str),
        timeout=timeout,
        shard_id=None,
    )


def _may_cross_threads(conn: Connection) -> bool:
    """Whether ``conn`` may be used from a worker thread for one statement.

    File-based pysqlite engines get ``check_same_thread=False`` and a QueuePool from
    SQLAlchemy; in-memory ones, and any engine on a per-thread pool, do not.
    """
    if conn.dialect.is_async:
        return False
    if conn.dialect.name != "sqlite":
        return True
    if isinstance(conn.engine.pool, SingletonThreadPool | StaticPool):
        return False
    url = conn.engine.url
    database = url.database or ""
    return database not in ("", ":memory:") and url.query.get("mode") != "memory"
