"""The choosers a :class:`~shardsession.routing.Placement` gives a sharded session.

A session built with ``placement=`` routes through these instead of user-written
``shard_chooser`` / ``identity_chooser`` / ``execute_chooser`` callables; each takes the
placement explicitly, and none keeps state of its own beyond the placement's caches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import inspect
from sqlalchemy.ext.horizontal_shard import set_shard_id
from sqlalchemy.orm import Mapper, ORMExecuteState
from sqlalchemy.sql import Delete, Insert, Select, Update
from sqlalchemy.sql.elements import BindParameter
from sqlalchemy.sql.util import find_tables

from . import _compat
from ._execute import mappers_of_tables, tables_of
from .exc import RoutingError, UnsupportedQueryError
from .query._unrelated import unrelated_subquery
from .routing.placement import Placement
from .routing.strategies import Broadcast

__all__ = [
    "choosers",
    "execute_chooser",
    "identity_chooser",
    "shard_chooser",
    "shard_of_identity",
]


def shard_of_identity(
    placement: Placement | None, entity: Any, ident: Any, kw: Mapping[str, Any]
) -> Any:
    """The one shard a placed primary key maps to, or ``None`` (SQLAlchemy's path then
    decides, with its own errors for malformed keys)."""
    if placement is None:
        return None
    if kw:
        bind_arguments = kw.get("bind_arguments")
        if bind_arguments and bind_arguments.get("shard_id") is not None:
            return None
        if "_sa_shard_id" in (kw.get("execution_options") or {}):
            return None
        if any(isinstance(o, set_shard_id) for o in kw.get("options") or ()):
            return None
    # entity -> (its mapper, primary key width, single-column key strategy and the key's
    # position in the primary key, or None), or None when the entity is not placed
    routes: dict[Any, _IdentityRoute | None] | None = placement.cache.get("identity_routes")
    if routes is None:
        routes = placement.cache.setdefault("identity_routes", {})
    route = routes.get(entity, _UNSEEN)
    if route is _UNSEEN:
        route = routes[entity] = _identity_route(placement, entity)
    if route is None:
        return None
    mapper, width, strategy, at = route
    kind = type(ident)
    if (kind is int or kind is str) and width == 1 and strategy is not None:
        try:  # the most common case of all, in short: one int or str key column
            return strategy.shard_for(ident)
        except RoutingError:
            return None  # no shard holds it: SQLAlchemy's path decides (finds nothing)
    if kind is tuple:
        pk = ident
    elif kind is int or kind is str:  # the common scalar keys, without ABC checks
        pk = (ident,)
    elif isinstance(ident, Mapping):
        return None  # {attribute: value}: SQLAlchemy's path decides
    elif isinstance(ident, (tuple, list)):
        pk = tuple(ident)
    else:
        pk = (ident,)
    if len(pk) != width or None in pk:
        return None
    if strategy is not None:  # the common case: one key column, part of the primary key
        try:
            return strategy.shard_for(pk[at])
        except RoutingError:
            return None  # no shard holds it: SQLAlchemy's path decides (finds nothing)
    shards = placement.shards_for_identity(mapper, pk)
    return shards[0] if len(shards) == 1 else None


_IdentityRoute = tuple[Mapper[Any], int, Any, int]
_UNSEEN: Any = object()


def _identity_route(placement: Placement, entity: Any) -> _IdentityRoute | None:
    mapper = getattr(inspect(entity, raiseerr=False), "mapper", None)
    if not (isinstance(mapper, Mapper) and placement.is_placed(mapper)):
        return None
    r = placement.resolve(mapper)
    if r.strategy is not None and r.pk_is_key and len(r.key_in_pk) == 1:
        return mapper, len(mapper.primary_key), r.strategy, r.key_in_pk[0]
    return mapper, len(mapper.primary_key), None, 0


def choosers(
    placement: Placement,
) -> tuple[Callable[..., str], Callable[..., list[str]], Callable[[ORMExecuteState], list[str]]]:
    """The shard, identity and execute choosers a session with ``placement`` uses (made
    once per placement; they refer to the placement only, never to a session)."""
    found: Any = placement.cache.get("choosers")
    if found is None:

        def placed_shard_chooser(mapper: Any, instance: Any, clause: Any = None,
                                 **kw: Any) -> str:
            return shard_chooser(placement, mapper, instance, clause)

        def placed_identity_chooser(mapper: Mapper[Any], primary_key: Any, *,
                                    lazy_loaded_from: Any = None, **kw: Any) -> list[str]:
            return identity_chooser(placement, mapper, primary_key, lazy_loaded_from)

        def placed_execute_chooser(orm_context: ORMExecuteState) -> list[str]:
            return execute_chooser(placement, orm_context)

        found = placement.cache["choosers"] = (
            placed_shard_chooser, placed_identity_chooser, placed_execute_chooser)
    return found  # type: ignore[no-any-return]


def shard_chooser(placement: Placement, mapper: Any, instance: Any, clause: Any = None) -> str:
    """The shard of ``instance`` (or of the one shard ``clause`` can touch).

    :raises RoutingError: no instance, and the clause does not pin one shard.
    """
    if instance is not None:
        return placement.shard_for_instance(mapper, inspect(instance))
    where = getattr(clause, "whereclause", None) if clause is not None else None
    shards = placement.shards_for_clause(mapper, where)
    if len(shards) == 1:
        return shards[0]
    raise RoutingError(
        f"cannot choose one shard for {mapper.class_.__name__} without an instance "
        f"(it may be on any of {shards}); pass bind_arguments={{'shard_id': ...}}",
        shard_id=None,
    )

def identity_chooser(
    placement: Placement, mapper: Mapper[Any], primary_key: Any, lazy_loaded_from: Any = None
) -> list[str]:
    """The shards a primary key may be on (the parent's, for a lazy load)."""
    if lazy_loaded_from is not None:
        token = _compat.identity_token_of(lazy_loaded_from)
        if token is not None and not isinstance(placement.resolve(mapper).rule, Broadcast):
            return [token]
    pk = primary_key if isinstance(primary_key, tuple | list) else (primary_key,)
    return placement.shards_for_identity(mapper, pk)

def execute_chooser(placement: Placement, orm_context: ORMExecuteState) -> list[str]:
    """The shards a statement must run on: pruned by its WHERE clause on the shard key.

    :raises UnsupportedQueryError: it relates rows that may be on different shards.
    """
    stmt = orm_context.statement
    for_write = isinstance(stmt, Update | Delete | Insert)
    params = orm_context.parameters if isinstance(orm_context.parameters, dict) else {}
    where = getattr(stmt, "whereclause", None)
    mappers = [m for m in orm_context.all_mappers if placement.is_placed(m)]
    if not mappers:
        mappers = mappers_of_tables(placement, stmt)
    if not mappers:
        return list(placement.shards)
    if isinstance(stmt, Select | Update | Delete) or for_write:
        candidates: list[str] | None = None
        keyed = [m for m in mappers if not isinstance(placement.resolve(m).rule, Broadcast)]
        one_shard_refusal = None
        if isinstance(stmt, Update | Delete):
            _check_write_subqueries(placement, stmt)
        if isinstance(stmt, Select) or len(keyed) > 1:
            # Sharded tables joined in without being selected route the statement too.
            keyed, one_shard_refusal = _checked_keyed(placement, keyed, stmt)
        for m in keyed or mappers:
            found = placement.shards_for_clause(m, where, params, for_write=for_write)
            candidates = found if candidates is None else [s for s in candidates if s in found]
        assert candidates is not None
        if isinstance(stmt, Update):
            for m in keyed:
                _refuse_key_change(placement, m, stmt, params, candidates)
        if one_shard_refusal is not None and len(candidates) == 1:
            message, construct = one_shard_refusal
            raise UnsupportedQueryError(message, shard_id=None, construct=construct)
        if not candidates:
            # The WHERE clause can match no row: ask one shard, for an empty result of
            # the right shape.
            return placement.all_candidates(mappers[0])[:1] or list(placement.shards)[:1]
        return candidates
    return list(placement.shards)


def _refuse_key_change(placement: Placement, mapper: Mapper[Any], stmt: Any,
                       params: Mapping[str, Any], shards: Sequence[str]) -> None:
    """Refuse an UPDATE that sets ``mapper``'s shard key (or the foreign key that places
    a follower) to a value whose shard is not the one shard the statement runs on: the
    rows would stay on their old shard under a key that places them elsewhere (no read
    finds them again). A value the statement cannot show (an SQL expression) is refused
    too.

    :raises RoutingError: before anything is sent, as changing the key of a loaded object
        is refused at flush.
    """
    r = placement.resolve(mapper)
    if r.strategy is None:
        return
    table = _compat.dml_table(stmt)
    names = {c.name: i for i, c in enumerate(r.columns) if getattr(c, "table", None) is not None
             and _compat.deannotated(c.table) is table}
    if not names:
        return
    new: dict[int, Any] = {}
    opaque = False
    for key, value in _compat.update_set_pairs(stmt):
        if isinstance(key, str):
            prop = mapper.attrs.get(key)
            columns = getattr(prop, "columns", None)
            name = columns[0].name if columns else key
        else:
            name = getattr(key, "name", None)
        if name not in names:
            continue
        if isinstance(value, BindParameter):
            new[names[name]] = params.get(value.key, value.effective_value)
        else:
            opaque = True
    if not new and not opaque:
        return
    what = f"an UPDATE setting the shard key of {mapper.class_.__name__}"
    if opaque or len(new) != len(r.columns):
        raise RoutingError(
            f"{what} to a value the statement does not show (an SQL expression, or part "
            "of a composite key) would leave rows on a shard their new key does not "
            "place them on; moving rows between shards is not supported: insert a new "
            "row and delete the old one", shard_id=None)
    values = tuple(new[i] for i in range(len(r.columns)))
    target = r.strategy.shard_for(values[0] if len(values) == 1 else values)
    if list(shards) != [target]:
        raise RoutingError(
            f"{what} to {values[0] if len(values) == 1 else values!r} would move its rows "
            f"to shard {target!r} from {', '.join(map(repr, shards))}; moving rows between "
            "shards is not supported: insert a new row and delete the old one",
            shard_id=target)


_JOIN_VERDICTS = "join_verdicts"
_JOIN_VERDICTS_MAX = 2048
_WRITE_VERDICTS = "write_subquery_verdicts"


def _check_write_subqueries(placement: Placement, stmt: Any) -> None:
    """Refuse an UPDATE or DELETE whose subquery is not related to its rows along the
    placement, on one shard or many alike: ``UPDATE users SET score = (SELECT max(score)
    FROM users)`` would set each shard's own maximum. The verdict is cached by the
    statement's structure, like the SELECT checks'.

    :raises UnsupportedQueryError: such a subquery; nothing was sent to any shard.
    """
    refusal: str | None = _cached_verdict(
        placement, _WRITE_VERDICTS, stmt, lambda: _write_refusal(placement, stmt))
    if refusal is not None:
        raise UnsupportedQueryError(
            refusal, shard_id=None,
            construct="subquery not related along the placement relationship")


def _write_refusal(placement: Placement, stmt: Any) -> str | None:
    written = _sharded_mappers(placement, [_compat.dml_table(stmt)])
    in_subqueries = [m for m in _sharded_mappers(
        placement, find_tables(stmt, check_columns=True, include_aliases=True))
        if m not in written]
    if in_subqueries and not placement.colocated(
            [m.local_table for m in [*written, *in_subqueries]]):
        return _not_placed_with(in_subqueries, written)
    return unrelated_subquery(stmt, placement)


def _not_placed_with(in_subqueries: list[Mapper[Any]], routed: list[Mapper[Any]]) -> str:
    return (
        "a subquery reads " + ", ".join(sorted({m.class_.__name__ for m in in_subqueries}))
        + ", which is not placed with "
        + (", ".join(sorted({m.class_.__name__ for m in routed})) or "the written table")
        + ": it would see only the rows of the shard it runs on"
    )


def _cached_verdict(placement: Placement, cache_name: str, stmt: Any,
                    compute: Callable[[], Any]) -> Any:
    """``compute()`` for ``stmt``, cached in the placement by SQLAlchemy's cache key of
    the statement (its structure; not cached when it has none)."""
    key = _compat.statement_cache_key(stmt)
    verdicts: dict[Any, Any] = placement.cache.setdefault(cache_name, {})
    if key is not None and key in verdicts:
        return verdicts[key]
    verdict = compute()
    if key is not None:
        if len(verdicts) >= _JOIN_VERDICTS_MAX:
            verdicts.clear()
        verdicts[key] = verdict
    return verdict


def _checked_keyed(
    placement: Placement, keyed: list[Mapper[Any]], stmt: Any
) -> tuple[list[Mapper[Any]], tuple[str, str] | None]:
    """The sharded mappers that route ``stmt``: ``keyed`` (its placed entities) plus the
    sharded tables of its FROM list (joined in without being selected); and a refusal
    (message, construct) for the case the statement runs on one shard only: a subquery
    over the statement's own sharded tables that is not related to its rows along the
    placement (``(SELECT avg(score) FROM users)`` in a query of one user would average
    that user's shard only). A fan-out leaves that case to the fan-out checks of
    :mod:`shardsession.query`, which name it more precisely.

    Refuses, before any shard is asked, a statement whose answer would need rows of
    several shards paired: each shard would pair only its own rows, silently dropping the
    pairs one database would return.

    The answer depends only on the statement's structure, so it is cached by
    SQLAlchemy's cache key (working out an ORM statement's FROM list costs a compile).

    :raises UnsupportedQueryError: the tables are placed independently; or co-located but
        not related along their placement (joined on other columns, or not at all); or a
        subquery reads sharded tables that the statement's own FROM list does not route
        by (a statement over replicated or pinned tables would see one shard's rows).
    """
    def compute() -> tuple[tuple[Mapper[Any], ...], _Refusal, _Refusal]:
        return _routing_facts(placement, keyed, stmt)

    if isinstance(stmt, Select):
        routed, refusal, one_shard_refusal = _cached_verdict(
            placement, _JOIN_VERDICTS, stmt, compute)
    else:  # (a multi-table write: its keyed mappers come from the caller, not cached)
        routed, refusal, one_shard_refusal = compute()
    if refusal is not None:
        message, construct = refusal
        raise UnsupportedQueryError(message, shard_id=None, construct=construct)
    return list(routed), one_shard_refusal


_Refusal = tuple[str, str] | None


def _sharded_mappers(placement: Placement, tables: Iterable[Any]) -> list[Mapper[Any]]:
    return [m for m in placement.mappers_for_tables(list(tables))
            if not isinstance(placement.resolve(m).rule, Broadcast)]


def _routing_facts(
    placement: Placement, keyed: list[Mapper[Any]], stmt: Any
) -> tuple[tuple[Mapper[Any], ...], _Refusal, _Refusal]:
    froms: Sequence[Any] = ()
    one_shard_refusal: _Refusal = None
    if isinstance(stmt, Select):
        froms = _compat.final_froms_without_eager_joins(stmt)
        keyed = [*keyed, *(m for m in _sharded_mappers(placement, tables_of(froms))
                           if m not in keyed)]
        in_subqueries = [m for m in _sharded_mappers(
            placement, find_tables(stmt, check_columns=True, include_aliases=True))
            if m not in keyed]
        if in_subqueries:
            names = ", ".join(sorted({m.class_.__name__ for m in in_subqueries}))
            if not keyed:
                return (), (
                    f"a subquery reads the sharded {names}, but the statement itself reads "
                    "only replicated tables and would run on one shard, seeing that "
                    "shard's rows only",
                    "subquery over sharded tables in a statement over replicated tables",
                ), None
            if not placement.colocated([m.local_table for m in [*keyed, *in_subqueries]]):
                return (), (
                    _not_placed_with(in_subqueries, keyed),
                    "subquery over tables that are not co-located",
                ), None
            unrelated = unrelated_subquery(stmt, placement)
            if unrelated is not None:
                return (), (
                    unrelated, "subquery not related along the placement relationship"), None
        elif keyed:
            # Subqueries over the statement's own tables only (e.g. a global aggregate of
            # the same table): wrong on one shard; a fan-out's checks see them.
            unrelated = unrelated_subquery(stmt, placement)
            if unrelated is not None:
                one_shard_refusal = (
                    unrelated, "subquery not related along the placement relationship")
    refusal = _cross_shard_pairs(placement, keyed, stmt, froms) if len(keyed) > 1 else None
    return tuple(keyed), refusal, one_shard_refusal


def _cross_shard_pairs(
    placement: Placement, keyed: list[Mapper[Any]], stmt: Any, froms: Sequence[Any]
) -> tuple[str, str] | None:
    names = ", ".join(sorted({m.class_.__name__ for m in keyed}))
    if not placement.colocated([m.local_table for m in keyed]):
        return (
            f"the statement relates rows of {names}, which are placed independently and "
            "may be on different shards",
            "join of tables that are not co-located",
        )
    if isinstance(stmt, Select):
        apart = placement.joined_apart(keyed, froms, stmt.whereclause)
        if apart:
            return (
                f"the statement relates rows of {names} but does not join "
                + " with ".join("(" + ", ".join(g) + ")" for g in apart)
                + " along their placement relationship (a child's foreign key to its "
                "parent): rows it would pair may be on different shards",
                "join not along the placement relationship",
            )
    return None
