"""``COUNT(*)`` over a derived table that each shard cannot count alone.

``query.distinct().count()``, ``query.limit(n).count()``, ``query.group_by(...).count()``
and ``select(func.count()).select_from(<subquery>)`` count the rows of an inner SELECT
whose rows depend on all shards (DISTINCT, LIMIT/OFFSET, GROUP BY, HAVING, aggregates).
Such a statement is answered by planning and merging the *inner* SELECT like any other
fan-out (same checks, same merge) and counting the merged rows: the count of what one
database's inner SELECT returns.  Memory: the inner result's rows, which the merge
holds anyway for DISTINCT and GROUP BY.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.sql.elements import ColumnClause, Label
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.sql.selectable import Alias, Select, Subquery

from .. import _compat

__all__ = ["counted_inner_select"]


def _is_count_star(expr: Any) -> bool:
    while isinstance(expr, Label):
        expr = expr.element
    if not isinstance(expr, FunctionElement) or str(getattr(expr, "name", "")) != "count":
        return False
    args = list(expr.clauses.clauses)
    return (
        len(args) == 1
        and isinstance(args[0], ColumnClause)
        and bool(args[0].is_literal)
        and args[0].name == "*"
    )


def counted_inner_select(stmt: Select[Any]) -> Select[Any] | None:
    """The inner SELECT of ``SELECT count(*) FROM (<inner>) AS anon`` (nothing else in
    the outer statement), else ``None``."""
    parts = _compat.select_parts(stmt)
    if (
        len(parts.raw_columns) != 1
        or not _is_count_star(parts.raw_columns[0])
        or parts.where
        or parts.group_by
        or parts.having
        or parts.order_by
        or parts.distinct
        or parts.ctes
        or parts.setup_joins
        or parts.limit_clause is not None
        or parts.offset_clause is not None
        or parts.fetch_clause is not None
    ):
        return None
    froms = _compat.final_froms_without_eager_joins(stmt)
    if len(froms) != 1:
        return None
    frm: Any = froms[0]
    while isinstance(frm, Alias | Subquery):
        frm = frm.element
    return frm if isinstance(frm, Select) else None
