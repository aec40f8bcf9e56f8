"""TransactionCoordinator: makes a session's commits atomic across its shards.

How it hooks into SQLAlchemy (all public events, plus one sanctioned wrapper in
:mod:`shardsession._compat`):

* ``after_transaction_create`` of a root ``SessionTransaction``: the protocol hook goes
  into the root's prepare step, right after the final flush (so ``session.commit()`` and
  ``with session.begin():`` both run it; see ``_compat.coordinate``);
* ``after_begin``: the first connection of a root transaction is only noted; from the
  second on, each becomes a branch of the root's :class:`~.transaction.GlobalTransaction`
  (made then, the first connection its first branch). MySQL branches after the first
  send ``XA START`` now (it must be the first statement); the first has no XA and holds
  the decision;
* engine ``before_cursor_execute``: marks the branch as written unless the statement is a
  compiled SELECT (or a savepoint); on MySQL/MariaDB, a SELECT that calls a function
  other than SQLAlchemy's known SQL functions counts as a write (it may call a stored
  function that writes, and the server cannot be asked); PostgreSQL and SQLite branches
  that look read-only are asked at commit; after the protocol ran, a write raises;
* engine ``handle_error``: keeps the driver errors raised in a branch's transaction (an
  application may catch a deadlock and commit: the commit asks whether the server rolled
  the transaction back);
* engine ``rollback`` (fires before the DBAPI ROLLBACK): ends an XA branch first, since a
  plain ROLLBACK fails in XA ACTIVE state;
* the root's ``close()`` (every root transaction ends there): branches are forgotten.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any, Literal

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, SessionTransaction
from sqlalchemy.sql import visitors
from sqlalchemy.sql.elements import ColumnClause, TextClause
from sqlalchemy.sql.expression import (
    ReleaseSavepointClause,
    RollbackToSavepointClause,
    SavepointClause,
)
from sqlalchemy.sql.functions import FunctionElement, GenericFunction

from .. import _compat
from ..backends import BackendAdapter, Capabilities, adapter_for
from ..backends.sqlite import total_changes
from ..exc import ConfigurationError, TransactionError
from . import deadlock, early
from .branch import IMPLICIT_COMMIT_KEY, Branch, BranchState, commits_implicitly
from .identity import IdentityCache
from .transaction import GlobalTransaction

__all__ = ["TransactionCoordinator"]

log = logging.getLogger(__name__)

#: attributes of ours on a SQLAlchemy ``Connection``: its Branch, and "wrote" before it had one
_BRANCH_KEY = "_shardsession_branch"
_WROTE_KEY = "_shardsession_wrote"
#: attributes of ours on a transaction's first Connection before it is a branch: the
#: driver errors raised on it, and its adapter's write mark (SQLite only)
_ERRORS_KEY = "_shardsession_errors"
_MARK_KEY = "_shardsession_mark"
#: attribute of ours on a root ``SessionTransaction``: its first connection, until a second
#: shard joins (then that connection is the first branch of the GlobalTransaction)
_FIRST_KEY = "_shardsession_first"
#: attribute of ours on an Engine whose connection-level listeners are installed
_INSTRUMENTED_KEY = "_shardsession_instrumented"
#: ... and whose after_cursor_execute listener is (installed with its first branch)
_AFTER_KEY = "_shardsession_instrumented_after"
#: a session's branch-naming function: kept there by :meth:`TransactionCoordinator.attach`,
#: or a method of the session's class (``ShardedSession``)
_NAMING_KEY = "_shardsession_naming"
#: attribute of ours on a SQLAlchemy ``Connection``: its open savepoints, each with
#: whether the connection had written when it began
_SAVEPOINTS_KEY = "_shardsession_savepoints"
#: a session's shards given to TransactionCoordinator.attach (see _shards_of)
_SHARDS_KEY = "_shardsession_shards"
_SAVEPOINTS = (SavepointClause, RollbackToSavepointClause, ReleaseSavepointClause)

# Connection-level listeners are installed once per engine (marked with _INSTRUMENTED_KEY),
# whatever the number of coordinators: the listeners find their branch through the
# connection.
_instrument_lock = threading.Lock()


def _branch_of(conn: Connection) -> Branch | None:
    # The mark lives on the SQLAlchemy Connection, which a session transaction uses for
    # one shard and discards at its end (the pool's DBAPI connection carries nothing).
    branch = getattr(conn, _BRANCH_KEY, None)
    if branch is not None and branch.state is not BranchState.CLOSED:
        return branch  # type: ignore[no-any-return]
    return None


def _is_write(context: Any) -> bool:
    if context is None:
        return True
    compiled = getattr(context, "compiled", None)
    if compiled is None:
        return True  # driver-level SQL: cannot tell, assume it writes
    if context.isinsert or context.isupdate or context.isdelete or context.isddl:
        return True
    stmt = getattr(compiled, "statement", None)
    if isinstance(stmt, _SAVEPOINTS):
        return False
    if not getattr(stmt, "is_select", False):
        return True
    if context.dialect.name in _UNASKABLE:
        return _calls_routines(compiled, stmt)
    # A SELECT may still write (a function it calls may insert): PostgreSQL and SQLite
    # branches are asked at commit time (GlobalTransaction._inspect).
    return False


#: dialects whose server cannot say whether a transaction's first shard wrote (MariaDB asks
#: its counters of rows written only from the point a branch joined: see the MySQL adapter)
_UNASKABLE = frozenset({"mysql", "mariadb"})
#: attribute of ours on a SQLAlchemy Compiled: whether its statement calls a function that
#: is not one of SQLAlchemy's known SQL functions (found once per compiled statement,
#: which SQLAlchemy caches)
_CALLS_KEY = "_shardsession_calls_routines"


def _may_call_routine(el: Any) -> bool:
    # A function SQLAlchemy does not know, or opaque SQL (text(), literal_column("f()"))
    # that may hold a call; the "*" of count(*) is SQLAlchemy's own literal column.
    if isinstance(el, FunctionElement):
        return not isinstance(el, GenericFunction)
    if isinstance(el, TextClause):
        return True
    return isinstance(el, ColumnClause) and el.is_literal and el.name != "*"


def _calls_routines(compiled: Any, stmt: Any) -> bool:
    """Whether a SELECT calls a function that may be a stored routine (and so write).

    A routine called through a view is not seen (documented in the README)."""
    verdict = getattr(compiled, _CALLS_KEY, None)
    if verdict is None:
        verdict = any(_may_call_routine(el) for el in visitors.iterate(stmt))
        with contextlib.suppress(AttributeError):
            setattr(compiled, _CALLS_KEY, verdict)
    return bool(verdict)


def _before_cursor_execute(conn: Connection, cursor: Any, statement: str, parameters: Any,
                           context: Any, executemany: bool) -> None:
    branch = _branch_of(conn)
    if (conn.dialect.name in ("mysql", "mariadb") and commits_implicitly(statement)
            and (branch is not None or getattr(conn, _WROTE_KEY, None) is not None)):
        setattr(conn, IMPLICIT_COMMIT_KEY, statement[:80])
    if branch is None:
        # Not (yet) a branch. A transaction's first connection carries the "wrote" mark,
        # False until it writes: it becomes a branch only when a second shard joins, and
        # the mark tells it then whether it wrote. Other connections of the engine (a
        # plain Session's, say) carry no mark and cost no more than this.
        if getattr(conn, _WROTE_KEY, None) is False and _is_write(context):
            setattr(conn, _WROTE_KEY, True)
        return
    gt = branch.gt
    if _is_write(context):
        if gt is not None and gt.protocol_ran:
            raise TransactionError(
                f"write on shard {branch.shard_id!r} after the commit protocol ran: it "
                "would not be part of the committed transaction",
                gtrid=gt.gtrid,
            )
        branch.wrote = True
    if gt is not None:
        coord = gt.coordinator
        if coord.deadlock_timeout is not None:
            deadlock.enter(branch, coord.deadlock_timeout, coord.deadlock_fallback)


def _after_cursor_execute(conn: Connection, cursor: Any, statement: str, parameters: Any,
                          context: Any, executemany: bool) -> None:
    branch = _branch_of(conn)
    if branch is not None:
        deadlock.after_statement(branch)


def _wrote(conn: Connection) -> bool | None:
    branch = _branch_of(conn)
    return branch.wrote if branch is not None else getattr(conn, _WROTE_KEY, None)


def _on_savepoint(conn: Connection, name: str | None) -> None:
    # Whether the connection had written when the SAVEPOINT began, so that a rollback to
    # it can say so again: the server undid every write since, and a shard whose only
    # writes were rolled back must commit as the reader it is (no PREPARE, and no
    # second unpreparable writer for atomic='require' to refuse).
    wrote = _wrote(conn)
    if wrote is None:
        return  # not a connection of a coordinated transaction
    stack: list[tuple[str, bool]] | None = getattr(conn, _SAVEPOINTS_KEY, None)
    if stack is None:
        stack = []
        setattr(conn, _SAVEPOINTS_KEY, stack)
    stack.append((_compat.savepoint_name(conn, name), wrote))


def _unwind(conn: Connection, name: str) -> bool | None:
    """Forget savepoint ``name`` and those begun after it; what the connection had
    written when it began (``None``: not tracked)."""
    stack: list[tuple[str, bool]] | None = getattr(conn, _SAVEPOINTS_KEY, None)
    if not stack:
        return None
    for i in range(len(stack) - 1, -1, -1):
        if stack[i][0] == name:
            wrote = stack[i][1]
            del stack[i:]
            return wrote
    return None


def _on_rollback_savepoint(conn: Connection, name: str, context: Any) -> None:
    wrote = _unwind(conn, name)
    if wrote is None:
        return
    branch = _branch_of(conn)
    if branch is not None:
        deadlock.savepoint_rolled_back(branch)  # it reverts a label set since
        branch.wrote = wrote
        if (not wrote and branch.adapter is not None and branch.mark is not None
                and branch.adapter.name == "sqlite"):
            # SQLite's total_changes still holds the rows the rollback undid: count from
            # here, as if the branch began now (SQLite has no routine that writes unseen).
            # MariaDB's counters are left alone: a routine may have written before the
            # savepoint, unseen by the statements; counting the undone rows too only
            # prepares a reader.
            branch.mark = branch.adapter.write_mark(branch.dbapi)
    elif getattr(conn, _WROTE_KEY, None) is not None:
        setattr(conn, _WROTE_KEY, wrote)
        if not wrote and getattr(conn, _MARK_KEY, None) is not None:
            setattr(conn, _MARK_KEY, total_changes(conn.connection.dbapi_connection))


def _on_release_savepoint(conn: Connection, name: str, context: Any) -> None:
    _unwind(conn, name)


def _on_error(context: Any) -> BaseException | None:
    # The server may have rolled the whole transaction back (a deadlock): if the
    # application catches the error and commits, the commit must know.
    conn = context.connection
    if conn is None or context.original_exception is None:
        return None
    branch = _branch_of(conn)
    if branch is not None:
        if branch.errors is None:
            branch.errors = []
        branch.errors.append(context.original_exception)
        deadlock.leave(branch)
        return deadlock.victim_error(branch.gt) if branch.gt is not None else None
    elif getattr(conn, _WROTE_KEY, None) is not None:  # a transaction's first connection
        errors = getattr(conn, _ERRORS_KEY, None)
        if errors is None:
            errors = []
            setattr(conn, _ERRORS_KEY, errors)
        errors.append(context.original_exception)
    return None


def _on_rollback(conn: Connection) -> None:
    if getattr(conn, _SAVEPOINTS_KEY, None):
        setattr(conn, _SAVEPOINTS_KEY, None)  # the transaction ended with them open
    branch = _branch_of(conn)
    if branch is not None and branch.gt is not None:
        branch.gt.on_connection_rollback(branch)


def _instrument(engine: Engine) -> None:
    with _instrument_lock:
        if getattr(engine, _INSTRUMENTED_KEY, False):
            return
        event.listen(engine, "before_cursor_execute", _before_cursor_execute)
        event.listen(engine, "rollback", _on_rollback)
        event.listen(engine, "savepoint", _on_savepoint)
        event.listen(engine, "rollback_savepoint", _on_rollback_savepoint)
        event.listen(engine, "release_savepoint", _on_release_savepoint)
        event.listen(engine, "handle_error", _on_error)
        setattr(engine, _INSTRUMENTED_KEY, True)


def _instrument_branches(engine: Engine) -> None:
    # the end of a branch's statement (for the deadlock detector), on an engine's first
    # branch: an engine only ever used by single-shard transactions never pays for it
    with _instrument_lock:
        if getattr(engine, _AFTER_KEY, False):
            return
        event.listen(engine, "after_cursor_execute", _after_cursor_execute)
        setattr(engine, _AFTER_KEY, True)


def _is_autocommit(conn: Connection) -> bool:
    level = conn.get_execution_options().get("isolation_level")
    if level is None:
        level = getattr(conn.engine.dialect, "isolation_level", None)
    return level == "AUTOCOMMIT"


class TransactionCoordinator:
    """Shared, thread-safe per session factory: settings + per-engine capability cache.

    :param atomic: ``"require"``: a commit that cannot be atomic (two or more written
        shards that cannot prepare) raises
        :class:`~shardsession.exc.AtomicityUnavailableError` before anything commits;
        ``"best_effort"``: those shards are committed last, one by one, with a
        :class:`~shardsession.exc.NonAtomicCommitWarning`.
    :param decider: shard id preferred as the holder of the decision row.
    :param max_workers: threads for the parallel phases (default: ``min(32, cpus + 4)``).
    :param max_commit_age: seconds; an older transaction is refused at commit (nothing is
        committed). Must stay below half of recovery's ``abort_retention``.
    :param deadlock_timeout: seconds a statement of a global transaction (2+ shards) may
        wait before the distributed deadlock detector reads the lock waits of its shards
        (see :mod:`.deadlock`); ``None`` turns detection off.
    :param deadlock_fallback: seconds after which a global transaction waiting on a shard
        that cannot show its lock waits (MariaDB without ``PROCESS``, SQLite) is cancelled
        with :class:`~shardsession.exc.DistributedDeadlock`.
    :param label_branches: label each PostgreSQL branch of a global transaction with it
        (``application_name``, one round trip per branch, multi-shard transactions only),
        so that the detectors of other processes see its cycles too.
    :param crash_point: tests only: called with the name of each protocol step.
    """

    def __init__(
        self,
        *,
        atomic: Literal["require", "best_effort"] = "require",
        decider: str | None = None,
        max_workers: int | None = None,
        max_commit_age: float = 6 * 3600.0,
        crash_point: Callable[[str], None] | None = None,
        deadlock_timeout: float | None = 1.0,
        deadlock_fallback: float = 30.0,
        label_branches: bool = True,
    ) -> None:
        if deadlock_timeout is not None and not deadlock_timeout > 0:
            raise ConfigurationError(
                f"deadlock_timeout must be > 0 seconds or None, not {deadlock_timeout!r}")
        if not deadlock_fallback > 0:
            raise ConfigurationError(
                f"deadlock_fallback must be > 0 seconds, not {deadlock_fallback!r}")
        self.deadlock_timeout = deadlock_timeout
        self.deadlock_fallback = deadlock_fallback
        self.label_branches = label_branches
        if atomic not in ("require", "best_effort"):
            raise ConfigurationError(f"atomic must be 'require' or 'best_effort', not {atomic!r}")
        self.atomic = atomic
        self.decider = decider
        self.max_workers = max_workers or min(32, (os.cpu_count() or 1) + 4)
        self.max_commit_age = max_commit_age
        self.crash_point = crash_point
        self._lock = threading.Lock()
        self._caps: weakref.WeakKeyDictionary[Engine, Capabilities] = weakref.WeakKeyDictionary()
        self._tables: weakref.WeakKeyDictionary[Engine, bool] = weakref.WeakKeyDictionary()
        self._identity = IdentityCache()
        self._executor: ThreadPoolExecutor | None = None

    # --- shared resources ------------------------------------------------------------

    def executor(self) -> Executor:
        """The thread pool of the parallel phases (created on first use)."""
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    max_workers=self.max_workers, thread_name_prefix="shardsession-2pc"
                )
            return self._executor

    def adapter(self, engine: Engine) -> BackendAdapter | None:
        """The adapter of an engine's dialect, or ``None`` if there is none."""
        try:
            return adapter_for(engine.dialect.name)
        except KeyError:
            return None

    def capabilities(self, branch: Branch, *, detect: bool) -> Capabilities:
        """Capabilities of a branch's engine, detected on its connection on first need.

        Without ``detect``, an undetected server is assumed able to prepare (used only
        to pick a decider early; the commit detects before relying on it).
        """
        caps = self._caps.get(branch.engine)
        if caps is not None:
            return caps
        assert branch.adapter is not None
        if not detect and branch.adapter.name != "sqlite":
            return Capabilities(True)
        caps = branch.adapter.detect(branch.dbapi)
        if not caps.can_prepare:
            log.info("shard %s cannot prepare: %s", branch.shard_id, caps.reason)
        with self._lock:
            self._caps[branch.engine] = caps
        return caps

    def known_can_prepare(self, engine: Engine) -> bool:
        """Whether ``engine``'s server can prepare, as far as already detected (an
        undetected one is assumed able to)."""
        caps = self._caps.get(engine)
        return caps is None or caps.can_prepare

    def ensure_decision_table(self, branch: Branch) -> None:
        """Create the decision table on a decider's database on first use."""
        if self._tables.get(branch.engine):
            return
        assert branch.adapter is not None
        if branch.adapter.name == "sqlite":
            # Transactional DDL on the branch's own connection: a second connection
            # could not see (or would lock) an in-memory or busy database file. Never
            # marked as done: a commit that fails rolls the CREATE back with it (no
            # round trip to save on SQLite, IF NOT EXISTS is cheap).
            branch.adapter.ensure_decision_table(branch.dbapi)
            return
        else:
            # MySQL DDL commits implicitly: never on the branch's connection.
            with branch.engine.connect() as c:
                c = c.execution_options(isolation_level="AUTOCOMMIT")
                branch.adapter.ensure_decision_table(c.connection.dbapi_connection)
        with self._lock:
            self._tables[branch.engine] = True

    def identity(self, branch: Branch) -> str:
        """The cluster identity to write into a gtrid decided on ``branch`` (see
        :class:`.identity.IdentityCache`)."""
        return self._identity.for_branch(branch)

    def engine_identity(self, engine: Engine) -> str:
        """The cluster identity of a decider that is not a branch of the transaction."""
        return self._identity.for_engine(engine, self.adapter(engine))

    def forget_identity(self, engine: Engine) -> None:
        """Read a decider's identity again for the next transaction (it was re-keyed)."""
        self._identity.forget(engine)

    def confirm_identity(self, branch: Branch, cluster: str) -> None:
        """Make sure a decider chosen before it joined stores ``cluster`` (see
        :meth:`.identity.IdentityCache.confirm`)."""
        self._identity.confirm(branch, cluster)

    def forget(self, branch: Branch) -> None:
        """Drop a branch's mark from its connection."""
        deadlock.leave(branch)
        if getattr(branch.connection, _BRANCH_KEY, None) is branch:
            setattr(branch.connection, _BRANCH_KEY, None)

    # --- session integration ---------------------------------------------------------

    def attach(self, session: Session, shard_of_engine: Callable[[Engine], str], *,
               shards: Mapping[str, Any] | None = None) -> None:
        """Make this session's commits atomic, for a session class whose class-level
        listeners call :meth:`on_transaction_create` and :meth:`on_begin` (as
        :class:`~shardsession.ShardedSession` does: that costs a session nothing at
        creation, unlike per-instance listeners). A coordinated root transaction forgets
        its branches in its own ``close()``.

        ``shard_of_engine`` names a branch by its engine; it is kept on the session.
        ``shards`` (shard id -> Engine) lets a shard that cannot prepare (SQLite) hold
        the decision whatever the order in which the shards are written: without it, a
        MariaDB branch's XA START fixes the decider among the shards begun so far, and a
        SQLite shard written after that cannot be atomic. A
        :class:`~shardsession.ShardedSession` gives its own shards.
        """
        setattr(session, _NAMING_KEY, shard_of_engine)
        if shards is not None:
            setattr(session, _SHARDS_KEY, dict(shards))
        # A session may already have autobegun (e.g. attached late): cover it too.
        current = session.get_transaction()
        if current is not None:
            self.on_transaction_create(session, current)

    def install(self, session: Session, shard_of_engine: Callable[[Engine], str], *,
                shards: Mapping[str, Any] | None = None) -> None:
        """Make this session's commits atomic, by listening to its events (any Session);
        ``shards`` as for :meth:`attach`."""
        event.listen(session, "after_transaction_create", self.on_transaction_create)
        event.listen(session, "after_begin", self.on_begin)
        self.attach(session, shard_of_engine, shards=shards)

    def on_transaction_create(self, sess: Session, transaction: SessionTransaction) -> None:
        """``after_transaction_create``: a root transaction will run the protocol at commit.

        Nothing else happens yet: the :class:`GlobalTransaction` is made when a second
        shard joins, and a transaction that stays on one shard never runs more than
        SQLAlchemy's own commit.
        """
        _compat.coordinate(transaction)

    def _global(self, sess: Session, root: SessionTransaction) -> GlobalTransaction | None:
        """The root transaction's GlobalTransaction, made on first need (``None`` for a
        transaction of a session this coordinator is not attached to).

        The transaction's first connection, noted by :meth:`on_begin`, becomes the new
        global transaction's first branch, with what it wrote so far.
        """
        owner = _compat.transaction_slot(root)
        if owner is not None:
            return owner  # type: ignore[no-any-return]
        if not _compat.is_coordinated(root):
            return None
        naming = getattr(sess, _NAMING_KEY, None)
        if naming is None:
            return None
        gt = GlobalTransaction(self, naming, _shards_of(sess))
        gt.session = sess
        _compat.set_transaction_slot(root, gt)
        first: Connection | None = getattr(root, _FIRST_KEY, None)
        if first is not None and not _is_autocommit(first):
            branch = self._add(gt, first, begun=True)
            branch.wrote = bool(getattr(first, _WROTE_KEY, False))
            branch.mark = getattr(first, _MARK_KEY, None)
            branch.errors = getattr(first, _ERRORS_KEY, None)
        return gt

    def _add(self, gt: GlobalTransaction, connection: Connection, *,
             begun: bool = False) -> Branch:
        _instrument(connection.engine)
        if self.deadlock_timeout is not None:
            _instrument_branches(connection.engine)
        branch = gt.add_branch(connection, begun=begun)
        setattr(connection, _BRANCH_KEY, branch)
        if self.label_branches and self.deadlock_timeout is not None and not gt.defer_xa_start:
            deadlock.schedule_labels(gt, ())  # (a flush's early BEGIN labels its own)
        if not getattr(connection, _WROTE_KEY, False):
            self._identity.early(branch)
        return branch

    def on_begin(
        self, sess: Session, transaction: SessionTransaction, connection: Connection
    ) -> None:
        """``after_begin``: the connection just begun becomes a branch (see
        :func:`begin_listener`, which this runs with this coordinator)."""
        begin_listener(sess, transaction, connection, self)

    def _join(self, sess: Session, root: SessionTransaction, connection: Connection,
              gt: GlobalTransaction | None, first: Connection | None, *,
              adopted: bool = False) -> None:
        # begin_listener's part for a second connection (or later) of a transaction
        if _is_autocommit(connection):
            return  # not transactional: never a branch
        if gt is None:
            assert first is not None
            if first.engine is connection.engine:
                return
            if _is_autocommit(first):  # it never was a branch: this one is the first
                _note_first(root, connection, adopted=adopted)
                return
        elif connection.engine in gt.branches:
            return
        gt = self._global(sess, root)
        if gt is not None:
            branch = self._add(gt, connection, begun=adopted)
            if adopted:
                branch.wrote = True

    def begin_early(self, sess: Session, shard_ids: Sequence[str]) -> list[Future[None]]:
        """Before a flush that writes ``shard_ids`` (in the order the flush will most
        likely write them): check out their connections and open the server
        transactions of all but the first from worker threads (see :mod:`.early`).

        Returns the running early BEGINs (a list :func:`.early.join` empties); the
        transaction joins them itself before it commits or rolls back.
        """
        if len(shard_ids) < 2:
            return []
        root = sess.get_transaction()
        if root is None:
            return []
        gt = self._global(sess, root)
        if gt is None or gt.protocol_ran:
            return []
        branches = []
        # Every connection is checked out in the flush's order (the branches register as
        # the flush would register them, which fixes e.g. a MySQL branch's decider at its
        # XA START); their XA STARTs go out together afterwards. The first shard's BEGIN
        # is left to the flush's own first statement.
        gt.defer_xa_start = True
        try:
            for i, shard_id in enumerate(shard_ids):
                # From the root, not from a begin_nested() savepoint the flush may run in:
                # a savepoint's connection would get its SAVEPOINT right away, before the
                # deferred XA START that must be its transaction's first statement. The
                # flush's own first use of it there sends the SAVEPOINT afterwards.
                conn = root.connection(None, shard_id=shard_id)
                branch = gt.branches.get(conn.engine)
                if branch is not None and i > 0:
                    branches.append(branch)
            if self.label_branches and self.deadlock_timeout is not None:
                # the label jobs of the branches to begin early make their BEGINs
                labelled = deadlock.schedule_labels(gt, branches)
                branches = [b for b in branches if b not in labelled]
        finally:
            gt.defer_xa_start = False
            gt.start_pending_xa()
        gt.early.extend(early.start(self.executor(), branches))
        return gt.early

    def close(self) -> None:
        """Shut the worker threads down (they are daemon-like; optional)."""
        with self._lock:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None


