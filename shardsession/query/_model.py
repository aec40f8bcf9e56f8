"""The model of a fan-out SELECT: the allow-list of what the merge knows.

One pass over the select list, GROUP BY, HAVING and ORDER BY of a statement that runs on
several shards classifies every node into a kind the planner merges exactly (a column,
a bound value, a mergeable aggregate, a known row-level function, CASE, CAST,
arithmetic, comparison, boolean logic, a subquery that :mod:`._checks` checks). A node
without a kind raises :class:`~shardsession.exc.UnsupportedQueryError` naming it, before
any shard is asked: a function the planner does not know (it may be an aggregate of the
database, or a user-defined one), an aggregate, window or subquery inside a function or
an expression, opaque SQL (``text()``, ``literal_column()``) whose meaning the merge
cannot see.

WHERE and JOIN ... ON run unchanged on every shard, row by row, so they are not part of
the merge: :mod:`._checks` only refuses there what reads other rows (subqueries,
windows, aggregate-looking text).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.sql import operators
from sqlalchemy.sql.elements import (
    BinaryExpression,
    BindParameter,
    Case,
    Cast,
    ClauseList,
    CollationClause,
    ColumnClause,
    ColumnElement,
    ExpressionClauseList,
    Extract,
    False_,
    FunctionFilter,
    Grouping,
    Label,
    Null,
    Over,
    TextClause,
    True_,
    Tuple,
    TypeClause,
    TypeCoerce,
    UnaryExpression,
    WithinGroup,
)
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.sql.selectable import FromClause, ScalarSelect, Select, SelectBase

from .. import _compat
from ..exc import UnsupportedQueryError
from ._nodes import (
    KNOWN_SCALAR_FUNCTIONS,
    MERGEABLE_AGGREGATES,
    OTHER_AGGREGATES,
    aggregate_kind,
    distinct_argument,
    unwrap_label,
)

__all__ = ["ItemModel", "StatementModel", "model_select"]


_ORDER_MODIFIERS = (
    operators.asc_op,
    operators.desc_op,
    operators.nulls_first_op,
    operators.nulls_last_op,
)


@dataclass(frozen=True)
class ItemModel:
    """One selected column: ``"entity"`` (a mapped class or table selected whole),
    ``"row"`` (a row-level expression), ``"aggregate"`` (a mergeable aggregate,
    ``aggregate`` naming it) or ``"computed"`` (known functions and operators of
    mergeable aggregates and constants, evaluated after the merge)."""

    kind: str
    aggregate: str | None = None


@dataclass(frozen=True)
class StatementModel:
    """What the plans read of a fan-out SELECT (no statement object is kept, so a model
    may be cached by the statement's structural key)."""

    items: tuple[ItemModel, ...]
    #: aggregates anywhere in the select list, HAVING or ORDER BY, or a GROUP BY/HAVING
    aggregated: bool
    #: ``SELECT DISTINCT``, or ``select(distinct(col), ...)`` (which renders the same)
    distinct: bool
    #: without a placement: what relates rows of sharded tables (a join, a correlated or
    #: IN subquery), for the :class:`~shardsession.exc.ColocationWarning` of each run
    colocation: str | None = None


def _refuse(message: str, construct: str) -> UnsupportedQueryError:
    return UnsupportedQueryError(message, construct=construct)


def _function_name(node: FunctionElement[Any]) -> str:
    return str(getattr(node, "name", "") or type(node).__name__).lower()


class _Walker:
    """Classifies the nodes of one clause; ``aggregates`` counts those found.

    In the select list an aggregate may sit inside known functions and operators
    (``coalesce(sum(x), 0)``): the item is then *computed* after the merge from the
    merged aggregates (:mod:`._computed`), which is exact only when nothing else in it
    reads a row: ``outside`` counts the columns and subqueries outside aggregates, and
    ``nested`` the aggregates inside an expression.
    """

    def __init__(self, clause: str) -> None:
        self.clause = clause
        self.aggregates = 0
        self.nested = 0
        self.outside = 0
        self._in_aggregate = 0
        #: ``x`` of each COUNT/SUM/AVG(DISTINCT x) found
        self.distinct_arguments: list[Any] = []

    def visit(self, node: Any, *, inside: str | None = None, nested: bool = False) -> None:
        """Classify ``node``; ``inside`` names the enclosing function or aggregate (an
        aggregate, window or subquery is refused there); ``nested``: under an operator,
        CASE or CAST (an aggregate is refused there: its per-shard value would be
        combined before the merge)."""
        while isinstance(node, Label | Grouping):
            node = node.element
        target = _compat.label_reference_target(node)
        if target is not None:
            if not isinstance(target, str):
                self.visit(target, inside=inside, nested=nested)
            return  # a label name: resolved against the select list by the plan
        if isinstance(node, BindParameter | Null | True_ | False_ | TypeClause):
            return
        if isinstance(node, CollationClause):
            if self.clause == "GROUP BY" or self.clause == "select list":
                raise _refuse(
                    f"COLLATE in the {self.clause} of a fan-out: the merge groups and "
                    "deduplicates by exact value",
                    "COLLATE",
                )
            return
        if isinstance(node, ColumnClause):
            self._column(node, inside)
            return
        if isinstance(node, TextClause):
            raise _refuse(
                f"text() in the {self.clause} of a statement that runs on several shards "
                "cannot be checked for the merge; write it as an expression",
                f"text() in {self.clause}",
            )
        if isinstance(node, Over):
            raise _refuse("window functions (OVER) see only one shard's rows", "OVER")
        if isinstance(node, WithinGroup):
            raise _refuse("ordered-set aggregates (WITHIN GROUP) cannot be merged",
                          "WITHIN GROUP")
        if isinstance(node, FunctionFilter):
            raise _refuse("aggregate FILTER (WHERE ...) is not merged", "FILTER")
        if isinstance(node, FunctionElement):
            self._function(node, inside, nested)
            return
        if isinstance(node, SelectBase | ScalarSelect):
            if inside is not None:
                raise _refuse(
                    f"a subquery inside {inside} is not merged across shards",
                    f"subquery inside {inside}",
                )
            self.outside += 1
            return  # checked by _checks.check_subquery
        if isinstance(node, UnaryExpression):
            self._unary(node, inside, nested)
            return
        if isinstance(node, BinaryExpression | ClauseList | ExpressionClauseList | Tuple
                      | Case | Cast | TypeCoerce | Extract):
            # HAVING's own connectives are evaluated after the merge (._having).
            keep = self.clause == "HAVING" and _having_connective(node)
            for child in node.get_children():
                self.visit(child, inside=inside, nested=nested or not keep)
            return
        raise _refuse(
            f"{type(node).__name__} ({str(node)[:60]!r}) in the {self.clause} is not "
            "known to the cross-shard merge",
            type(node).__name__,
        )

    def _column(self, node: ColumnClause[Any], inside: str | None) -> None:
        if not node.is_literal:
            if not self._in_aggregate:
                self.outside += 1
            return
        if node.name == "*" and inside == "COUNT()":
            return  # COUNT(*), also as Query.count() and func.count() write it
        raise _refuse(
            f"literal_column({node.name!r}) in the {self.clause} of a statement that runs "
            "on several shards is opaque to the merge; write it as an expression",
            f"literal_column() in {self.clause}",
        )

    def _unary(self, node: UnaryExpression[Any], inside: str | None, nested: bool) -> None:
        if node.operator is operators.distinct_op:
            if inside not in ("COUNT()", "MIN()", "MAX()", "SUM()", "AVG()"):
                raise _refuse(
                    "a column-level DISTINCT is merged only as the first selected column "
                    "(where it means SELECT DISTINCT)",
                    "DISTINCT in expression",
                )
        elif node.modifier in _ORDER_MODIFIERS:
            if self.clause != "ORDER BY":
                raise _refuse(f"ASC/DESC in the {self.clause}", "ASC/DESC")
        elif not (self.clause == "HAVING" and node.operator is operators.inv):
            nested = True
        self.visit(node.element, inside=inside, nested=nested)

    def _function(self, node: FunctionElement[Any], inside: str | None, nested: bool) -> None:
        name = _function_name(node)
        shown = f"{name.upper()}()"
        if name in MERGEABLE_AGGREGATES:
            if self._in_aggregate or (
                (inside is not None or nested) and self.clause != "select list"
            ):
                raise _refuse(
                    f"{shown} inside {inside or 'an expression'}: an aggregate inside a "
                    "function or expression is merged only as a selected column",
                    "aggregate in expression",
                )
            if inside is not None or nested:
                self.nested += 1
            if self.clause in ("GROUP BY", "WHERE"):
                raise _refuse(f"{shown} in {self.clause}", f"aggregate in {self.clause}")
            if len(node.clauses.clauses) != 1:
                # SQLite's max(a, b) is a row-level function, not an aggregate.
                raise _refuse(f"{shown} with {len(node.clauses.clauses)} arguments",
                              f"{shown} with several arguments")
            if aggregate_kind(node, distinct_ok=True) in _DISTINCT_KINDS:
                self.distinct_arguments.append(distinct_argument(node))
            self.aggregates += 1
            self._in_aggregate += 1
            for arg in node.clauses.clauses:
                self.visit(arg, inside=shown)
            self._in_aggregate -= 1
            return
        if name in OTHER_AGGREGATES:
            raise _refuse(f"{name}() cannot be merged across shards", f"{name}()")
        if name not in KNOWN_SCALAR_FUNCTIONS:
            raise _refuse(
                f"function {name}() in the {self.clause} is not known to the cross-shard "
                "merge (it may aggregate rows)",
                f"{name}()",
            )
        for arg in node.clauses.clauses:
            self.visit(arg, inside=shown if inside is None else inside)


_DISTINCT_KINDS = ("count_distinct", "sum_distinct", "avg_distinct")

_HAVING_OPERATORS = frozenset(
    {operators.and_, operators.or_, operators.eq, operators.ne, operators.lt, operators.le,
     operators.gt, operators.ge, operators.is_, operators.is_not}
)


def _having_connective(node: Any) -> bool:
    return getattr(node, "operator", None) in _HAVING_OPERATORS


def _selected_expressions(stmt: Select[Any]) -> Iterable[Any]:
    for col in _compat.select_parts(stmt).raw_columns:
        if isinstance(col, FromClause) and not isinstance(col, ColumnElement):
            yield None  # an entity or a table selected whole
        else:
            yield col


def _column_distinct(expr: Any) -> bool:
    plain = unwrap_label(expr)
    return isinstance(plain, UnaryExpression) and plain.operator is operators.distinct_op


def model_select(stmt: Select[Any], colocation: str | None = None) -> StatementModel:
    """Classify every node of ``stmt``'s select list, GROUP BY, HAVING and ORDER BY.

    :raises UnsupportedQueryError: naming the first node that has no kind in the model;
        nothing was sent to any shard.
    """
    parts = _compat.select_parts(stmt)
    walkers: list[_Walker] = []
    items: list[ItemModel] = []
    aggregated = bool(parts.group_by or parts.having)
    column_distinct = False
    for position, expr in enumerate(_selected_expressions(stmt)):
        if expr is None:
            items.append(ItemModel("entity"))
            continue
        walker = _Walker("select list")
        walkers.append(walker)
        if position == 0 and _column_distinct(expr):
            column_distinct = True
            expr = unwrap_label(expr).element
        walker.visit(expr)
        if walker.nested:
            if walker.outside:
                raise _refuse(
                    "a function of aggregates that also reads a column or subquery is not "
                    "merged across shards; select the aggregates and the column apart",
                    "aggregate in expression",
                )
            aggregated = True
            items.append(ItemModel("computed"))
        elif walker.aggregates:
            aggregated = True
            items.append(ItemModel("aggregate", aggregate_kind(expr, distinct_ok=True)))
        else:
            items.append(ItemModel("row"))
    for clause, exprs in (("GROUP BY", parts.group_by), ("HAVING", parts.having),
                          ("ORDER BY", parts.order_by)):
        for expr in exprs:
            walker = _Walker(clause)
            walkers.append(walker)
            walker.visit(expr)
            aggregated = aggregated or bool(walker.aggregates)
    distinct_arguments = [x for w in walkers for x in w.distinct_arguments]
    if any(not _compat.same_expression(x, distinct_arguments[0]) for x in distinct_arguments):
        # Each shard groups by the one DISTINCT argument as well (see _plan_aggregate).
        raise _refuse(
            "aggregates over DISTINCT of different expressions are not merged",
            "several DISTINCT arguments",
        )
    return StatementModel(
        tuple(items), aggregated, parts.distinct or column_distinct, colocation
    )
