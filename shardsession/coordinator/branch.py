"""Branches of a global transaction, and the helpers the protocol runs them with.

A :class:`Branch` is one shard connection and its xid; the helpers here run work on several
branches at once and deal with lost connections. Nothing here decides anything: the
decisions are in :mod:`.protocol` and their execution in :mod:`.transaction`.
"""

from __future__ import annotations

import enum
import logging
import re
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from typing import TYPE_CHECKING, Any

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Engine

from .. import _compat
from ..backends import BackendAdapter
from .xid import Xid

if TYPE_CHECKING:
    from .transaction import GlobalTransaction

__all__ = [
    "IMPLICIT_COMMIT_KEY",
    "Branch",
    "BranchState",
    "discard_dead",
    "is_disconnect",
    "isolation_of",
    "leave",
    "rollback_all",
    "run_parallel",
    "wrap_error",
]

log = logging.getLogger(__name__)

#: set on a coordinated MySQL/MariaDB connection (to the statement) once it sent a
#: statement the server commits implicitly, with whatever the transaction wrote before it
IMPLICIT_COMMIT_KEY = "_shardsession_implicit_commit"

# Statements MariaDB/MySQL commit implicitly (and commit the open transaction before
# them): DDL and a few administrative ones. CREATE/DROP TEMPORARY TABLE do not.
_IMPLICIT_RE = re.compile(
    r"\s*(?:/\*.*?\*/\s*)*(?:"
    r"(?:CREATE|DROP)\s+(?!TEMPORARY\b)|ALTER\s|RENAME\s|TRUNCATE\s|"
    r"(?:GRANT|REVOKE|ANALYZE|OPTIMIZE|REPAIR|FLUSH|INSTALL|UNINSTALL)\s|"
    r"LOCK\s+TABLES?\b|UNLOCK\s+TABLES?\b|LOAD\s+INDEX\b|CACHE\s+INDEX\b)",
    re.IGNORECASE | re.DOTALL)


def commits_implicitly(statement: str) -> bool:
    """Whether MariaDB/MySQL commits ``statement`` (and the open transaction) implicitly."""
    return _IMPLICIT_RE.match(statement) is not None


class BranchState(enum.Enum):
    ACTIVE = "active"
    PREPARED = "prepared"
    #: committed or rolled back by the protocol; SQLAlchemy's own COMMIT/ROLLBACK follows
    FINISHED = "finished"
    #: left prepared for recovery (outcome unknown or commit incomplete)
    LEFT = "left"
    CLOSED = "closed"


class Branch:
    """One shard connection taking part in a global transaction.

    Slotted, with its shard name found on first use: every transaction that touches a
    database makes at least one, and most never need the name.
    """

    __slots__ = ("_shard_id", "adapter", "connection", "engine", "errors", "gt", "index",
                 "mark", "plain", "state", "wrote", "xa_started", "xid")

    def __init__(self, index: int, engine: Engine, connection: Connection,
                 adapter: BackendAdapter | None, gt: GlobalTransaction | None = None,
                 shard_id: str | None = None) -> None:
        self.index = index
        self.engine = engine
        self.connection = connection
        self.adapter = adapter
        self.gt = gt
        self._shard_id = shard_id
        self.xid: Xid | None = None
        self.xa_started = False
        #: a MySQL branch that began without XA (the transaction's first shard): it
        #: cannot prepare, it can hold the decision
        self.plain = False
        #: a write statement ran (from the statement's kind); the commit asks the server
        #: about a branch where none did, see GlobalTransaction._inspect
        self.wrote = False
        #: the adapter's write_mark at the branch's start
        self.mark: Any = None
        #: driver errors raised on the connection during the transaction (an application
        #: may catch one and go on: the server may have rolled the transaction back)
        self.errors: list[BaseException] | None = None
        self.state = BranchState.ACTIVE

    @property
    def shard_id(self) -> str:
        """The shard's name (from the session's shards, found on first use)."""
        sid = self._shard_id
        if sid is None:
            assert self.gt is not None
            sid = self._shard_id = str(self.gt.shard_of_engine(self.engine))
        return sid

    @property
    def dbapi(self) -> Any:
        return self.connection.connection.dbapi_connection

    def __repr__(self) -> str:
        return (f"Branch(index={self.index}, shard_id={self.shard_id!r}, xid={self.xid!r}, "
                f"state={self.state.name}, wrote={self.wrote})")

    def describe(self) -> str:
        return f"{self.shard_id} ({self.xid.bqual if self.xid else self.index})"

def wrap_error(b: Branch, e: BaseException, statement: str) -> BaseException:
    """A driver error of a protocol statement as SQLAlchemy would have raised it."""
    dbapi_mod = b.engine.dialect.loaded_dbapi
    if isinstance(e, dbapi_mod.Error):
        wrapped: Exception = sa_exc.DBAPIError.instance(statement, None, e, dbapi_mod.Error)
        return wrapped
    return e


