"""NULL order made explicit in subqueries when shards order NULLs differently.

On a cluster mixing backends that sort NULL as the largest value (PostgreSQL) with
backends that sort it as the smallest (SQLite, MariaDB), an ``ORDER BY ... LIMIT`` inside
a (correlated) subquery would pick different rows on different shards.  The documented
mixed rule is *NULL is the smallest value*; every such ORDER BY item without NULLS
FIRST/LAST is made to follow it on every shard.  The statement's own ORDER BY is the
planner's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from sqlalchemy.sql import visitors
from sqlalchemy.sql.elements import ClauseElement
from sqlalchemy.sql.selectable import Select

from .. import _compat
from ._columns import parse_order_by
from ._dialect import rules_for

__all__ = ["explicit_nulls_in_subqueries", "mixed_null_order", "nulls_low_on_one_shard"]

E = TypeVar("E", bound=ClauseElement)


def mixed_null_order(dialects: Sequence[str]) -> bool:
    """Whether shards of both NULL conventions take part."""
    return len({rules_for(d).nulls_high for d in dialects}) > 1


def explicit_nulls_in_subqueries(statement: E, dialects: Sequence[str]) -> E:
    """``statement`` with every subquery's ORDER BY item that leaves NULL placement to
    the backend made to place NULL as the smallest value (the documented mixed rule),
    when shards of both NULL conventions take part: ``NULLS FIRST/LAST`` on the
    backends that order NULL as the largest value (:class:`shardsession._compat.
    NullsLow`), unchanged on the others.  The statement's own ORDER BY is the
    planner's."""
    if not mixed_null_order(dialects):
        return statement
    return _subqueries_explicit(statement)


def _nested_order_by(statement: ClauseElement) -> bool:
    return any(
        isinstance(node, Select)
        and node is not statement
        and bool(_compat.select_parts(node).order_by)
        for node in visitors.iterate(statement)
    )


def _rewrite(select: Select[Any]) -> Select[Any]:
    inner = _subqueries_explicit(select)
    parts = _compat.select_parts(inner)
    if not parts.order_by:
        return inner
    new_order: list[Any] = []
    changed = False
    for element in parts.order_by:
        item = parse_order_by(element)
        if item.nulls_first is None and not isinstance(item.target, str):
            # NULL is the smallest value: NULLS FIRST/LAST added where the backend
            # would put it last for ASC (the expression itself is unchanged, so a
            # DISTINCT subquery stays valid).
            new_order.append(_compat.NullsLow(element, item.descending))
            changed = True
        else:
            new_order.append(element)
    if not changed:
        return inner
    return inner.order_by(None).order_by(*new_order)


def _subqueries_explicit(select: E) -> E:
    """``select`` with the ORDER BY of every subquery (not its own) made explicit."""
    if not _nested_order_by(select):
        return select

    def replace(element: Any, **_: Any) -> Any:
        if isinstance(element, Select) and element is not select:
            return _rewrite(element)
        return None

    result = visitors.replacement_traverse(select, {}, replace)
    assert isinstance(result, type(select))
    return result


def nulls_low_on_one_shard(statement: Any, dialect: str, cluster_dialects: Any) -> Any:
    """``statement`` as it must run on one shard of ``dialect`` in a cluster whose
    backends order NULLs differently: with NULL as the smallest value in its own ORDER BY
    and its subqueries' (the cluster's one rule), unchanged on a backend that already
    orders NULL that way, on a cluster of one convention, and for anything but a SELECT.

    :param cluster_dialects: the dialect names of every shard of the session.
    """
    if not isinstance(statement, Select) or not rules_for(dialect).nulls_high:
        return statement
    if not mixed_null_order(list(cluster_dialects)):
        return statement
    return _rewrite(statement)