def begin_listener(
    sess: Session,
    transaction: SessionTransaction,
    connection: Connection,
    coordinator: TransactionCoordinator | None = None,
) -> None:
    """``after_begin``: the connection just begun becomes a branch of the transaction
    (for a session class whose instances name their ``_coordinator``, when
    ``coordinator`` is not given).

    The first connection of a transaction is only noted: most transactions touch one
    shard, and their commit is SQLAlchemy's own (on MySQL too: no XA START). A second
    shard makes it a branch of a GlobalTransaction; a MySQL first branch then has no XA
    and holds the decision, as MySQL's first branch always did (its XA START fixed the
    decider from the shards begun so far). An AUTOCOMMIT connection is never a branch.

    An external transaction the session only joined (a Connection bind that was already
    in a transaction, with any ``join_transaction_mode`` but ``"control_fully"``) is
    never a branch either: its commit is not the session's to make, so the protocol
    never prepares, decides or commits it, and the session commits (or not) what a plain
    Session would. One it adopted (``"control_fully"``) is a branch that may have
    written before and never has an XA START.
    """
    if transaction.nested:
        # A SAVEPOINT's transaction: the root's after_begin for this connection came
        # first (SQLAlchemy begins the root's before the savepoint's).
        return
    kind = _compat.join_kind(transaction, connection)
    if kind is _compat.OUTSIDE:
        return
    gt = _compat.transaction_slot(transaction)
    first: Connection | None = getattr(transaction, _FIRST_KEY, None)
    if first is None and gt is None:
        # the common case: the transaction's first connection
        _note_first(transaction, connection, adopted=kind is _compat.ADOPTED)
        return
    if coordinator is None:
        coordinator = getattr(sess, "_coordinator", None)
        if coordinator is None:
            return
    coordinator._join(sess, transaction, connection, gt, first,
                      adopted=kind is _compat.ADOPTED)


