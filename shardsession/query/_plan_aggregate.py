"""Plan an aggregate SELECT (aggregates and/or GROUP BY) across shards.

Each shard returns its partial groups (AVG as SUM and COUNT; HAVING, ORDER BY and
LIMIT removed, hidden partial columns added); :class:`AggregatePlan` says where each
merged value comes from, and HAVING, DISTINCT, ORDER BY and LIMIT/OFFSET are applied to
the merged groups in Python.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Boolean, Integer, func, type_coerce
from sqlalchemy.sql import visitors
from sqlalchemy.sql.elements import ClauseElement, ClauseList, ColumnClause, ColumnElement
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.sql.selectable import ScalarSelect, Select, SelectBase
from sqlalchemy.types import NullType

from .. import _compat
from ..exc import UnsupportedQueryError
from ._aggregates import Slot
from ._columns import Columns, parse_order_by, references_columns, resolve_nulls
from ._computed import Computed
from ._dialect import avg_sum_argument
from ._having import compile_having
from ._model import ItemModel
from ._nodes import aggregate_kind, contains_aggregate, distinct_argument, unwrap_label
from ._ordering import SortKey

__all__ = ["AggregatePlan", "plan_aggregate"]


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
    #: select-list items evaluated after the merge from merged aggregates
    computed: tuple[Computed, ...] = ()


def _check_computable(dialects: Sequence[str], expr: Any) -> None:
    if len(set(dialects)) > 1:
        raise UnsupportedQueryError(
            "a function of aggregates is evaluated after the merge by one shard's "
            "database; with shards of different dialects its meaning is not one",
            construct="aggregate in expression (mixed dialects)",
        )
    if dialects and dialects[0] in ("mysql", "mariadb") and any(
        kind.startswith("avg") for _, kind in _aggregates_in(expr)
    ):
        # MySQL computes a function of AVG from the exact average; the merged AVG is
        # the one it shows, rounded to 4 more decimals than its argument.
        raise UnsupportedQueryError(
            "a function of AVG cannot be computed after the merge on MySQL/MariaDB "
            "(the merged AVG is rounded as MySQL shows it, not as it computes with it)",
            construct="function of AVG (MySQL)",
        )


def _aggregates_in(expr: Any) -> list[tuple[Any, str]]:
    """The mergeable aggregates of a computed item, each once, with their kinds."""
    found: list[tuple[Any, str]] = []
    for node in visitors.iterate(unwrap_label(expr)):
        kind = (
            aggregate_kind(node, distinct_ok=True)
            if isinstance(node, FunctionElement)
            else None
        )
        if kind is not None and not any(node is f for f, _ in found):
            found.append((node, kind))
    return found


def _check_distinct_values(x: Any, dialects: Sequence[str]) -> None:
    """The merge tells distinct values of ``x`` apart by Python equality: exact for
    numbers, dates and binary-collated strings of one dialect; not for strings a
    collation may fold (see :func:`~shardsession._compat.string_may_fold`), nor for
    values each dialect's driver types differently (SQLite ``1.1``, PostgreSQL
    ``Decimal('1.10')``)."""
    if len(set(dialects)) > 1:
        raise UnsupportedQueryError(
            "an aggregate over DISTINCT values on shards of different dialects is not "
            "merged (their drivers type the values differently)",
            construct="aggregate(DISTINCT) on mixed dialects",
        )
    if _compat.string_may_fold(getattr(x, "type", None), dialects):
        raise UnsupportedQueryError(
            "an aggregate over DISTINCT strings whose collation may fold values "
            "(MySQL/MariaDB, or a collation of the column) is not merged",
            construct="aggregate(DISTINCT string) with a collation",
        )


def _function_of_keys(expr: Any, group_exprs: Sequence[Any]) -> bool:
    """Whether every column ``expr`` reads is a GROUP BY expression (and it holds no
    aggregate or subquery): its value is one per group."""
    if contains_aggregate(expr) or any(
        isinstance(n, SelectBase | ScalarSelect) for n in visitors.iterate(expr)
    ):
        return False
    keys = [unwrap_label(g) for g in group_exprs if not isinstance(g, str)]
    stack = [expr]
    while stack:
        node = stack.pop()
        if any(_compat.same_expression(k, node) for k in keys):
            continue
        if isinstance(node, ColumnClause) and not node.is_literal:
            return False
        stack.extend(node.get_children())
    return True


class _SlotBuilder:
    def __init__(self, cols: Columns, dialects: Sequence[str] = ()) -> None:
        self.cols = cols
        self.dialects = dialects
        self.slots: list[Slot] = []
        self.slot_exprs: list[Any] = []
        #: x of the COUNT/SUM/AVG(DISTINCT x) (the model allows one x per statement)
        self.distinct_of: Any = None

    def add(self, slot: Slot, expr: Any) -> int:
        self.slots.append(slot)
        self.slot_exprs.append(expr)
        return len(self.slots) - 1

    def aggregate_slot(self, kind: str, expr: Any, visible_pos: int | None) -> Slot:
        plain = unwrap_label(expr)
        if kind.endswith("_distinct"):
            # Each shard returns its distinct values of x (it groups by x as well).
            self.distinct_of = distinct_argument(plain)
            _check_distinct_values(self.distinct_of, self.dialects)
            return Slot(kind, (self.cols.add_hidden(self.distinct_of),))
        if kind == "avg":
            args = list(plain.clauses.clauses)
            arg = args[0] if args else None
            if arg is None:
                raise UnsupportedQueryError("AVG() needs an argument", construct="AVG")
            s = self.cols.add_hidden(_avg_partial_sum(arg, self.dialects))
            c = self.cols.add_hidden(func.count(arg))
            return Slot("avg", (s, c))
        if kind == "sum" and _is_boolean(_sum_argument(plain)):
            # Each shard's SUM(flag) would pass through the Boolean result processor
            # (True for any count); the partials are read as integers and the merged
            # total converted as one database's would be.
            arg = _sum_argument(plain)
            total = self.cols.add_hidden(_integer_sum(func.sum(arg), arg))
            return Slot("sum", (total,), as_bool=True)
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
                and _compat.same_expression(cand, plain)
            ):
                return i
        return None

    def slot_for(self, expr: Any, group_exprs: Sequence[Any], *, order: bool = False) -> int:
        """A slot holding ``expr``'s merged value (adding hidden partials when needed);
        ``order``: for ORDER BY, which may also sort by a function of GROUP BY values."""
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
        kind = aggregate_kind(expr, distinct_ok=True)
        if kind is not None:
            return self.add(self.aggregate_slot(kind, expr, None), expr)
        plain = unwrap_label(expr)
        for g in group_exprs:
            if isinstance(plain, ColumnElement) and _compat.same_expression(
                unwrap_label(g), plain
            ):
                return self.add(Slot("key", (self.cols.add_hidden(plain),)), plain)
        if not references_columns(plain) and not contains_aggregate(plain):
            return self.add(Slot("key", (self.cols.add_hidden(plain),)), plain)
        if order and _function_of_keys(plain, group_exprs):
            # Every shard holding a group computes the same value for it.  (Not for
            # HAVING: evaluating, say, lower(x) = 'a' in Python could differ from SQL.)
            return self.add(Slot("key", (self.cols.add_hidden(plain),)), plain)
        raise UnsupportedQueryError(
            "in an aggregate query across shards, ORDER BY and HAVING may only use "
            "aggregates, GROUP BY expressions and selected columns",
            construct="expression in ORDER BY/HAVING",
        )



def _sum_argument(call: Any) -> Any:
    args = list(getattr(getattr(call, "clauses", None), "clauses", ()))
    return args[0] if len(args) == 1 else None


def _is_boolean(expr: Any) -> bool:
    return isinstance(getattr(expr, "type", None), Boolean)


def _integer_sum(partial: Any, arg: Any) -> Any:
    """A partial SUM of a Boolean argument read as an integer (``SUM`` takes its
    argument's type, whose result processor would turn a shard's count into ``True``)."""
    return type_coerce(partial, Integer()) if _is_boolean(arg) else partial


def _avg_partial_sum(arg: Any, dialects: Sequence[str]) -> Any:
    """Each shard's partial SUM for AVG(arg).

    On SQLite an integer SUM raises "integer overflow" past 2**63 where SQLite's AVG
    goes on in floating point: there the partial is ``total(arg)`` (a double, exact up
    to 2**53 as the integer sum is), and the merged AVG a double, as SQLite's is."""
    if (
        dialects
        and all(d == "sqlite" for d in dialects)
        and isinstance(getattr(arg, "type", None), Integer)
    ):
        return func.total(arg)
    # Untyped, as SQLAlchemy types AVG itself: the driver's own value comes back (a
    # PostgreSQL numeric SUM of a Float-typed CASE stays a Decimal, as its AVG does; a
    # Boolean's SUM stays a number), not one converted by the argument's type.
    return type_coerce(func.sum(avg_sum_argument(arg, dialects)), NullType())


