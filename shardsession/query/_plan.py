"""Turn a SELECT into a per-shard statement plus the recipe to merge its results.

Two shapes of plan:

* :class:`RowsPlan` -- rows pass through: a k-way merge on the ORDER BY keys (read from
  extra, hidden columns appended to the per-shard statement when they are not selected),
  DISTINCT as a dedupe after the merge, LIMIT pushed down as ``LIMIT offset+limit``;
* :class:`AggregatePlan` -- aggregates and/or GROUP BY: each shard returns its partial
  groups (AVG as SUM and COUNT, HAVING/ORDER BY/LIMIT removed), merged in Python, then
  HAVING, DISTINCT, ORDER BY and LIMIT/OFFSET are applied to the merged groups.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import case, func, inspect, literal_column
from sqlalchemy.exc import CompileError
from sqlalchemy.sql import operators
from sqlalchemy.sql.elements import ClauseElement, ColumnClause, ColumnElement, Label
from sqlalchemy.sql.selectable import Select

from .. import _compat
from ..exc import UnsupportedQueryError
from ._aggregates import Slot
from ._checks import aggregate_kind, contains_aggregate, unwrap_label
from ._having import compile_having
from ._ordering import SortKey, default_nulls_first

__all__ = ["AggregatePlan", "OrderItem", "RowsPlan", "parse_order_by", "plan_select"]

HIDDEN_PREFIX = "_shardsession_"


@dataclass(frozen=True)
class OrderItem:
    """One ORDER BY element taken apart."""

    element: ColumnElement[Any]  # as written (with ASC/DESC/NULLS)
    target: Any  # the expression, a Label, or a label name (str)
    descending: bool
    nulls_first: bool | None  # None: not stated


@dataclass
class RowsPlan:
    statement: Select[Any]
    visible: int
    sort_keys: list[SortKey]
    limit: int | None
    offset: int
    distinct: bool
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass
class AggregatePlan:
    statement: Select[Any]
    visible: int
    slots: list[Slot]
    group_positions: list[int]
    has_group_by: bool
    having: Callable[[Sequence[Any]], Any] | None
    sort_keys: list[SortKey]
    distinct: bool
    limit: int | None
    offset: int


def parse_order_by(element: ColumnElement[Any]) -> OrderItem:
    """Take ASC/DESC and NULLS FIRST/LAST off an ORDER BY element."""
    expr: Any = element
    descending = False
    nulls: bool | None = None
    while True:
        modifier = getattr(expr, "modifier", None)
        if modifier is operators.desc_op:
            descending = True
        elif modifier is operators.asc_op:
            pass
        elif modifier is operators.nulls_first_op:
            nulls = True
        elif modifier is operators.nulls_last_op:
            nulls = False
        else:
            break
        expr = expr.element
    target = _compat.label_reference_target(expr)
    return OrderItem(element, expr if target is None else target, descending, nulls)


def _limit_offset(stmt: Select[Any]) -> tuple[int | None, int]:
    parts = _compat.select_parts(stmt)
    if parts.fetch_clause is not None:
        raise UnsupportedQueryError(
            "FETCH FIRST is not merged across shards; use limit()", construct="FETCH"
        )
    try:
        limit, offset = _compat.limit_offset_values(stmt)
    except CompileError as err:
        raise UnsupportedQueryError(
            "LIMIT/OFFSET must be integers to be applied across shards",
            construct="LIMIT/OFFSET expression",
        ) from err
    return limit, offset or 0


class _Columns:
    """The visible columns of a statement and the hidden ones added for the merge."""

    def __init__(self, stmt: Select[Any]) -> None:
        descs = stmt.column_descriptions
        self.names: list[str] = [str(d.get("name")) for d in descs]
        self.exprs: list[Any] = [_as_clause(d.get("expr")) for d in descs]
        self.hidden: list[Label[Any]] = []

    @property
    def visible(self) -> int:
        return len(self.exprs)

    def find(self, target: Any) -> int | None:
        """Position of a visible column that is ``target`` (a label name, a label or an
        equal expression)."""
        if isinstance(target, str):
            matches = [i for i, n in enumerate(self.names) if n == target]
            return matches[0] if len(matches) == 1 else None
        for i, expr in enumerate(self.exprs):
            if expr is target:
                return i
        plain = unwrap_label(target)
        if not isinstance(plain, ColumnElement):
            return None
        for i, expr in enumerate(self.exprs):
            candidate = unwrap_label(expr)
            if isinstance(candidate, ColumnElement) and candidate.compare(plain):
                return i
        return None

    def add_hidden(self, expr: ColumnElement[Any]) -> int:
        plain = unwrap_label(expr)
        for j, existing in enumerate(self.hidden):
            if existing.element.compare(plain):
                return self.visible + j
        self.hidden.append(plain.label(f"{HIDDEN_PREFIX}{len(self.hidden)}"))
        return self.visible + len(self.hidden) - 1


def _as_clause(expr: Any) -> Any:
    """ORM attributes (``User.name``) as their column expression; entities unchanged."""
    insp = inspect(expr, raiseerr=False)
    if insp is not None and (
        getattr(insp, "is_mapper", False) or getattr(insp, "is_aliased_class", False)
    ):
        return expr
    clause = getattr(expr, "__clause_element__", None)
    return clause() if clause is not None else expr


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


def _single_entity(cols: _Columns, wants_tuples: bool) -> bool:
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
    limit, offset = _limit_offset(stmt)
    if parts.for_update is not None and (limit is not None or offset):
        raise UnsupportedQueryError(
            "FOR UPDATE with LIMIT/OFFSET would lock rows on every shard that the merged "
            "result then drops",
            construct="FOR UPDATE with LIMIT",
        )
    cols = _Columns(stmt)
    aggregated = bool(parts.group_by or parts.having) or any(
        isinstance(e, ClauseElement) and contains_aggregate(e) for e in cols.exprs
    )
    if aggregated:
        return _plan_aggregate(stmt, cols, dialects, limit, offset)
    return _plan_rows(stmt, cols, dialects, limit, offset, is_orm, wants_tuples)


def _resolve_nulls(item: OrderItem, dialects: Sequence[str]) -> tuple[bool, bool]:
    if item.nulls_first is not None:
        return item.nulls_first, False
    return default_nulls_first(item.descending, dialects)


def _plan_rows(
    stmt: Select[Any],
    cols: _Columns,
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
        nulls_first, mixed = _resolve_nulls(item, dialects)
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


def _references_columns(expr: Any) -> bool:
    if not isinstance(expr, ClauseElement):
        return True  # an entity
    stack = [expr]
    while stack:
        node = stack.pop()
        if isinstance(node, ColumnClause) and not getattr(node, "is_literal", False):
            return True
        stack.extend(node.get_children())
    return False


class _SlotBuilder:
    def __init__(self, cols: _Columns) -> None:
        self.cols = cols
        self.slots: list[Slot] = []
        self.slot_exprs: list[Any] = []

    def add(self, slot: Slot, expr: Any) -> int:
        self.slots.append(slot)
        self.slot_exprs.append(expr)
        return len(self.slots) - 1

    def aggregate_slot(self, kind: str, expr: Any, visible_pos: int | None) -> Slot:
        plain = unwrap_label(expr)
        if kind == "avg":
            args = list(plain.clauses.clauses)
            arg = args[0] if args else None
            if arg is None:
                raise UnsupportedQueryError("AVG() needs an argument", construct="AVG")
            s = self.cols.add_hidden(func.sum(arg))
            c = self.cols.add_hidden(func.count(arg))
            return Slot("avg", (s, c))
        if visible_pos is None:
            visible_pos = self.cols.add_hidden(plain)
        return Slot(kind, (visible_pos,))

    def find_slot(self, expr: Any) -> int | None:
        plain = unwrap_label(expr)
        for i, existing in enumerate(self.slot_exprs):
            if existing is expr:
                return i
            cand = unwrap_label(existing)
            if (
                isinstance(cand, ColumnElement)
                and isinstance(plain, ColumnElement)
                and cand.compare(plain)
            ):
                return i
        return None

    def slot_for(self, expr: Any, group_exprs: Sequence[Any]) -> int:
        """A slot holding ``expr``'s merged value (adding hidden partials when needed)."""
        if isinstance(expr, str):
            pos = self.cols.find(expr)
            if pos is None:
                raise UnsupportedQueryError(
                    f"{expr!r} does not name one selected column", construct="label reference"
                )
            return pos
        found = self.find_slot(expr)
        if found is not None:
            return found
        kind = aggregate_kind(expr)
        if kind is not None:
            return self.add(self.aggregate_slot(kind, expr, None), expr)
        plain = unwrap_label(expr)
        for g in group_exprs:
            if isinstance(plain, ColumnElement) and unwrap_label(g).compare(plain):
                return self.add(Slot("key", (self.cols.add_hidden(plain),)), plain)
        if not _references_columns(plain) and not contains_aggregate(plain):
            return self.add(Slot("key", (self.cols.add_hidden(plain),)), plain)
        raise UnsupportedQueryError(
            "in an aggregate query across shards, ORDER BY and HAVING may only use "
            "aggregates, GROUP BY expressions and selected columns",
            construct="expression in ORDER BY/HAVING",
        )


