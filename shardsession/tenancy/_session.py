"""What tenant-scoped sessions do: scope statements, check objects, check the shard.

Installed into the session through :mod:`shardsession._scope` when
:mod:`shardsession.tenancy` is imported (the session never imports this package). The
filter is SQLAlchemy's own global-criteria mechanism: ``with_loader_criteria`` options
added in ``do_orm_execute``, which SQLAlchemy applies to every SELECT, UPDATE and DELETE
of the entity, to joins, aliases and relationship loads.
"""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy import and_, event, inspect, or_, select
from sqlalchemy.orm import Mapper, ORMExecuteState, with_loader_criteria
from sqlalchemy.orm.attributes import get_history
from sqlalchemy.sql.elements import BindParameter, ClauseElement, TextClause
from sqlalchemy.sql.util import find_tables

from .. import _scope
from .._compat import (
    POSITIONAL,
    class_listener_list,
    dml_from_select,
    dml_upserts,
    dml_value_sets,
    flush_states,
    loader_options,
)
from ..exc import (
    ConfigurationError,
    TenantIsolationError,
    TenantRequiredError,
    UnsupportedQueryError,
)
from ..routing.placement import Placement
from ..routing.strategies import Broadcast, Pinned
from ._checks import (
    check_bulk_rows,
    check_loaded,
    check_new,
    check_state,
    deleted_states,
    own_new,
)
from ._directory import tenant_key
from ._mappers import TenantMapper, criterion, tenant_mappers, text_of, typed_key
from ._walk import unfiltered_part

__all__ = ["CHECKED_OPTION", "Tenancy"]

#: the execution option that marks a ``text()`` (or Core) statement as checked by the
#: caller for tenant scoping: ``session.execute(text(...), execution_options={
#: CHECKED_OPTION: True})``; it then runs on the tenant's shard, unfiltered
CHECKED_OPTION = "shardsession_tenant_checked"


