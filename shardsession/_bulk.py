"""Bulk writes of a sharded session: every row to its shard, each shard's rows in batches.

``session.execute(insert(M), rows)`` (with ``.returning()`` and the dialects' upserts),
``session.execute(update(M), rows)`` (by primary key), ``bulk_save_objects``,
``bulk_insert_mappings`` and ``bulk_update_mappings`` come here. Every row is given its
shard first: by the placement (the shard key; a follower by the foreign key that carries
its parent's key; a broadcast table on every shard; a pinned table on its shard) or, under
the drop-in constructor, by the shard chooser looking at a transient object built from the
row. A row that cannot be routed raises before anything is sent to any shard. Then each
shard's rows go through SQLAlchemy's own ORM bulk code on that shard's connection (its
insertmanyvalues batching, its handling of keys, defaults and RETURNING), the shards in
parallel, inside the session's transaction: the commit protocol makes them durable
together.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.engine import Connection, Result
from sqlalchemy.engine.result import null_result
from sqlalchemy.orm import Mapper, ORMExecuteState
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.orm.state import InstanceState
from sqlalchemy.sql.elements import BindParameter

from . import _compat
from .exc import CapabilityError, RoutingError, ShardKeyMissingError, ShardSessionError
from .query._fanout import _may_cross_threads, _overlappable, _shared_pool
from .routing.placement import naming_mapper
from .routing.strategies import Broadcast, Follows

__all__ = [
    "all_or_nothing", "execute_bulk", "in_parameter_order", "route_rows", "run_per_shard",
    "save_mappings",
]

_T = TypeVar("_T")
_Row = Mapping[str, Any]


# -- routing ---------------------------------------------------------------------------------


def route_rows(
    session: Any,
    mapper: Mapper[Any],
    rows: Sequence[_Row],
    *,
    by_attribute: bool = True,
    for_update: bool = False,
) -> dict[Any, list[_Row]]:
    """Group ``rows`` (parameter dictionaries keyed by attribute names, or by column keys
    when ``by_attribute`` is false) by the shard each belongs on, keeping their order.
    The dictionaries themselves are kept (SQLAlchemy writes generated defaults back into
    those of ``bulk_insert_mappings(return_defaults=True)``).

    :raises ShardKeyMissingError: a row lacks its shard key (or a broadcast row its
        primary key, which each shard would otherwise generate on its own).
    :raises RoutingError: a key no shard holds, a row the placement can only place through
        a parent object, or a shard chooser that failed on a row.
    :raises UnknownShardError: a chooser named a shard the session does not have.
    """
    placement = session.placement
    if placement is None:
        return _route_by_chooser(session, mapper, rows, by_attribute, for_update)
    r = placement.resolve(mapper)
    if isinstance(r.rule, Broadcast):
        _require_primary_key(mapper, rows, by_attribute)
        return {s: list(rows) for s in placement.shards}
    if r.strategy is None:
        only = placement.all_candidates(mapper)
        if isinstance(r.rule, Follows) or len(only) != 1:
            raise RoutingError(
                f"cannot route bulk rows of {mapper.class_.__name__}: its placement follows a "
                "parent object, not a key column of the row; add the objects with "
                "session.add_all() instead, or pass bind_arguments={'shard_id': ...}",
                shard_id=None,
            )
        return {session._check_shard(only[0]): list(rows)}
    names = r.attrs if by_attribute else tuple(str(c.key) for c in r.columns)
    strategy = r.strategy
    groups: dict[Any, list[_Row]] = {}
    known = session._shards
    one = names[0] if len(names) == 1 else None
    for index, row in enumerate(rows):
        try:
            value = row[one] if one is not None else tuple(row[n] for n in names)
        except KeyError:
            value = None
        if value is None or (one is None and None in value):
            missing = [n for n in names if row.get(n) is None]
            raise ShardKeyMissingError(
                f"bulk row {index} of {mapper.class_.__name__} has no value for shard key "
                f"{', '.join(missing)}; nothing was sent",
                shard_id=None,
                mapper=mapper.class_.__name__,
                key=tuple(missing),
            )
        try:
            shard = strategy.shard_for(value)
        except RoutingError as e:
            raise naming_mapper(e, mapper) from e
        group = groups.get(shard)
        if group is None:
            if shard not in known:
                session._check_shard(shard)  # raises
            group = groups[shard] = []
        group.append(row)
    if for_update and not r.pk_is_key and len(groups) > 0:
        _refuse_moved_rows(session, mapper, groups, by_attribute)
    return groups


def _refuse_moved_rows(session: Any, mapper: Mapper[Any], groups: Mapping[Any, list[_Row]],
                       by_attribute: bool, what: str = "a bulk UPDATE row") -> None:
    """Bulk UPDATE rows by primary key whose shard key is not the primary key are routed
    by the key value they carry: a row whose key changed would be looked for on its new
    shard (StaleDataError there, the row left on its old shard). Ask each shard which of
    its rows' primary keys it holds (one SELECT per shard; only for a one-column primary
    key) and refuse a row another shard holds.

    :raises RoutingError: a row's shard key places it on another shard than the one that
        holds it (moving rows between shards is not supported); nothing was written.
    """
    pk = mapper.primary_key
    if len(pk) != 1:
        return
    name = mapper.get_property_by_column(pk[0]).key if by_attribute else str(pk[0].key)
    wanted = {s: {row[name] for row in rows if row.get(name) is not None}
              for s, rows in groups.items()}
    missing: dict[Any, Any] = {}
    for shard, ids in wanted.items():
        if ids:
            conn = session.connection(bind_arguments={"shard_id": shard})
            held = set(conn.execute(select(pk[0]).where(pk[0].in_(ids))).scalars())
            missing.update((i, shard) for i in ids - held)
    if not missing:
        return
    for other in session._shards:
        conn = session.connection(bind_arguments={"shard_id": other})
        elsewhere = [i for i, shard in missing.items() if shard != other]
        if not elsewhere:
            continue
        for found in conn.execute(select(pk[0]).where(pk[0].in_(elsewhere))).scalars():
            raise RoutingError(
                f"{what} of {mapper.class_.__name__} with primary key {found!r} "
                f"sets a shard key that places it on shard {missing[found]!r}, but shard "
                f"{other!r} holds it; moving rows between shards is not supported (insert a "
                "new row and delete the old one); nothing was written",
                shard_id=missing[found],
            )


def _require_primary_key(mapper: Mapper[Any], rows: Sequence[_Row], by_attribute: bool) -> None:
    names = [
        mapper.get_property_by_column(c).key if by_attribute else str(c.key)
        for c in mapper.primary_key
    ]
    for index, row in enumerate(rows):
        missing = [n for n in names if row.get(n) is None]
        if missing:
            raise ShardKeyMissingError(
                f"bulk row {index} of the replicated {mapper.class_.__name__} has no "
                f"{', '.join(missing)}: each shard would generate a key of its own; "
                "nothing was sent",
                shard_id=None,
                mapper=mapper.class_.__name__,
                key=tuple(missing),
            )


def _route_by_chooser(
    session: Any,
    mapper: Mapper[Any],
    rows: Sequence[_Row],
    by_attribute: bool,
    for_update: bool,
) -> dict[Any, list[_Row]]:
    """The drop-in constructor's routing: an UPDATE row goes where its object is in the
    identity map; otherwise the shard chooser is asked with a transient object carrying
    the row's column values (set without attribute events: no validator or backref runs
    on a partial object)."""
    attr_of = {
        str(col.key): prop.key for prop in mapper.column_attrs for col in prop.columns
    }
    if by_attribute:
        attr_of.update((prop.key, prop.key) for prop in mapper.column_attrs)
    pk_attrs = [mapper.get_property_by_column(c).key for c in mapper.primary_key]
    groups: dict[Any, list[_Row]] = {}
    for index, row in enumerate(rows):
        shard = _shard_in_identity_map(session, mapper, row, pk_attrs) if for_update else None
        if shard is None:
            obj = mapper.class_manager.new_instance()
            for key, value in row.items():
                attr = attr_of.get(key)
                if attr is not None:
                    set_committed_value(obj, attr, value)  # type: ignore[no-untyped-call, unused-ignore]
            shard = _ask_chooser(mapper, f"bulk row {index}",
                                 functools.partial(session.shard_chooser, mapper, obj))
        groups.setdefault(session._check_shard(shard), []).append(row)
    return groups


def _ask_chooser(mapper: Mapper[Any], what: str, ask: Callable[[], Any]) -> Any:
    """``ask()``: the shard the drop-in constructor's shard chooser names for ``what``.

    :raises RoutingError: the chooser raised anything but a library error (chained from
        it); a library error it raised passes unchanged.
    """
    try:
        return ask()
    except ShardSessionError:
        raise
    except Exception as e:
        raise RoutingError(
            f"the shard chooser failed on {what} of {mapper.class_.__name__} "
            f"({type(e).__name__}: {e}); nothing was sent",
            shard_id=None,
        ) from e


def _shard_in_identity_map(
    session: Any, mapper: Mapper[Any], row: _Row, pk_attrs: list[str]
) -> Any:
    try:
        pk = tuple(row[a] for a in pk_attrs)
    except KeyError:
        return None
    for shard in session._shards:
        key = mapper.identity_key_from_primary_key(pk, identity_token=shard)
        if key in session.identity_map:
            return shard
    return None


def route_states(
    session: Any, mapper: Mapper[Any], states: Sequence[InstanceState[Any]], isupdate: bool
) -> dict[Any, list[InstanceState[Any]]]:
    """Group the states of ``bulk_save_objects`` by shard: a persistent object's is in its
    identity key; a new one is placed as a flush would place it (the placement, or the
    shard chooser, which SQLAlchemy's sharded session also asks with the object).

    :raises RoutingError: (and subclasses) an object cannot be placed; nothing was sent.
    """
    placement = session.placement
    if placement is not None and isinstance(placement.resolve(mapper).rule, Broadcast):
        rows = [s.dict for s in states]
        _require_primary_key(mapper, rows, True)
        return {s: list(states) for s in placement.shards}
    groups: dict[Any, list[InstanceState[Any]]] = {}
    for index, state in enumerate(states):
        shard = _compat.identity_token_of(state)
        if shard is None and isupdate:
            raise RoutingError(
                f"bulk update of a {mapper.class_.__name__} that is not persistent: it has "
                "no shard",
                shard_id=None,
            )
        if shard is None:
            if placement is not None:
                shard = placement.shard_for_instance(mapper, state)
            else:
                # (_shard_for, as a flush places it: the state gets its identity token)
                shard = _ask_chooser(mapper, f"bulk object {index}",
                                     functools.partial(session._shard_for, mapper, state.obj()))
        groups.setdefault(session._check_shard(shard), []).append(state)
    return groups


# -- running on the shards ---------------------------------------------------------------------


def run_per_shard(
    session: Any,
    shard_ids: Sequence[Any],
    work: Callable[[Any, Connection], _T],
    *,
    one_statement: bool = False,
) -> dict[Any, _T]:
    """``work(shard_id, connection)`` for each shard, in parallel; return the results by
    shard, in the order of ``shard_ids``.

    Each shard's connection is checked out (and its transaction begun) in the calling
    thread first, as the fan-out does (:mod:`shardsession.query._fanout`); workers only
    execute on their connection. Shards sharing one connection run one after another.

    With ``one_statement`` (the parts of one bulk statement) and several shards, each
    connection's part runs inside a SAVEPOINT of its own, when every connection can take
    one safely (:func:`shardsession._compat.savepoint_readiness`; a pysqlite or aiosqlite
    connection whose driver defers its BEGIN to the first write gets that BEGIN first):
    an error on any shard rolls every shard back to it, so nothing of the statement stays
    anywhere, as one statement that fails on one database leaves nothing of itself. (Two
    more round trips per connection, SAVEPOINT and RELEASE.)

    :raises CapabilityError: ``one_statement`` over several shards, one of them a SQLite
        connection in driver autocommit mode (no transaction for a SAVEPOINT to nest
        in, its part would be committed at once); raised before anything is sent.

    Failure semantics: every started shard finishes before anything is raised (no worker
    outlives the call); then the first error in shard order is re-raised unchanged.
    With savepoints, every shard's part was undone first (best effort: a shard whose
    server already dropped the savepoint, a deadlock's rollback for one, is left as it
    is); without, the other shards' writes stay in the session's transaction. Either
    way the caller rolls the session back (nothing is committed).
    """
    conns = {s: session.connection(bind_arguments={"shard_id": s}) for s in shard_ids}
    lanes: dict[int, list[Any]] = {}
    for s in shard_ids:
        lanes.setdefault(id(conns[s]), []).append(s)
    savepoints: dict[int, Any] | None = None
    if one_statement and len(shard_ids) > 1:
        prepare_savepoints(conns, shard_ids, "a bulk statement")
        savepoints = {}

    def lane(members: list[Any]) -> list[tuple[Any, _T]]:
        if savepoints is not None:  # (in the lane: the SAVEPOINTs overlap too)
            savepoints[id(conns[members[0]])] = conns[members[0]].begin_nested()
        return [(s, work(s, conns[s])) for s in members]

    if savepoints is None:
        return _run_lanes(shard_ids, conns, lanes, lane)
    try:
        done = _run_lanes(shard_ids, conns, lanes, lane)
    except BaseException:
        _undo(savepoints.values())
        raise
    for savepoint in savepoints.values():
        savepoint.commit()  # RELEASE SAVEPOINT
    return done


def prepare_savepoints(conns: Mapping[Any, Connection], shard_ids: Sequence[Any],
                       what: str) -> None:
    """Make sure a SAVEPOINT on each connection of ``conns`` nests in its transaction.

    :raises CapabilityError: a connection in autocommit mode (a SQLite driver's
        ``isolation_level=None`` / ``autocommit=True``, or a server engine's
        ``isolation_level="AUTOCOMMIT"``): its part of ``what`` would be committed at
        once and no SAVEPOINT could undo it if another shard fails; raised before
        anything of the statement is sent."""
    readiness = {s: _compat.savepoint_readiness(conns[s]) for s in shard_ids}
    unsafe = [s for s, r in readiness.items() if r == _compat.SAVEPOINT_UNSAFE]
    if unsafe:
        raise CapabilityError(
            f"{what} over shards {', '.join(map(str, shard_ids))} cannot be "
            f"all-or-nothing: the connection of {', '.join(map(str, unsafe))} is in "
            "autocommit mode (SQLite: isolation_level=None without a BEGIN, or "
            "autocommit=True; a server: isolation_level='AUTOCOMMIT'), so its part would "
            "be committed at once, and no SAVEPOINT can undo it if another shard fails; "
            "nothing was sent. Send each shard's part with "
            "bind_arguments={'shard_id': ...}, or use a transactional isolation level "
            "(SQLite: the pysqlite savepoint recipe)",
            shard_id=unsafe[0],
        )
    begun: set[int] = set()
    for s in shard_ids:
        # (shards of one local SQLite engine share one DBAPI connection: one BEGIN)
        key = _dbapi_key(conns[s])
        if readiness[s] == _compat.SAVEPOINT_AFTER_BEGIN and key not in begun:
            begun.add(key)
            _compat.begin_driver_transaction(conns[s])


def _dbapi_key(connection: Connection) -> int:
    """The identity of the DBAPI connection under ``connection``: shards whose engines
    share one (an in-memory SQLite engine with attached schemas or table prefixes per
    shard) are in one transaction, which one BEGIN and one SAVEPOINT cover."""
    return id(connection.connection.dbapi_connection)


def _undo(savepoints: Iterable[Any]) -> None:
    for savepoint in savepoints:
        with contextlib.suppress(Exception):  # the first error is the one to raise
            savepoint.rollback()


@contextlib.contextmanager
def all_or_nothing(session: Any, shard_ids: Sequence[Any], what: str) -> Iterator[None]:
    """Run the body (one statement sent to several shards) inside a SAVEPOINT on each
    shard's connection: an error rolls every shard back to it and is re-raised, so no
    shard keeps its part of a statement that failed on another, as one database undoes
    a failed statement and its transaction goes on (SQLite, MariaDB). Two more round
    trips per connection (SAVEPOINT and RELEASE), taken one after another.

    :raises CapabilityError: see :func:`prepare_savepoints` (nothing was sent)."""
    conns = {s: session.connection(bind_arguments={"shard_id": s}) for s in shard_ids}
    prepare_savepoints(conns, shard_ids, what)
    savepoints: dict[int, Any] = {}
    try:
        for s in shard_ids:
            if _dbapi_key(conns[s]) not in savepoints:
                savepoints[_dbapi_key(conns[s])] = conns[s].begin_nested()
        yield
    except BaseException:
        _undo(savepoints.values())
        raise
    for savepoint in savepoints.values():
        savepoint.commit()  # RELEASE SAVEPOINT


def _run_lanes(
    shard_ids: Sequence[Any],
    conns: Mapping[Any, Connection],
    lanes: Mapping[int, list[Any]],
    lane: Callable[[list[Any]], list[tuple[Any, _T]]],
) -> dict[Any, _T]:
    keys = list(lanes)
    if len(keys) > 1 and _overlappable(conns.values()):
        # asyncio drivers: the lanes overlap on the event loop, never in threads
        outcomes_ = _compat.run_overlapped([functools.partial(lane, lanes[k]) for k in keys])
        failures = {lanes[k][0]: o for k, o in zip(keys, outcomes_, strict=True)
                    if isinstance(o, BaseException)}
        if failures:
            raise failures[next(s for s in shard_ids if s in failures)]
        done_: dict[Any, _T] = {}
        for outcome in outcomes_:
            done_.update(outcome)
        return {s: done_[s] for s in shard_ids}
    if len(keys) == 1 or not all(_may_cross_threads(c) for c in conns.values()):
        return dict(lane(list(shard_ids)))
    pool = _shared_pool()
    futures = {pool.submit(lane, lanes[k]): k for k in keys[:-1]}
    outcomes: dict[int, list[tuple[Any, _T]] | BaseException] = {}
    try:
        try:  # the calling thread runs the last lane itself instead of waiting idle
            outcomes[keys[-1]] = lane(lanes[keys[-1]])
        except Exception as e:  # reported in shard order below
            outcomes[keys[-1]] = e
    finally:
        concurrent.futures.wait(futures)
    for future, key in futures.items():
        failure = future.exception()
        outcomes[key] = failure if failure is not None else future.result()
    errors = {lanes[k][0]: o for k, o in outcomes.items() if isinstance(o, BaseException)}
    if errors:
        raise errors[next(s for s in shard_ids if s in errors)]
    done: dict[Any, _T] = {}
    for outcome in outcomes.values():
        assert not isinstance(outcome, BaseException)
        done.update(outcome)
    return {s: done[s] for s in shard_ids}


# -- the statements and methods ------------------------------------------------------------------


def execute_bulk(
    orm_context: ORMExecuteState, bulk: _compat.BulkStatement, shard_id: Any = None
) -> Result[Any]:
    """Run an ORM bulk INSERT or UPDATE (``session.execute(insert(M), rows)``,
    ``session.execute(update(M), rows)``) with each row on its shard, or every row on
    ``shard_id`` when the statement names one.

    Objects returned by ``.returning(M)`` carry their shard as identity token (``get()``
    finds them); a bulk UPDATE brings the objects of the identity map up to date as
    SQLAlchemy does (``synchronize_session``).

    Failure semantics: routing errors are raised before any shard is asked. An error on
    a shard (a duplicate key, a row no shard matched: ``StaleDataError``) is raised after
    every shard finished, every shard's part of the statement rolled back to its
    savepoint where one could be taken (:func:`run_per_shard`); otherwise the rows
    written elsewhere stay in the session's transaction, uncommitted. Either way: roll
    the session back.

    With ``returning(..., sort_by_parameter_order=True)`` the rows come back in the
    order of the parameter sets (:func:`in_parameter_order`); without it, shard by shard.
    """
    session: Any = orm_context.session
    params = orm_context.parameters
    rows: list[_Row] = [params] if isinstance(params, Mapping) else list(params or ())
    mapper = bulk.mapper
    if bulk.kind == "update":
        _compat.check_bulk_update(orm_context, bulk)
    else:
        _compat.check_bulk_insert(orm_context, bulk)
    if shard_id is not None:
        groups: dict[Any, list[_Row]] = {shard_id: rows}
    else:
        groups = route_rows(session, mapper, rows, for_update=bulk.kind == "update")
    if bulk.autoflush:
        _compat.session_autoflush(session)
    replicated = _replicated(session, mapper) and shard_id is None

    if bulk.kind == "insert" and shard_id is None:
        _refuse_upsert_key_change(session, mapper, orm_context.statement, groups)
    if bulk.kind == "insert":
        def insert(shard: Any, conn: Connection) -> Any:
            return _compat.run_bulk_insert(orm_context, bulk, conn, groups[shard])

        results = run_per_shard(session, list(groups), insert, one_statement=True)
        if not bulk.returning:
            # what SQLAlchemy returns: its own result on one shard, else as it would
            parts = list(results.values())
            return parts[0] if len(parts) == 1 else _compat.closed_empty_result()
        shards = list(results)[:1] if replicated else list(results)
        returned: list[Result[Any]] = [
            _compat.orm_insert_result(orm_context, groups[s], results[s], s) for s in shards
        ]
        if len(returned) == 1:
            return returned[0]
        if _compat.sorted_by_parameter_order(orm_context.statement):
            return in_parameter_order(rows, [groups[s] for s in shards], returned)
        merged: Result[Any] = returned[0].merge(*returned[1:])
        return merged

    def update(shard: Any, conn: Connection) -> Any:
        return _compat.run_bulk_update(orm_context, bulk, conn, groups[shard])

    results = run_per_shard(session, list(groups), update, one_statement=True)
    for shard, result in results.items():
        _compat.synchronize_bulk_update(orm_context, bulk, groups[shard], result, shard)
    return null_result()


def _refuse_upsert_key_change(session: Any, mapper: Mapper[Any], statement: Any,
                              groups: Mapping[Any, list[_Row]]) -> None:
    """An upsert whose conflict clause sets the shard key to a value of another shard
    than its rows' (or to an SQL expression other than the inserted row's own key,
    ``excluded.key`` / ``inserted.key``) would leave the updated row on its shard under
    a key that places it elsewhere.

    :raises RoutingError: before anything is sent."""
    placement = session.placement
    if placement is None:
        return
    r = placement.resolve(mapper)
    if r.strategy is None or not _compat.upsert_set_pairs(statement):
        return
    if not r.pk_is_key:
        # the conflict is on the primary key, which another shard may hold: the row
        # would be inserted again on its key's shard instead of updated where it is
        _refuse_moved_rows(session, mapper, groups, True, "an upsert row")
    names = {str(c.name): i for i, c in enumerate(r.columns)}
    names.update({a: i for i, a in enumerate(r.attrs)})
    for key, value in _compat.upsert_set_pairs(statement):
        name = key if isinstance(key, str) else getattr(key, "name", None)
        if name not in names:
            continue
        column = r.columns[names[name]]
        if isinstance(value, BindParameter) and len(r.columns) == 1:
            target = r.strategy.shard_for(value.effective_value)
            if all(s == target for s in groups):
                continue
        elif (getattr(value, "name", None) == column.name
              and getattr(getattr(value, "table", None), "name", None) in ("excluded", "inserted")):
            continue  # the inserted row's own key: it placed the row
        raise RoutingError(
            f"an upsert of {mapper.class_.__name__} whose conflict clause sets its shard key "
            f"{name!r} to a value of another shard (or an expression) would leave the row on "
            "a shard its new key does not place it on; moving rows between shards is not "
            "supported; nothing was sent", shard_id=None)


def in_parameter_order(
    rows: Sequence[_Row], groups: Sequence[Sequence[_Row]], results: Sequence[Result[Any]]
) -> Result[Any]:
    """The RETURNING ``results`` of an INSERT whose ``rows`` went to several shards, one
    result per shard with the rows of the matching entry of ``groups`` (each in the order
    of ``rows``), merged into one result in the order of ``rows``: what
    ``returning(..., sort_by_parameter_order=True)`` promises on one database.

    A shard that returned fewer rows than it was sent (an upsert that skipped rows:
    ``ON CONFLICT DO NOTHING``) leaves no way to tell where its rows belong: the results
    are then given shard after shard, each in its own parameter order (on one database
    the rows returned cannot be matched to the parameter sets by position either).
    """
    owners: dict[int, list[int]] = {}
    for index in reversed(range(len(groups))):  # popped from the end: first shard first
        for row in reversed(groups[index]):
            owners.setdefault(id(row), []).append(index)
    sources = [owners[id(row)].pop() for row in rows]
    return _compat.interleave_results(results, sources)


def _replicated(session: Any, mapper: Mapper[Any]) -> bool:
    placement = session.placement
    return placement is not None and isinstance(placement.resolve(mapper).rule, Broadcast)


def save_mappings(
    session: Any,
    mapper: Mapper[Any],
    mappings: list[Any],
    *,
    isupdate: bool,
    isstates: bool,
    return_defaults: bool,
    update_changed_only: bool,
    render_nulls: bool,
) -> None:
    """``bulk_save_objects`` / ``bulk_insert_mappings`` / ``bulk_update_mappings`` of one
    mapper: each object or dictionary to its shard, the shards in parallel.

    Objects inserted with ``return_defaults=True`` become persistent-keyed with their
    shard as identity token.

    :raises sqlalchemy.exc.UnboundExecutionError: the session has no shard at all (as
        a plain Session without a bind), before anything else is checked.

    Failure semantics: routing errors are raised before any shard is asked; a shard's
    error is raised after every shard finished, and the caller
    (:class:`~shardsession._compat.RoutedBulkSaves`) rolls the session's transaction back
    as a failed flush does: nothing is committed on any shard.
    """
    if not session._shards:
        # nothing to route to: what a plain Session without a bind raises
        from .session import _unbound  # (the session module imports this one)

        raise _unbound(mapper, None)
    if not mappings:
        return
    groups: dict[Any, list[Any]]
    if isstates:
        groups = dict(route_states(session, mapper, mappings, isupdate))
    else:
        groups = dict(route_rows(session, mapper, mappings, for_update=isupdate))

    def work(shard: Any, conn: Connection) -> None:
        if isupdate:
            _compat.bulk_update_on(conn, mapper, groups[shard], isstates=isstates,
                                   update_changed_only=update_changed_only)
        else:
            _compat.bulk_insert_on(conn, mapper, groups[shard], isstates=isstates,
                                   return_defaults=return_defaults, render_nulls=render_nulls)

    run_per_shard(session, list(groups), work)
    if isstates and return_defaults and not isupdate:
        # a replicated object is keyed by the shard it is read from, as a flush keys it
        own = (session.placement.all_candidates(mapper)[0]
               if _replicated(session, mapper) else None)
        for shard, states in groups.items():
            if own is not None and shard != own:
                continue
            for state in states:
                _compat.key_with_token(state, shard)