def _group_expression(g: Any) -> Any:
    """A GROUP BY term as its expression: SQLAlchemy keeps a function call given to
    ``group_by()`` as a one-element list holding the function under an anonymous label
    (it renders as the function alone)."""
    while isinstance(g, ClauseList) and len(g.clauses) == 1:
        g = unwrap_label(g.clauses[0])
    return g


def plan_aggregate(
    stmt: Select[Any],
    cols: Columns,
    dialects: Sequence[str],
    limit: int | None,
    offset: int,
    *,
    distinct: bool,
    items: Sequence[ItemModel] | None = None,
) -> AggregatePlan:
    parts = _compat.select_parts(stmt)
    builder = _SlotBuilder(cols, dialects)
    group_exprs: list[Any] = []
    for g in parts.group_by:
        target = _compat.label_reference_target(g)
        group_exprs.append(_group_expression(g) if target is None else target)
    pending: list[tuple[int, Any]] = []
    for i, expr in enumerate(list(cols.exprs)):
        if items is not None and items[i].kind == "computed":
            _check_computable(dialects, expr)
            # Each shard's own value of the item is replaced after the merge.
            builder.add(Slot("key", (i,)), expr)
            pending.append((i, expr))
            continue
        kind = (
            aggregate_kind(expr, distinct_ok=True) if isinstance(expr, ClauseElement) else None
        )
        if kind is not None:
            builder.add(builder.aggregate_slot(kind, expr, i), expr)
            continue
        if isinstance(expr, ClauseElement) and contains_aggregate(expr):
            raise UnsupportedQueryError(
                "an aggregate inside an expression cannot be merged; select the "
                "aggregates themselves and combine them in Python",
                construct="aggregate in expression",
            )
        if not group_exprs and references_columns(expr):
            raise UnsupportedQueryError(
                "a column that is neither aggregated nor grouped has no single value "
                "across shards",
                construct="non-aggregated column",
            )
        # A GROUP BY expression, or (as PostgreSQL requires) functionally dependent on
        # one: every shard holding the group has the same value.
        builder.add(Slot("key", (i,)), expr)
    # The aggregates inside computed items get slots after the visible columns' (a
    # merged row's first values are the visible columns).
    computed = [
        Computed(
            i,
            unwrap_label(expr),
            tuple(
                (agg, builder.add(builder.aggregate_slot(kind, agg, None), agg))
                for agg, kind in _aggregates_in(expr)
            ),
        )
        for i, expr in pending
    ]
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
        slot = builder.slot_for(item.target, group_exprs, order=True)
        nulls_first, _mixed = resolve_nulls(item, dialects)
        sort_keys.append(SortKey(slot, item.descending, nulls_first))
    per_shard = (
        _compat.with_having(stmt, ()).order_by(None).limit(None).fetch(None).offset(None)
    )
    if cols.hidden:
        per_shard = per_shard.add_columns(*cols.hidden)
    if builder.distinct_of is not None:
        per_shard = per_shard.group_by(builder.distinct_of)
    return AggregatePlan(
        statement=per_shard,
        visible=cols.visible,
        slots=builder.slots,
        group_positions=group_positions,
        has_group_by=bool(group_exprs),
        having=having,
        sort_keys=sort_keys,
        distinct=distinct,
        limit=limit,
        offset=offset,
        computed=tuple(computed),
    )
