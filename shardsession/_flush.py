"""Flush-time placement: assign every new object a shard and refuse cross-shard links.

Runs in ``before_flush``, so any error is raised before a single statement is sent:
nothing is written when placement fails.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, delete, insert, update
from sqlalchemy.orm import Mapper, Session
from sqlalchemy.orm.attributes import get_history, instance_state
from sqlalchemy.orm.state import InstanceState

from ._compat import flush_states, identity_token_of, set_identity_token
from .exc import CrossShardError, RoutingError
from .routing.placement import Placement, naming_mapper
from .routing.strategies import Broadcast, Follows

__all__ = ["place_flush", "replicate_broadcast"]


@dataclass(frozen=True)
class _Plan:
    """What the flush checks need to know about one mapper (computed once)."""

    broadcast: bool
    follows: bool
    strategy: Any
    attrs: tuple[str, ...]
    key_attr: str | None  # the one key attribute of a strategy placing by one attribute
    o2m: tuple[str, ...]  # one-to-many relationship keys (children to place)
    links: tuple[str, ...]  # relationship keys whose targets must share the shard


def _plans(placement: Placement) -> dict[Mapper[Any], _Plan]:
    plans: dict[Mapper[Any], _Plan] | None = placement.cache.get("flush_plans")
    if plans is None:
        plans = placement.cache.setdefault("flush_plans", {})
    return plans


def _plan(placement: Placement, mapper: Mapper[Any]) -> _Plan:
    cache = _plans(placement)
    plan = cache.get(mapper)
    if plan is None:
        r = placement.resolve(mapper)
        broadcast = isinstance(r.rule, Broadcast)
        rels = [p for p in mapper.relationships if not p.viewonly]
        plan = _Plan(
            broadcast=broadcast,
            follows=isinstance(r.rule, Follows),
            strategy=r.strategy,
            attrs=r.attrs,
            key_attr=r.attrs[0] if r.strategy is not None and len(r.attrs) == 1 else None,
            o2m=tuple(p.key for p in rels if p.direction.name == "ONETOMANY"),
            links=tuple(
                p.key
                for p in rels
                if not (
                    placement.is_placed(p.mapper)
                    and isinstance(placement.resolve(p.mapper).rule, Broadcast)
                )
            )
            if not broadcast and rels
            else (),
        )
        cache[mapper] = plan
    return plan


def _related(state: InstanceState[Any], key: str) -> Iterable[Any]:
    # Only what is loaded: placement never triggers a lazy load inside a flush.
    value = state.dict.get(key)
    if value is None:
        return ()
    if isinstance(value, list | set | tuple):
        return value
    if isinstance(value, dict):
        return value.values()
    if hasattr(value, "__iter__") and not hasattr(value, "_sa_instance_state"):
        return list(value)
    return (value,)


def place_flush(
    session: Session, placement: Placement, shard_ids: Collection[str]
) -> list[str]:
    """Assign shards to the session's new objects and check every link stays on one shard.

    Returns the shards the flush will write, in the order it will most likely write them
    (those of new objects first, in the order they were added).

    :raises CrossShardError: two related objects would be on different shards.
    :raises RoutingError: a new object cannot be placed, or a persistent object's shard
        key changed so that it would belong on another shard.

    Failure semantics: raised from ``before_flush``, before any SQL; no object is
    modified except that new objects may have been assigned their shard.
    """
    known = shard_ids
    new, dirty = flush_states(session)
    if not new and not dirty:
        return []
    plans = placement.cache.get("flush_plans") or _plans(placement)
    written: dict[Any, None] = {}
    # (The loops below are the hot path of a big flush: they look plans up in place and
    # read public InstanceState attributes directly, without a helper call per object.)
    linked: list[InstanceState[Any]] = []  # objects with links to check in step 4

    # 1. Objects placed by their own key, pin or broadcast rule.
    pending: list[InstanceState[Any]] = []
    for state in new:
        mapper = state.mapper
        plan = plans.get(mapper) or _plan(placement, mapper)
        if plan.links:
            linked.append(state)
        token = state.identity_token  # (a pending object has no identity key yet)
        if token is not None:
            written[token] = None
            continue
        if plan.follows:
            pending.append(state)  # placed through its parent first, below
            continue
        if plan.key_attr is not None:
            value = state.dict.get(plan.key_attr)
            if value is not None:
                try:
                    shard = plan.strategy.shard_for(value)
                except RoutingError as e:
                    raise naming_mapper(e, mapper) from e
                if shard not in known:
                    raise _unknown(shard)
                state.identity_token = shard
                written[shard] = None
                continue
        shard = placement.shard_for_instance(mapper, state)
        _assign(state, shard, known)
        written[shard] = None

    # 2. Followers take their parent's shard, through a many-to-one attribute or by being
    #    in a one-to-many collection of a placed object; repeat for grandchildren.
    if pending:
        _place_followers(placement, pending, [*new, *dirty], known)
        written = dict.fromkeys(identity_token_of(state) for state in new)

    # 3. A persistent object whose shard key changed would now belong elsewhere.
    for state in dirty:
        plan = plans.get(state.mapper) or _plan(placement, state.mapper)
        if plan.links:
            linked.append(state)
        identity_key = state.key
        if identity_key is None:
            continue
        written[identity_key[2]] = None
        if plan.strategy is None:
            continue
        changed = state.committed_state  # old values of the attributes set since loaded
        for attr in plan.attrs:
            if attr in changed:
                break
        else:
            continue  # no key attribute was set: get_history() would report no change
        obj = state.obj()
        if obj is not None and any(get_history(obj, a).deleted for a in plan.attrs):
            own = _own_shard(plan, state)
            if own is not None and own != identity_key[2]:
                raise RoutingError(
                    f"changing the shard key of {state.mapper.class_.__name__} would move it from "
                    f"shard {identity_key[2]!r} to {own!r}; moving rows between shards is not "
                    "supported by a flush: delete the object and add a new one",
                    shard_id=identity_key[2],
                )

    # 4. Every link between two sharded objects stays on one shard.
    for state in linked:
        plan = plans[state.mapper]
        shard = identity_token_of(state)
        for key in plan.links:
            for other in _related(state, key):
                ostate = instance_state(other)
                oshard = identity_token_of(ostate)
                if oshard is not None and shard is not None and oshard != shard:
                    raise CrossShardError(
                        f"{state.mapper.class_.__name__} on shard {shard!r} is linked through "
                        f"{key!r} to {ostate.mapper.class_.__name__} on shard {oshard!r}; "
                        "related objects must live on the same shard",
                        shard_id=shard,
                        shard_ids=(shard, oshard),
                    )

    written.pop(None, None)
    return list(written)


def _assign(state: InstanceState[Any], shard: str, known: Collection[str]) -> None:
    if shard not in known:
        raise _unknown(shard)
    set_identity_token(state, shard)


def _unknown(shard: str) -> RoutingError:
    return RoutingError(f"placement chose unknown shard {shard!r}", shard_id=shard)


def _place_followers(
    placement: Placement,
    pending: list[InstanceState[Any]],
    touched: list[InstanceState[Any]],
    known: Collection[str],
) -> None:
    waiting = {id(s): s for s in pending}
    changed = True
    while waiting and changed:
        changed = False
        # parent -> child through collections
        for state in touched:
            shard = identity_token_of(state)
            plan = _plan(placement, state.mapper)
            if shard is None or plan.broadcast:
                continue
            for key in plan.o2m:
                for child in _related(state, key):
                    cstate = instance_state(child)
                    current = identity_token_of(cstate)
                    if current is None and id(cstate) in waiting:
                        _assign(cstate, shard, known)
                        del waiting[id(cstate)]
                        changed = True
                    elif current is not None and current != shard and cstate.key is None:
                        raise CrossShardError(
                            f"{cstate.mapper.class_.__name__} is in collections of objects on "
                            f"shards {current!r} and {shard!r}",
                            shard_id=shard,
                            shard_ids=(current, shard),
                        )
        # child -> parent through many-to-one attributes
        for wkey, state in list(waiting.items()):
            for prop in placement.resolve(state.mapper).parent_props:
                parent = state.dict.get(prop.key)
                if parent is None:
                    continue
                shard = identity_token_of(instance_state(parent))
                if shard is not None:
                    _assign(state, shard, known)
                    del waiting[wkey]
                    changed = True
                    break
    # what is left is placed by its foreign key, or raises a clear error
    for state in waiting.values():
        _assign(state, placement.shard_for_instance(state.mapper, state), known)


def _own_shard(plan: _Plan, state: InstanceState[Any]) -> str | None:
    if plan.strategy is None:
        return None
    values = tuple(state.dict.get(a) for a in plan.attrs)
    if any(v is None for v in values):
        return None
    shard: str = plan.strategy.shard_for(values[0] if len(values) == 1 else values)
    return shard


def _table_values(mapper: Mapper[Any], obj: Any, table: Any) -> dict[str, Any]:
    values = {}
    for col in table.columns:
        try:
            prop = mapper.get_property_by_column(col)
        except Exception:  # a column the mapper does not map: leave it to its default
            continue
        values[col.key] = getattr(obj, prop.key)
    return values


def replicate_broadcast(session: Session, placement: Placement) -> None:
    """Copy this flush's writes to broadcast (reference) objects onto every other shard.

    Called from ``after_flush``: the rows were just written to the object's own shard;
    the same INSERT/UPDATE/DELETE goes to the other shards inside the same session
    transaction, so the commit protocol makes all copies durable together.

    Failure semantics: an error is raised out of the flush, which SQLAlchemy rolls back;
    nothing of the flush stays on any shard.
    """
    if not placement.has_broadcast:
        return
    shards = list(placement.shards)
    work = [(o, "insert") for o in session.new]
    work += [(o, "update") for o in session.dirty if session.is_modified(o)]
    work += [(o, "delete") for o in session.deleted]
    for obj, kind in work:
        state = instance_state(obj)
        mapper = state.mapper
        if not _plan(placement, mapper).broadcast:
            continue
        own = identity_token_of(state)
        tables = list(mapper.tables)
        if kind == "delete":
            tables.reverse()
        for shard in shards:
            if shard == own:
                continue
            conn = session.connection(bind_arguments={"shard_id": shard})
            for table in tables:
                values = _table_values(mapper, obj, table)
                pk = and_(*(c == values[c.key] for c in list(table.primary_key)))
                if kind == "insert":
                    conn.execute(insert(table).values(values))
                elif kind == "update":
                    conn.execute(update(table).where(pk).values(values))
                else:
                    conn.execute(delete(table).where(pk))