def _plan_aggregate(
    stmt: Select[Any],
    cols: _Columns,
    dialects: Sequence[str],
    limit: int | None,
    offset: int,
) -> AggregatePlan:
    parts = _compat.select_parts(stmt)
    builder = _SlotBuilder(cols)
    group_exprs: list[Any] = []
    for g in parts.group_by:
        target = _compat.label_reference_target(g)
        group_exprs.append(g if target is None else target)
    for i, expr in enumerate(list(cols.exprs)):
        kind = aggregate_kind(expr) if isinstance(expr, ClauseElement) else None
        if kind is not None:
            builder.add(builder.aggregate_slot(kind, expr, i), expr)
            continue
        if isinstance(expr, ClauseElement) and contains_aggregate(expr):
            raise UnsupportedQueryError(
                "an aggregate inside an expression cannot be merged; select the "
                "aggregates themselves and combine them in Python",
                construct="aggregate in expression",
            )
        if not group_exprs and _references_columns(expr):
            raise UnsupportedQueryError(
                "a column that is neither aggregated nor grouped has no single value "
                "across shards",
                construct="non-aggregated column",
            )
        # A GROUP BY expression, or (as PostgreSQL requires) functionally dependent on
        # one: every shard holding the group has the same value.
        builder.add(Slot("key", (i,)), expr)
    group_positions = []
    for g in group_exprs:
        if isinstance(g, str):
            pos = cols.find(g)
            if pos is None:
                raise UnsupportedQueryError(
                    f"GROUP BY {g!r} does not name one selected column",
                    construct="GROUP BY label",
                )
        else:
            pos = cols.find(g)
            if pos is None:
                pos = cols.add_hidden(unwrap_label(g))
        group_positions.append(pos)
    having = None
    if parts.having:
        having = compile_having(parts.having, lambda e: builder.slot_for(e, group_exprs))
    sort_keys = []
    for element in parts.order_by:
        item = parse_order_by(element)
        slot = builder.slot_for(item.target, group_exprs)
        nulls_first, _mixed = _resolve_nulls(item, dialects)
        sort_keys.append(SortKey(slot, item.descending, nulls_first))
    per_shard = _compat.with_having(stmt, ()).order_by(None).limit(None).offset(None)
    if cols.hidden:
        per_shard = per_shard.add_columns(*cols.hidden)
    return AggregatePlan(
        statement=per_shard,
        visible=cols.visible,
        slots=builder.slots,
        group_positions=group_positions,
        has_group_by=bool(group_exprs),
        having=having,
        sort_keys=sort_keys,
        distinct=parts.distinct,
        limit=limit,
        offset=offset,
    )
