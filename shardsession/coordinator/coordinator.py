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
  compiled SELECT (or a savepoint); after the protocol ran, a write raises;
* engine ``rollback`` (fires before the DBAPI ROLLBACK): ends an XA branch first, since a
  plain ROLLBACK fails in XA ACTIVE state;
* the root's ``close()`` (every root transaction ends there): branches are forgotten.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any, Literal

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, SessionTransaction
from sqlalchemy.sql.expression import (
    ReleaseSavepointClause,
    RollbackToSavepointClause,
    SavepointClause,
)

from .. import _compat
from ..backends import BackendAdapter, Capabilities, adapter_for
from ..exc import ConfigurationError, TransactionError
from . import early
from .branch import Branch, BranchState
from .transaction import GlobalTransaction

__all__ = ["TransactionCoordinator"]

log = logging.getLogger(__name__)

#: attributes of ours on a SQLAlchemy ``Connection``: its Branch, and "wrote" before it had one
_BRANCH_KEY = "_shardsession_branch"
_WROTE_KEY = "_shardsession_wrote"
#: attribute of ours on a root ``SessionTransaction``: its first connection, until a second
#: shard joins (then that connection is the first branch of the GlobalTransaction)
_FIRST_KEY = "_shardsession_first"
#: attribute of ours on an Engine whose connection-level listeners are installed
_INSTRUMENTED_KEY = "_shardsession_instrumented"
#: a session's branch-naming function: kept there by :meth:`TransactionCoordinator.attach`,
#: or a method of the session's class (``ShardedSession``)
_NAMING_KEY = "_shardsession_naming"
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
    return not bool(getattr(stmt, "is_select", False))


def _before_cursor_execute(conn: Connection, cursor: Any, statement: str, parameters: Any,
                           context: Any, executemany: bool) -> None:
    branch = _branch_of(conn)
    if branch is None:
        # Not (yet) a branch. A transaction's first connection carries the "wrote" mark,
        # False until it writes: it becomes a branch only when a second shard joins, and
        # the mark tells it then whether it wrote. Other connections of the engine (a
        # plain Session's, say) carry no mark and cost no more than this.
        if getattr(conn, _WROTE_KEY, None) is False and _is_write(context):
            setattr(conn, _WROTE_KEY, True)
        return
    if not _is_write(context):
        return
    if branch.gt is not None and branch.gt.protocol_ran:
        raise TransactionError(
            f"write on shard {branch.shard_id!r} after the commit protocol ran: it would "
            "not be part of the committed transaction",
            gtrid=branch.gt.gtrid,
        )
    branch.wrote = True


def _on_rollback(conn: Connection) -> None:
    branch = _branch_of(conn)
    if branch is not None and branch.gt is not None:
        branch.gt.on_connection_rollback(branch)


