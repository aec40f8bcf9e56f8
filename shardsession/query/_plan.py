"""Turn a SELECT into a per-shard statement plus the recipe to merge its results.

Two shapes of plan (aggregate plans are made by :mod:`._plan_aggregate`):

* :class:`RowsPlan` -- rows pass through: a k-way merge on the ORDER BY keys (read from
  extra, hidden columns appended to the per-shard statement when they are not selected),
  DISTINCT as a dedupe after the merge, LIMIT pushed down as ``LIMIT offset+limit``;
* :class:`AggregatePlan` -- aggregates and/or GROUP BY: each shard returns its partial
  groups (AVG as SUM and COUNT, HAVING/ORDER BY/LIMIT removed), merged in Python, then
  HAVING, DISTINCT, ORDER BY and LIMIT/OFFSET are applied to the merged groups.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Column, Table, case, inspect, literal_column
from sqlalchemy.sql import visitors
from sqlalchemy.sql.elements import (
    BindParameter,
    ClauseElement,
    ColumnClause,
    ColumnElement,
    Label,
)
from sqlalchemy.sql.selectable import Select

from .. import _compat
from ..exc import UnsupportedQueryError
from ._cache import LRUCache
from ._columns import (
    Columns,
    OrderItem,
    hidden_label,
    limit_offset,
    parse_order_by,
    resolve_nulls,
)
from ._model import StatementModel, model_select
from ._nodes import unwrap_label
from ._ordering import SortKey
from ._plan_aggregate import AggregatePlan, plan_aggregate

__all__ = [
    "PLAN_CACHE",
    "AggregatePlan",
    "OrderItem",
    "RowsPlan",
    "parse_order_by",
    "plan_select",
]


@dataclass
class RowsPlan:
    statement: Select[Any]
    visible: int
    sort_keys: list[SortKey]
    limit: int | None
    offset: int
    distinct: bool
    attributes: dict[str, Any] = field(default_factory=dict)
    #: labels of the hidden columns, in order (row position ``visible + i`` is
    #: ``hidden_names[i]``)
    hidden_names: tuple[str, ...] = ()



def _nullable(expr: Any) -> bool:
    plain = unwrap_label(expr)
    return bool(getattr(plain, "nullable", True))


def _entity_tables(exprs: Sequence[Any]) -> list[Any]:
    tables = []
    for expr in exprs:
        insp = inspect(expr, raiseerr=False)
        if insp is not None and getattr(insp, "is_mapper", False):
            tables.extend(insp.tables)
        elif insp is not None and getattr(insp, "is_aliased_class", False):
            tables.append(insp.selectable)
    return tables


def _single_entity(cols: Columns, wants_tuples: bool) -> bool:
    if cols.visible != 1 or wants_tuples:
        return False
    expr = cols.exprs[0]
    insp = inspect(expr, raiseerr=False)
    if insp is not None and (
        getattr(insp, "is_mapper", False) or getattr(insp, "is_aliased_class", False)
    ):
        return True
    return bool(getattr(expr, "single_entity", False))  # a Bundle



def plan_select(
    stmt: Select[Any],
    *,
    dialects: Sequence[str],
    is_orm: bool,
    wants_tuples: bool = False,
    cache_key: Hashable | None = None,
    model: StatementModel | None = None,
) -> RowsPlan | AggregatePlan:
    """Plan the merge of ``stmt`` over shards of the given dialects.

    ``cache_key`` is the statement's structural cache key (``None``: not cacheable).
    With it, what a rows plan decides from the statement's structure alone is kept in
    :data:`PLAN_CACHE` and only the parts that depend on bound values (LIMIT/OFFSET) and
    the per-shard statement are made again; the checks that depend on bound values run
    every time.  ``model`` is the statement's :func:`~._model.model_select` (made here
    when not given).

    :raises UnsupportedQueryError: a construct that cannot be merged exactly.
    """
    parts = _compat.select_parts(stmt)
    if parts.distinct_on:
        raise UnsupportedQueryError("DISTINCT ON is not merged", construct="DISTINCT ON")
    limit, offset = limit_offset(stmt)
    if parts.for_update is not None and (limit is not None or offset):
        raise UnsupportedQueryError(
            "FOR UPDATE with LIMIT/OFFSET would lock rows on every shard that the merged "
            "result then drops",
            construct="FOR UPDATE with LIMIT",
        )
    key = None if cache_key is None else (cache_key, tuple(dialects), is_orm, wants_tuples)
    if key is not None:
        shape = PLAN_CACHE.get(key)
        if shape is not None:
            return _rows_plan(shape, stmt, parts, _hidden_of(shape, parts), None, limit, offset)
    if model is None:
        model = model_select(stmt)
    cols = Columns(stmt)
    if model.aggregated:
        return plan_aggregate(
            stmt, cols, dialects, limit, offset, distinct=model.distinct, items=model.items
        )
    plan, shape = _plan_rows(
        stmt, parts, cols, dialects, limit, offset, is_orm, wants_tuples, model.distinct
    )
    if key is not None and shape is not None:
        PLAN_CACHE.put(key, shape)
    return plan


@dataclass(frozen=True)
class _RowsShape:
    """What a rows plan takes from the statement's structure alone (no bound value, no
    expression object of one statement): cacheable by the structural cache key."""

    visible: int
    sort_keys: tuple[SortKey, ...]
    #: for each hidden column, the index of the ORDER BY item it selects
    hidden_from: tuple[int, ...]
    distinct: bool
    attributes: tuple[tuple[str, Any], ...]
    #: the hidden columns themselves when each is a column of a schema ``Table`` (the
    #: same object in every statement of this shape, so they can be shared); else ``()``
    shared_hidden: tuple[Label[Any], ...] = ()


#: rows-plan shapes by (statement cache key, dialects, is_orm, wants_tuples); only
#: statements whose ORDER BY holds no bound parameter (matching ORDER BY items to
#: selected columns compares bound values) and needs no NULL-placement rewrite are stored
PLAN_CACHE: LRUCache[_RowsShape] = LRUCache(1024)


def _hidden_of(shape: _RowsShape, parts: _compat.SelectParts) -> Sequence[Label[Any]]:
    """The hidden columns of a cached shape, made from this statement's ORDER BY."""
    if shape.shared_hidden:
        return shape.shared_hidden
    return [
        hidden_label(unwrap_label(parse_order_by(parts.order_by[i]).target), j)
        for j, i in enumerate(shape.hidden_from)
    ]