def _shards_of(sess: Session) -> Mapping[str, Any] | None:
    """The session's shards: given to :meth:`TransactionCoordinator.attach`, or a
    ShardedSession's own (its ``shards`` property)."""
    given = getattr(sess, _SHARDS_KEY, None)
    if given is not None:
        return given  # type: ignore[no-any-return]
    if isinstance(getattr(type(sess), "shards", None), property):
        shards = sess.shards  # type: ignore[attr-defined]
        if isinstance(shards, Mapping):
            return shards
    return None


def _note_first(root: SessionTransaction, connection: Connection, *,
                adopted: bool = False) -> None:
    """Note ``connection`` as the root transaction's first (not yet a branch), its
    engine's listeners installed so that its "wrote" mark follows its statements (an
    adopted transaction counts as written: what ran before the session joined it was not
    seen)."""
    engine = connection.engine
    if not getattr(engine, _INSTRUMENTED_KEY, False):
        _instrument(engine)
    # (a Connection given as a session's bind serves several transactions)
    setattr(connection, _WROTE_KEY, adopted)
    setattr(connection, _ERRORS_KEY, None)
    if engine.dialect.name == "sqlite":
        # SQLite's count of changed rows is per connection: note where this one starts
        dbapi: Any = connection.connection.dbapi_connection
        setattr(connection, _MARK_KEY, total_changes(dbapi))
    setattr(root, _FIRST_KEY, connection)
