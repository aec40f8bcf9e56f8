"""The one module allowed to touch SQLAlchemy's private names.

Everything here is checked against SQLAlchemy 2.1.9 (and the 2.0 series where noted);
each function documents the private name it relies on, so an upgrade has one place to look.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable, Collection, Iterable, Sized
from typing import Any

from sqlalchemy.engine import NestedTransaction
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.ext.horizontal_shard import IdentityChooser, set_shard_id
from sqlalchemy.orm import Mapper, ORMExecuteState, Session
from sqlalchemy.orm.base import PassiveFlag
from sqlalchemy.orm.session import (
    SessionTransaction,
    SessionTransactionOrigin,
    SessionTransactionState,
)
from sqlalchemy.orm.state import InstanceState
from sqlalchemy.orm.state_changes import _StateChangeStates
from sqlalchemy.sql.visitors import InternalTraversal
from sqlalchemy.util import EMPTY_DICT, safe_reraise

__all__ = [
    "coordinate",
    "explicit_shard_of",
    "identity_token_of",
    "is_coordinated",
    "set_identity_token",
    "skip_connection_commit",
]


def identity_token_of(state: InstanceState[Any]) -> Any:
    """Return the shard an instance is (or will be) stored on, or ``None``.

    Persistent objects carry it as the third element of their identity key; pending
    objects carry it in ``InstanceState.identity_token`` (a public attribute in 2.x that
    SQLAlchemy's own ``horizontal_shard`` sets the same way).
    """
    if state.key is not None:
        return state.key[2]
    return state.identity_token


def set_identity_token(state: InstanceState[Any], shard_id: Any) -> None:
    """Assign a pending object to a shard (what ``horizontal_shard`` does on first flush)."""
    state.identity_token = shard_id


def flush_states(
    session: Session,
) -> tuple[Collection[InstanceState[Any]], list[InstanceState[Any]]]:
    """The states of ``session.new`` (in the order they were added; SQLAlchemy's own
    insertion-ordered dict, not a copy: do not add or remove objects while using it) and
    of ``session.dirty``, without building the two ``IdentitySet`` collections of objects.

    Reads ``Session._new`` (private: ``{state: obj}``, insertion-ordered),
    ``IdentityMap._modified`` (the set behind ``Session._dirty_states``) and
    ``Session._deleted``, exactly what the public properties read (checked on 2.0.30 and
    2.1.9).
    """
    new = session._new
    modified = session.identity_map._modified
    if not modified:
        return new, []
    deleted = session._deleted
    dirty = []
    for state in modified:  # (a plain loop: a comprehension is one more frame on 3.11)
        if state not in deleted and state.obj() is not None:
            dirty.append(state)
    return new, dirty


def session_identity_lookup(
    session: Session,
    mapper: Mapper[Any],
    primary_key_identity: Any,
    identity_token: Any,
    **kw: Any,
) -> Any:
    """Call ``Session._identity_lookup`` of the plain Session class (private in 2.x)."""
    return Session._identity_lookup(
        session, mapper, primary_key_identity, identity_token=identity_token, **kw
    )


def explicit_shard_of(orm_context: ORMExecuteState) -> Any:
    """Return the shard a statement is pinned to, or ``None`` to let the choosers decide.

    Mirrors ``sqlalchemy.ext.horizontal_shard.execute_and_instances`` exactly, in its order:
    a ``set_shard_id`` option (``ORMExecuteState._non_compile_orm_options``, looked at only
    when the statement's ``_with_options`` is not empty), the identity token of the
    load/update options (``_identity_token``: lazy loads and refreshes of an object stay on
    its shard; a SELECT's load options are the ``_sa_orm_load_options`` execution option,
    which is what ``ORMExecuteState.load_options`` returns), the ``_sa_shard_id``
    execution option of ``ShardedQuery.set_shard``, then ``bind_arguments["shard_id"]``.
    """
    statement = orm_context.statement
    if statement._with_options:  # (most statements have none: skip building the list)
        for opt in orm_context._non_compile_orm_options:
            if isinstance(opt, set_shard_id):
                return opt.shard_id
    active: Any
    if statement.is_select:  # what ORMExecuteState.is_select / .load_options read
        active = orm_context.execution_options.get("_sa_orm_load_options")
    elif orm_context.is_update or orm_context.is_delete:
        active = update_delete_options_of(orm_context)
    else:
        active = None
    if active is not None and active._identity_token is not None:
        return active._identity_token
    if "_sa_shard_id" in orm_context.execution_options:
        return orm_context.execution_options["_sa_shard_id"]
    return orm_context.bind_arguments.get("shard_id")


def update_delete_options_of(orm_context: ORMExecuteState) -> Any:
    """The update/delete options of an UPDATE or DELETE execution, or ``None`` when
    none were set (SQLAlchemy's defaults then apply: no identity token, autoflush).

    ``ORMExecuteState.update_delete_options`` refuses an UPDATE or DELETE written as
    ``lambda_stmt(lambda: update(...))`` or ``select(...).from_statement(update(...))``
    (its check is ``isinstance(statement, (Update, Delete))``) although ``is_update`` /
    ``is_delete`` are true for them and a plain Session runs them; this reads what that
    property returns, the ``_sa_orm_update_options`` execution option (private; checked
    on 2.1.9), for every form.
    """
    return orm_context.execution_options.get("_sa_orm_update_options")


def route_identity_load(orm_context: ORMExecuteState, shards: Any, slow_option: str) -> bool:
    """The common case of :func:`explicit_shard_of` and :func:`route_in_place` in one
    step: a SELECT without options whose load options carry the identity token of a
    shard in ``shards`` (``Session.get``, lazy loads, refreshes) is pinned to that shard
    and ``True`` returned. ``False`` (nothing changed) when the statement is anything
    else, or carries the execution option ``slow_option``. Reads what those two do."""
    statement = orm_context.statement
    if statement._with_options or not statement.is_select:
        return False
    execution_options = orm_context.execution_options
    load_options = execution_options.get("_sa_orm_load_options")
    if load_options is None:
        return False
    token = load_options._identity_token
    if token is None or token not in shards or slow_option in execution_options:
        return False
    if len(shards) != 1:  # (one shard: get_bind() answers it, as route_in_place says)
        orm_context.bind_arguments["shard_id"] = token
    return True


def route_in_place(orm_context: ORMExecuteState, shard_id: Any, *, name_shard: bool = True) -> None:
    """Pin the statement a ``do_orm_execute`` handler is looking at to ``shard_id`` and
    let SQLAlchemy execute it when the handler returns ``None``.

    ``Session._execute_internal`` hands the very ``bind_arguments`` dict it later passes
    to ``get_bind(**bind_arguments)`` to the ``ORMExecuteState``, and merges
    ``update_execution_options()`` into the options it executes with (checked on 2.0.30
    and 2.1.9). The effect equals ``invoke_statement(bind_arguments={..., "shard_id":
    shard_id})`` with the ``identity_token`` option, without a nested execution.

    Without ``name_shard`` (a session with one shard) ``bind_arguments`` are left as
    they are: ``get_bind(**bind_arguments)`` is then called as by a plain Session, and
    answers the one shard.
    """
    if name_shard:
        orm_context.bind_arguments["shard_id"] = shard_id
    if orm_context.statement.is_select:  # (what the is_select and load_options
        # properties read, without their two calls)
        load_options = orm_context.execution_options.get("_sa_orm_load_options")
        if load_options is not None and load_options._identity_token == shard_id:
            return  # a load of this shard's identity already: nothing to add
    orm_context.update_execution_options(identity_token=shard_id)
    if orm_context.statement.is_dml:  # objects of RETURNING(Entity) keyed by shard too
        extra = returning_identity_options(orm_context, shard_id)
        if extra:
            orm_context.update_execution_options(**extra)


# --- commit protocol hook (used by shardsession.coordinator) -------------------------------

# Attributes of ours on SQLAlchemy objects are set and read as attributes, never through
# ``obj.__dict__`` and never by assigning ``__class__``: on CPython 3.11+ either turns the
# object's inline attribute values into a dict for good, and every later attribute read of
# SQLAlchemy's on that object is then several times slower. It matters most for a
# session's root transaction (SQLAlchemy's event dispatcher gives the Session, Connection
# and Engine a dict of their own anyway).
_SLOT = "_shardsession_gt"


#: called with no arguments when a coordinated root transaction that used one connection
#: commits without the protocol (SQLAlchemy's own commit is all it needs); set while
#: someone observes commits (:func:`shardsession.coordinator.trace.add_observer`)
one_shard_commit_hook: Callable[[], None] | None = None


class _CoordinatedTransaction(SessionTransaction):
    """A root ``SessionTransaction`` whose prepare step also runs the commit protocol.

    A :class:`CoordinatedRoots` session creates its root transactions as this class;
    :func:`coordinate` turns another session's root into one by assigning its
    ``__class__`` (a subclass without slots of its own has the same layout, checked on
    2.0.30 and 2.1.9). Overriding at class level costs a transaction nothing; wrapping the
    instance's methods cost two closures and a reference cycle per transaction, and most
    transactions touch one shard and need no protocol at all.

    ``_prepare_impl`` (private) runs ``before_commit``, the release of subtransactions and
    the final flush; the protocol runs right after it, so ``Session.commit()``,
    ``with session.begin():`` and ``prepare()`` all run it after the last write and before
    SQLAlchemy commits each connection. The object in the transaction's slot (see
    :func:`set_transaction_slot`) decides: its ``protocol(transaction)`` runs the commit,
    and its ``close()`` runs when the transaction has ended (``close`` is overridden too).

    If the protocol raises, the session transaction is rolled back and the error
    re-raised, exactly as SQLAlchemy's twophase failure path does inside
    ``_prepare_impl``: the rollback runs under ``_expect_state(CLOSED)`` with
    ``_next_state`` (private state-machine helpers).

    If it *returns* an exception, the data is committed but the caller must still hear
    about it: SQLAlchemy finishes its commit (bookkeeping, ``after_commit``, expiry,
    close) and the exception is raised from ``commit()`` afterwards (``Session.commit()``,
    ``SessionTransaction.__exit__`` and a nested transaction's commit to the root all go
    through the root's ``commit``).
    """

    #: the slot's owner (see set_transaction_slot) and an exception to raise after commit
    _shardsession_gt: Any = None
    _shardsession_late: BaseException | None = None

    def _prepare_impl(self) -> None:
        super()._prepare_impl()
        owner = self._shardsession_gt
        if owner is None:
            hook = one_shard_commit_hook
            if hook is not None and self._connections:
                hook()
            return
        try:
            late = owner.protocol(self)
        except BaseException:
            with safe_reraise():
                saved = self._next_state
                self._next_state = _StateChangeStates.CHANGE_IN_PROGRESS
                try:
                    with self._expect_state(SessionTransactionState.CLOSED):
                        self.rollback()
                finally:
                    self._next_state = saved
        if late is not None:
            self._shardsession_late = late

    def commit(self, _to_root: bool = False) -> None:
        owner = self._shardsession_gt
        try:
            super().commit(_to_root=_to_root)
        except Exception as e:
            # (after the protocol: the slot's owner says what a failure now means)
            told = owner.late_failure(e) if owner is not None else None
            if told is None:
                raise
            late, self._shardsession_late = self._shardsession_late, None
            raise (late or told) from e
        late = self._shardsession_late
        if late is not None:
            self._shardsession_late = None
            raise late

    def close(self, invalidate: bool = False) -> None:
        # SQLAlchemy ends every root transaction here (commit, rollback, Session.close),
        # after its connections went back and ``after_transaction_end`` ran: the slot's
        # owner forgets its branches now (the hook costs no event per transaction).
        try:
            super().close(invalidate)
        finally:
            owner = self._shardsession_gt
            if owner is not None:
                self._shardsession_gt = None
                owner.close()


class CoordinatedRoots(Session):
    """A Session class whose root transactions are born coordinated (see
    :class:`_CoordinatedTransaction`), without an ``after_transaction_create`` listener
    and without the ``__class__`` assignment of :func:`coordinate`.

    Overrides ``Session._autobegin_t`` (private), where SQLAlchemy creates every root
    ``SessionTransaction`` (``begin()`` and autobegin both go through it); the body is
    SQLAlchemy's own with the class replaced, identical on 2.0.30 and 2.1.9.
    """

    def _autobegin_t(self, begin: bool = False) -> SessionTransaction:
        trans = self._transaction
        if trans is not None:
            return trans
        if not begin and not self.autobegin:
            return super()._autobegin_t(begin)  # SQLAlchemy's error
        self._shardsession_root_begins()
        trans = _CoordinatedTransaction(
            self, SessionTransactionOrigin.BEGIN if begin else SessionTransactionOrigin.AUTOBEGIN
        )
        assert self._transaction is trans
        return trans

    def _shardsession_root_begins(self) -> None:
        """Called before each root transaction is created (a subclass's hook)."""


class ForwardedIdentityLookup(Session):
    """A sharded Session class whose identity-map lookups keep their ``passive`` flags.

    Overrides ``Session._identity_lookup`` (private; the lookup of ``get()``, of a
    many-to-one lazy load and of the unit of work's history checks) as
    ``sqlalchemy.ext.horizontal_shard.ShardedSession`` does, asking the identity chooser
    for the shards and looking in each one's part of the identity map, but passes every
    argument on: SQLAlchemy's override (2.1.9) drops ``passive``, so a lookup that must
    not emit SQL (``PASSIVE_NO_FETCH``: a flush checking the old parent of an expired
    object) loads the expired object with a SELECT a plain Session does not send.
    """

    identity_chooser: IdentityChooser  # (SQLAlchemy's type: it shows through ShardedSession)

    def _identity_lookup(  # type: ignore[override, unused-ignore]
        self,
        mapper: Mapper[Any],
        primary_key_identity: Any,
        identity_token: Any = None,
        passive: Any = PassiveFlag.PASSIVE_OFF,
        lazy_loaded_from: Any = None,
        execution_options: Any = EMPTY_DICT,
        bind_arguments: Any = None,
        **kw: Any,
    ) -> Any:
        lookup = Session._identity_lookup
        if identity_token is not None:
            return lookup(self, mapper, primary_key_identity, identity_token, passive,
                          lazy_loaded_from, execution_options, bind_arguments)
        for shard_id in self.identity_chooser(
            mapper,
            primary_key_identity,
            lazy_loaded_from=lazy_loaded_from,
            execution_options=execution_options,
            bind_arguments=dict(bind_arguments) if bind_arguments else {},
        ):
            found = lookup(self, mapper, primary_key_identity, shard_id, passive,
                           lazy_loaded_from, execution_options, bind_arguments)
            if found is not None:  # (the object, or "present but not loadable now")
                return found
        return None


class TransientMerge(Session):
    """A sharded Session class whose ``merge()`` of a transient object looks it up by its
    current key only.

    Overrides ``Session._merge`` (private; ``merge()`` and its cascades call it for every
    object, on 2.0.30 and 2.1.9), which builds the identity key of a transient object from
    ``InstanceState.identity_token``. ``make_transient()`` keeps that token: the shard of
    the key the object had before. A copy given a new key would be looked up on that shard
    and, not found there, inserted as a second row. The token of a transient state (no
    key, in no session) is forgotten first, as adding the object forgets it, so the
    identity chooser (or the placement) finds the shard of the current key.
    """

    def _merge(self, state: InstanceState[Any], *args: Any, **kw: Any) -> Any:
        if state.key is None and state.session_id is None and state.identity_token is not None:
            state.identity_token = None
        return super()._merge(state, *args, **kw)


def coordinate(transaction: Any) -> None:
    """Make a root ``SessionTransaction`` run the protocol of the object later put in its
    slot (see :class:`_CoordinatedTransaction`); a no-op for a subtransaction (private
    ``SessionTransaction._parent``), for one already coordinated and for a subclass of
    SQLAlchemy's own."""
    if type(transaction) is SessionTransaction and transaction._parent is None:
        transaction.__class__ = _CoordinatedTransaction


def root_transaction(transaction: Any) -> Any:
    """The root of a ``SessionTransaction`` (what ``parent`` leads to, read from the
    private ``_parent`` without a property call per level)."""
    while transaction._parent is not None:
        transaction = transaction._parent
    return transaction


def connection_owner(session: Session) -> SessionTransaction | None:
    """The transaction a session's connections are asked of: the innermost SAVEPOINT
    (``begin_nested()``) transaction, else the root; ``None`` outside a transaction.

    What ``Session.get_nested_transaction() or Session.get_transaction()`` answer, in one
    walk up the private ``Session._transaction`` / ``SessionTransaction._parent`` chain
    (a flush asks once per object). Subtransactions (a flush's own) are skipped: they
    hand out their parent's connections.
    """
    trans = session._transaction
    while trans is not None:
        parent = trans._parent
        if parent is None or trans.nested:
            return trans
        trans = parent
    return None


def savepoint_name(connection: Any, name: str | None) -> str:
    """The name of the SAVEPOINT a ``savepoint`` connection event announces.

    SQLAlchemy dispatches the event before it makes up the name of a savepoint begun
    without one (every ``begin_nested()``): ``name`` is then ``None`` and the name will
    be ``"sa_savepoint_%d"`` of the Connection's next sequence number (the private,
    name-mangled ``Connection.__savepoint_seq``; ``Connection._savepoint_impl``, the
    same on 2.0.30 and 2.1.9). The later ``rollback_savepoint`` / ``release_savepoint``
    events carry that name.
    """
    if name is not None:
        return name
    return f"sa_savepoint_{connection._Connection__savepoint_seq + 1}"


#: the ``isolation_level`` values of a pysqlite / aiosqlite connection in its default
#: (legacy) mode, the driver's transaction then begun with ``BEGIN <level>``
_SQLITE_BEGIN_LEVELS = frozenset({"", "DEFERRED", "IMMEDIATE", "EXCLUSIVE"})
SAVEPOINT_READY, SAVEPOINT_AFTER_BEGIN, SAVEPOINT_UNSAFE = "ready", "after-begin", "unsafe"


def savepoint_readiness(connection: Any) -> str:
    """Whether a SAVEPOINT on ``connection`` nests in the transaction it is in.

    ``SAVEPOINT_READY``: it does (every dialect but SQLite, unless its isolation level
    is ``AUTOCOMMIT``: then ``SAVEPOINT_UNSAFE``; SQLite when the driver says a
    transaction is open: ``sqlite3.Connection.in_transaction``, after the pysqlite
    savepoint recipe's ``BEGIN`` or an earlier write). ``SAVEPOINT_AFTER_BEGIN``: pysqlite
    or aiosqlite in their default mode, with no transaction begun yet: the driver begins
    one only before a write, so a SAVEPOINT sent first would open a transaction of its
    own, which RELEASE commits; :func:`begin_driver_transaction` begins the driver's
    transaction first, as the write itself would. ``SAVEPOINT_UNSAFE``: the driver is in
    autocommit mode (``isolation_level=None``, ``autocommit=True``: no transaction to
    nest in) or cannot say whether a transaction is open. (aiosqlite: read through the
    private ``AsyncAdapt_aiosqlite_connection._connection``, checked on 2.1.9.)"""
    if connection.dialect.name != "sqlite":
        level = connection.get_execution_options().get("isolation_level") or getattr(
            connection.dialect, "isolation_level", None)
        if str(level).upper() == "AUTOCOMMIT":
            return SAVEPOINT_UNSAFE
        return SAVEPOINT_READY
    dbapi = connection.connection.dbapi_connection
    raw = getattr(dbapi, "_connection", dbapi)  # (aiosqlite: its aiosqlite.Connection)
    open_ = getattr(raw, "in_transaction", None)
    if open_ is True:
        return SAVEPOINT_READY
    if open_ is not False or getattr(raw, "autocommit", None) is True:
        return SAVEPOINT_UNSAFE
    level = getattr(dbapi, "isolation_level", None)
    if not isinstance(level, str) or level.upper() not in _SQLITE_BEGIN_LEVELS:
        return SAVEPOINT_UNSAFE
    return SAVEPOINT_AFTER_BEGIN


def begin_driver_transaction(connection: Any) -> None:
    """Begin the deferred transaction of a pysqlite / aiosqlite ``connection``
    (``savepoint_readiness`` answered ``SAVEPOINT_AFTER_BEGIN``) with the ``BEGIN``
    the driver itself sends before a write; the driver's ``commit()`` / ``rollback()``,
    and so the session's, end it."""
    level = str(connection.connection.dbapi_connection.isolation_level).upper()
    connection.exec_driver_sql(f"BEGIN {level}".rstrip())


#: how a root ``SessionTransaction`` holds a connection's transaction (see join_kind)
OWN, ADOPTED, OUTSIDE = 0, 1, 2


def join_kind(transaction: Any, connection: Any) -> int:
    """How the root ``transaction`` holds the transaction of ``connection``, which it
    just began or joined (read in ``after_begin``):

    * ``OWN``: it began it (an Engine's connection, or a Connection with no transaction
      of its own); its commit is the session's;
    * ``ADOPTED``: a Connection given as a bind whose transaction the session may have
      found already begun and commits anyway (``join_transaction_mode="control_fully"``);
      its earlier statements were not seen, and it may not be the first of its
      transaction (too late for an XA START);
    * ``OUTSIDE``: an external transaction the session only joined, through a SAVEPOINT
      (``"create_savepoint"``, or ``"conditional_savepoint"`` on a Connection inside a
      savepoint) or without committing it (``"rollback_only"``, ``"conditional_savepoint"``):
      its commit is not the session's.

    Reads the entry ``SessionTransaction._connections[connection]`` (private:
    ``(connection, transaction, should_commit, autoclose)``, written just before
    ``after_begin`` is dispatched; ``autoclose`` is false exactly when the bind was a
    Connection; the same on 2.0.30 and 2.1.9).
    """
    entry = transaction._connections.get(connection)
    if entry is None or entry[3]:
        return OWN  # an Engine's connection: the root began its transaction
    _conn, trans, should_commit, _autoclose = entry
    if not should_commit or isinstance(trans, NestedTransaction):
        return OUTSIDE
    if transaction.session.join_transaction_mode == "control_fully":
        return ADOPTED
    return OWN


def is_coordinated(transaction: Any) -> bool:
    return type(transaction) is _CoordinatedTransaction


def transaction_slot(transaction: Any) -> Any:
    """What :func:`set_transaction_slot` put on a ``SessionTransaction`` (or ``None``).

    An attribute of ours on the instance (SQLAlchemy's own names are untouched): cheaper
    than a ``WeakKeyDictionary`` lookup, and it goes away with the transaction object.
    """
    return getattr(transaction, _SLOT, None)


def set_transaction_slot(transaction: Any, value: Any) -> None:
    setattr(transaction, _SLOT, value)


def skip_connection_commit(transaction: Any, connection: Any) -> None:
    """Tell a root ``SessionTransaction`` not to commit ``connection`` itself.

    Used for a branch the commit protocol left prepared for recovery (its connection is
    invalidated or holds a prepared XA branch, so SQLAlchemy's own COMMIT would fail
    while the data is already committed). Rewrites the ``should_commit`` flag of the
    entry in ``SessionTransaction._connections`` (private: ``{bind: (connection,
    transaction, should_commit, autoclose)}``); the connection is still closed (and its
    SQLAlchemy transaction ended without touching the DBAPI connection) at close time.
    """
    entries = transaction._connections
    for key, (conn, trans, _should_commit, autoclose) in list(entries.items()):
        if conn is connection:
            entries[key] = (conn, trans, False, autoclose)


# ---------------------------------------------------------------------------
# Cross-shard query engine (shardsession.query)
# ---------------------------------------------------------------------------
# Imports of this section live here so the section can be read (and merged) on its own.
from collections.abc import Mapping, Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402

from sqlalchemy.engine import CursorResult, IteratorResult, Result  # noqa: E402
from sqlalchemy.sql import elements  # noqa: E402
from sqlalchemy.sql.elements import ClauseElement, ColumnElement  # noqa: E402
from sqlalchemy.sql.selectable import Select  # noqa: E402
from sqlalchemy.types import NullType, String  # noqa: E402


@dataclass(frozen=True)
class SelectParts:
    """The clauses of a :class:`~sqlalchemy.sql.expression.Select`, read in one place.

    SQLAlchemy has generative setters for these but no public getters; each field names
    the private attribute it is read from.
    """

    raw_columns: tuple[Any, ...]  # Select._raw_columns (entities count as one column)
    where: tuple[ColumnElement[Any], ...]  # Select._where_criteria
    group_by: tuple[ColumnElement[Any], ...]  # Select._group_by_clauses
    having: tuple[ColumnElement[Any], ...]  # Select._having_criteria
    order_by: tuple[ColumnElement[Any], ...]  # Select._order_by_clauses
    limit_clause: Any  # Select._limit_clause
    offset_clause: Any  # Select._offset_clause
    fetch_clause: Any  # Select._fetch_clause
    distinct: bool  # Select._distinct
    distinct_on: tuple[Any, ...]  # Select._distinct_on
    for_update: Any  # Select._for_update_arg
    ctes: tuple[Any, ...]  # Select._independent_ctes (add_cte())
    setup_joins: tuple[Any, ...]  # Select._setup_joins (ORM .join() targets)
    from_obj: tuple[Any, ...]  # Select._from_obj (select_from())


def select_parts(stmt: Select[Any]) -> SelectParts:
    """Return the clauses of ``stmt`` (private ``Select._*`` attributes, see fields)."""
    return SelectParts(
        raw_columns=tuple(stmt._raw_columns),
        where=tuple(stmt._where_criteria),
        group_by=tuple(stmt._group_by_clauses),
        having=tuple(stmt._having_criteria),
        order_by=tuple(stmt._order_by_clauses),
        limit_clause=stmt._limit_clause,
        offset_clause=stmt._offset_clause,
        fetch_clause=stmt._fetch_clause,
        distinct=bool(stmt._distinct),
        distinct_on=tuple(stmt._distinct_on),
        for_update=stmt._for_update_arg,
        ctes=tuple(getattr(stmt, "_independent_ctes", ())),
        setup_joins=tuple(stmt._setup_joins),
        from_obj=tuple(stmt._from_obj),
    )


def dml_table(stmt: Any) -> Any:
    """The table an UPDATE or DELETE writes, as a plain ``Table``: an ORM-enabled one
    (``update(User)``) carries an annotated copy (``_deannotate()``, private, gives the
    original), and the checks compare tables by identity."""
    return deannotated(stmt.table)


def deannotated(element: Any) -> Any:
    """``element`` without the ORM's annotations (private ``_deannotate()``): the ORM
    refers to one table through several annotated copies (an entity's, each attribute's
    column's), which compare by identity as different objects."""
    deannotate = getattr(element, "_deannotate", None)
    return deannotate() if deannotate is not None else element


def has_returning(stmt: Any) -> bool:
    """Whether an INSERT/UPDATE/DELETE has a RETURNING clause (private ``_returning``)."""
    return bool(getattr(stmt, "_returning", ()))


def upsert_set_pairs(stmt: Any) -> list[tuple[Any, Any]]:
    """What an upsert's conflict clause sets, as (key, value) pairs (PostgreSQL and
    SQLite ``on_conflict_do_update``: ``_post_values_clause.update_values_to_set``;
    MySQL ``on_duplicate_key_update``: ``.update``); empty for any other INSERT."""
    clause = getattr(stmt, "_post_values_clause", None)
    if clause is None:
        return []
    values = getattr(clause, "update_values_to_set", None)
    if values is None:
        values = getattr(clause, "update", None)
    if isinstance(values, Mapping):
        return list(values.items())
    return list(values or ())


def update_set_pairs(stmt: Any) -> list[tuple[Any, Any]]:
    """What an UPDATE sets, as (key, value) pairs: the key a column name, attribute name
    or column, the value a bound parameter or SQL expression (``_values`` and, on
    2.0.x, ``_ordered_values``)."""
    pairs: list[tuple[Any, Any]] = list((getattr(stmt, "_values", None) or {}).items())
    pairs.extend(getattr(stmt, "_ordered_values", None) or ())
    return pairs


def dml_expressions(stmt: Any) -> list[Any]:
    """The expressions of an UPDATE or DELETE that may hold subqueries: its WHERE terms
    (``_where_criteria``) and the values it sets (``_values``, a dict; on 2.0.x also
    ``_ordered_values``, pairs), SQL expressions only."""
    found: list[Any] = list(getattr(stmt, "_where_criteria", ()))
    values = getattr(stmt, "_values", None)
    if values:
        found.extend(values.values())
    ordered = getattr(stmt, "_ordered_values", None)
    if ordered:
        found.extend(value for _, value in ordered)
    return [e for e in found if isinstance(e, ClauseElement)]


def with_having(stmt: Select[Any], criteria: Sequence[ColumnElement[Any]]) -> Select[Any]:
    """Return a copy of ``stmt`` whose HAVING is ``criteria`` (``Select._having_criteria``).

    ``Select.having()`` can only add criteria; the fan-out must remove HAVING from the
    per-shard statement because groups are only complete after the merge.
    """
    new = stmt._generate()
    new._having_criteria = tuple(criteria)
    return new


def plain_fetch_value(stmt: Select[Any]) -> int | None:
    """FETCH FIRST n ROWS ONLY as the int ``n`` (``Select._fetch_clause``,
    ``_fetch_clause_options``, ``_offset_or_limit_clause_asint``); ``None`` when there is
    no FETCH, or it is WITH TIES or PERCENT (not the same as a LIMIT).

    :raises sqlalchemy.exc.CompileError: when ``n`` is an expression.
    """
    if stmt._fetch_clause is None:
        return None
    options = stmt._fetch_clause_options or {}
    if options.get("percent") or options.get("with_ties"):
        return None
    return stmt._offset_or_limit_clause_asint(  # type: ignore[no-any-return, unused-ignore]
        stmt._fetch_clause, "fetch"
    )


def limit_offset_values(stmt: Select[Any]) -> tuple[int | None, int | None]:
    """Return LIMIT and OFFSET as ints (``Select._limit`` / ``Select._offset``).

    :raises sqlalchemy.exc.CompileError: when either is an expression, not an integer.
    """
    return stmt._limit, stmt._offset


def compound_orders_or_limits(stmt: Any) -> bool:
    """Whether a UNION (``CompoundSelect``) has an ORDER BY, LIMIT, OFFSET or FETCH of its
    own (``GenerativeSelect._order_by_clauses`` / ``_limit_clause`` / ``_offset_clause`` /
    ``_fetch_clause``, private)."""
    return bool(
        getattr(stmt, "_order_by_clauses", ())
        or getattr(stmt, "_limit_clause", None) is not None
        or getattr(stmt, "_offset_clause", None) is not None
        or getattr(stmt, "_fetch_clause", None) is not None
    )


def label_reference_target(expr: ClauseElement) -> ColumnElement[Any] | str | None:
    """Unwrap the ORDER BY wrappers SQLAlchemy makes for labels.

    ``order_by(some_label)`` wraps the label in ``elements._label_reference`` and
    ``order_by("name")`` in ``elements._textual_label_reference``; both are private
    classes.  Returns the label (or the label's name) or ``None`` for anything else.
    """
    if isinstance(expr, elements._label_reference):
        return expr.element  # type: ignore[no-any-return, unused-ignore]
    if isinstance(expr, elements._textual_label_reference):
        return str(expr.element)
    return None


def requires_unique(result: Result[Any]) -> bool:
    """Whether an ORM result insists on ``.unique()`` (``Result._unique_filter_state``).

    The ORM sets it for joined eager loading of collections.
    """
    return result._unique_filter_state is not None


def result_yield_per(result: Result[Any]) -> int | None:
    """The batch size a result was set up with (``Result._yield_per``)."""
    return result._yield_per  # type: ignore[no-any-return, unused-ignore]


def build_result(
    template: Result[Any],
    rows: Iterable[Sequence[Any]],
    *,
    visible: int,
    attributes: Mapping[str, Any] | None = None,
    unique_state_from: Result[Any] | None = None,
) -> Result[Any]:
    """Build a :class:`Result` that looks like ``template`` but yields ``rows``.

    ``rows`` hold *processed* values (what iterating a per-shard result gives), with the
    first ``visible`` columns being those of the user's statement and any further
    columns helpers added for the merge (sort keys), which are not shown.

    Private names used: ``Result._metadata``, ``ResultMetaData._for_freeze()`` (metadata
    without type processors: values are already processed, possibly by another shard's
    dialect), ``ResultMetaData._reduce()``, ``Result._attributes``,
    ``Result._unique_filter_state``, ``Result._yield_per``,
    ``SimpleResultMetaData._create_unique_filters`` (see :func:`_holding_objects`).
    """
    metadata = _frozen_metadata(template._metadata)
    # Not ``len(template.keys())``: keys() leaves out unnamed columns (``None``).
    if visible != len(metadata._keys):
        metadata = _reduced_metadata(metadata, visible)
    create = getattr(metadata, "_create_unique_filters", None)
    if create is not None:
        metadata._create_unique_filters = _holding_objects(create)
    result: IteratorResult[Any] = IteratorResult(metadata, iter(rows))
    merged_attrs = dict(template._attributes)
    if attributes:
        merged_attrs.update(attributes)
    result._attributes = template._attributes.union(merged_attrs)
    source = unique_state_from if unique_state_from is not None else template
    result._unique_filter_state = source._unique_filter_state
    if template._yield_per:
        result._yield_per = template._yield_per
    return result


class _Held:
    """A uniquing key for an ORM object: its identity, holding the object alive."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __hash__(self) -> int:
        return id(self.obj)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Held) and other.obj is self.obj


def _holding_objects(create: Any) -> Any:
    """The ORM's unique filters with ``id`` (what ``.unique()`` keys an ORM object by)
    replaced by a key that keeps the object alive.

    The ORM builds every object of a result before ``.unique()`` sees any, so no object
    is freed while its ``id()`` is remembered.  A merged result yields one shard's
    objects after another's: once the caller dropped an earlier object, a later object
    could get its ``id()`` and be dropped as a duplicate (``scalars(select(Item).join(
    Item.children)).unique()`` lost objects at random).  Memory: the objects seen, as
    in one database's result."""

    def create_holding(result: Any) -> Any:
        return [_Held if f is id else f for f in create(result)]

    return create_holding


def _frozen_metadata(metadata: Any) -> Any:
    """``metadata._for_freeze()``, keeping each column's own extra keys.

    SQLAlchemy's ``SimpleResultMetaData._for_freeze()`` (the ORM's result metadata)
    reads each column's record by its name; a legacy ``Query`` of several unnamed
    columns (``query(func.count(x), func.sum(y))``) has the name ``None`` for all of
    them, so every column got the last one's record, and a tuple filter then read the
    last column's value for each.  The records are taken by position here instead.
    Private names used: ``SimpleResultMetaData._keys``, ``._keymap``,
    ``._tuplefilter``, ``._translated_indexes``, ``._ambiguous_keys``,
    ``._create_unique_filters``.
    """
    from sqlalchemy.engine.result import SimpleResultMetaData

    frozen = metadata._for_freeze()
    if (
        not isinstance(metadata, SimpleResultMetaData)
        or metadata._tuplefilter is not None
        or metadata._translated_indexes is not None
    ):
        return frozen
    keys = list(metadata._keys)
    if len(set(keys)) == len(keys):
        return frozen
    extras: dict[int, Any] = {}
    for record in metadata._keymap.values():
        if record[0] is not None:
            extras.setdefault(record[0], record[2])
    return SimpleResultMetaData(
        keys,
        extra=[extras.get(i) or () for i in range(len(keys))],
        **_uniqueness(frozen, metadata),
    )


def _uniqueness(filters_of: Any, ambiguity_of: Any) -> dict[str, Any]:
    """The private ``SimpleResultMetaData`` arguments that carry ``unique()``'s filters:
    ``_create_unique_filters`` and ``_ambiguous_keys`` on 2.1, ``_unique_filters`` on
    2.0 (checked on 2.0.30 and 2.1.9)."""
    if hasattr(filters_of, "_create_unique_filters"):
        return {"_create_unique_filters": filters_of._create_unique_filters,
                "_ambiguous_keys": ambiguity_of._ambiguous_keys}
    return {"_unique_filters": filters_of._unique_filters}


def _reduced_metadata(metadata: Any, visible: int) -> Any:
    """``metadata`` for its first ``visible`` columns.

    ``ResultMetaData._reduce()`` looks columns up by name, so several unnamed columns
    (the name ``None``, a legacy ``Query`` of expressions) would all become the last of
    them; for ``SimpleResultMetaData`` without unnamed duplicates it is right, and the
    others are rebuilt by position (private ``._keys``, ``._keymap``,
    ``._create_unique_filters``, ``._ambiguous_keys``, ``engine.result.tuplegetter``)."""
    from sqlalchemy.engine.result import SimpleResultMetaData, tuplegetter

    keys = list(metadata._keys)
    if not isinstance(metadata, SimpleResultMetaData) or None not in keys[:visible]:
        return metadata._reduce(list(range(visible)))
    extras: dict[int, Any] = {}
    for record in metadata._keymap.values():
        if record[0] is not None:
            extras.setdefault(record[0], record[2])
    return SimpleResultMetaData(
        keys[:visible],
        extra=[extras.get(i) or () for i in range(visible)],
        _tuplefilter=tuplegetter(*range(visible)),
        **_uniqueness(metadata, metadata),
    )


def same_expression(a: ClauseElement, b: ClauseElement) -> bool:
    """``a.compare(b)``, also for ORM expressions annotated with different entities.

    SQLAlchemy's ``compare()`` compares the ORM plugin subjects of two expressions
    (``_propagate_attrs``) with the same traversal, which fails on two different
    ``Mapper`` objects (``AttributeError: 'Mapper' object has no attribute
    '__visit_name__'``, e.g. ``avg(Tag.x)`` against ``avg(Item.y)`` in a join).  Their
    subjects differ, so they are taken as different: the planner then adds one more
    hidden column, never a wrong one.
    """
    try:
        return bool(a.compare(b))
    except AttributeError:
        return False


def string_may_fold(type_: Any, dialects: Sequence[str]) -> bool:
    """Whether values of SQL type ``type_`` may compare equal in the database while
    different in Python: a string type with a collation of its own, per-dialect variants
    (``with_variant()``, private ``TypeEngine._variant_mapping``, where collations are
    usually set), or on MySQL/MariaDB, whose default collations fold case, accents and
    trailing spaces.

    An expression SQLAlchemy does not type (``NullType``: ``func.trim(col)``, any
    function it does not know) may be a string under the collation of its argument on
    PostgreSQL and MySQL/MariaDB, so it may fold there; SQLite gives a function's result
    no collation (BINARY)."""
    if isinstance(type_, NullType):
        return any(d != "sqlite" for d in dialects)
    if not isinstance(type_, String):
        return False
    return (
        type_.collation is not None
        or bool(getattr(type_, "_variant_mapping", None))
        or any(d in ("mysql", "mariadb") for d in dialects)
    )


def one_row_result(keys: Sequence[str], row: Sequence[Any]) -> Result[Any]:
    """A :class:`Result` of one row of processed values under ``keys``
    (``sqlalchemy.engine.result.SimpleResultMetaData``, not documented)."""
    from sqlalchemy.engine.result import SimpleResultMetaData

    return IteratorResult(SimpleResultMetaData(list(keys)), iter([tuple(row)]))


def is_cursor_result(result: Result[Any]) -> bool:
    """Whether ``result`` comes straight from a DBAPI cursor (Core statement)."""
    return isinstance(result, CursorResult)


def class_orm_execute_listener_list(session_class: type[Session]) -> Sized:
    """The ``do_orm_execute`` listeners a session class (with those of its bases, and a
    sessionmaker's class) carries, as a live collection: its ``len()`` is always current.

    It is the class-level registry ``_ClsLevelDispatch._clslevel[cls]`` (private; checked
    on 2.0.30 and 2.1.9), where SQLAlchemy keeps each class's listeners including those
    propagated from its bases, and adds and removes them in place; a class not registered
    yet is registered the way SQLAlchemy does it on its first instance
    (``update_subclass``). Asking an instance's ``dispatch.do_orm_execute`` instead would
    build that instance's listener collection at session creation.
    """
    fns = _class_listeners.get(session_class)
    if fns is None:
        fns = _class_listeners[session_class] = class_listener_list(
            session_class, "do_orm_execute"
        )
    return fns


def class_listener_list(session_class: type[Session], event_name: str) -> Collection[Any]:
    """The class-level listeners of ``event_name`` a session class carries (with those
    of its bases), as a live collection: see :func:`class_orm_execute_listener_list`.

    SQLAlchemy clears these collections in place (``SessionEvents._clear()``, what its
    test fixtures run after every test, empties every one of them) and never replaces
    them, so a reference kept tells later whether a listener is still registered.
    """
    dispatch: Any = getattr(session_class.dispatch, event_name)
    fns = dispatch._clslevel.get(session_class)
    if fns is None:
        dispatch.update_subclass(session_class)
        fns = dispatch._clslevel[session_class]
    return fns  # type: ignore[no-any-return]


_class_listeners: weakref.WeakKeyDictionary[type, Any] = weakref.WeakKeyDictionary()


def remaining_orm_execute_handlers(orm_context: ORMExecuteState) -> int:
    """How many ``do_orm_execute`` handlers run after the current one
    (``ORMExecuteState._remaining_events()``).

    ``invoke_statement()`` runs them for each call, so the fan-out must know whether
    calling it from a worker thread would run user code there.
    """
    return len(orm_context._remaining_events())


def orm_autoflush_requested(orm_context: ORMExecuteState) -> bool:
    """Whether executing ``orm_context`` would autoflush (``load_options._autoflush`` or
    ``update_delete_options._autoflush``; Core statements always autoflush, #9809)."""
    if not orm_context.is_orm_statement:
        return True
    if orm_context.is_select:
        return bool(orm_context.load_options._autoflush)
    if orm_context.is_update or orm_context.is_delete:
        options = update_delete_options_of(orm_context)
        return options is None or bool(options._autoflush)
    return True


def wants_tuples(orm_context: ORMExecuteState) -> bool:
    """Whether a legacy ``Query`` asked for tuples even for one entity
    (``load_options._only_return_tuples``)."""
    if not (orm_context.is_orm_statement and orm_context.is_select):
        return False
    return bool(orm_context.load_options._only_return_tuples)


def session_autoflush(session: Session) -> None:
    """Run the Session's query-invoked autoflush (``Session._autoflush()``), which wraps
    flush errors the way a query-triggered flush reports them."""
    session._autoflush()


def auto_correlates(sel: Select[Any]) -> bool:
    """Whether ``sel`` correlates to an enclosing statement at all (``Select._auto_correlate``,
    ``Select._correlate``, ``Select._correlate_except``); ``correlate(None)`` turns it off."""
    return bool(sel._auto_correlate or sel._correlate or sel._correlate_except)


def query_lazyload_from(query: Any, state: InstanceState[Any]) -> Any:
    """``Query._set_lazyload_from`` (private), as SQLAlchemy's legacy ``id_chooser`` shim uses."""
    return query._set_lazyload_from(state)


def final_froms_without_eager_joins(sel: Select[Any]) -> Sequence[Any]:
    """``sel.get_final_froms()`` with the ORM's eager joins left out.

    For an ORM statement the FROM list is computed by the ORM compile step, which adds
    the joins and LIMIT-wrapping subqueries of ``joinedload()``; those belong to the
    statement's own semantics, not to what the user wrote.  The copy drops the loader
    options (private ``Executable._with_options``); they do not change the FROM list
    otherwise.
    """
    if sel._with_options:
        sel = sel._generate()
        sel._with_options = ()
    return sel.get_final_froms()


def statement_cache_key(stmt: ClauseElement) -> tuple[Any, ...] | None:
    """The structural cache key of ``stmt`` (``ClauseElement._generate_cache_key().key``),
    or ``None`` when SQLAlchemy cannot cache it.

    It is the key of SQLAlchemy's own compiled cache: equal for statements that differ
    only in the values of bound parameters, with tables, columns and mappers compared
    by identity (``Table._gen_cache_key`` is ``(self,)``).  Anything derived from it must
    therefore not depend on bound values (LIMIT numbers, literals).
    """
    key = stmt._generate_cache_key()
    return None if key is None else key.key


def dbapi_socket_fileno(dbapi_connection: Any) -> int | None:
    """The file descriptor of a DBAPI connection's network socket, or ``None``.

    psycopg2 and psycopg 3 have a public ``fileno()``; PyMySQL keeps its socket in the
    private ``Connection._sock``.  SQLite (no socket) and unknown drivers give ``None``.
    """
    fileno = getattr(dbapi_connection, "fileno", None)
    if callable(fileno):
        return int(fileno())
    sock = getattr(dbapi_connection, "_sock", None)
    if sock is not None:
        return int(sock.fileno())
    return None


# --- late materialization of ORM rows (shardsession.query._merge) -------------------------
from sqlalchemy.engine import ChunkedIteratorResult  # noqa: E402
from sqlalchemy.engine.cursor import (  # noqa: E402
    CursorFetchStrategy,
    FullyBufferedCursorFetchStrategy,
)


@dataclass(frozen=True)
class UnloadedRows:
    """The cursor under an ORM result whose rows the ORM has not turned into objects yet.

    ``positions`` are the positions of the requested keys in the cursor's rows;
    ``process`` makes processed rows of raw ones (see :func:`_processed_rows_maker`).
    """

    cursor: CursorResult[Any]
    positions: tuple[int, ...]
    process: Callable[[Sequence[Any]], Sequence[Sequence[Any]]]


def unloaded_orm_rows(result: Result[Any], keys: Sequence[str]) -> UnloadedRows | None:
    """The cursor of an ORM ``result`` that nobody has read yet, or ``None``.

    Only a result built by the ORM's ``loading.instances()`` qualifies: a
    ``ChunkedIteratorResult`` whose ``raw`` is a :class:`CursorResult` (public attribute,
    undocumented), not read yet (``CursorResult._soft_closed``: the ORM soft-closes it once
    it read the rows, e.g. for ``prebuffer_rows``), fetching from a client-side cursor
    (``CursorResult.cursor_strategy`` exactly ``CursorFetchStrategy`` or
    ``FullyBufferedCursorFetchStrategy``; server-side cursors stream), without
    ``yield_per`` or ``unique()`` (``Result._yield_per``, ``Result._unique_filter_state``),
    and with each of ``keys`` naming exactly one column of the cursor.  Nothing is read or
    changed here but the memoized ``Result._row_getter`` (computed as the ORM would).
    """
    if type(result) is not ChunkedIteratorResult:
        return None
    cursor = result.raw
    if not isinstance(cursor, CursorResult) or cursor._soft_closed or cursor.closed:
        return None
    if type(cursor.cursor_strategy) not in (CursorFetchStrategy, FullyBufferedCursorFetchStrategy):
        return None
    if result._yield_per or result._unique_filter_state is not None:
        return None
    process = _processed_rows_maker(cursor)
    if process is None:
        return None
    names = list(cursor.keys())
    if any(names.count(k) != 1 for k in keys):
        return None
    return UnloadedRows(cursor, tuple(names.index(k) for k in keys), process)


def read_unloaded_rows(rows: UnloadedRows) -> tuple[list[Any], Sequence[Sequence[Any]]]:
    """Read every remaining row of ``rows.cursor``: ``(raw DBAPI rows, processed rows)``.

    The processed rows (type processors applied, in the cursor's key order) are made by
    ``rows.process``, as the ORM itself makes them; the raw rows come from
    ``CursorResult._fetchall_impl()`` (the cursor strategy, which wraps driver errors).
    The cursor is soft-closed, as when the ORM reads it; put rows back with
    :func:`reload_unloaded_rows` before the ORM result is iterated.

    :raises sqlalchemy.exc.DBAPIError: the driver failed to fetch (wrapped by SQLAlchemy,
        as for any fetch).
    """
    raw = list(rows.cursor._fetchall_impl())  # type: ignore[no-untyped-call, unused-ignore]
    return raw, rows.process(raw)


def _processed_rows_maker(
    cursor: CursorResult[Any],
) -> Callable[[Sequence[Any]], Sequence[Sequence[Any]]] | None:
    """``Result._row_getter`` as a function of a list of raw rows: on 2.1 its third
    element (plain processed tuples, or Rows where rows are logged); on 2.0 it is the
    one-row ``Row`` maker.  ``None`` where there is none (scalar sources only)."""
    getter: Any = cursor._row_getter
    if isinstance(getter, tuple):
        interim_rows: Callable[[Sequence[Any]], Sequence[Sequence[Any]]] | None = getter[2]
        return interim_rows
    if callable(getter):
        make_row: Callable[[Any], Sequence[Any]] = getter
        return lambda raw: [make_row(row) for row in raw]
    return None


def reload_unloaded_rows(rows: UnloadedRows, raw: Sequence[Any]) -> None:
    """Make ``raw`` (rows returned by :func:`read_unloaded_rows`) the only rows the ORM
    result will read from the cursor: ``CursorResult.cursor_strategy`` becomes a
    ``FullyBufferedCursorFetchStrategy`` over them (what SQLAlchemy uses for results read
    ahead of time)."""
    rows.cursor.cursor_strategy = FullyBufferedCursorFetchStrategy(None, initial_buffer=raw)  # type: ignore[no-untyped-call, unused-ignore]


# --- subqueries inside expressions (shardsession.query._checks) ---------------------------
from sqlalchemy.sql.selectable import SelectBase, SelectStatementGrouping  # noqa: E402


def correlates_enclosing(sub: Select[Any], froms: Sequence[Any]) -> bool:
    """Whether SQLAlchemy may correlate ``sub`` (a subquery with FROM list ``froms``) to
    the statement around it: it was told to (``Select._correlate`` /
    ``_correlate_except``, private), or it auto-correlates (``_auto_correlate``) and has
    more than one FROM, which is SQLAlchemy's own condition
    (``SelectState._correlate_froms``, the same on 2.0.30 and 2.1.9). A one-FROM subquery
    that was not told is never correlated: ``(SELECT avg(users.score) FROM users)``
    inside a query of ``users`` reads the whole table."""
    if sub._correlate or sub._correlate_except is not None:
        return True
    return bool(sub._auto_correlate) and len(froms) > 1


def ungrouped_select(sel: SelectBase) -> SelectBase:
    """The statement inside any parentheses around a subquery
    (``SelectStatementGrouping.element``, repeatedly).

    A version difference: ``Exists.where()``, ``.correlate()``, ``.select_from()``... (and
    so the ORM's ``relationship.any()`` / ``has()``) rebuild the EXISTS with
    ``Exists._regroup``, whose result is a ``SelectStatementGrouping`` of the SELECT on
    2.0 (checked on 2.0.30) and a ``ScalarSelect`` on 2.1.  A grouping only adds
    parentheses, so the grouped statement is what the subquery checks must look at.
    """
    while isinstance(sel, SelectStatementGrouping):
        sel = sel.element
    return sel


# --- bulk writes (shardsession._bulk) -----------------------------------------------------
from sqlalchemy.orm import bulk_persistence as _bulk_persistence  # noqa: E402
from sqlalchemy.orm.context import QueryContext  # noqa: E402


# SQLAlchemy's bulk statement classes: "_BulkORMInsert" / "_BulkORMUpdate" on 2.1, without
# the underscore on 2.0 (checked on 2.0.30 and 2.1.9).
def _bulk_class(*names: str) -> Any:
    for name in names:
        found = getattr(_bulk_persistence, name, None)
        if found is not None:
            return found
    raise ImportError(f"sqlalchemy.orm.bulk_persistence has none of {names}")


_BULK_ORM_INSERT: Any = _bulk_class("_BulkORMInsert", "BulkORMInsert")
_BULK_ORM_UPDATE: Any = _bulk_class("_BulkORMUpdate", "BulkORMUpdate")


@dataclass(frozen=True)
class BulkStatement:
    """What SQLAlchemy decided about an ORM-enabled bulk INSERT or UPDATE (a statement
    run with parameter sets), read from its ``_sa_orm_insert_options`` /
    ``_sa_orm_update_options`` execution option (private ``Options`` of
    ``sqlalchemy.orm.bulk_persistence``, filled by ``orm_pre_session_exec`` before the
    ``do_orm_execute`` handlers run; checked on 2.0.30 and 2.1.9)."""

    kind: str  # "insert" or "update"
    mapper: Mapper[Any]
    options: Any  # the private insert/update options object
    autoflush: bool
    returning: bool


def orm_bulk_statement(orm_context: ORMExecuteState) -> BulkStatement | None:
    """The bulk INSERT or UPDATE ``orm_context`` holds, or ``None`` when SQLAlchemy would
    not run it with its ORM ``"bulk"`` strategy (one statement with VALUES, ``"raw"``,
    a Core statement, an UPDATE with one parameter dict...)."""
    if orm_context.is_insert:
        options = orm_context.execution_options.get("_sa_orm_insert_options")
        kind = "insert"
    elif orm_context.is_update:
        options = orm_context.execution_options.get("_sa_orm_update_options")
        kind = "update"
    else:
        return None
    if options is None or options._dml_strategy != "bulk" or options._subject_mapper is None:
        return None
    statement: Any = orm_context.statement
    return BulkStatement(kind, options._subject_mapper, options, bool(options._autoflush),
                         bool(statement._returning))


def mappers_of_table(table: Any) -> list[Mapper[Any]]:
    """The mappers whose own table is ``table`` (a Core ``insert(table)``'s rows are routed
    through them), the base mapper of a single-table hierarchy only. Read from SQLAlchemy's
    private list of registries (``sqlalchemy.orm.mapper._all_registries``, checked on
    2.0.30 and 2.1.9); each registry's ``mappers`` is public."""
    from sqlalchemy.orm import mapperlib

    found: list[Mapper[Any]] = []
    for reg in mapperlib._all_registries():
        for m in reg.mappers:
            if m.local_table is table and (m.inherits is None
                                           or m.inherits.local_table is not table):
                found.append(m)
    return found


class _NoConnectionCallable:
    connection_callable = None


class _OneConnection:
    """What ``bulk_persistence._bulk_insert`` / ``_bulk_update`` (private) read of the
    ``SessionTransaction`` they are given: ``session.connection_callable`` (they refuse
    to run when the session routes objects itself, which a sharded session does) and
    ``connection(mapper)``. This stands in for one shard's transaction: the shard's rows
    are grouped beforehand, so its one connection is the answer for every row."""

    session = _NoConnectionCallable()

    def __init__(self, connection: Any) -> None:
        self._connection = connection

    def connection(self, mapper: Any, **kw: Any) -> Any:
        return self._connection


def bulk_insert_on(
    connection: Any,
    mapper: Mapper[Any],
    mappings: Sequence[Any],
    *,
    isstates: bool,
    return_defaults: bool,
    render_nulls: bool,
    statement: Any = None,
    execution_options: Any = None,
) -> Any:
    """SQLAlchemy's own ORM bulk INSERT (``bulk_persistence._bulk_insert``, what
    ``Session.bulk_insert_mappings()`` / ``bulk_save_objects()`` and
    ``session.execute(insert(M), rows)`` run) of ``mappings`` on one ``connection``:
    its batching (insertmanyvalues), its key handling and, with ``statement``, its
    RETURNING result (a ``CursorResult``; see :func:`orm_returning`)."""
    transaction: Any = _OneConnection(connection)
    return _bulk_persistence._bulk_insert(
        mapper, mappings, transaction,
        isstates=isstates, return_defaults=return_defaults, render_nulls=render_nulls,
        use_orm_insert_stmt=statement, execution_options=execution_options,
    )


def bulk_update_on(
    connection: Any,
    mapper: Mapper[Any],
    mappings: Sequence[Any],
    *,
    isstates: bool,
    update_changed_only: bool,
    statement: Any = None,
) -> Any:
    """SQLAlchemy's own ORM bulk UPDATE by primary key (``bulk_persistence._bulk_update``)
    of ``mappings`` on one ``connection``; raises ``StaleDataError`` as SQLAlchemy does
    when a row was not matched (and the driver counts executemany rows)."""
    check = statement is None or not statement._where_criteria
    transaction: Any = _OneConnection(connection)
    return _bulk_persistence._bulk_update(
        mapper, mappings, transaction,
        isstates=isstates, update_changed_only=update_changed_only,
        use_orm_update_stmt=statement, enable_check_rowcount=check,
    )


def run_bulk_insert(
    orm_context: ORMExecuteState, bulk: BulkStatement, connection: Any, rows: Sequence[Any]
) -> Any:
    """The bulk INSERT of ``orm_context`` with ``rows`` on one ``connection``, as
    ``_BulkORMInsert.orm_execute_statement`` (private) runs it for its ``"bulk"``
    strategy, RETURNING included (a ``CursorResult``; see :func:`orm_insert_result`)."""
    options = bulk.options
    return bulk_insert_on(
        connection, bulk.mapper, rows, isstates=False,
        return_defaults=bool(options._return_defaults),
        render_nulls=bool(options._render_nulls),
        statement=orm_context.statement, execution_options=orm_context.execution_options,
    )


def run_bulk_update(
    orm_context: ORMExecuteState, bulk: BulkStatement, connection: Any, rows: Sequence[Any]
) -> Any:
    """The bulk UPDATE by primary key of ``orm_context`` with ``rows`` on one
    ``connection``, as ``_BulkORMUpdate.orm_execute_statement`` (private) runs it (the
    identity map is synchronized afterwards: :func:`synchronize_bulk_update`).

    The statement gets the annotations SQLAlchemy's ``orm_pre_session_exec`` adds in its
    second pass, after the ``do_orm_execute`` handlers (which is where this runs):
    without ``dml_strategy="bulk"`` the compiler would treat it as an ORM UPDATE of the
    whole (multi-table, inherited) entity instead of one table's UPDATE per
    ``_emit_update_statements`` call (``_BulkORMUpdate.create_for_statement``, private,
    2.0.30 and 2.1.9)."""
    options = bulk.options
    sync = options._synchronize_session
    original: Any = orm_context.statement
    statement = original._annotate({
        "synchronize_session": "evaluate" if sync == "auto" else sync,
        "is_delete_using": options._is_delete_using,
        "is_update_from": options._is_update_from,
        "dml_strategy": "bulk",
        "can_use_returning": options._can_use_returning,
    })
    return bulk_update_on(connection, bulk.mapper, rows, isstates=False,
                          update_changed_only=False, statement=statement)


def closed_empty_result() -> Result[Any]:
    """An empty result, closed as SQLAlchemy's ORM bulk INSERT without RETURNING returns
    it (``null_result()`` soft-closed: ``Result._soft_close``, private, 2.1.9)."""
    from sqlalchemy.engine.result import null_result

    result = null_result()
    result._soft_close()
    return result


def check_bulk_insert(orm_context: ORMExecuteState, bulk: BulkStatement) -> None:
    """SQLAlchemy's refusal of a bulk INSERT with a "post values" clause (an upsert) into a
    mapper of several tables (``_BulkORMInsert.orm_execute_statement``), raised before
    any shard is asked (``Insert._post_values_clause`` and
    ``Mapper._multiple_persistence_tables``, private)."""
    from sqlalchemy.exc import InvalidRequestError

    statement: Any = orm_context.statement
    mapper: Any = bulk.mapper
    if statement._post_values_clause is not None and mapper._multiple_persistence_tables:
        raise InvalidRequestError(
            "bulk INSERT with a 'post values' clause (typically upsert) not supported for "
            f"multi-table mapper {mapper}"
        )


def check_bulk_update(orm_context: ORMExecuteState, bulk: BulkStatement) -> None:
    """SQLAlchemy's refusal of a bulk UPDATE with WHERE criteria that would synchronize
    the identity map (``_BulkORMUpdate.orm_execute_statement``), raised before any shard
    is asked (``Update._where_criteria``, private)."""
    from sqlalchemy.exc import InvalidRequestError

    statement: Any = orm_context.statement
    if not (statement._where_criteria
            and bulk.options._synchronize_session in ("auto", "evaluate")):
        return
    raise InvalidRequestError(
        "bulk synchronize of persistent objects not supported when using bulk update "
        "with additional WHERE criteria right now.  add synchronize_session=None "
        "execution option to bypass synchronize of persistent objects."
    )


def orm_insert_result(
    orm_context: ORMExecuteState, params: Sequence[Any], result: Any, shard_id: Any
) -> Any:
    """The ORM result of a bulk INSERT with RETURNING that ran on ``shard_id``: objects
    keyed with the shard as identity token (``_BulkORMInsert._return_orm_returning``,
    private, with ``QueryContext.default_load_options._identity_token``, the load option
    a SELECT routed by horizontal_shard gets from the ``identity_token`` execution
    option; ``populate_existing`` as ``orm_execute_statement`` adds it)."""
    options = _with_load_token(orm_context.execution_options, shard_id)
    insert_options = options.get("_sa_orm_insert_options")
    if insert_options is not None and insert_options._populate_existing:
        load = options["_sa_orm_load_options"] + {"_populate_existing": True}
        options = options.union({"_sa_orm_load_options": load})
    return _BULK_ORM_INSERT._return_orm_returning(  # type: ignore[no-any-return, unused-ignore]
        orm_context.session, orm_context.statement, params, options,
        orm_context.bind_arguments, result,
    )


def sorted_by_parameter_order(statement: Any) -> bool:
    """Whether ``statement`` is an INSERT whose RETURNING rows SQLAlchemy returns in the
    order of the parameter sets (``returning(..., sort_by_parameter_order=True)``; read
    from ``Insert._sort_by_parameter_order``, private; checked on 2.0.30 and 2.1.9)."""
    return bool(getattr(statement, "_sort_by_parameter_order", False))


def interleave_results(results: Sequence[Any], sources: Sequence[int]) -> Result[Any]:
    """One result whose k-th row is the next unread row of ``results[sources[k]]``:
    each result's rows are taken in their own order. When ``sources`` does not name
    exactly as many rows of each result as it has, the results' rows one result after
    the other instead (the results are read here either way).

    Built from the results' :class:`~sqlalchemy.engine.FrozenResult` (public), so the
    row metadata, ORM entity rows and ``scalars()`` behave as in the results given; the
    rows of a source that yields scalars are kept as scalars there
    (``FrozenResult._source_supports_scalars``, private)."""
    frozen = [r.freeze() for r in results]
    data = [list(f.data) for f in frozen]
    if [sum(1 for s in sources if s == i) for i in range(len(data))] != [len(d) for d in data]:
        sources = [i for i, d in enumerate(data) for _ in d]
    taken = [iter(d) for d in data]
    rows = [next(taken[s]) for s in sources]
    first = frozen[0]
    if first._source_supports_scalars:
        rows = [(row,) for row in rows]  # with_new_rows() takes the first of each row
    ordered: Result[Any] = first.with_new_rows(rows)()
    return ordered


def synchronize_bulk_update(
    orm_context: ORMExecuteState, bulk: BulkStatement, params: Sequence[Any], result: Any,
    shard_id: Any,
) -> None:
    """Bring the objects of ``shard_id`` in the identity map up to date after a bulk
    UPDATE of ``params`` there, as SQLAlchemy does after its own (the ``"evaluate"``
    synchronization that ``"auto"`` means for bulk: ``orm_setup_cursor_result`` of
    ``_BulkORMUpdate``, private, with the update options' ``_identity_token``)."""
    options = bulk.options
    sync = options._synchronize_session
    if sync in (None, False):
        return
    options = options + {"_identity_token": shard_id, "_synchronize_session": "evaluate"}
    execution_options = orm_context.execution_options.union(
        {"_sa_orm_update_options": options})
    _BULK_ORM_UPDATE.orm_setup_cursor_result(
        orm_context.session, orm_context.statement, params, execution_options,
        orm_context.bind_arguments, result,
    )


def _with_load_token(execution_options: Any, shard_id: Any) -> Any:
    load = execution_options.get("_sa_orm_load_options", QueryContext.default_load_options)
    return execution_options.union({"_sa_orm_load_options": load + {"_identity_token": shard_id}})


def returning_identity_options(orm_context: ORMExecuteState, shard_id: Any) -> dict[str, Any]:
    """Execution options that make the objects an ORM ``insert/update/delete(...)
    .returning(Entity)`` builds on ``shard_id`` carry the shard in their identity key
    (``_sa_orm_load_options`` with ``_identity_token``: the ``identity_token`` execution
    option reaches the load options of SELECTs only). Empty for anything else."""
    statement: Any = orm_context.statement
    if statement.is_select or not getattr(statement, "_returning", ()):
        return {}
    if not orm_context.is_orm_statement:
        return {}
    load = orm_context.execution_options.get(
        "_sa_orm_load_options", QueryContext.default_load_options)
    return {"_sa_orm_load_options": load + {"_identity_token": shard_id}}


def key_with_token(state: InstanceState[Any], shard_id: Any) -> None:
    """Give an object SQLAlchemy's bulk INSERT keyed with no identity token
    (``return_defaults=True`` sets ``state.key = (class, pk, None)``) its shard."""
    key = state.key
    if key is not None and key[2] is None:
        state.key = (key[0], key[1], shard_id)
    state.identity_token = shard_id


class RoutedBulkSaves(Session):
    """A Session whose ``bulk_save_objects`` / ``bulk_insert_mappings`` /
    ``bulk_update_mappings`` go through ``_shardsession_save_mappings`` (a method the
    subclass provides) instead of SQLAlchemy's ``_bulk_insert`` / ``_bulk_update`` on
    one connection, which refuse a session that routes objects itself.

    Overrides ``Session._bulk_save_mappings`` (private; the three public methods end
    there on 2.0.30 and 2.1.9) and keeps its frame: the work runs in a subtransaction,
    with ``Session._flushing`` set, and an error rolls the subtransaction back the way
    a failed flush does (the session then needs ``rollback()``).
    """

    def _shardsession_save_mappings(
        self, mapper: Mapper[Any], mappings: list[Any], *, isupdate: bool, isstates: bool,
        return_defaults: bool, update_changed_only: bool, render_nulls: bool,
    ) -> None:
        raise NotImplementedError

    def _bulk_save_mappings(  # type: ignore[override, unused-ignore]
        self, mapper: Any, mappings: Iterable[Any], *, isupdate: bool, isstates: bool,
        return_defaults: bool, update_changed_only: bool, render_nulls: bool,
    ) -> None:
        from sqlalchemy import inspect

        mapper = inspect(mapper).mapper
        try:
            self._flushing = True
            transaction = self._autobegin_t()._begin()
            try:
                self._shardsession_save_mappings(
                    mapper, list(mappings), isupdate=isupdate, isstates=isstates,
                    return_defaults=return_defaults,
                    update_changed_only=update_changed_only, render_nulls=render_nulls,
                )
                transaction.commit()
            except BaseException:
                with safe_reraise():
                    transaction.rollback(_capture_exception=True)
        finally:
            self._flushing = False


# -- asyncio ---------------------------------------------------------------------------------

import asyncio  # noqa: E402

from sqlalchemy.util import concurrency as _concurrency  # noqa: E402


def in_async_greenlet() -> bool:
    """Whether the caller runs inside SQLAlchemy's asyncio greenlet (an ``AsyncSession``
    call, ``AsyncConnection.run_sync``...), where async drivers may do IO.

    ``sqlalchemy.util.concurrency.in_greenlet`` is not in SQLAlchemy's documented API
    (run on 2.1.9; 2.0's source has it too).
    """
    return bool(_concurrency.in_greenlet())


def run_overlapped(
    fns: Sequence[Callable[[], Any]], timeout: float | None = None
) -> list[Any]:
    """Run each callable in a greenlet of its own on the running event loop, all at once,
    from inside SQLAlchemy's asyncio greenlet; return the outcomes in order (a result,
    or the exception it raised).

    This is what SQLAlchemy's ``AsyncSession`` does for one sync function
    (``greenlet_spawn``), done for several under one ``asyncio.gather``: each async
    driver call (``await_``) of one callable lets the others' run, so their waiting
    overlaps while every connection is still used only from the event loop's thread.

    With ``timeout``, callables still running after that many seconds are cancelled
    (``asyncio.CancelledError`` raised inside them) and reported as
    :class:`asyncio.TimeoutError`; every greenlet has returned when this returns.

    Uses ``greenlet_spawn`` / ``await_only`` of ``sqlalchemy.util.concurrency`` (not in
    the documented API; run on 2.1.9, and 2.0's source has both names).
    """
    tasks: list[asyncio.Task[Any]] = []

    async def gather() -> list[Any]:
        for fn in fns:
            tasks.append(asyncio.ensure_future(_concurrency.greenlet_spawn(fn)))
        try:
            _done, pending = await asyncio.wait(tasks, timeout=timeout)
        except BaseException:
            # The caller's task was cancelled: no greenlet may go on using a
            # connection after this returns, so stop them all and wait for them.
            for t in tasks:
                t.cancel()
            await asyncio.wait(tasks)
            raise
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.wait(pending)
        out: list[Any] = []
        for t in tasks:
            if t in pending:
                out.append(asyncio.TimeoutError())
            elif t.cancelled():
                out.append(asyncio.CancelledError())
            else:
                failure = t.exception()
                out.append(failure if failure is not None else t.result())
        return out

    # await_only: the name in 2.0 and 2.1 (2.1 also calls it await_)
    result: list[Any] = _concurrency.await_only(gather())
    return result


def sync_bind(bind: Any) -> Any:
    """The sync ``Engine`` / ``Connection`` behind an ``AsyncEngine`` /
    ``AsyncConnection`` (their public ``sync_engine`` / ``sync_connection``); any other
    bind unchanged."""
    for attr in ("sync_engine", "sync_connection"):
        inner = getattr(bind, attr, None)
        if inner is not None and type(bind).__module__.startswith("sqlalchemy.ext.asyncio"):
            return inner
    return bind


async def run_in_greenlet(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Await the sync ``fn(*args, **kwargs)`` run in SQLAlchemy's asyncio greenlet (as
    ``AsyncConnection.run_sync`` does), so async drivers can do its IO.

    ``sqlalchemy.util.concurrency.greenlet_spawn`` (not in the documented API; checked on
    2.1.9).
    """
    return await _concurrency.greenlet_spawn(fn, *args, **kwargs)


# -- an ORDER BY item with NULL as the smallest value, in each dialect's syntax ----------

class NullsLow(ColumnElement[Any]):
    """``element`` (an ORDER BY item with ASC/DESC and no NULLS FIRST/LAST) ordered
    with NULL as the smallest value on every backend: ``NULLS FIRST`` (ASC) or ``NULLS
    LAST`` (DESC) where NULL is otherwise the largest (PostgreSQL, Oracle), the item as
    written elsewhere (SQLite, MySQL/MariaDB already order NULL first for ASC).

    Private names: ``_traverse_internals`` (what the cache key, cloning and traversal
    read, as for SQLAlchemy's own elements).
    """

    __visit_name__ = "shardsession_nulls_low"
    inherit_cache = True
    _traverse_internals = [
        ("element", InternalTraversal.dp_clauseelement),
        ("descending", InternalTraversal.dp_boolean),
    ]

    def __init__(self, element: Any, descending: bool) -> None:
        self.element = element
        self.descending = descending


@compiles(NullsLow)  # type: ignore[misc, no-untyped-call, untyped-decorator, unused-ignore]
def _nulls_low_default(element: NullsLow, compiler: Any, **kw: Any) -> str:
    text: str = compiler.process(element.element, **kw)
    return text


@compiles(NullsLow, "postgresql")  # type: ignore[misc, no-untyped-call, untyped-decorator, unused-ignore]
@compiles(NullsLow, "oracle")  # type: ignore[misc, no-untyped-call, untyped-decorator, unused-ignore]
def _nulls_low_high_dialects(element: NullsLow, compiler: Any, **kw: Any) -> str:
    text: str = compiler.process(element.element, **kw)
    return text + (" NULLS LAST" if element.descending else " NULLS FIRST")


#: a row of VALUES that cannot be read by column (a positional multi-VALUES row)
POSITIONAL = object()


def dml_value_sets(statement: Any) -> list[Any]:
    """The VALUES of an ``insert()`` / ``update()``: its ``.values()`` mapping (keys are
    Columns, or names SQLAlchemy could not resolve) and each row of a multi-VALUES
    insert; :data:`POSITIONAL` for a row given as a tuple. Reads ``_values`` and
    ``_multi_values`` (private; checked on 2.0.30 and 2.1.9)."""
    out: list[Any] = []
    values = getattr(statement, "_values", None)
    if values:
        out.append(values)
    for rows in getattr(statement, "_multi_values", None) or ():
        for row in rows:
            out.append(row if isinstance(row, Mapping) else POSITIONAL)
    return out


def dml_upserts(statement: Any) -> bool:
    """Whether an insert has an ON CONFLICT / ON DUPLICATE KEY clause
    (``_post_values_clause``, private)."""
    return getattr(statement, "_post_values_clause", None) is not None


def dml_from_select(statement: Any) -> bool:
    """Whether an insert is ``insert().from_select(...)`` (``_select_names``, private)."""
    return getattr(statement, "_select_names", None) is not None


def annotations_of(element: Any) -> Mapping[str, Any]:
    """The ORM annotations of a SQL element (``_annotations``, private): an ORM
    attribute's column carries ``parententity`` / ``parentmapper``, a plain Core
    ``Table.c.x`` none."""
    return getattr(element, "_annotations", None) or {}


def text_extras(element: Any) -> bool:
    """Whether a statement carries raw SQL text outside its clauses: prefixes, suffixes,
    hints (``_prefixes``, ``_suffixes``, ``_hints``, ``_statement_hints``, private)."""
    return any(getattr(element, n, None) for n in
               ("_prefixes", "_suffixes", "_hints", "_statement_hints"))


def lambda_resolved(statement: Any) -> Any:
    """The statement a ``lambda_stmt()`` stands for (``_resolved``, private); others
    unchanged."""
    return getattr(statement, "_resolved", statement)


def walk_children(element: Any) -> Iterable[Any]:
    """``element.get_children()``, except that a ``Select``'s FROM list is its explicit
    ``select_from()`` / join objects (``_from_obj``, private) and not the tables implied
    by its columns (the plain ``Table`` behind an ORM attribute's annotated column)."""
    if isinstance(element, Select):
        return itertools.chain(
            super(Select, element).get_children(
                omit_attrs=("_from_obj", "_correlate", "_correlate_except")),
            element._from_obj,
        )
    return element.get_children()  # type: ignore[no-any-return]


def loader_options(statement: Any) -> list[tuple[list[Any], tuple[Any, ...]]]:
    """The loader options of an ORM statement, each as (the mappers on its path, its
    SQL expressions: ``with_expression()``'s, ``relationship.and_()``'s). Reads
    ``_with_options``, ``Load.context``, ``_LoadElement.path`` / ``_extra_criteria``
    (private; checked on 2.1.9)."""
    out: list[tuple[list[Any], tuple[Any, ...]]] = []
    for opt in getattr(statement, "_with_options", ()) or ():
        for element in getattr(opt, "context", ()) or ():
            path = getattr(getattr(element, "path", None), "path", ()) or ()
            mappers = [m for m in (getattr(i, "mapper", None) for i in path) if m is not None]
            out.append((mappers, tuple(getattr(element, "_extra_criteria", ()) or ())))
    return out