def _rows_plan(
    shape: _RowsShape,
    stmt: Select[Any],
    parts: _compat.SelectParts,
    hidden: Sequence[Label[Any]],
    new_order: Sequence[ColumnElement[Any]] | None,
    limit: int | None,
    offset: int,
) -> RowsPlan:
    """The plan for ``stmt``: its per-shard statement (hidden columns appended, ORDER BY
    replaced by ``new_order`` when given, ``LIMIT offset+limit`` without OFFSET)."""
    per_shard = stmt
    if hidden:
        per_shard = per_shard.add_columns(*hidden)
    if new_order is not None:
        per_shard = per_shard.order_by(None).order_by(*new_order)
    if parts.offset_clause is not None:
        # OFFSET is applied after the merge; without one the LIMIT is already right.
        per_shard = per_shard.offset(None)
        if limit is not None:
            per_shard = per_shard.limit(limit + offset)
    return RowsPlan(
        statement=per_shard,
        visible=shape.visible,
        sort_keys=list(shape.sort_keys),
        limit=limit,
        offset=offset,
        distinct=shape.distinct,
        attributes=dict(shape.attributes),
        hidden_names=tuple(str(h.name) for h in hidden),
    )


def _table_columns(hidden: Sequence[Label[Any]]) -> bool:
    # A Table's column is in the cache key as itself: equal keys, same column object.
    return bool(hidden) and all(
        isinstance(h.element, Column) and isinstance(h.element.table, Table) for h in hidden
    )


def _has_bound_values(elements: Sequence[ClauseElement]) -> bool:
    return any(
        isinstance(node, BindParameter) for e in elements for node in visitors.iterate(e)
    )


def _plan_rows(
    stmt: Select[Any],
    parts: _compat.SelectParts,
    cols: Columns,
    dialects: Sequence[str],
    limit: int | None,
    offset: int,
    is_orm: bool,
    wants_tuples: bool,
    distinct: bool,
) -> tuple[RowsPlan, _RowsShape | None]:
    """The plan, and its shape when the shape may be cached (else ``None``)."""
    sort_keys: list[SortKey] = []
    new_order: list[ColumnElement[Any]] = []
    hidden_from: list[int] = []
    rewrite = False
    entity_tables = _entity_tables(cols.exprs)
    for index, element in enumerate(parts.order_by):
        item = parse_order_by(element)
        pos = cols.find(item.target)
        if pos is None:
            if isinstance(item.target, str):
                raise UnsupportedQueryError(
                    f"ORDER BY {item.target!r} does not name one selected column",
                    construct="ORDER BY label",
                )
            expr = unwrap_label(item.target)
            if distinct and not (
                isinstance(expr, ColumnClause)
                and getattr(expr, "table", None) is not None
                and any(expr.table is t for t in entity_tables)
            ):
                raise UnsupportedQueryError(
                    "DISTINCT with ORDER BY on an expression that is not selected",
                    construct="DISTINCT with ORDER BY",
                )
            known = len(cols.hidden)
            pos = cols.add_hidden(expr)
            if len(cols.hidden) > known:
                hidden_from.append(index)
        nulls_first, mixed = resolve_nulls(item, dialects)
        sort_keys.append(SortKey(pos, item.descending, nulls_first))
        value_expr = (
            cols.exprs[pos] if pos < cols.visible else cols.hidden[pos - cols.visible].element
        )
        if mixed and _nullable(value_expr) and isinstance(value_expr, ColumnElement):
            # Shards disagree on where NULLs go: make each put them where the merge
            # expects, with a CASE every dialect understands (MySQL has no NULLS FIRST).
            first, rest = ("0", "1") if nulls_first else ("1", "0")
            flag: ColumnElement[Any] = case(
                (unwrap_label(value_expr).is_(None), literal_column(first)),
                else_=literal_column(rest),
            )
            if distinct:
                # PostgreSQL wants DISTINCT's ORDER BY in the select list; the flag is a
                # function of a selected column, so DISTINCT is unchanged.
                flag = cols.hidden[cols.add_hidden(flag) - cols.visible]
            new_order.append(flag.asc())
            rewrite = True
        new_order.append(element)
    attributes: dict[str, Any] = {}
    if cols.hidden and is_orm:
        attributes["is_single_entity"] = _single_entity(cols, wants_tuples)
    shape = _RowsShape(
        visible=cols.visible,
        sort_keys=tuple(sort_keys),
        hidden_from=tuple(hidden_from),
        distinct=distinct,
        attributes=tuple(attributes.items()),
        shared_hidden=tuple(cols.hidden) if _table_columns(cols.hidden) else (),
    )
    plan = _rows_plan(
        shape, stmt, parts, cols.hidden, new_order if rewrite else None, limit, offset
    )
    cacheable = not rewrite and not _has_bound_values(parts.order_by)
    return plan, shape if cacheable else None
