"""The tables a clause reads, and how a subquery is tied to the statement around it."""

from __future__ import annotations

from typing import Any

from sqlalchemy.sql import operators
from sqlalchemy.sql.elements import (
    BinaryExpression,
    ClauseElement,
    ColumnClause,
    Grouping,
    Tuple,
)
from sqlalchemy.sql.selectable import FromClause, ScalarSelect, Select
from sqlalchemy.sql.util import find_tables

from .. import _compat

__all__ = ["note_in_link", "relating_conditions", "tables_in"]


def tables_in(clause: ClauseElement) -> list[FromClause]:
    return list(find_tables(clause, check_columns=True, include_aliases=True))


def note_in_link(node: ClauseElement, in_links: dict[int, Any]) -> None:
    """Remember ``column`` for the subquery of ``column [NOT] IN (subquery)`` (or the
    tuple of ``tuple_(a, b) IN (subquery)``: a set as well, not a scalar), keyed by the
    subquery's identity as :func:`walk` yields it."""
    if (
        isinstance(node, BinaryExpression)
        and node.operator in (operators.in_op, operators.not_in_op)
        and isinstance(node.left, ColumnClause | Tuple)
    ):
        right: Any = node.right
        while isinstance(right, Grouping | ScalarSelect):
            right = right.element
        in_links[id(right)] = node.left


def relating_conditions(sub: Select[Any], in_left: Any) -> list[Any]:
    """The conditions that may relate ``sub``'s rows to the enclosing statement's: its
    WHERE terms, plus ``in_left = <its one column>`` when it is ``in_left IN (sub)``."""
    parts = _compat.select_parts(sub)
    conditions: list[Any] = list(parts.where)
    columns = [c for c in parts.raw_columns if isinstance(c, ColumnClause)]
    if isinstance(in_left, ColumnClause) and len(parts.raw_columns) == 1 and columns:
        conditions.append(in_left == columns[0])
    return conditions