def run_parallel(pool: Executor, tasks: Sequence[tuple[Branch, Callable[[], None]]]
                 ) -> dict[int, BaseException]:
    """Run one callable per branch, all at once (the first in the calling thread);
    return the failures by branch index.

    A ``BaseException`` of the first callable (``KeyboardInterrupt``, or whatever a
    signal handler raises in the calling thread) is that branch's failure like any
    other: the other callables are still waited for, so no worker is left running on a
    connection the caller is about to roll back, close or leave to recovery.
    """
    errors: dict[int, BaseException] = {}
    if not tasks:
        return errors
    if any(b.engine.dialect.is_async for b, _ in tasks):
        return _run_async(tasks)
    futures: list[tuple[Branch, Future[None]]] = [(b, pool.submit(fn)) for b, fn in tasks[1:]]
    first_b, first_fn = tasks[0]
    try:
        first_fn()
    except BaseException as e:
        errors[first_b.index] = e
    for b, fut in futures:
        try:
            fut.result()
        except Exception as e:
            errors[b.index] = e
    return errors


def _run_async(tasks: Sequence[tuple[Branch, Callable[[], None]]]) -> dict[int, BaseException]:
    """:func:`run_parallel` for asyncio drivers, whose connections do IO only from the
    event loop's greenlets, never from a worker thread: overlapped on the event loop
    when called from SQLAlchemy's asyncio greenlet, else one after another (where the
    driver raises its own "greenlet_spawn has not been called")."""
    errors: dict[int, BaseException] = {}
    if not _compat.in_async_greenlet():
        for b, fn in tasks:
            try:
                fn()
            except Exception as e:
                errors[b.index] = e
        return errors
    outcomes = _compat.run_overlapped([fn for _, fn in tasks])
    for (b, _), outcome in zip(tasks, outcomes, strict=True):
        if isinstance(outcome, Exception):
            errors[b.index] = outcome
        elif isinstance(outcome, BaseException):
            # A cancelled task or KeyboardInterrupt: as the threaded path, after every
            # branch returned.
            raise outcome
    return errors


def is_disconnect(b: Branch, e: BaseException) -> bool:
    """Whether ``e`` means the branch's connection is lost."""
    dialect = b.engine.dialect
    if not isinstance(e, dialect.loaded_dbapi.Error):
        return False
    try:
        return bool(dialect.is_disconnect(e, b.dbapi, None))
    except Exception:
        return True


def discard_dead(ordered: Sequence[Branch], errors: dict[int, BaseException]) -> None:
    """Invalidate connections lost mid-protocol, so that SQLAlchemy's ROLLBACK skips
    them instead of raising over the protocol's own exception."""
    for i, e in errors.items():
        b = ordered[i]
        if is_disconnect(b, e) and not b.connection.invalidated:
            b.connection.invalidate()


def leave(left: Sequence[Branch]) -> None:
    """Leave branches prepared for recovery without leaking them into the pool."""
    for b in left:
        if b.state is BranchState.FINISHED:
            continue
        b.state = BranchState.LEFT
        if (b.adapter is not None and b.adapter.prepared_blocks_connection
                and not b.connection.invalidated):
            # A MySQL session holding a prepared branch cannot do anything else; closing
            # it leaves the branch to recovery (prepared XA survives the disconnect).
            b.connection.invalidate()



def rollback_all(pool: Executor, ordered: Sequence[Branch], gtrid: str | None) -> None:
    """Roll back every branch before the commit point (nothing is committed); a branch
    that cannot be rolled back now is left to recovery (presumed abort)."""

    def undo(b: Branch) -> Callable[[], None]:
        def run() -> None:
            if b.adapter is None:
                return
            if b.state is BranchState.PREPARED:
                b.adapter.rollback_prepared_here(b.dbapi, b.xid)
                b.state = BranchState.FINISHED
            elif b.state is BranchState.ACTIVE and b.xa_started:
                b.adapter.rollback_active(b.dbapi, b.xid)
                b.state = BranchState.FINISHED
        return run

    errors = run_parallel(pool, [(b, undo(b)) for b in ordered])
    discard_dead(ordered, errors)
    for i, e in errors.items():
        b = ordered[i]
        log.warning("2PC %s: rollback of %s failed (%s); recovery will roll it back",
                    gtrid, b.describe(), e)
        leave([b])

def isolation_of(connection: Connection) -> str | None:
    """The isolation level a connection runs at, from what SQLAlchemy knows: the
    execution option, else the engine's setting, else the server default read at first
    connect (a ``SET SESSION TRANSACTION`` sent by hand is not seen)."""
    level = connection.get_execution_options().get("isolation_level")
    if level is None:
        dialect = connection.dialect
        level = getattr(dialect, "isolation_level", None) or getattr(
            dialect, "default_isolation_level", None)
    return str(level).upper().replace("_", " ") if level else None
