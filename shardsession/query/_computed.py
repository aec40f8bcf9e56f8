"""Select-list items computed from merged aggregates: ``coalesce(sum(x), 0)``,
``round(avg(x), 2)``, ``sum(a) + 1``...

Each shard returns the partials of the aggregates inside the item; after the merge the
item's own expression is run again by the database of the first shard, on the merged
aggregates as bound values, in one small SELECT without FROM for a batch of groups.  So
``round``, ``coalesce``, casts, arithmetic and division have exactly that dialect's
meaning (rounding mode, integer division, NULL handling, result type), which Python
would only imitate.  The statement model (:mod:`._model`) admits an item here only when
everything in it outside the aggregates is a constant or a known function or operator.
"""

from __future__ import annotations

import decimal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    Numeric,
    cast,
    literal,
    literal_column,
    null,
    select,
    union_all,
)
from sqlalchemy.sql import operators, visitors
from sqlalchemy.sql.elements import Cast, ColumnElement, UnaryExpression
from sqlalchemy.sql.schema import Column
from sqlalchemy.sql.selectable import Select
from sqlalchemy.types import NullType, TypeEngine

__all__ = ["BATCH", "Computed", "Evaluator", "compute", "value_type"]

#: groups evaluated per SELECT (bounded so that the number of bound values stays far
#: below every backend's limit)
BATCH = 200

#: runs a SELECT on the shard whose dialect evaluates, returning its rows
Evaluator = Callable[[Select[Any]], Sequence[Any]]


@dataclass(frozen=True)
class Computed:
    """A visible column whose value is ``expression`` with each of ``aggregates``
    replaced by the merged value of the slot beside it."""

    position: int
    expression: ColumnElement[Any]
    aggregates: tuple[tuple[ColumnElement[Any], int], ...]


def value_type(value: Any, aggregate: ColumnElement[Any]) -> TypeEngine[Any]:
    """The SQL type to bind a merged ``value`` with (typed from the value itself: the
    expression's type may be ``NullType`` or narrower, e.g. AVG of an integer column)."""
    if isinstance(value, bool):
        return Boolean()
    if isinstance(value, int):
        return BigInteger()
    if isinstance(value, float):
        return Float()
    if isinstance(value, decimal.Decimal):
        exponent = value.as_tuple().exponent
        scale = max(0, -exponent) if isinstance(exponent, int) else 0
        precision = max(len(value.as_tuple().digits), scale, 1)
        return Numeric(precision, scale)
    return aggregate.type


_MYSQL = ("mysql", "mariadb")


def _constant(value: Any, aggregate: ColumnElement[Any], dialect: str) -> ColumnElement[Any]:
    """The merged ``value`` of ``aggregate`` as SQL of the type ``dialect``'s aggregate
    has (a typed NULL for ``None``, so that overloaded functions such as PostgreSQL's
    ``round`` resolve and ``coalesce`` keeps the aggregate's type)."""
    if value is None:
        type_: TypeEngine[Any] = aggregate.type
        name = str(getattr(aggregate, "name", "")).lower()
        args = list(getattr(aggregate, "clauses", ()))
        arg_type = getattr(args[0], "type", None) if args else None
        if isinstance(type_, NullType) or (name == "sum" and dialect in _MYSQL):
            # AVG (and MySQL's SUM of exact values): a decimal, or a float of floats
            type_ = Float() if isinstance(arg_type, Float) else Numeric()
        return cast(null(), type_)
    if dialect == "sqlite" and _numeric_affinity_extreme(aggregate):
        # MIN/MAX return one stored value of NUMERIC affinity, which SQLite keeps as an
        # INTEGER when it is integral (4, not 4.0); CAST of its text does the same.
        return cast(literal(str(value)), Numeric())
    type_ = value_type(value, aggregate)
    bound = literal(value, type_)
    if isinstance(type_, Float):
        # A driver may write a float as a decimal literal (psycopg2, PyMySQL), which the
        # database takes as NUMERIC/DECIMAL.  CAST AS FLOAT is double precision on
        # PostgreSQL and SQLite but single precision on MySQL/MariaDB, where adding the
        # double 0e0 converts instead (exactly: the literal is the float's repr).
        if dialect in _MYSQL:
            return bound + literal_column("0e0")
        return cast(bound, type_)
    # A decimal's precision and scale are part of its value (PostgreSQL's round() and
    # division scale follow them).
    return cast(bound, type_) if isinstance(type_, Numeric) else bound


def _numeric_affinity_extreme(aggregate: ColumnElement[Any]) -> bool:
    """Whether ``aggregate`` is MIN/MAX of a column or CAST of exact NUMERIC type."""
    if str(getattr(aggregate, "name", "")).lower() not in ("min", "max"):
        return False
    args = list(getattr(aggregate, "clauses", ()))
    if len(args) != 1:
        return False
    arg: Any = args[0]
    if isinstance(arg, UnaryExpression) and arg.operator is operators.distinct_op:
        arg = arg.element
    if not isinstance(arg, Cast | Column):
        return False
    return isinstance(arg.type, Numeric) and not isinstance(arg.type, Float)


def _substituted(item: Computed, row: Sequence[Any], dialect: str) -> ColumnElement[Any]:
    by_id = {
        id(agg): _constant(row[slot], agg, dialect) for agg, slot in item.aggregates
    }

    def replace(element: Any, **kw: Any) -> Any:
        return by_id.get(id(element))

    result: ColumnElement[Any] = visitors.replacement_traverse(
        item.expression, {}, replace
    )
    return result


def compute(
    items: Sequence[Computed],
    groups: list[tuple[Any, ...]],
    evaluate: Evaluator,
    dialect: str,
) -> list[tuple[Any, ...]]:
    """``groups`` with each computed item's value filled in, evaluated by ``evaluate``.

    Failure semantics: read-only; a database error evaluating an item (say a division
    by zero, as one database would raise) propagates unchanged.
    """
    if not items or not groups:
        return groups
    out = [list(g) for g in groups]
    for start in range(0, len(groups), BATCH):
        chunk = range(start, min(start + BATCH, len(groups)))
        selects = [
            select(
                literal(i, BigInteger()).label("i"),
                *[
                    _substituted(item, groups[i], dialect).label(f"v{k}")
                    for k, item in enumerate(items)
                ],
            )
            for i in chunk
        ]
        stmt = selects[0] if len(selects) == 1 else union_all(*selects)
        for row in evaluate(stmt):  # type: ignore[arg-type]
            for k, item in enumerate(items):
                out[row[0]][item.position] = row[1 + k]
    return [tuple(g) for g in out]
