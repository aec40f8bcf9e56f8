"""The sharded Session: a drop-in for ``sqlalchemy.ext.horizontal_shard.ShardedSession``.

Two ways to configure it:

* the drop-in way, exactly as SQLAlchemy's class: ``shard_chooser``, ``identity_chooser``,
  ``execute_chooser`` and ``shards``; the choosers are obeyed as given;
* the declarative way: ``placement=Placement({...})`` derives all three choosers, prunes
  statements by their WHERE clause, places children with their parents and refuses
  cross-shard links at flush.

Either way, cross-shard reads are merged exactly (see :mod:`shardsession.query`) and a
commit that wrote to several shards goes through the coordinator
(:mod:`shardsession.coordinator`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection, Iterable, Mapping, Sized
from typing import Any, Literal

from sqlalchemy import Engine, event, inspect
from sqlalchemy.engine import Connection, Result
from sqlalchemy.exc import ArgumentError, NoInspectionAvailable, UnboundExecutionError
from sqlalchemy.ext.horizontal_shard import ShardedQuery
from sqlalchemy.ext.horizontal_shard import ShardedSession as _SAShardedSession
from sqlalchemy.orm import Mapper, ORMExecuteState, Query, Session
from sqlalchemy.orm.attributes import instance_state
from sqlalchemy.orm.exc import NO_STATE, UnmappedClassError, UnmappedInstanceError

from . import _bulk, _compat, _placed, _scope
from ._execute import execute
from ._flush import place_flush, replicate_broadcast
from ._legacy import execute_chooser_of, identity_chooser_of
from ._typing import (
    _O,
    ClauseElement,
    EntityKey,
    Executable,
    ExecuteChooser,
    GetOptions,
    IdentityChooser,
    ShardChooser,
    Unpack,
)
from .coordinator import TransactionCoordinator, early
from .coordinator.coordinator import begin_listener
from .coordinator.xid import check_shard_ids
from .exc import (
    ConfigurationError,
    NoShardChosenError,
    RoutingError,
    TenantIsolationError,
    UnknownShardError,
)
from .query import TIMEOUT_OPTION
from .routing.placement import Placement

__all__ = ["ShardedQuery", "ShardedSession"]

log = logging.getLogger(__name__)

AtomicMode = Literal["require", "best_effort"]


class ShardedSession(
    _compat.CoordinatedRoots,
    _compat.RoutedBulkSaves,
    _compat.ForwardedIdentityLookup,
    _compat.TransientMerge,
    _SAShardedSession,
):
    """A Session whose data is spread over several databases.

    Accepts every argument of :class:`sqlalchemy.orm.Session` and of SQLAlchemy's
    ``ShardedSession``, plus:

    :param placement: a :class:`~shardsession.routing.Placement`; derives the three
        choosers (do not pass them too).
    :param atomic: ``"require"`` refuses a commit that cannot be atomic (two or more
        written shards that cannot prepare) before anything is committed;
        ``"best_effort"`` commits those last, one after another, and warns. Default:
        ``"best_effort"`` for the drop-in constructor (SQLAlchemy's behaviour),
        ``"require"`` when a ``placement`` is given.
    :param decider: shard id preferred as the decision holder of atomic commits.
    :param fanout_max_workers: bound on shards queried at once by a fan-out.
    :param fanout_timeout: default per-query deadline of a fan-out, in seconds.
    :param coordinator: a shared
        :class:`~shardsession.coordinator.TransactionCoordinator` (sessionmakers share
        one so capability checks are cached once per engine).
    :param tenant: scope the session to one tenant (see :mod:`shardsession.tenancy`);
        ``None`` takes the tenant of the current :func:`~shardsession.tenancy.tenant_scope`,
        if any. Needs a placement with ``TenantSharding`` rules.
    """

    #: early BEGINs of the current flush (see shardsession.coordinator.early): a list
    #: while a flush that writes several shards runs
    _early: list[Any] | tuple[()] = ()
    #: whether the routing handler is registered on the instance (see __init__)
    _route_on_instance = False
    _shards: dict[Any, Engine | Connection]
    _placement: Placement | None = None
    _coordinator: TransactionCoordinator | None = None
    atomic: AtomicMode
    fanout_max_workers: int | None
    fanout_timeout: float | None
    #: the tenant this session is scoped to (``None``: none)
    _tenant: str | None = None
    #: the tenancy hooks, when the placement has tenant-owned mappers
    _tenancy: Any = None

    def __init__(
        self,
        shard_chooser: ShardChooser | None = None,
        identity_chooser: IdentityChooser | None = None,
        execute_chooser: ExecuteChooser | None = None,
        shards: Mapping[str, Any] | None = None,
        query_cls: type[Query[Any]] = ShardedQuery,
        *,
        placement: Placement | None = None,
        atomic: AtomicMode | None = None,
        decider: str | None = None,
        fanout_max_workers: int | None = None,
        fanout_timeout: float | None = None,
        coordinator: TransactionCoordinator | None = None,
        tenant: str | int | None = None,
        id_chooser: Callable[[Query[Any], Iterable[Any]], Iterable[Any]] | None = None,
        query_chooser: Callable[[Executable], Iterable[Any]] | None = None,
        **kwargs: Any,
    ) -> None:
        _ensure_hooks()
        # A sessionmaker passes the same arguments to every session: a configuration that
        # was validated once is applied from what that first session computed.
        key: Any = (type(self), id(shards), placement, shard_chooser, identity_chooser,
                    execute_chooser, atomic, decider, fanout_max_workers, fanout_timeout,
                    coordinator, id_chooser, query_chooser)
        try:
            known = _known_configs.get(key)
        except TypeError:  # an unhashable argument: no shortcut
            key, known = None, None
        if known is not None and known[0] == shards:
            Session.__init__(self, query_cls=query_cls, **kwargs)
            # (plain attribute assignments, like the long path's: see _compat on why we
            # never go through an SQLAlchemy object's __dict__)
            (self._placement, self.atomic, self.fanout_max_workers, self.fanout_timeout,
             self.shard_chooser, self.identity_chooser, self.execute_chooser,
             self._coordinator) = known[1]
            self._shards = known[3].copy()
            if len(known[2]) > 1:
                self._route_if_other_listeners(known[2])
            self._scope_tenant(tenant)
            return
        self._shards = {}
        self._placement = placement
        if placement is not None:
            if shard_chooser or identity_chooser or execute_chooser:
                raise ConfigurationError(
                    "pass either placement= or the shard_chooser/identity_chooser/"
                    "execute_chooser callables, not both"
                )
            if not shards:
                raise ConfigurationError("a placement needs shards={name: engine, ...}")
            bad = [k for k in shards if not isinstance(k, str) or not k]
            if bad:
                raise ConfigurationError(f"a placement needs string shard ids, not {bad!r}")
            placement.bind(list(shards))
            placement.bind_engines({n: _compat.sync_bind(b) for n, b in shards.items()})
            # One set of choosers per placement: bound methods of this session kept in its
            # own attributes would make every session a reference cycle for the garbage
            # collector to find.
            shard_chooser, identity_chooser, execute_chooser = _placed.choosers(placement)
        if atomic not in (None, "require", "best_effort"):
            raise ConfigurationError(f"atomic must be 'require' or 'best_effort', not {atomic!r}")
        if fanout_max_workers is not None and fanout_max_workers < 1:
            raise ConfigurationError("fanout_max_workers must be >= 1")
        if fanout_timeout is not None and fanout_timeout <= 0:
            raise ConfigurationError("fanout_timeout must be > 0")
        self.atomic = atomic or ("require" if placement is not None else "best_effort")
        self.fanout_max_workers = fanout_max_workers
        self.fanout_timeout = fanout_timeout
        # SQLAlchemy's ShardedSession.__init__ is not called: it registers its sequential,
        # concatenating executor on every instance. Ours is registered per instance too,
        # where SQLAlchemy registers its own: do_orm_execute listeners of the class or of a
        # sessionmaker then run before the routing (once per statement, and the choosers
        # see what they did), not once per shard inside it.
        Session.__init__(self, query_cls=query_cls, **kwargs)
        listeners = _compat.class_orm_execute_listener_list(type(self))
        self._route_if_other_listeners(listeners)
        self.shard_chooser = shard_chooser  # type: ignore[assignment]
        if placement is not None:  # the derived choosers (no legacy arguments to map)
            self.identity_chooser = identity_chooser  # type: ignore[assignment]
            self.execute_chooser = execute_chooser  # type: ignore[assignment]
        else:
            self.identity_chooser = identity_chooser_of(self, identity_chooser, id_chooser)
            self.execute_chooser = execute_chooser_of(execute_chooser, query_chooser)
        if self.shard_chooser is None:
            raise ArgumentError("shard_chooser is required (or pass placement=)")
        for name, bind in (shards or {}).items():
            self.bind_shard(name, bind)
        try:  # an xid names its decider by shard id: two ids must never name one
            check_shard_ids(shards or ())
        except ValueError as e:
            raise ConfigurationError(str(e)) from e
        self._coordinator = _coordinator_for(self, coordinator, decider)
        if key is not None and shards and id_chooser is None:  # (the legacy wrapper
            # of id_chooser refers to this session: it cannot be shared)
            if len(_known_configs) >= 64:
                _known_configs.clear()
            _known_configs[key] = (
                dict(shards),
                tuple(getattr(self, name) for name in _SHARED_ATTRIBUTES),
                listeners,
                dict(self._shards),  # (as bound: an AsyncEngine's sync Engine)
            )
        self._scope_tenant(tenant)

    def _scope_tenant(self, tenant: str | int | None) -> None:
        placement = self._placement
        if tenant is None:
            tenant = _scope.tenant_var.get()
            if tenant is None and (placement is None or not placement.tenant_rules()):
                return
        hooks = _scope.hooks()
        if hooks is None or placement is None:
            raise ConfigurationError(
                "a tenant-scoped session needs a placement with TenantSharding rules "
                "(shardsession.tenancy)"
            )
        hooks.on_session(self, tenant)  # (checks its type: not str() of anything)

    @property
    def tenant(self) -> str | None:
        """The tenant this session is scoped to, or ``None``. Fixed for the session's
        life: setting it raises :class:`~shardsession.exc.TenantIsolationError`."""
        return self._tenant

    @tenant.setter
    def tenant(self, value: Any) -> None:
        raise TenantIsolationError(
            f"the tenant of a session cannot be changed (from {self._tenant!r} to "
            f"{value!r}): create another session",
            tenant=self._tenant,
        )

    def _shardsession_root_begins(self) -> None:
        # (a session created before its class's listeners were cleared gets them back
        # before its next transaction: see _install_hooks)
        _ensure_hooks()

    def _route_if_other_listeners(self, class_listeners: Sized) -> None:
        # Our executor is a class-level listener (no per-session registration cost) as
        # long as it is the only one. When the class or a sessionmaker carries other
        # do_orm_execute listeners (``class_listeners``, a live collection: its length is
        # current), it is registered on this instance instead, where SQLAlchemy registers
        # its own: those listeners then run first, once per statement, and the choosers
        # see what they did.
        if len(class_listeners) > 1:
            self._route_on_instance = True
            event.listen(self, "do_orm_execute", execute, retval=True)

    # -- shards ------------------------------------------------------------------------------

    @property
    def shards(self) -> Mapping[str, Engine | Connection]:
        """The shard ids and their binds (read-only view)."""
        return dict(self._shards)

    def bind_shard(self, shard_id: Any, bind: Any) -> None:
        """Add or replace the bind (Engine) of ``shard_id``.

        Shard ids are strings by convention; like SQLAlchemy's class, any hashable id other
        than ``None`` and ``""`` is accepted (a ``placement`` needs strings).

        :raises ConfigurationError: ``shard_id`` would name the same decider inside an
            xid as another configured shard (the same text, or the same token); nothing
            is changed.
        """
        try:
            hash(shard_id)
        except TypeError:
            raise ConfigurationError(f"shard ids must be hashable, not {shard_id!r}") from None
        if shard_id is None or shard_id == "":
            raise ConfigurationError(f"a shard id cannot be {shard_id!r}")
        # An AsyncEngine (AsyncSession(sync_session_class=ShardedSession, shards=...)):
        # the sync session works on the Engine behind it.
        bind = _compat.sync_bind(bind)
        if not isinstance(bind, Engine | Connection) and not hasattr(bind, "connect"):
            raise ConfigurationError(f"shard {shard_id!r}: bind must be an Engine, not {bind!r}")
        try:  # an xid names its decider by shard id: two ids must never name one
            check_shard_ids([*(s for s in self._shards if s != shard_id), shard_id])
        except ValueError as e:
            raise ConfigurationError(str(e)) from e
        self._shards[shard_id] = bind

    def _check_shard(self, shard_id: Any) -> str:
        if shard_id is None:
            raise NoShardChosenError("the shard chooser returned None", shard_id=None)
        if shard_id not in self._shards:
            raise UnknownShardError(
                f"unknown shard id {shard_id!r}; configured shards are "
                f"{sorted(self._shards, key=repr)}",
                shard_id=shard_id,
            )
        return shard_id  # type: ignore[no-any-return]

    def _shard_for(self, mapper: Any, instance: Any, **kw: Any) -> str:
        if instance is not None:
            try:
                state = instance_state(instance)
            except NO_STATE as err:  # (what Session.add() raises for it)
                raise UnmappedInstanceError(instance) from err
            if not self._shards:
                raise _unbound(mapper if mapper is not None else state.mapper, kw.get("clause"))
            token = _compat.identity_token_of(state)
            if token is not None:
                return token if token in self._shards else self._check_shard(token)
            if mapper is None:
                mapper = state.mapper
        if mapper is not None and not isinstance(mapper, Mapper):
            mapper = _mapper_of(mapper)
        if not self._shards:
            raise _unbound(mapper, kw.get("clause"))
        if mapper is None:
            if len(self._shards) == 1:  # nothing to choose from: the one shard, as a
                only: str = next(iter(self._shards))  # plain Session's one bind
                return only
            raise RoutingError(
                "cannot choose a shard without a mapper or instance; pass "
                "bind_arguments={'shard_id': ...}",
                shard_id=None,
            )
        shard_id = self._check_shard(self.shard_chooser(mapper, instance, **kw))
        if instance is not None:
            _compat.set_identity_token(state, shard_id)
        return shard_id

    def get_bind(
        self,
        mapper: EntityKey[_O] | None = None,
        *,
        shard_id: Any = None,
        instance: Any = None,
        clause: ClauseElement | None = None,
        **kw: Any,
    ) -> Engine | Connection:
        """Return the Engine of ``shard_id`` (chosen by the shard chooser when not given).

        A session with one shard answers it without asking the shard chooser (there is
        nothing to choose from); its statements reach this method as a plain Session's
        do, without ``shard_id``.

        :raises UnknownShardError: the id is not configured.
        :raises NoShardChosenError: the chooser returned ``None``.
        :raises sqlalchemy.exc.UnboundExecutionError: the session has no shard at all (as
            a plain Session without a bind raises it).
        """
        if shard_id is None:
            if instance is None and len(self._shards) == 1:
                if mapper is not None and not isinstance(mapper, Mapper):
                    _mapper_of(mapper)  # (raises for an unmapped class, as Session does)
                return next(iter(self._shards.values()))  # type: ignore[no-any-return]
            shard_id = self._shard_for(mapper, instance, clause=clause)
        bind = self._shards.get(shard_id)
        return bind if bind is not None else self._shards[self._check_shard(shard_id)]

    def connection_callable(
        self,
        mapper: Mapper[Any] | None = None,
        instance: Any = None,
        shard_id: Any = None,
        **kw: Any,
    ) -> Connection:
        """The connection the unit of work uses for ``instance`` (its shard's)."""
        if shard_id is None:
            if instance is not None:  # (_shard_for's first step, without its call)
                state = instance_state(instance)
                key = state.key
                shard_id = key[2] if key is not None else state.identity_token
            if shard_id is None or shard_id not in self._shards:
                shard_id = self._shard_for(mapper, instance)
        elif shard_id not in self._shards:
            self._check_shard(shard_id)
        # The innermost SAVEPOINT's transaction, or the root: asking the root inside
        # begin_nested() would bypass the savepoint (no SAVEPOINT on a shard first
        # touched there, and a rollback to it would keep that shard's rows).
        trans = _compat.connection_owner(self)
        if trans is not None:
            # A flush asks once per object: remember the answers for this transaction
            # (SQLAlchemy's own answer never changes while the transaction lasts), in a
            # dict of ours on the transaction object, which goes away with it.
            cache = getattr(trans, _CONNECTIONS_KEY, None)
            if cache is None:
                cache = {}
                setattr(trans, _CONNECTIONS_KEY, cache)
            conn = cache.get(shard_id)
            if conn is None:
                conn = cache[shard_id] = trans.connection(mapper, shard_id=shard_id)
            return conn  # type: ignore[no-any-return, unused-ignore]
        bind = self._shards[shard_id]
        return bind.connect(**kw) if isinstance(bind, Engine) else bind  # type: ignore[no-any-return, unused-ignore]

    # -- identity lookups --------------------------------------------------------------------

    def get(
        self, entity: EntityKey[_O], ident: Any, *, identity_token: Any = None,
        **kw: Unpack[GetOptions],
    ) -> _O | None:
        """:meth:`Session.get`; with a ``placement`` the key's one shard is looked up
        directly (its identity map, then one SELECT), without asking the execute chooser.

        Everything else (arguments, errors, results) is SQLAlchemy's.
        """
        if identity_token is None and self._tenant is not None:
            identity_token = self._tenancy.identity_token(self, entity)
        if identity_token is None:
            identity_token = _placed.shard_of_identity(self._placement, entity, ident, kw)
        # (GetOptions has SQLAlchemy 2.1's types; 2.0 types populate_existing as bool)
        return super().get(entity, ident, identity_token=identity_token, **kw)  # type: ignore[arg-type, unused-ignore]

    def get_one(
        self, entity: EntityKey[_O], ident: Any, *, identity_token: Any = None,
        **kw: Unpack[GetOptions],
    ) -> _O:
        """:meth:`Session.get_one`, routed like :meth:`get`."""
        if identity_token is None and self._tenant is not None:
            identity_token = self._tenancy.identity_token(self, entity)
        if identity_token is None:
            identity_token = _placed.shard_of_identity(self._placement, entity, ident, kw)
        # (GetOptions has SQLAlchemy 2.1's types; 2.0 types populate_existing as bool)
        return super().get_one(entity, ident, identity_token=identity_token, **kw)  # type: ignore[arg-type, unused-ignore]

    def merge(self, instance: _O, *, load: bool = True, options: Any = None) -> _O:
        """:meth:`Session.merge`; in a tenant-scoped session the merged object must be
        the tenant's (checked after the copy, before it is returned).

        With ``load=False``, a detached object keyed without a shard (a
        ``make_transient_to_detached`` copy, say) is merged under its shard's identity
        token, chosen by the shard chooser (the placement) from its attributes: keyed
        with none it was a second copy of the object ``get()`` loads from its shard.
        (Objects merged along its cascades are not re-keyed.)

        :raises TenantIsolationError: it is another tenant's; it is expunged again.
        :raises RoutingError: ``load=False`` and no shard can be chosen for it.
        """
        state: Any = None if load else inspect(instance, raiseerr=False)
        key = state.key if state is not None else None  # (unmapped: super() says so)
        if state is not None and key is not None and key[2] is None and self._shards:
            shard = self._check_shard(self.shard_chooser(state.mapper, instance, None))
            state.key = (key[0], key[1], shard)  # (the key merge() reads; restored below)
            try:
                merged = super().merge(instance, load=load, options=options)
            finally:
                state.key = key
        else:
            merged = super().merge(instance, load=load, options=options)
        if self._tenant is not None:
            self._tenancy.check_object(self, merged)
        return merged

    def _shardsession_save_mappings(
        self, mapper: Mapper[Any], mappings: list[Any], *, isupdate: bool, isstates: bool,
        return_defaults: bool, update_changed_only: bool, render_nulls: bool,
    ) -> None:
        """``bulk_save_objects`` / ``bulk_insert_mappings`` / ``bulk_update_mappings``:
        each object or row to its shard (see :func:`shardsession._bulk.save_mappings`)."""
        if self._tenancy is not None:
            self._tenancy.check_mappings(self, mapper, mappings, isupdate=isupdate,
                                         isstates=isstates)
        _bulk.save_mappings(
            self, mapper, mappings, isupdate=isupdate, isstates=isstates,
            return_defaults=return_defaults, update_changed_only=update_changed_only,
            render_nulls=render_nulls,
        )

    def _shardsession_naming(self, engine: Any) -> str:
        """The coordinator's name for a branch on ``engine``: its shard id."""
        return _shard_name(self._shards, engine)

    @property
    def placement(self) -> Placement | None:
        return self._placement


#: ShardedSession arguments (the shards mapping by id) -> (a copy of that mapping, the
#: attributes a session built from them got). The copy is compared, so a reused id or a
#: changed mapping misses; only validated configurations are recorded.
_known_configs: dict[Any, tuple[dict[Any, Any], tuple[Any, ...], Sized, dict[Any, Any]]] = {}
#: a flush's connection per shard, kept on the session transaction (see connection_callable)
_CONNECTIONS_KEY = "_shardsession_connections"
_SHARED_ATTRIBUTES = ("_placement", "atomic", "fanout_max_workers", "fanout_timeout",
                      "shard_chooser", "identity_chooser", "execute_chooser", "_coordinator")


def _unbound(mapper: Any, clause: Any) -> UnboundExecutionError:
    """The error of a plain Session with no bind, for a session with no shard: there is
    nothing to run on (the message is SQLAlchemy's, naming the mapper or expression)."""
    if mapper is None and clause is None:
        return UnboundExecutionError(
            "This session is not bound to a single Engine or Connection, and no context "
            "was provided to locate a binding (a ShardedSession without shards)."
        )
    context = []
    if mapper is not None:
        context.append(f"mapper {mapper}")
    if clause is not None:
        context.append("SQL expression")
    return UnboundExecutionError(
        f"Could not locate a bind configured on {', '.join(context)} or this Session "
        "(a ShardedSession without shards)."
    )


def _mapper_of(entity: Any) -> Mapper[Any]:
    """The mapper of a mapped class, aliased class or mapper, read as
    :meth:`Session.get_bind` reads its ``mapper`` argument (an unmapped class raises
    :class:`~sqlalchemy.orm.exc.UnmappedClassError`, anything else that cannot be
    inspected :class:`~sqlalchemy.exc.NoInspectionAvailable`)."""
    try:
        inspected = inspect(entity)
    except NoInspectionAvailable as err:
        if isinstance(entity, type):
            raise UnmappedClassError(entity) from err
        raise
    mapper = getattr(inspected, "mapper", None)
    if not isinstance(mapper, Mapper):
        raise RoutingError(
            f"cannot choose a shard for {entity!r}: not a mapped class or mapper; pass "
            "bind_arguments={'shard_id': ...}",
            shard_id=None,
        )
    return mapper


def _engine_of(bind: Any) -> Any:
    return getattr(bind, "engine", bind)


def _shard_name(shards: Mapping[Any, Any], engine: Any) -> str:
    """The name of the (first) shard bound to ``engine``; its ``repr`` when none is (the
    coordinator names branches with it)."""
    for name, bind in shards.items():
        if bind is engine or _engine_of(bind) is engine:
            return str(name)
    return repr(engine)


_default_coordinators: dict[tuple[str, str | None], Any] = {}
_default_lock = threading.Lock()


def _coordinator_for(session: ShardedSession, coordinator: Any, decider: str | None) -> Any:
    """The session's coordinator: the one given, or one shared per (atomic, decider) so
    capability checks are cached once per engine, not once per session."""
    if coordinator is None:
        key = (session.atomic, decider)
        coordinator = _default_coordinators.get(key)
        if coordinator is None:
            with _default_lock:
                coordinator = _default_coordinators.get(key)
                if coordinator is None:
                    coordinator = TransactionCoordinator(atomic=session.atomic, decider=decider)
                    _default_coordinators[key] = coordinator
    elif decider is not None:
        raise ConfigurationError("pass decider= to the TransactionCoordinator, not both")
    # No attach(): the class-level listeners below hand the session's transactions to the
    # coordinator, and the coordinator names branches with _shardsession_naming (a
    # method, so nothing is stored per session; a new session has no transaction yet).
    return coordinator


# (The listeners below are registered on ShardedSession: ``session`` is one, and its
# class defaults cover the attributes __init__ sets. Each accepts being called with other
# arguments, or none: ``session.dispatch.before_flush()`` calls every class-level listener
# of the event with whatever it is given, and a plain Session's listeners are then not
# reached with an error of ours.)


def _before_flush(session: Any = None, *args: Any) -> None:
    if not isinstance(session, ShardedSession):
        return
    placement = session._placement
    if session._tenancy is not None:
        session._tenancy.before_flush(session)
    if placement is not None:
        written = place_flush(session, placement, session._shards)
        if len(written) > 1 and session._coordinator is not None:
            session._early = session._coordinator.begin_early(session, written)


def _after_flush(session: Any = None, *args: Any) -> None:
    if not isinstance(session, ShardedSession):
        return
    if session._early:
        early.join(session._early)
    placement = session._placement
    if placement is not None and placement.has_broadcast:
        replicate_broadcast(session, placement)


def _after_begin(
    session: Any = None, transaction: Any = None, connection: Any = None, *args: Any
) -> None:
    if connection is not None and isinstance(session, ShardedSession):
        begin_listener(session, transaction, connection)
        if session._tenant is not None and not transaction.nested:
            session._tenancy.after_begin(session, connection)


def _execute_from_class(orm_context: ORMExecuteState | None = None) -> Result[Any] | None:
    if orm_context is None:
        return None
    session: Any = orm_context.session
    if session._route_on_instance:
        return None  # the instance-level registration routes (after other listeners)
    if session._tenancy is None and _compat.route_identity_load(
        orm_context, session._shards, TIMEOUT_OPTION
    ):
        return None  # (execute()'s first step, without its frame: get() and lazy loads)
    return execute(orm_context)


def _forget_shard(session: Any = None, state: Any = None) -> None:
    # An object added as new is placed anew: a shard it carries from an earlier life
    # (make_transient() keeps InstanceState.identity_token, and so does a rollback of
    # its INSERT) belonged to the key it had then, which may have changed since.
    # (Registered raw: SQLAlchemy would otherwise wrap it, and the wrapper is not the
    # function _ensure_hooks looks for in the listener collection.)
    if getattr(state, "identity_token", None) is not None:
        _compat.set_identity_token(state, None)


# Class-level listeners: registered once, they apply to every ShardedSession (and subclass)
# instance without the per-instance registration cost (an instance-level listen() costs
# some 8 us per event and session). (No after_transaction_create listener:
# ShardedSession's root transactions are born coordinated, see _compat.CoordinatedRoots.
# No after_transaction_end listener: a coordinated root transaction ends its global
# transaction in its own close().)
_HOOKS: tuple[tuple[str, Callable[..., Any], dict[str, Any]], ...] = (
    ("do_orm_execute", _execute_from_class, {"retval": True}),
    ("before_flush", _before_flush, {}),
    ("after_flush", _after_flush, {}),
    ("after_begin", _after_begin, {}),
    ("transient_to_pending", _forget_shard, {"raw": True}),
)
#: (the live class-level listener collection of ShardedSession, our listener) per hook
_HOOK_CHECKS: tuple[tuple[Collection[Any], Callable[..., Any]], ...] = ()
_hooks_lock = threading.Lock()


def _install_hooks() -> None:
    """Register the hooks that are missing from ShardedSession's class-level listeners.

    A user's test suite may remove every class-level Session listener between tests
    (SQLAlchemy's own fixtures run ``SessionEvents._clear()`` after each test, which
    empties the collections of every Session class, ours included): without these hooks
    a session would neither route statements nor run the commit protocol. Every new
    session and every new root transaction checks (one membership test per hook) and
    puts back what is missing. Re-registering on ShardedSession reaches its subclasses
    (sessionmakers' classes) too.
    """
    global _HOOK_CHECKS
    with _hooks_lock:  # (two sessions healing at once must not register a hook twice)
        for name, fn, kw in _HOOKS:
            if fn not in _compat.class_listener_list(ShardedSession, name):
                event.listen(ShardedSession, name, fn, **kw)
        _HOOK_CHECKS = tuple(
            (_compat.class_listener_list(ShardedSession, name), fn) for name, fn, _kw in _HOOKS
        )


def _ensure_hooks() -> None:
    for listeners, fn in _HOOK_CHECKS:
        if fn not in listeners:
            _install_hooks()
            return


_install_hooks()