class Tenancy:
    """The hooks a :class:`~shardsession.ShardedSession` calls (see
    :class:`shardsession._scope.TenancyHooks`)."""

    # -- session creation ------------------------------------------------------------------

    def on_session(self, session: Any, tenant: str | int | None) -> None:
        placement: Placement | None = session._placement
        owned = tenant_mappers(placement) if placement is not None else {}
        if tenant is not None:
            if not owned:
                raise ConfigurationError(
                    "a tenant-scoped session needs a placement with TenantSharding rules"
                )
            session._tenant = tenant_key(tenant)
            for tm in owned.values():  # (an int tenant key needs an int's canonical text)
                typed_key(tm, session._tenant)
            for listeners, fn in _CHECKS:  # (a test suite may have cleared them)
                if fn not in listeners:
                    _install()
                    break
        session._tenancy = self

    # -- statements ------------------------------------------------------------------------

    def on_execute(self, session: Any, orm_context: ORMExecuteState) -> None:
        """Scope a statement to the session's tenant: filter tenant-owned entities, pin
        it to the tenant's shard; refuse what cannot be scoped.

        :raises TenantIsolationError: unscopable SQL (``text()``, a Core statement on a
            tenant table) not marked with :data:`CHECKED_OPTION`; a bulk write of rows
            of another tenant; a bulk UPDATE by primary key.
        :raises TenantRequiredError: no tenant, and a rule refuses unscoped access.
        """
        placement: Placement = session._placement
        owned = tenant_mappers(placement)
        tenant: str | None = session._tenant
        statement = orm_context.statement
        mappers = _placed_mappers(placement, orm_context)
        touched = _touched(owned, mappers)
        if touched or isinstance(statement, TextClause):
            _check_scope(session)
        if tenant is None:
            for tm in touched:
                if not tm.rule.allow_unscoped:
                    raise TenantRequiredError(
                        f"{tm.mapper.class_.__name__} is tenant-owned and its placement "
                        "refuses sessions without a tenant (allow_unscoped=False)",
                        tenant=None,
                    )
            return
        checked = bool(orm_context.execution_options.get(CHECKED_OPTION))
        if not checked and not (orm_context.is_column_load or orm_context.is_relationship_load):
            part = unfiltered_part(statement, owned)
            if part is not None:
                raise TenantIsolationError(
                    f"a tenant-scoped session refuses a statement holding {part}: the "
                    "tenant filter reaches ORM entities only. Use mapped attributes, or "
                    "filter by tenant yourself and pass execution_options="
                    f"{{{CHECKED_OPTION!r}: True}}",
                    tenant=tenant,
                )
        if isinstance(statement, TextClause) or (
            touched and not orm_context.is_orm_statement
        ):
            if not checked:
                raise TenantIsolationError(
                    "a tenant-scoped session does not run text() or Core statements on "
                    "tenant tables: they cannot be filtered by tenant. Use ORM statements, "
                    f"or filter by tenant yourself and pass execution_options="
                    f"{{{CHECKED_OPTION!r}: True}}",
                    tenant=tenant,
                )
            orm_context.bind_arguments["shard_id"] = _tenant_shard(owned, tenant)
            return
        if not touched:
            return
        shard = _tenant_shard(owned, tenant)
        _check_companions(placement, owned, mappers, shard)
        if orm_context.is_insert or orm_context.is_update:
            check_bulk_rows(orm_context, touched, tenant)
            statement = _check_values(statement, touched, tenant, orm_context.is_insert)
        statement = statement.options(*_criteria(placement, owned, tenant))
        if orm_context.is_column_load:
            # (SQLAlchemy leaves with_loader_criteria out of the loads of an object's
            # attributes, refresh() and expired or deferred columns, as the object was
            # filtered when loaded; one that came in detached was not: filter it here,
            # and a row of another tenant is "not present", ObjectDeletedError)
            statement = cast(Any, statement).where(
                *(_row_criterion(tm, tenant) for tm in touched))
        orm_context.statement = statement
        if orm_context.is_select or orm_context.is_update or orm_context.is_delete:
            orm_context.bind_arguments["shard_id"] = shard
            orm_context.update_execution_options(identity_token=shard)
        else:
            orm_context.bind_arguments["shard_id"] = shard

    def identity_token(self, session: Any, entity: Any) -> str | None:
        """The shard ``get()`` looks in: the tenant's, for a tenant-owned entity."""
        tenant = session._tenant
        if tenant is None:
            return None
        _check_scope(session)  # (an identity map hit sends no statement to check)
        owned = tenant_mappers(session._placement)
        mapper = inspect(entity, raiseerr=False)
        mapper = getattr(mapper, "mapper", None)
        if mapper is None or mapper not in owned:
            return None
        return _tenant_shard(owned, tenant)

    # -- flush -----------------------------------------------------------------------------

    def before_flush(self, session: Any) -> None:
        """Give new tenant-owned objects the session's tenant key and refuse other
        tenants' objects and tenant key changes (before any SQL of the flush).

        :raises TenantIsolationError: a new, changed or deleted object of another
            tenant, or a persistent object whose tenant key was changed.
        """
        owned = tenant_mappers(session._placement)
        tenant: str | None = session._tenant
        new, dirty = flush_states(session)
        if new or dirty or session._deleted:
            _check_scope(session)
        for state in new:
            tm = owned.get(state.mapper)
            if tm is not None and tenant is not None:
                own_new(state, tm, tenant)
        for state in [*dirty, *(s for s in deleted_states(session))]:
            tm = owned.get(state.mapper)
            if tm is None:
                continue
            obj = state.obj()
            for attr in tm.attrs:
                if obj is not None and get_history(obj, attr).deleted:
                    raise TenantIsolationError(
                        f"changing the tenant key {attr!r} of a persistent "
                        f"{state.mapper.class_.__name__} is refused: move the tenant with "
                        "move_tenant, or delete the object and add a new one",
                        tenant=tenant,
                    )
            if tenant is not None:
                check_state(state, tm, tenant)
        if tenant is not None:
            _verify_rows(session, owned, tenant, [*dirty, *deleted_states(session)])
        elif owned:
            _check_unscoped_owners(session, owned, [*new, *dirty, *deleted_states(session)])

    def check_object(self, session: Any, instance: Any) -> None:
        """Refuse an object of another tenant in the session (expunged first).

        :raises TenantIsolationError: it is another tenant's.
        """
        check_loaded(session, instance)

    def check_mappings(
        self, session: Any, mapper: Mapper[Any], mappings: list[Any], *, isupdate: bool,
        isstates: bool,
    ) -> None:
        """``bulk_save_objects`` / ``bulk_insert_mappings`` / ``bulk_update_mappings``:
        the rows of a tenant-scoped session must be its tenant's (a missing key is set
        on inserts), and an update by primary key must carry the tenant key in that key.

        :raises TenantIsolationError: before any row is sent.
        """
        tenant: str | None = session._tenant
        if tenant is None:
            return
        tm = tenant_mappers(session._placement).get(mapper)
        if tm is None:
            return
        if isupdate and set(tm.attrs) - {c.key for c in tm.mapper.primary_key}:
            raise TenantIsolationError(
                "a bulk UPDATE by primary key of tenant-owned "
                f"{tm.mapper.class_.__name__} cannot be filtered by tenant (its primary "
                "key does not contain the tenant key): use update(...).where(...) or the "
                "ORM unit of work",
                tenant=tenant,
            )
        for m in mappings:
            row = m.dict if isstates else m
            for attr in tm.attrs:
                value = row.get(attr)
                if value is None and not isupdate:
                    if isstates:
                        setattr(m.obj(), attr, typed_key(tm, tenant))
                    else:
                        row[attr] = typed_key(tm, tenant)
                elif value is not None and text_of(value) != tenant:
                    raise TenantIsolationError(
                        f"a bulk write of a {tm.mapper.class_.__name__} of tenant "
                        f"{text_of(value)!r} in a session of tenant {tenant!r}",
                        tenant=tenant,
                        other_tenant=text_of(value),
                    )

    # -- the shard check -------------------------------------------------------------------

    def after_begin(self, session: Any, connection: Any) -> None:
        """Check that the tenant's shard still holds it, in the transaction just begun
        there (see :meth:`TenantDirectory.check_owner`)."""
        tenant = session._tenant
        owned = tenant_mappers(session._placement)
        rule = next(iter(owned.values())).rule
        shard = rule.directory.entry(tenant)[0]
        bind = session._shards.get(shard)
        if bind is None or getattr(bind, "engine", bind) is not connection.engine:
            return
        rule.directory.check_owner(tenant, shard, connection)


