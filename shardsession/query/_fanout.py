"""Run one statement on several shards, the database round trips in parallel.

Thread safety (a Session is not thread-safe) rests on four rules:

1. Everything that changes Session state happens in the calling thread, before the
   workers start: the autoflush (once, not once per shard) and the checkout of each
   shard's Connection (``Session.connection()``, which runs ``_connection_for_bind`` and
   any ``after_begin`` hooks).  A worker's ``invoke_statement`` then only *finds* its
   connection and runs with ``autoflush=False``.
2. A worker only executes the statement and sets up the ORM result; ORM rows are turned
   into objects lazily, when the caller iterates -- in the calling thread (for ORDER BY
   with LIMIT the merge first reads each shard's cursor there, see :mod:`._merge`).
   Eager loaders (``selectinload``) therefore issue their queries from the calling
   thread too.  The
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
caller's transaction handling decides.  If the deadline passes, shards not started yet
are never started, statements still running are cancelled on the server where the driver
allows it (PostgreSQL ``pg_cancel_backend()``, SQLite ``interrupt()``, MySQL ``KILL
QUERY``; sent from a helper thread that never touches the session, since a cancel request
can block), and
:class:`~shardsession.exc.FanoutTimeoutError` names the shards that had not answered;
those shards' transactions may be aborted, so roll the session back.

No worker outlives the fan-out: :func:`run_on_shards` returns or raises (deadline, error,
``KeyboardInterrupt``) only after every worker it started has returned, so none can touch
the session or a connection afterwards.  A worker that has not returned
:data:`CANCEL_GRACE_SECONDS` after its server-side cancel (an unreachable server, a
cancel request lost on the way) has its connection's socket shut down, which makes the
blocked driver call fail at once; that connection is then invalidated (closed, never
returned to the pool) and the fan-out waits for the worker to return.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import os
import socket
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Connection, Result
from sqlalchemy.orm import ORMExecuteState
from sqlalchemy.pool import SingletonThreadPool, StaticPool
from sqlalchemy.sql import Executable

from .. import _compat
from ..events import emit
from ..exc import FanoutTimeoutError

__all__ = ["ShardCall", "run_on_shards"]

log = logging.getLogger(__name__)

#: how long to wait for cancelled statements to return after a deadline passed, before
#: their connections are severed
CANCEL_GRACE_SECONDS = 2.0
#: while waiting for a severed worker, log an error this often
STUCK_LOG_SECONDS = 10.0


class _Abandoned(Exception):
    """Raised in a worker that was told to stop before starting its next statement."""


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
    options = {"identity_token": shard_id, "autoflush": False}
    if orm_context.statement.is_dml:  # objects of RETURNING(Entity) keyed by shard too
        options.update(_compat.returning_identity_options(orm_context, shard_id))
    return orm_context.invoke_statement(
        statement=call.statement,
        params=params,
        bind_arguments={"shard_id": shard_id},
        # identity_token keys loaded objects by shard, as horizontal_shard does; the
        # autoflush already ran once in the calling thread.
        execution_options=options,
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
        if driver == "psycopg2":
            # Not ``connection.cancel()``: psycopg2 holds the GIL during PQcancel, so a
            # server that does not answer would freeze the whole process.
            pid = int(dbapi_conn.get_backend_pid())
            with conn.engine.connect() as killer:
                killer.exec_driver_sql("SELECT pg_cancel_backend(%(pid)s)", {"pid": pid})
            return True
        if driver == "psycopg":
            # psycopg >= 3.2: cancel_safe() does not block other threads.
            getattr(dbapi_conn, "cancel_safe", dbapi_conn.cancel)()
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
    orm_context: ORMExecuteState,
    call: ShardCall,
    shard_ids: Sequence[Any],
    stop: threading.Event | None = None,
) -> list[tuple[Any, Result[Any]]]:
    out: list[tuple[Any, Result[Any]]] = []
    for shard_id in shard_ids:
        if stop is not None and stop.is_set():
            _close_all([r for _, r in out])
            raise _Abandoned(shard_id)
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
    # (shard_ids as given: the events' listeners get a sequence they must not change)
    emit(session, "shardsession_fanout_started", call.statement, shard_ids)
    started = time.monotonic()
    try:
        results = _run_on_shards(orm_context, shard_ids, call)
    except BaseException as e:
        emit(session, "shardsession_fanout_finished", call.statement, shard_ids,
             time.monotonic() - started, e)
        raise
    emit(session, "shardsession_fanout_finished", call.statement, shard_ids,
         time.monotonic() - started, None)
    return results


def _run_on_shards(
    orm_context: ORMExecuteState, shard_ids: Sequence[Any], call: ShardCall
) -> list[tuple[Any, Result[Any]]]:
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
    if (call.parallel and len(groups) > 1
            and _compat.remaining_orm_execute_handlers(orm_context) == 0
            and _overlappable(conn_of_group.values())):
        return _run_overlapped(orm_context, call, groups, conn_of_group, shard_ids)
    if not parallel or (len(groups) == 1 and call.timeout is None):
        return _run_group(orm_context, call, shard_ids)
    return _Fanout(orm_context, call, groups, conn_of_group).run(shard_ids)


def _overlappable(conns: Iterable[Connection]) -> bool:
    """Whether the shards' statements can overlap on the event loop: every connection
    is an asyncio driver's and the caller runs in SQLAlchemy's asyncio greenlet."""
    return all(c.dialect.is_async for c in conns) and _compat.in_async_greenlet()


def _run_overlapped(
    orm_context: ORMExecuteState,
    call: ShardCall,
    groups: dict[int, list[Any]],
    conn_of_group: dict[int, Connection],
    shard_ids: Sequence[Any],
) -> list[tuple[Any, Result[Any]]]:
    """The fan-out for asyncio drivers: each group in a greenlet of its own on the event
    loop (:func:`shardsession._compat.run_overlapped`), at most ``call.max_workers``
    groups at a time, within ``call.timeout`` overall.

    Same failure semantics as the threaded fan-out; at the deadline the statements still
    running are cancelled by the driver (asyncio cancellation) and their connections
    invalidated, since the driver's state after a cancelled call is not known.
    """
    started = time.monotonic()
    keys = list(groups)
    width = call.max_workers or len(keys)
    outcomes: dict[int, Any] = {}
    late: list[int] = []
    for i in range(0, len(keys), width):
        wave = keys[i:i + width]
        if call.timeout is not None and time.monotonic() - started >= call.timeout:
            late.extend(wave)
            continue
        left = None if call.timeout is None else call.timeout - (time.monotonic() - started)
        results = _compat.run_overlapped(
            [functools.partial(_run_group, orm_context, call, groups[k]) for k in wave],
            timeout=left,
        )
        for k, outcome in zip(wave, results, strict=True):
            if isinstance(outcome, asyncio.TimeoutError):
                late.append(k)
            outcomes[k] = outcome
    done = {k: o for k, o in outcomes.items() if not isinstance(o, BaseException)}
    if late:
        for k in late:
            conn = conn_of_group[k]
            if k in outcomes and not conn.invalidated:
                conn.invalidate()
        _close_all([r for o in done.values() for _, r in o])
        pending_shards = sorted((s for k in late for s in groups[k]), key=str)
        raise FanoutTimeoutError(
            f"fan-out deadline of {call.timeout}s passed after "
            f"{time.monotonic() - started:.3f}s; shards not answered: "
            f"{[str(s) for s in pending_shards]}",
            pending_shards=pending_shards,
            timeout=call.timeout,
            shard_id=None,
        )
    errors = {groups[k][0]: o for k, o in outcomes.items() if isinstance(o, BaseException)}
    if errors:
        _close_all([r for o in done.values() for _, r in o])
        first = next(s for s in shard_ids if s in errors)
        raise errors[first]
    by_shard: dict[Any, Result[Any]] = {}
    for outcome in done.values():
        by_shard.update(outcome)
    return [(s, by_shard[s]) for s in shard_ids]


class _Fanout:
    """One parallel fan-out: its workers, and the guarantee that none outlives it."""

    def __init__(
        self,
        orm_context: ORMExecuteState,
        call: ShardCall,
        groups: dict[int, list[Any]],
        conn_of_group: dict[int, Connection],
    ) -> None:
        self.orm_context = orm_context
        self.call = call
        self.groups = groups
        self.conn_of_group = conn_of_group
        self.stop = threading.Event()
        self.futures: dict[concurrent.futures.Future[Any], int] = {}

    def run(self, shard_ids: Sequence[Any]) -> list[tuple[Any, Result[Any]]]:
        call = self.call
        started = time.monotonic()
        keys = list(self.groups)
        # Without a deadline the calling thread runs the last group itself instead of
        # sleeping: one thread hand-off less per fan-out.  With a deadline it must stay
        # free to watch the clock.
        unbounded = call.max_workers is None or call.max_workers >= len(keys)
        inline = keys[-1] if call.timeout is None and unbounded else None
        outcomes: dict[int, list[tuple[Any, Result[Any]]] | BaseException] = {}
        try:
            self._submit([k for k in keys if k != inline])
            if inline is not None:
                try:
                    outcomes[inline] = _run_group(
                        self.orm_context, call, self.groups[inline], self.stop
                    )
                except Exception as err:  # reported in shard order below
                    outcomes[inline] = err
            _, pending = concurrent.futures.wait(self.futures, timeout=call.timeout)
            if pending:
                self._deadline_passed(pending, outcomes, started)
        finally:
            if any(not f.done() for f in self.futures):
                # Leaving abnormally (KeyboardInterrupt...): still outlive every worker.
                self._settle({f for f in self.futures if not f.done()})
        for future, key in self.futures.items():
            failure = future.exception()
            outcomes[key] = failure if failure is not None else future.result()
        by_shard: dict[Any, Result[Any]] = {}
        errors: dict[Any, BaseException] = {}
        for key, outcome in outcomes.items():
            if isinstance(outcome, BaseException):
                errors[self.groups[key][0]] = outcome
            else:
                by_shard.update(outcome)
        if errors:
            _close_all(list(by_shard.values()))
            first = next(s for s in shard_ids if s in errors)
            log.debug("fan-out failed on shard %r", first)
            raise errors[first]
        return [(s, by_shard[s]) for s in shard_ids]

    def _submit(self, keys: Sequence[int]) -> None:
        """Start the groups on the shared pool, at most ``call.max_workers`` at a time."""
        pool = _shared_pool()
        limit = self.call.max_workers or len(keys)
        ctx, call, stop = self.orm_context, self.call, self.stop
        if limit >= len(keys):
            for k in keys:
                self.futures[pool.submit(_run_group, ctx, call, self.groups[k], stop)] = k
            return
        # Bounded: each group waits for a slot inside its worker, and checks ``stop``
        # once it has one, so a deadline also stops groups that never got to run.
        slots = threading.BoundedSemaphore(limit)

        def bounded(members: list[Any]) -> list[tuple[Any, Result[Any]]]:
            with slots:
                return _run_group(ctx, call, members, stop)

        for k in keys:
            self.futures[pool.submit(bounded, self.groups[k])] = k

    def _deadline_passed(
        self,
        pending: set[concurrent.futures.Future[Any]],
        outcomes: dict[int, list[tuple[Any, Result[Any]]] | BaseException],
        started: float,
    ) -> None:
        pending_shards = sorted(
            (s for f in pending for s in self.groups[self.futures[f]]), key=str
        )
        self._settle(pending)
        results: list[Result[Any]] = []
        for outcome in outcomes.values():
            if not isinstance(outcome, BaseException):
                results.extend(r for _, r in outcome)
        for future in self.futures:
            if not future.cancelled() and future.exception() is None:
                results.extend(r for _, r in future.result())
        _close_all(results)
        timeout = self.call.timeout
        elapsed = time.monotonic() - started
        raise FanoutTimeoutError(
            f"fan-out deadline of {timeout}s passed after {elapsed:.3f}s; "
            f"shards not answered: {[str(s) for s in pending_shards]}",
            pending_shards=pending_shards,
            timeout=timeout,
            shard_id=None,
        )

    def _settle(self, pending: set[concurrent.futures.Future[Any]]) -> None:
        """Stop the ``pending`` workers and return only once each has returned.

        Not-started groups are cancelled; running statements are cancelled on the
        server; after :data:`CANCEL_GRACE_SECONDS` the sockets of those still running
        are shut down, and their connections invalidated once their workers returned.
        """
        self.stop.set()
        running = []
        for future in pending:
            if not future.cancel():
                running.append(future)
                # A cancel request can block (PQcancel connects to the server): send it
                # from a helper thread, which only uses the DBAPI cancel handle or a new
                # connection of the engine, never the session.
                threading.Thread(
                    target=_interrupt,
                    args=(self.conn_of_group[self.futures[future]],),
                    name="shardsession-cancel",
                    daemon=True,
                ).start()
        if not running:
            return
        _, still = concurrent.futures.wait(running, timeout=CANCEL_GRACE_SECONDS)
        severed = [self.futures[f] for f in still]
        for key in severed:
            shards = self.groups[key]
            log.warning(
                "fan-out worker for shards %r did not return %.1fs after its statement "
                "was cancelled; shutting down its connection",
                shards,
                CANCEL_GRACE_SECONDS,
            )
            _sever(self.conn_of_group[key])
        while still:
            _, still = concurrent.futures.wait(still, timeout=STUCK_LOG_SECONDS)
            if still:
                log.error(
                    "still waiting for fan-out workers of shards %r to return",
                    [s for f in still for s in self.groups[self.futures[f]]],
                )
        for key in severed:
            conn = self.conn_of_group[key]
            if not conn.invalidated:
                try:
                    conn.invalidate()
                except Exception:
                    log.debug("invalidating a severed connection failed", exc_info=True)


def _sever(conn: Connection) -> bool:
    """Shut down the socket under ``conn`` so a driver call blocked on it fails now.

    ``shutdown()`` acts on the socket, not on one descriptor, so it is done on a
    duplicate and the driver's own descriptor stays valid (and is closed by the driver).
    """
    try:
        fd = _compat.dbapi_socket_fileno(conn.connection.dbapi_connection)
        if fd is None or fd < 0:
            return False
        with socket.socket(fileno=os.dup(fd)) as sock:
            sock.shutdown(socket.SHUT_RDWR)
        return True
    except Exception:
        log.warning("could not shut down a stuck fan-out connection", exc_info=True)
        return False


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
