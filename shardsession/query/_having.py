"""HAVING evaluated in Python on merged groups, with SQL's three-valued logic.

Only a small grammar is evaluated exactly: AND / OR / NOT, the six comparisons,
IS [NOT] NULL, over aggregates, grouped or selected columns and literal values.
Anything else refuses the statement (evaluating, say, a string function in Python could
differ from the database).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy.sql import operators
from sqlalchemy.sql.elements import (
    BinaryExpression,
    BindParameter,
    BooleanClauseList,
    ClauseElement,
    False_,
    Grouping,
    Null,
    True_,
    UnaryExpression,
)

from ..exc import UnsupportedQueryError
from ._dialect import nan_safe

__all__ = ["compile_having"]

Predicate = Callable[[Sequence[Any]], Any]

_COMPARISONS: dict[Any, Callable[[Any, Any], bool]] = {
    operators.eq: operator.eq,
    operators.ne: operator.ne,
    operators.lt: operator.lt,
    operators.le: operator.le,
    operators.gt: operator.gt,
    operators.ge: operator.ge,
}


def _unsupported(expr: Any) -> UnsupportedQueryError:
    return UnsupportedQueryError(
        f"HAVING expression {str(expr)!r} cannot be evaluated exactly after the merge",
        construct="HAVING",
    )


def _and(values: list[Any]) -> Any:
    if any(v is False for v in values):
        return False
    if any(v is None for v in values):
        return None
    return True


def _or(values: list[Any]) -> Any:
    if any(v is True for v in values):
        return True
    if any(v is None for v in values):
        return None
    return False


def _compare(op: Callable[[Any, Any], bool], left: Predicate, right: Predicate) -> Predicate:
    def run(row: Sequence[Any]) -> Any:
        a = left(row)
        b = right(row)
        if a is None or b is None:
            return None  # comparisons with NULL are unknown
        # NaN equals NaN and exceeds every number, as in PostgreSQL (the only backend
        # that returns NaN).
        try:
            return bool(op(nan_safe(a), nan_safe(b)))
        except TypeError as err:
            # e.g. max(name) > 2: each backend has its own cross-type rules (SQLite
            # ranks every number below every string, MySQL converts the string)
            raise UnsupportedQueryError(
                f"HAVING compares a {type(a).__name__} with a {type(b).__name__}; the "
                "merge does not reproduce the database's cross-type comparison: compare "
                "values of one type (cast one side)",
                construct="HAVING across types",
            ) from err

    return run


def compile_having(
    criteria: Sequence[ClauseElement], slot_for: Callable[[Any], int]
) -> Predicate:
    """Compile HAVING criteria into a function of a merged group's slot values that
    returns True, False or None (unknown); only True keeps the group.

    :param slot_for: gives the slot of an aggregate or grouped expression (adding hidden
        partial columns as needed); raises for anything else.
    :raises UnsupportedQueryError: the expression is outside the evaluated grammar.
    """
    preds = [_predicate(c, slot_for) for c in criteria]
    if len(preds) == 1:
        return preds[0]
    return lambda row: _and([p(row) for p in preds])


def _operand(expr: Any, slot_for: Callable[[Any], int]) -> Predicate:
    while isinstance(expr, Grouping):
        expr = expr.element
    if isinstance(expr, BindParameter):
        value = expr.effective_value
        return lambda row: value
    if isinstance(expr, Null):
        return lambda row: None
    if isinstance(expr, True_ | False_):
        const = isinstance(expr, True_)
        return lambda row: const
    try:
        slot = slot_for(expr)
    except UnsupportedQueryError as err:
        raise _unsupported(expr) from err
    return lambda row: row[slot]


def _predicate(expr: Any, slot_for: Callable[[Any], int]) -> Predicate:
    while isinstance(expr, Grouping):
        expr = expr.element
    if isinstance(expr, BooleanClauseList):
        parts = [_predicate(c, slot_for) for c in expr.clauses]
        if expr.operator is operators.and_:
            return lambda row: _and([p(row) for p in parts])
        if expr.operator is operators.or_:
            return lambda row: _or([p(row) for p in parts])
        raise _unsupported(expr)
    if isinstance(expr, UnaryExpression) and expr.operator is operators.inv:
        inner = _predicate(expr.element, slot_for)

        def negate(row: Sequence[Any]) -> Any:
            value = inner(row)
            return None if value is None else not value

        return negate
    if isinstance(expr, BinaryExpression):
        op = expr.operator
        if op in _COMPARISONS:
            return _compare(
                _COMPARISONS[op],
                _operand(expr.left, slot_for),
                _operand(expr.right, slot_for),
            )
        if op in (operators.is_, operators.is_not) and isinstance(expr.right, Null):
            left = _operand(expr.left, slot_for)
            want_null = op is operators.is_
            return lambda row: (left(row) is None) == want_null
    raise _unsupported(expr)