def _check_unscoped_owners(
    session: Any, owned: dict[Mapper[Any], TenantMapper], states: list[Any]
) -> None:
    """A session without a tenant writing tenant-owned rows: check, in the flush's
    transaction on each shard written, that the shard holds each tenant written there
    (what a tenant-scoped session does in ``after_begin``): a process whose directory
    cache is stale after a move would write to the old shard, rows orphaned there.

    :raises StaleTenantDirectoryError: a shard does not hold the tenant (the cache is
        refreshed; roll back and retry).
    """
    pairs: set[tuple[str, str]] = set()
    directory = None
    for state in states:
        tm = owned.get(state.mapper) or next(
            (owned[b] for b in state.mapper.iterate_to_root() if b in owned), None)
        if tm is None:
            continue
        directory = tm.rule.directory
        value = state.dict.get(tm.attrs[0])
        if value is None:
            continue  # (no tenant key: the shard chooser refuses it)
        key = tenant_key(value if type(value) in (str, int) else text_of(value))
        shard = state.key[2] if state.key is not None else (
            state.identity_token or directory.shard_of(key))
        pairs.add((key, shard))
    for key, shard in sorted(pairs):
        assert directory is not None
        conn = session.connection(bind_arguments={"shard_id": shard})
        directory.check_owner(key, shard, conn)


def _check_values(
    statement: Any, touched: list[TenantMapper], tenant: str, is_insert: bool
) -> Any:
    """The VALUES of an ORM ``insert()`` / ``update()`` of a tenant table: a tenant key
    in them must be the session's tenant, given as a plain value; an insert without it
    gets it. Refused: upserts (their ON CONFLICT branch updates a row found by a key that
    need not be the tenant's), ``insert().from_select()`` (the tenant key comes from the
    select), positional multi-VALUES rows.

    :raises TenantIsolationError: before anything is sent.
    """
    name = "INSERT" if is_insert else "UPDATE"
    if is_insert and (dml_upserts(statement) or dml_from_select(statement)):
        raise TenantIsolationError(
            "a tenant-scoped session does not run upserts (ON CONFLICT / ON DUPLICATE KEY) "
            "or insert().from_select() on tenant tables: the row they update or the tenant "
            "key they copy cannot be proven the tenant's",
            tenant=tenant,
        )
    sets = dml_value_sets(statement)
    add: dict[Any, Any] = {}
    for tm in touched:
        for attr, col in zip(tm.attrs, tm.columns, strict=True):
            for values in sets:
                if values is POSITIONAL:
                    raise TenantIsolationError(
                        f"a multi-VALUES {name} of tenant-owned {tm.mapper.class_.__name__} "
                        "with positional rows cannot be checked: give each row as a dict",
                        tenant=tenant,
                    )
                found = [values[k] for k in (col, col.key, col.name, attr) if k in values]
                if not found:
                    if is_insert and len(sets) == 1:
                        add[col] = typed_key(tm, tenant)
                    elif is_insert:
                        raise TenantIsolationError(
                            f"every row of a multi-VALUES INSERT of "
                            f"{tm.mapper.class_.__name__} must give the tenant key {attr!r}",
                            tenant=tenant,
                        )
                    continue
                for v in found:
                    v = getattr(v, "value", v) if isinstance(v, BindParameter) else v
                    if isinstance(v, ClauseElement) or v is None or text_of(v) != tenant:
                        raise TenantIsolationError(
                            f"an {name} of tenant-owned {tm.mapper.class_.__name__} sets "
                            f"the tenant key {attr!r} to {v!r}, not to the session's tenant "
                            f"{tenant!r}",
                            tenant=tenant,
                        )
    return statement.values(add) if add else statement


