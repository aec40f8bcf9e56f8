"""Uncorrelated scalar and EXISTS subqueries of a fan-out, answered in a first pass.

``score > (SELECT avg(score) FROM items)`` or ``EXISTS (SELECT 1 FROM tags WHERE ...)``
inside a statement that runs on several shards would be evaluated by each shard over its
own rows.  Such a subquery does not depend on the row around it, so it is run first, on
its own, through the session (routed, fanned out and merged like any statement: the
value one database would compute), and the statement then carries the value as a bound
parameter.  ``x [NOT] IN (SELECT ...)`` whose set needs every shard (an aggregate,
GROUP BY, DISTINCT or LIMIT in it) is computed first the same way and sent as a list of
values.  A correlated subquery, one in FROM, or a plain ``IN`` subquery is left to the
checks of :mod:`._checks`.

The two passes are two reads, not one snapshot (as every cross-shard read; see
docs/queries.md, Isolation).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import false, literal, true
from sqlalchemy.sql import operators, visitors
from sqlalchemy.sql.elements import (
    BinaryExpression,
    ClauseElement,
    CollectionAggregate,
    ColumnElement,
    Grouping,
)
from sqlalchemy.sql.selectable import Exists, FromClause, ScalarSelect, Select
from sqlalchemy.sql.util import find_tables

from .. import _compat
from ..exc import UnsupportedQueryError
from ._computed import value_type
from ._nodes import global_construct

if TYPE_CHECKING:
    from ._checks import QueryPlacement

__all__ = ["computed_first", "resolve_uncorrelated"]

#: members of an ``IN (SELECT ...)`` computed first, at most (each is a bound value)
MAX_IN_VALUES = 10_000

#: runs a SELECT through the session, returning its (merged) rows
Runner = Callable[[Select[Any]], Sequence[Any]]


def _tables(froms: Sequence[Any]) -> set[int]:
    # (an alias is its own FROM: correlation is by FROM object, annotations aside)
    return {
        id(_compat.deannotated(t))
        for f in froms
        for t in find_tables(f, include_aliases=True)
    }


_SET_OPERATORS = (operators.in_op, operators.not_in_op)


def _candidates(stmt: Select[Any]) -> Iterator[ClauseElement]:
    """Scalar subqueries and EXISTS directly in ``stmt``'s clauses (not inside other
    subqueries, which the checks see)."""
    parts = _compat.select_parts(stmt)
    roots = [
        c for c in parts.raw_columns
        if isinstance(c, ColumnElement)
    ] + [*parts.where, *parts.having, *parts.order_by]
    for root in roots:
        stack: list[Any] = [root]
        while stack:
            node = stack.pop()
            if isinstance(node, Exists | ScalarSelect):
                yield node
                continue
            if isinstance(node, FromClause) and not isinstance(node, ColumnElement):
                continue
            if isinstance(node, BinaryExpression) and node.operator in _SET_OPERATORS:
                # `x IN (SELECT ...)` is a set, not a value: computed first only when
                # the set needs all shards (an aggregate, GROUP BY, DISTINCT, LIMIT)
                if _inner(node.right) is not None:
                    yield node
                stack.append(node.left)
                continue
            if isinstance(node, CollectionAggregate):
                continue  # ANY (SELECT ...) / ALL (SELECT ...): a set as well
            stack.extend(node.get_children())


def _inner(node: Any) -> Select[Any] | None:
    inner: Any = node
    if isinstance(inner, BinaryExpression):
        inner = inner.right
    while isinstance(inner, Exists | ScalarSelect | Grouping):
        inner = inner.element
    inner = _compat.ungrouped_select(inner)
    return inner if isinstance(inner, Select) else None


def _uncorrelated(sub: Select[Any], outer_tables: set[int]) -> bool:
    """Whether ``sub`` renders the same alone as inside the statement: SQLAlchemy
    correlates away only FROMs of the enclosing statement, and only when the subquery
    keeps one FROM of its own (see :func:`~shardsession._compat.correlates_enclosing`)."""
    froms = _compat.final_froms_without_eager_joins(sub)
    if not froms:
        return False
    if not _compat.correlates_enclosing(sub, froms):
        return True
    own = _tables(froms)
    return not (own & outer_tables)


def _reads_sharded(sub: Select[Any], placement: QueryPlacement | None) -> bool:
    tables = find_tables(sub, check_columns=True, include_aliases=True)
    if placement is None:
        return bool(tables)
    return any(not placement.is_replicated(getattr(t, "element", t)) for t in tables)


def _resolvable(
    stmt: Select[Any], placement: QueryPlacement | None
) -> Iterator[tuple[ClauseElement, Select[Any]]]:
    """The subqueries :func:`resolve_uncorrelated` computes first, with their nodes."""
    outer_tables: set[int] | None = None
    for node in _candidates(stmt):
        sub = _inner(node)
        if sub is None or not _reads_sharded(sub, placement):
            continue
        if outer_tables is None:
            outer_tables = _tables(_compat.final_froms_without_eager_joins(stmt))
        if not _uncorrelated(sub, outer_tables):
            continue
        if isinstance(node, BinaryExpression) and (
            global_construct(sub) is None or len(sub.selected_columns) != 1
        ):
            continue  # a plain set: the checks decide (key IN, co-location)
        yield node, sub


def computed_first(stmt: Select[Any], placement: QueryPlacement | None) -> set[int]:
    """The SELECTs (by identity) inside ``stmt`` that :func:`resolve_uncorrelated`
    replaces by their values before ``stmt`` is sent anywhere: what they read on other
    shards does not matter."""
    return {id(sub) for _, sub in _resolvable(stmt, placement)}


def resolve_uncorrelated(
    stmt: Select[Any], placement: QueryPlacement | None, run: Runner
) -> Select[Any]:
    """``stmt`` with each uncorrelated scalar or EXISTS subquery over sharded tables
    replaced by its value, computed with ``run``; ``stmt`` itself when there is none.

    :raises UnsupportedQueryError: a scalar subquery returned more than one row (one
        database raises a cardinality error, or, SQLite, picks one).
    """
    values: dict[int, ColumnElement[Any]] = {}
    for node, sub in _resolvable(stmt, placement):
        if isinstance(node, BinaryExpression):
            members = [row[0] for row in run(sub)]
            if len(members) > MAX_IN_VALUES:
                raise UnsupportedQueryError(
                    f"an IN subquery with more than {MAX_IN_VALUES} rows is not computed "
                    "first",
                    construct="IN subquery with many rows",
                )
            # (NULL members keep their meaning: x NOT IN (1, NULL) is never true)
            values[id(node)] = (
                node.left.in_(members) if node.operator is operators.in_op
                else node.left.not_in(members)
            )
            continue
        if isinstance(node, Exists):
            found = run(sub.with_only_columns(literal(1), maintain_column_froms=True).limit(1))
            values[id(node)] = true() if found else false()
            continue
        rows = run(sub)
        if len(rows) > 1:
            raise UnsupportedQueryError(
                "a scalar subquery returned more than one row across the shards",
                construct="scalar subquery with several rows",
            )
        column = sub.selected_columns[0]
        value = rows[0][0] if rows else None
        # Typed from the value: with shards of several dialects it may come from
        # another dialect's driver (a PostgreSQL Decimal bound for SQLite).
        values[id(node)] = literal(
            value, column.type if value is None else value_type(value, column)
        )
    if not values:
        return stmt

    def replace(element: Any, **kw: Any) -> Any:
        return values.get(id(element))

    resolved = visitors.replacement_traverse(stmt, {}, replace)
    assert isinstance(resolved, Select)
    return resolved