def _instrument(engine: Engine) -> None:
    with _instrument_lock:
        if getattr(engine, _INSTRUMENTED_KEY, False):
            return
        event.listen(engine, "before_cursor_execute", _before_cursor_execute)
        event.listen(engine, "rollback", _on_rollback)
        setattr(engine, _INSTRUMENTED_KEY, True)


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
    ) -> None:
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

    def forget(self, branch: Branch) -> None:
        """Drop a branch's mark from its connection."""
        if getattr(branch.connection, _BRANCH_KEY, None) is branch:
            setattr(branch.connection, _BRANCH_KEY, None)

    # --- session integration ---------------------------------------------------------

    def attach(self, session: Session, shard_of_engine: Callable[[Engine], str]) -> None:
        """Make this session's commits atomic, for a session class whose class-level
        listeners call :meth:`on_transaction_create` and :meth:`on_begin` (as
        :class:`~shardsession.ShardedSession` does: that costs a session nothing at
        creation, unlike per-instance listeners). A coordinated root transaction forgets
        its branches in its own ``close()``.

        ``shard_of_engine`` names a branch by its engine; it is kept on the session.
        """
        setattr(session, _NAMING_KEY, shard_of_engine)
        # A session may already have autobegun (e.g. attached late): cover it too.
        current = session.get_transaction()
        if current is not None:
            self.on_transaction_create(session, current)

    def install(self, session: Session, shard_of_engine: Callable[[Engine], str]) -> None:
        """Make this session's commits atomic, by listening to its events (any Session)."""
        event.listen(session, "after_transaction_create", self.on_transaction_create)
        event.listen(session, "after_begin", self.on_begin)
        self.attach(session, shard_of_engine)

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
        gt = GlobalTransaction(self, naming)
        gt.session = sess
        _compat.set_transaction_slot(root, gt)
        first: Connection | None = getattr(root, _FIRST_KEY, None)
        if first is not None and not _is_autocommit(first):
            branch = self._add(gt, first, begun=True)
            branch.wrote = bool(getattr(first, _WROTE_KEY, False))
        return gt

    def _add(self, gt: GlobalTransaction, connection: Connection, *,
             begun: bool = False) -> Branch:
        _instrument(connection.engine)
        branch = gt.add_branch(connection, begun=begun)
        setattr(connection, _BRANCH_KEY, branch)
        return branch

    def on_begin(
        self, sess: Session, transaction: SessionTransaction, connection: Connection
    ) -> None:
        """``after_begin``: the connection just begun becomes a branch (see
        :func:`begin_listener`, which this runs with this coordinator)."""
        begin_listener(sess, transaction, connection, self)

    def _join(self, sess: Session, root: SessionTransaction, connection: Connection,
              gt: GlobalTransaction | None, first: Connection | None) -> None:
        # begin_listener's part for a second connection (or later) of a transaction
        if _is_autocommit(connection):
            return  # not transactional: never a branch
        if gt is None:
            assert first is not None
            if first.engine is connection.engine:
                return
            if _is_autocommit(first):  # it never was a branch: this one is the first
                _note_first(root, connection)
                return
        elif connection.engine in gt.branches:
            return
        gt = self._global(sess, root)
        if gt is not None:
            self._add(gt, connection)

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
        gt = self._global(sess, root) if root is not None else None
        if gt is None or gt.protocol_ran or gt.early:
            return []
        branches = []
        # Every connection is checked out in the flush's order (the branches register as
        # the flush would register them, which fixes e.g. a MySQL branch's decider at its
        # XA START); their XA STARTs go out together afterwards. The first shard's BEGIN
        # is left to the flush's own first statement.
        gt.defer_xa_start = True
        try:
            for i, shard_id in enumerate(shard_ids):
                conn = sess.connection(bind_arguments={"shard_id": shard_id})
                branch = gt.branches.get(conn.engine)
                if branch is not None and i > 0:
                    branches.append(branch)
        finally:
            gt.defer_xa_start = False
            gt.start_pending_xa()
        gt.early = early.start(self.executor(), branches)
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
    """
    # after_begin reports the transaction that owns the connection: the root, or a
    # SAVEPOINT's (nested) transaction
    root = _compat.root_transaction(transaction) if transaction.nested else transaction
    gt = _compat.transaction_slot(root)
    first: Connection | None = getattr(root, _FIRST_KEY, None)
    if first is None and gt is None:
        _note_first(root, connection)  # the common case: the transaction's first connection
        return
    if coordinator is None:
        coordinator = getattr(sess, "_coordinator", None)
        if coordinator is None:
            return
    coordinator._join(sess, root, connection, gt, first)


def _note_first(root: SessionTransaction, connection: Connection) -> None:
    """Note ``connection`` as the root transaction's first (not yet a branch), its
    engine's listeners installed so that its "wrote" mark follows its statements."""
    engine = connection.engine
    if not getattr(engine, _INSTRUMENTED_KEY, False):
        _instrument(engine)
    # (a Connection given as a session's bind serves several transactions)
    setattr(connection, _WROTE_KEY, False)
    setattr(root, _FIRST_KEY, connection)
