"""Pieces shared by the planners: ORDER BY items, LIMIT/OFFSET, the column list.

:class:`Columns` holds the visible columns of a statement and the hidden ones a plan
appends to the per-shard statement (sort keys, aggregate partials); hidden columns are
labelled with :data:`HIDDEN_PREFIX` and never shown to the caller.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import inspect
from sqlalchemy.exc import CompileError
from sqlalchemy.sql import operators
from sqlalchemy.sql.elements import (
    ClauseElement,
    ColumnClause,
    ColumnElement,
    Label,
    UnaryExpression,
)
from sqlalchemy.sql.selectable import Select

from .. import _compat
from ..exc import UnsupportedQueryError
from ._nodes import unwrap_label
from ._ordering import default_nulls_first

__all__ = [
    "HIDDEN_PREFIX",
    "Columns",
    "OrderItem",
    "as_clause",
    "hidden_label",
    "limit_offset",
    "parse_order_by",
    "references_columns",
    "resolve_nulls",
]

HIDDEN_PREFIX = "_shardsession_"


@dataclass(frozen=True)
class OrderItem:
    """One ORDER BY element taken apart."""

    element: ColumnElement[Any]  # as written (with ASC/DESC/NULLS)
    target: Any  # the expression, a Label, or a label name (str)
    descending: bool
    nulls_first: bool | None  # None: not stated



def parse_order_by(element: ColumnElement[Any]) -> OrderItem:
    """Take ASC/DESC and NULLS FIRST/LAST off an ORDER BY element."""
    expr: Any = element
    descending = False
    nulls: bool | None = None
    while True:
        # ``order_by(label.desc())`` wraps the whole ``label DESC`` in a label
        # reference: unwrap it and go on taking the modifiers off.
        inner = _compat.label_reference_target(expr)
        if inner is not None and not isinstance(inner, str) and getattr(
            inner, "modifier", None
        ) is not None:
            expr = inner
            continue
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



def resolve_nulls(item: OrderItem, dialects: Sequence[str]) -> tuple[bool, bool]:
    """``(nulls_first, mixed)`` of an ORDER BY item on shards of ``dialects``."""
    if item.nulls_first is not None:
        return item.nulls_first, False
    return default_nulls_first(item.descending, dialects)


def limit_offset(stmt: Select[Any]) -> tuple[int | None, int]:
    """LIMIT (``None``: none) and OFFSET (0: none) as ints; ``FETCH FIRST n ROWS ONLY``
    counts as ``LIMIT n``; refuses FETCH ... WITH TIES / PERCENT and expressions."""
    parts = _compat.select_parts(stmt)
    try:
        if parts.fetch_clause is not None:
            fetch = _compat.plain_fetch_value(stmt)
            if fetch is None:
                raise UnsupportedQueryError(
                    "FETCH FIRST ... WITH TIES / PERCENT is not merged across shards",
                    construct="FETCH WITH TIES/PERCENT",
                )
            return fetch, _compat.limit_offset_values(stmt)[1] or 0
        limit, offset = _compat.limit_offset_values(stmt)
    except CompileError as err:
        raise UnsupportedQueryError(
            "LIMIT/OFFSET must be integers to be applied across shards",
            construct="LIMIT/OFFSET expression",
        ) from err
    return limit, offset or 0


class Columns:
    """The visible columns of a statement and the hidden ones added for the merge."""

    def __init__(self, stmt: Select[Any]) -> None:
        descs = stmt.column_descriptions
        self.names: list[str] = [str(d.get("name")) for d in descs]
        self.exprs: list[Any] = [as_clause(d.get("expr")) for d in descs]
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
            candidate = _selected_value(expr)
            if isinstance(candidate, ColumnElement) and _compat.same_expression(candidate, plain):
                return i
        return None

    def add_hidden(self, expr: ColumnElement[Any]) -> int:
        plain = unwrap_label(expr)
        for j, existing in enumerate(self.hidden):
            if _compat.same_expression(existing.element, plain):
                return self.visible + j
        self.hidden.append(hidden_label(plain, len(self.hidden)))
        return self.visible + len(self.hidden) - 1


def _selected_value(expr: Any) -> Any:
    """The value a select-list item gives: under labels, and under the column-level
    DISTINCT of ``select(distinct(col))`` (which renders as ``SELECT DISTINCT col``)."""
    expr = unwrap_label(expr)
    if isinstance(expr, UnaryExpression) and expr.operator is operators.distinct_op:
        expr = unwrap_label(expr.element)
    return expr


def hidden_label(expr: ColumnElement[Any], index: int) -> Label[Any]:
    """``expr`` as the ``index``-th hidden column."""
    return expr.label(f"{HIDDEN_PREFIX}{index}")


def as_clause(expr: Any) -> Any:
    """ORM attributes (``User.name``) as their column expression; entities unchanged."""
    insp = inspect(expr, raiseerr=False)
    if insp is not None and (
        getattr(insp, "is_mapper", False) or getattr(insp, "is_aliased_class", False)
    ):
        return expr
    clause = getattr(expr, "__clause_element__", None)
    return clause() if clause is not None else expr



def references_columns(expr: Any) -> bool:
    """Whether ``expr`` reads a table column (an entity counts as one)."""
    if not isinstance(expr, ClauseElement):
        return True  # an entity
    stack = [expr]
    while stack:
        node = stack.pop()
        if isinstance(node, ColumnClause) and not getattr(node, "is_literal", False):
            return True
        stack.extend(node.get_children())
    return False
