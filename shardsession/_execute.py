"""Statement execution of a sharded session: where each statement goes, and how.

The session's ``do_orm_execute`` handler (:func:`execute`) pins a statement to the shard
an option, identity token or bind argument names, routes INSERT rows by their keys, and
otherwise asks the execute chooser and hands the shards to :mod:`shardsession.query`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast

from sqlalchemy import Table
from sqlalchemy.engine import Result
from sqlalchemy.orm import Mapper, ORMExecuteState
from sqlalchemy.sql import insert
from sqlalchemy.sql.selectable import Join

from . import _compat
from ._bulk import all_or_nothing, execute_bulk, in_parameter_order, route_rows, run_per_shard
from .exc import NoShardChosenError, RoutingError, UnsupportedQueryError
from .query import TIMEOUT_OPTION, FanoutOptions, execute_on_shards, one_shard_statement
from .query._null_order import nulls_low_on_one_shard
from .query._ordering import NULLS_HIGH_DIALECTS
from .routing.placement import Placement
from .routing.strategies import Broadcast

__all__ = [
    "chosen_insert", "combine", "execute", "invoke_one", "mappers_of_tables", "routed_insert",
    "tables_of",
]


def tables_of(froms: Iterable[Any]) -> list[Any]:
    """The tables (and aliases of tables) of FROM elements, joins flattened."""
    out: list[Any] = []
    for frm in froms:
        if isinstance(frm, Join):
            out += tables_of((frm.left, frm.right))
        else:
            out.append(frm)
    return out


def mappers_of_tables(placement: Placement, stmt: Any) -> list[Mapper[Any]]:
    """The placed mappers of a statement's table and FROM list, joined tables included
    (``select(func.count()).select_from(User).join(Order, ...)`` names no entity, and
    its join must still be checked)."""
    tables = []
    table = getattr(stmt, "table", None)
    if table is not None:
        tables.append(table)
    froms = getattr(stmt, "get_final_froms", None)
    if froms is not None:
        tables.extend(tables_of(froms()))
    return placement.mappers_for_tables(tables)


def invoke_one(orm_context: ORMExecuteState, shard_id: str) -> Result[Any]:
    bind_arguments = dict(orm_context.bind_arguments)
    bind_arguments["shard_id"] = shard_id
    orm_context.update_execution_options(identity_token=shard_id)
    return orm_context.invoke_statement(bind_arguments=bind_arguments)


def execute(orm_context: ORMExecuteState) -> Result[Any] | None:
    """The session's ``do_orm_execute`` handler: route, then run on one or many shards.

    Returns ``None`` when the statement goes to one shard: it is then pinned to it and
    SQLAlchemy runs it as usual (later ``do_orm_execute`` handlers included).

    Failure semantics: a routing error is raised before any shard is asked; errors of a
    fan-out are described in :func:`shardsession.query.execute_on_shards`.
    """
    session: Any = orm_context.session  # a shardsession.ShardedSession
    if session._tenancy is not None:  # (scope to the tenant first: it pins the shard)
        session._tenancy.on_execute(session, orm_context)
    if _compat.route_identity_load(orm_context, session._shards, TIMEOUT_OPTION):
        return None  # (the common case of the next lines, in one step)
    if not session._shards:
        # nothing to route to: SQLAlchemy asks get_bind(), which raises what a plain
        # Session without a bind raises (UnboundExecutionError, UnmappedClassError...)
        return None
    # (an ORM bulk INSERT/UPDATE: SQLAlchemy's own bulk code refuses sharded sessions)
    bulk = _compat.orm_bulk_statement(orm_context) if orm_context.statement.is_dml else None
    explicit = _compat.explicit_shard_of(orm_context)
    if explicit is not None:
        if explicit not in session._shards:
            session._check_shard(explicit)  # raises
        if bulk is not None:
            return execute_bulk(orm_context, bulk, explicit)
        return _single(session, orm_context, explicit)
    if bulk is not None:
        return execute_bulk(orm_context, bulk)

    if session.placement is not None and orm_context.is_insert:
        return routed_insert(session, orm_context)

    chosen = session.execute_chooser(orm_context)
    if chosen is None:
        raise NoShardChosenError("the execute chooser returned None", shard_id=None)
    shard_ids = list(dict.fromkeys(session._check_shard(s) for s in chosen))
    if not shard_ids:
        raise NoShardChosenError("the execute chooser returned no shard", shard_id=None)
    if len(shard_ids) == 1:
        if orm_context.is_select:
            # (a shard the chooser picked: the statement's subqueries may need others)
            statement = one_shard_statement(
                orm_context, _options(session), len(session._shards))
            if statement is not orm_context.statement:
                orm_context.statement = statement
        return _single(session, orm_context, shard_ids[0])
    if orm_context.is_insert and orm_context.parameters and not orm_context.is_orm_statement:
        return chosen_insert(session, orm_context, shard_ids)
    if orm_context.is_update or orm_context.is_delete:
        # One statement over several shards: all of it or nothing of it (a shard that
        # fails undoes every shard's part; the transaction goes on, as on one database)
        with all_or_nothing(session, shard_ids, "an UPDATE or DELETE"):
            result = execute_on_shards(orm_context, shard_ids, _options(session))
            if _compat.has_returning(orm_context.statement):
                # RETURNING rows are read before the RELEASE (SQLite cannot release a
                # savepoint while a statement's rows are still being read)
                result = result.freeze()()
        return result
    return execute_on_shards(orm_context, shard_ids, _options(session))


def _options(session: Any) -> FanoutOptions:
    return FanoutOptions(
        max_workers=session.fanout_max_workers,
        timeout=session.fanout_timeout,
        placement=session.placement,
    )


def _single(session: Any, orm_context: ORMExecuteState, shard_id: Any) -> Result[Any] | None:
    # A statement's own deadline (execution option) applies on one shard too; the
    # session-wide fanout_timeout is for fan-outs only, so lazy loads are never cut.
    if TIMEOUT_OPTION in orm_context.execution_options:
        return execute_on_shards(orm_context, [shard_id], _options(session))
    # One shard: SQLAlchemy runs the statement itself once the handler returns None,
    # bound to that shard (no nested execution: the common case costs what it costs
    # without sharding).
    _compat.route_in_place(orm_context, shard_id, name_shard=len(session._shards) != 1)
    dialect = session._shards[shard_id].dialect.name
    if dialect in NULLS_HIGH_DIALECTS and orm_context.is_select:
        # A cluster mixing NULL conventions orders NULL as the smallest value in every
        # statement, on one shard too (a broadcast read must not depend on the copy).
        statement = nulls_low_on_one_shard(
            orm_context.statement, dialect, (b.dialect.name for b in session._shards.values())
        )
        if statement is not orm_context.statement:
            orm_context.statement = statement
    return None


def routed_insert(session: Any, orm_context: ORMExecuteState) -> Result[Any]:
    """Route a Core INSERT (or an ORM one run with ``dml_strategy="raw"``) with
    parameter sets: each row goes to the shard of its key, the shards in parallel; a
    broadcast table gets every row on every shard. (ORM bulk INSERTs go to
    :func:`shardsession._bulk.execute_bulk`.)

    Failure semantics: a row that cannot be routed raises before any shard is asked;
    rows go to their shards inside the session's transaction; an error on one shard
    propagates after the others finished, the statement undone on every shard where
    savepoints could be taken (:func:`shardsession._bulk.run_per_shard`), and the session
    must be rolled back (nothing is committed).
    """
    placement = session.placement
    assert placement is not None
    stmt = orm_context.statement
    mapper = orm_context.bind_mapper
    if mapper is None:
        mappers = mappers_of_tables(placement, stmt)
        mapper = mappers[0] if mappers else None
    if mapper is None:
        raise RoutingError(
            "cannot route an INSERT into a table the placement does not know; "
            "pass bind_arguments={'shard_id': ...}",
            shard_id=None,
        )
    r = placement.resolve(mapper)
    params = orm_context.parameters
    rows: list[dict[str, Any]]
    if isinstance(params, list):
        rows = [dict(p) for p in params]
    elif isinstance(params, Mapping):
        rows = [dict(params)]
    else:
        rows = []
    orm_entity = orm_context.is_orm_statement
    replicated = isinstance(r.rule, Broadcast)
    groups: dict[Any, list[Any]]
    if rows:
        # parameter keys are attribute names for an ORM insert, column keys for a Core one
        groups = route_rows(session, mapper, rows, by_attribute=orm_entity)
    elif replicated:
        groups = {s: rows for s in placement.shards}
    else:
        only = placement.all_candidates(mapper)
        if len(only) != 1:
            raise RoutingError(
                f"cannot route this INSERT into {mapper.class_.__name__}: pass the rows as "
                "parameter dictionaries carrying the shard key, or "
                "bind_arguments={'shard_id': ...}",
                shard_id=None,
            )
        groups = {only[0]: rows}
    if not orm_entity and len(groups) == 1 and not replicated:
        return invoke_one(orm_context, next(iter(groups)))
    if orm_entity:  # (dml_strategy="raw": bulk ones went to execute_bulk)
        if getattr(stmt, "returning_column_descriptions", None) or len(mapper.tables) != 1:
            raise UnsupportedQueryError(
                "a raw INSERT with RETURNING, or into a multi-table (joined inheritance) "
                f"mapper {mapper.class_.__name__}, cannot be routed across shards; run it "
                "without dml_strategy='raw'",
                shard_id=None,
                construct="bulk INSERT",
            )
        stmt = insert(cast(Table, mapper.local_table))
        to_column = {p.key: p.columns[0].key for p in mapper.column_attrs}
        groups = {
            s: [{to_column.get(k, k): v for k, v in row.items()} for row in g]
            for s, g in groups.items()
        }

    return _send_rows(session, stmt, rows, groups, replicated=replicated)


def chosen_insert(
    session: Any, orm_context: ORMExecuteState, shard_ids: Sequence[Any]
) -> Result[Any]:
    """A Core ``insert(table)`` with parameter sets that the drop-in execute chooser sent
    to several shards (``shard_ids``): each row goes to the shard the shard chooser names
    for it, asked as for an ORM bulk row (a transient object of the class mapping
    ``table``, carrying the row's column values: :func:`shardsession._bulk.route_rows`),
    the shards in parallel. Running the statement on every chosen shard, as SQLAlchemy's
    sharded session does, would store each row once per shard.

    Failure semantics: raised before any shard is asked, nothing sent:
    :class:`~shardsession.exc.RoutingError` when no mapped class (or more than one) maps
    the table, when the shard chooser fails on a row, or when it names a shard the execute
    chooser did not; :class:`~shardsession.exc.UnknownShardError` for a shard the session
    does not have. An error on one shard is raised after the others finished, the
    statement undone on every shard where savepoints could be taken
    (:func:`shardsession._bulk.run_per_shard`); roll the session back.
    """
    stmt = orm_context.statement
    table = getattr(stmt, "table", None)
    mappers = _compat.mappers_of_table(table) if table is not None else []
    name = getattr(table, "name", "?")
    if len(mappers) != 1:
        raise RoutingError(
            f"cannot route the rows of an INSERT into {name!r} over the shards the execute "
            f"chooser named ({', '.join(map(str, shard_ids))}): "
            + ("no mapped class maps the table" if not mappers else
               f"several mapped classes map it ({', '.join(m.class_.__name__ for m in mappers)})")
            + ", so the shard chooser cannot be asked per row; nothing was sent. Pass "
            "bind_arguments={'shard_id': ...}, or have the execute chooser name one shard",
            shard_id=None,
        )
    params = orm_context.parameters
    rows = [dict(params)] if isinstance(params, Mapping) else [dict(p) for p in params or ()]
    groups: dict[Any, list[Any]] = route_rows(session, mappers[0], rows, by_attribute=False)
    outside = [s for s in groups if s not in shard_ids]
    if outside:
        raise RoutingError(
            f"the shard chooser placed rows of an INSERT into {name!r} on "
            f"{', '.join(map(str, outside))}, which the execute chooser did not name "
            f"({', '.join(map(str, shard_ids))}); nothing was sent",
            shard_id=outside[0],
        )
    return _send_rows(session, stmt, rows, groups, replicated=False)


def _send_rows(
    session: Any, stmt: Any, rows: Sequence[Any], groups: Mapping[Any, list[Any]],
    *, replicated: bool,
) -> Result[Any]:
    """Run ``stmt`` on each shard of ``groups`` with that shard's rows (the parts of one
    statement: a savepoint per shard where one can be taken), and combine the results."""

    def send(shard_id: Any, conn: Any) -> Result[Any]:
        group = groups[shard_id]
        return conn.execute(stmt, group if len(group) != 1 else group[0])  # type: ignore[no-any-return]

    results = run_per_shard(session, list(groups), send, one_statement=True)
    if (len(results) > 1 and not replicated and _compat.sorted_by_parameter_order(stmt)
            and all(getattr(r, "returns_rows", False) for r in results.values())):
        return in_parameter_order(rows, list(groups.values()), list(results.values()))
    return combine(list(results.values()), replicated=replicated)


def combine(results: Sequence[Result[Any]], *, replicated: bool = False) -> Result[Any]:
    """One result for a write sent to several shards: RETURNING rows concatenated;
    without RETURNING, a result that returns no rows whose ``rowcount`` is the sum of the
    shards' (``-1`` when a driver did not report one), as for one database. A write
    ``replicated`` to every shard (a broadcast table) counts its rows once."""
    if len(results) == 1:
        return results[0]
    merged = results[0].merge(*results[1:])
    if not all(getattr(r, "returns_rows", False) for r in results):
        counts = [int(getattr(r, "rowcount", -1)) for r in results]
        total = counts[0] if replicated else sum(counts)
        merged.rowcount = total if min(counts) >= 0 else -1  # type: ignore[attr-defined, unused-ignore]
        merged.returns_rows = False  # type: ignore[attr-defined]
    return merged
