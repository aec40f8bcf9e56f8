"""Events of the commit protocol, of recovery and of the fan-out, the SQLAlchemy way.

Listen with :func:`sqlalchemy.event.listen` (or ``@event.listens_for``) on a
:class:`~shardsession.ShardedSession` class or subclass (every such session), on a
``sessionmaker`` of one (the sessions it makes), or on one session (``ShardedSession``,
or an ``AsyncSession`` over one: its ``sync_session``). As with SQLAlchemy's session
events, an ``async_sessionmaker`` is not a target: pass it a subclass of
``ShardedSession`` as ``sync_session_class`` and listen on that class::

    from sqlalchemy import event

    @event.listens_for(ShardedSession, "shardsession_after_decision")
    def decided(session, gtrid, outcome, decider):
        metrics.increment(f"commit.{outcome}")

SQLAlchemy's own session events (``before_commit``, ``after_commit``, ``after_flush``...)
keep firing as in a plain Session; these come in addition, with the shards asked.

Listeners observe; they cannot change what happens. An exception raised by a listener is
logged (``shardsession.events``) and otherwise ignored: once a branch is prepared or the
decision is durable, nothing a listener does may leave the protocol half-run. Listeners
of the commit events run in the thread (or asyncio greenlet) that calls ``commit()``,
never in a worker. ``shardsession_in_doubt_resolved`` has no session: it fires for the
listeners registered on ``ShardedSession`` or any subclass of it (process-wide), from
whatever thread runs :func:`~shardsession.coordinator.recover`.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import Session

__all__ = ["ShardSessionEvents", "emit", "emit_global"]

log = logging.getLogger(__name__)


class _Hooks(event.EventTarget):
    """Holds the ``dispatch`` of one listen target (a session class or a session): the
    targets' own ``dispatch`` is SQLAlchemy's ``SessionEvents``, which these events must
    not replace."""

    # (SQLAlchemy's convention for a slotted target: it keeps the dispatch there)
    __slots__ = ("__weakref__", "_slots_dispatch")
    dispatch: Any


_by_class: weakref.WeakKeyDictionary[type, _Hooks] = weakref.WeakKeyDictionary()
_by_session: weakref.WeakKeyDictionary[Session, _Hooks] = weakref.WeakKeyDictionary()
#: set once anything listens: until then emitting costs one global lookup
_listening = False


def _session_class(target: Any) -> type[Session] | None:
    cls = getattr(target, "class_", None)  # a sessionmaker
    if isinstance(cls, type) and issubclass(cls, Session):
        return cls
    if isinstance(target, type) and issubclass(target, Session):
        return target
    return None


def _hooks_of(target: Any) -> _Hooks | None:
    global _listening
    sync_session = getattr(target, "sync_session", None)  # an AsyncSession
    if isinstance(sync_session, Session):
        target = sync_session
    registry: Any
    key: Any
    if isinstance(target, Session):
        registry, key = _by_session, target
    else:
        cls = _session_class(target)
        if cls is None or not hasattr(cls, "_shardsession_naming"):
            return None
        registry, key = _by_class, cls
    hooks = registry.get(key)
    if hooks is None:
        hooks = registry[key] = _Hooks()
    _listening = True
    return hooks  # type: ignore[no-any-return]


class ShardSessionEvents(event.Events[_Hooks]):
    """The events of a sharded session, named ``shardsession_*``.

    Shard ids are listed in the order the protocol or the fan-out uses them.
    """

    _target_class_doc = "SomeShardedSession"
    _dispatch_target = _Hooks

    @classmethod
    def _accept_with(cls, target: Any, identifier: str) -> Any:
        if isinstance(target, _Hooks):
            return target
        return _hooks_of(target)

    def shardsession_before_prepare(
        self, session: Session, gtrid: str, shard_ids: Sequence[Any], decider: Any
    ) -> None:
        """Phase one is about to start: ``shard_ids`` will be prepared (in parallel with
        the decision row's insert on ``decider``)."""

    def shardsession_after_prepare(
        self, session: Session, gtrid: str, shard_ids: Sequence[Any],
        failed_shard_ids: Sequence[Any],
    ) -> None:
        """Phase one ended: every shard of ``shard_ids`` prepared (``failed_shard_ids``
        empty), or the ones listed failed and every branch is being rolled back."""

    def shardsession_after_decision(
        self, session: Session, gtrid: str, outcome: str, decider: Any
    ) -> None:
        """The global transaction's outcome is fixed: ``"commit"`` (the decider's commit,
        the commit point, is durable), ``"abort"`` (nothing was committed) or
        ``"unknown"`` (the decider's reply was lost; recovery will settle it)."""

    def shardsession_in_doubt_resolved(
        self, gtrid: str, shard_id: Any, bqual: str, outcome: str
    ) -> None:
        """Recovery finished a prepared branch: ``outcome`` is ``"commit"``,
        ``"rollback"`` or ``"already_finished"`` (someone else finished it)."""

    def shardsession_fanout_started(
        self, session: Session, statement: Any, shard_ids: Sequence[Any]
    ) -> None:
        """A statement is about to run on ``shard_ids`` (after pruning)."""

    def shardsession_fanout_finished(
        self, session: Session, statement: Any, shard_ids: Sequence[Any], elapsed: float,
        error: BaseException | None,
    ) -> None:
        """The statement's shards answered (``error`` ``None``) or one raised
        ``error``; ``elapsed`` is in seconds."""


def _listeners(session: Session, name: str) -> list[Any]:
    found = []
    hooks = _by_session.get(session)
    if hooks is not None:
        found.append(getattr(hooks.dispatch, name))
    for cls in type(session).__mro__:
        hooks = _by_class.get(cls)
        if hooks is not None:
            found.append(getattr(hooks.dispatch, name))
    return found


def _run(collection: Any, name: str, args: tuple[Any, ...]) -> None:
    for fn in collection:  # each listener on its own: one failure skips no other
        try:
            fn(*args)
        except Exception:
            log.exception("a %s listener raised (ignored)", name)


def emit(session: Any, name: str, *args: Any) -> None:
    """Run the listeners of ``name`` registered for ``session`` (its own, then its
    class's and base classes')."""
    if not _listening or session is None:
        return
    for collection in _listeners(session, name):
        _run(collection, name, (session, *args))


def emit_global(name: str, *args: Any) -> None:
    """Run the listeners of ``name`` registered on any session class (recovery)."""
    if not _listening:
        return
    for hooks in list(_by_class.values()):
        _run(getattr(hooks.dispatch, name), name, args)