def _row_criterion(tm: TenantMapper, tenant: str) -> Any:
    key = typed_key(tm, tenant)
    return and_(*(getattr(tm.mapper.class_, a) == key for a in tm.attrs))


def _verify_rows(
    session: Any, owned: dict[Mapper[Any], TenantMapper], tenant: str, states: list[Any]
) -> None:
    """Prove that the rows a flush will UPDATE or DELETE by primary key are the
    tenant's, for objects this session did not load itself (``add()`` of a detached
    object, ``merge(load=False)``, ``make_transient_to_detached``): the unit of work's
    ``UPDATE ... WHERE id = ?`` carries no tenant condition, and the object's tenant key
    is what its builder wrote, not what the row holds. One filtered SELECT of their
    primary keys per mapper, on the tenant's shard, in the flush's transaction.

    :raises TenantIsolationError: a row is not the tenant's (or not on its shard).
    """
    seen: set[Any] = session.__dict__.setdefault("_tenant_rows", set())
    todo: dict[TenantMapper, list[Any]] = {}
    shard: str | None = None
    for state in states:
        key = state.key
        if key is None or key in seen:
            continue
        tm = owned.get(state.mapper) or next(
            (owned[b] for b in state.mapper.iterate_to_root() if b in owned), None)
        if tm is None:
            continue
        if shard is None:
            shard = _tenant_shard(owned, tenant)
        if key[2] is not None and key[2] != shard:
            raise TenantIsolationError(
                f"a {state.mapper.class_.__name__} of shard {key[2]!r} cannot be written by "
                f"a session of tenant {tenant!r}, whose shard is {shard!r}",
                tenant=tenant,
            )
        todo.setdefault(tm, []).append(state)
    for tm, group in todo.items():
        cls = tm.mapper.class_
        pk = [getattr(cls, tm.mapper.get_property_by_column(c).key)
              for c in tm.mapper.primary_key]
        idents = {tuple(s.key[1]) for s in group}
        cond = or_(*(and_(*(c == v for c, v in zip(pk, ident, strict=True)))
                     for ident in idents))
        found = {tuple(r) for r in session.execute(select(*pk).where(cond))}
        missing = idents - found
        if missing:
            raise TenantIsolationError(
                f"{tm.mapper.class_.__name__} {sorted(missing)[0]!r} is not a row of tenant "
                f"{tenant!r}: an object this session did not load cannot be written unless "
                "its row is the tenant's",
                tenant=tenant,
            )
        seen.update(s.key for s in group)


def _check_scope(session: Any) -> None:
    """Refuse a session used inside the :func:`tenant_scope` of another tenant than its
    own (a session kept across requests, by a ``scoped_session`` registry say): the
    request of globex must not be served by the session of acme, nor by one without a
    tenant that reads across tenants."""
    scope = _scope.tenant_var.get()
    if scope is not None and scope != session._tenant:
        raise TenantIsolationError(
            f"a session of tenant {session._tenant!r} is used inside the scope of tenant "
            f"{scope!r}; create the session inside the scope (call remove() on a "
            "scoped_session at the end of each request)",
            tenant=session._tenant,
            other_tenant=scope,
        )


def _tenant_shard(owned: dict[Mapper[Any], TenantMapper], tenant: str) -> str:
    return next(iter(owned.values())).rule.directory.shard_of(tenant)


