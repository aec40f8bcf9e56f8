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

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import case, inspect, literal_column
from sqlalchemy.sql.elements import ClauseElement, ColumnClause, ColumnElement
from sqlalchemy.sql.selectable import Select

from .. import _compat
from ..exc import UnsupportedQueryError
from ._checks import contains_aggregate, unwrap_label
from ._columns import Columns, OrderItem, limit_offset, parse_order_by, resolve_nulls
from ._ordering import SortKey
from ._plan_aggregate import AggregatePlan, plan_aggregate

__all__ = ["AggregatePlan", "OrderItem", "RowsPlan", "parse_order_by", "plan_select"]


@dataclass
class RowsPlan:
    statement: Select[Any]
    visible: int
    sort_keys: list[SortKey]
    limit: int | None
    offset: int
    distinct: bool
    attributes: dict[str, Any] = field(default_factory=dict)



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
) -> RowsPlan | AggregatePlan:
    """Plan the merge of ``stmt`` over shards of the given dialects.

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
    cols = Columns(stmt)
    aggregated = bool(parts.group_by or parts.having) or any(
        isinstance(e, ClauseElement) and contains_aggregate(e) for e in cols.exprs
    )
    if aggregated:
        return plan_aggregate(stmt, cols, dialects, limit, offset)
    return _plan_rows(stmt, cols, dialects, limit, offset, is_orm, wants_tuples)



def _plan_rows(
    stmt: Select[Any],
    cols: Columns,
    dialects: Sequence[str],
    limit: int | None,
    offset: int,
    is_orm: bool,
    wants_tuples: bool,
) -> RowsPlan:
    parts = _compat.select_parts(stmt)
    sort_keys: list[SortKey] = []
    new_order: list[ColumnElement[Any]] = []
    rewrite = False
    entity_tables = _entity_tables(cols.exprs)
    for element in parts.order_by:
        item = parse_order_by(element)
        pos = cols.find(item.target)
        if pos is None:
            if isinstance(item.target, str):
                raise UnsupportedQueryError(
                    f"ORDER BY {item.target!r} does not name one selected column",
                    construct="ORDER BY label",
                )
            expr = unwrap_label(item.target)
            if parts.distinct and not (
                isinstance(expr, ColumnClause)
                and getattr(expr, "table", None) is not None
                and any(expr.table is t for t in entity_tables)
            ):
                raise UnsupportedQueryError(
                    "DISTINCT with ORDER BY on an expression that is not selected",
                    construct="DISTINCT with ORDER BY",
                )
            pos = cols.add_hidden(expr)
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
            if parts.distinct:
                # PostgreSQL wants DISTINCT's ORDER BY in the select list; the flag is a
                # function of a selected column, so DISTINCT is unchanged.
                flag = cols.hidden[cols.add_hidden(flag) - cols.visible]
            new_order.append(flag.asc())
            rewrite = True
        new_order.append(element)
    per_shard = stmt
    if cols.hidden:
        per_shard = per_shard.add_columns(*cols.hidden)
    if rewrite:
        per_shard = per_shard.order_by(None).order_by(*new_order)
    if limit is not None:
        per_shard = per_shard.limit(limit + offset).offset(None)
    elif offset:
        per_shard = per_shard.offset(None)
    attributes: dict[str, Any] = {}
    if cols.hidden and is_orm:
        attributes["is_single_entity"] = _single_entity(cols, wants_tuples)
    return RowsPlan(
        statement=per_shard,
        visible=cols.visible,
        sort_keys=sort_keys,
        limit=limit,
        offset=offset,
        distinct=parts.distinct,
        attributes=attributes,
    )