def _placed_mappers(placement: Placement, orm_context: ORMExecuteState) -> list[Mapper[Any]]:
    """The placed mappers a statement reads or writes: its ORM entities and every table
    in it, joins, subqueries and aliases included (one traversal, no compilation)."""
    mappers: list[Mapper[Any]] = (
        list(orm_context.all_mappers) if orm_context.is_orm_statement else []
    )
    try:
        tables = find_tables(cast(Any, orm_context.statement), include_joins=True,
                             include_aliases=True, include_crud=True)
    except Exception:  # (a statement find_tables cannot walk: its ORM entities only)
        tables = []
    if tables:
        mappers.extend(placement.mappers_for_tables(tables))
    if orm_context.is_orm_statement:  # (a joinedload from a Broadcast mapper into a
        for path, _ in loader_options(orm_context.statement):  # tenant-owned one)
            mappers.extend(m for m in path if placement.is_placed(m))
    return mappers


def _touched(
    owned: dict[Mapper[Any], TenantMapper], mappers: list[Mapper[Any]]
) -> list[TenantMapper]:
    seen: dict[Mapper[Any], TenantMapper] = {}
    for m in mappers:
        for base in m.iterate_to_root():
            tm = owned.get(base)
            if tm is not None:
                seen[tm.mapper] = tm
                break
    return list(seen.values())


def _check_companions(
    placement: Placement, owned: dict[Mapper[Any], TenantMapper],
    mappers: list[Mapper[Any]], shard: str,
) -> None:
    """Refuse a statement that relates tenant-owned rows to rows of a mapper that is
    neither tenant-owned nor on the tenant's shard in full (a ``Broadcast`` table, or one
    ``Pinned`` there): run on the tenant's shard alone it would miss that mapper's rows
    on the other shards, a wrong answer given silently."""
    for m in mappers:
        if m in owned or any(b in owned for b in m.iterate_to_root()):
            continue
        if not placement.is_placed(m):
            continue
        rule = placement.resolve(m).rule
        if isinstance(rule, Broadcast) or (isinstance(rule, Pinned) and rule.shard_id == shard):
            continue
        raise UnsupportedQueryError(
            f"a tenant-scoped statement relates tenant-owned rows to {m.class_.__name__} "
            f"({rule!r}), whose rows are not all on the tenant's shard {shard!r}; query "
            f"{m.class_.__name__} in a statement of its own",
            shard_id=shard,
            construct="join of tenant-owned and sharded mappers",
        )


def _criteria(
    placement: Placement, owned: dict[Mapper[Any], TenantMapper], tenant: str
) -> tuple[Any, ...]:
    """The ``with_loader_criteria`` options of ``tenant`` (immutable: shared by every
    session of the tenant, kept on the placement, whose cache is cleared when its rules
    change; at most 4,096 tenants remembered)."""
    cache: dict[str, tuple[Any, ...]] = placement.cache.setdefault("tenant_criteria", {})
    opts = cache.get(tenant)
    if opts is None:
        opts = tuple(
            with_loader_criteria(
                tm.mapper, criterion(tm.attrs, typed_key(tm, tenant)), include_aliases=True,
                propagate_to_loaders=True,
            )
            for tm in owned.values()
        )
        if len(cache) >= 4096:
            cache.clear()
        cache[tenant] = opts
    return opts


def _on_loaded(session: Any, state: Any) -> None:
    # (registered raw: ``state`` is the InstanceState, and the listener is stored as
    # this very function, which the check in on_session looks for)
    if getattr(session, "_tenant", None) is not None:
        check_loaded(session, state.obj())
        # (loaded through the tenant filter: its row is the tenant's)
        session.__dict__.setdefault("_tenant_rows", set()).add(state.key)


def _on_attached(session: Any, state: Any) -> None:
    # (a detached object: its row is proven the tenant's before a flush writes it)
    if getattr(session, "_tenant", None) is not None:
        check_loaded(session, state.obj())


def _on_new(session: Any, state: Any) -> None:
    if getattr(session, "_tenant", None) is not None:
        check_new(session, state.obj())


def _install() -> None:
    """Register the object checks on ShardedSession (class level: no per-session
    registration cost; sessions without a tenant return at once)."""
    global _CHECKS
    from ..session import ShardedSession

    hooks = (("loaded_as_persistent", _on_loaded), ("detached_to_persistent", _on_attached),
             ("transient_to_pending", _on_new))
    for name, fn in hooks:
        if not event.contains(ShardedSession, name, fn):
            event.listen(ShardedSession, name, fn, raw=True)
    _CHECKS = tuple((class_listener_list(ShardedSession, name), fn) for name, fn in hooks)
    _scope.set_hooks(Tenancy())


#: (the live class-level listener collection, our listener) per object check
_CHECKS: tuple[tuple[Any, Any], ...] = ()


_install()
