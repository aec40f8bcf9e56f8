"""A UNION inside a FROM subquery: the statement ``Query.union()`` builds.

``session.query(A).union(session.query(B))`` is ``SELECT anon.* FROM (<a> UNION <b>) AS
anon``.  Each shard's UNION removes its own duplicates; when the statement around it
returns the union's rows whole, a DISTINCT merge removes those of several shards, which
is what one database's UNION does.  UNION ALL needs nothing more: each shard returns its
part of the rows, as for any derived table of plain row SELECTs.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.sql.elements import ColumnElement, Label
from sqlalchemy.sql.selectable import Alias, CompoundSelect, FromClause, Select, Subquery

from .. import _compat

__all__ = ["union_in_from", "union_rows_distinct"]

#: a UNION's statement (``CompoundSelect`` takes a type argument on SQLAlchemy 2.1 only)
CompoundSelectAny = Any


def _keyword(stmt: CompoundSelectAny) -> str:
    return str(getattr(stmt.keyword, "value", stmt.keyword)).upper()


def union_in_from(sel: Select[Any]) -> tuple[Any, CompoundSelectAny] | None:
    """``(subquery, union)`` when ``sel`` reads one FROM, a subquery of a UNION or UNION
    ALL without ORDER BY/LIMIT of its own (what ``Query.union()`` builds); else ``None``."""
    if not any(_unions_below(f) for f in _compat.select_parts(sel).from_obj):
        return None  # (cheap: the final FROM list below costs an ORM compile)
    froms = _compat.final_froms_without_eager_joins(sel)
    if len(froms) != 1:
        return None
    frm: Any = froms[0]
    while isinstance(frm, Alias | Subquery) and isinstance(frm.element, Alias | Subquery):
        frm = frm.element
    inner = getattr(frm, "element", None) if isinstance(frm, Alias | Subquery) else None
    if not isinstance(inner, CompoundSelect) or _keyword(inner) not in ("UNION", "UNION ALL"):
        return None
    if _compat.compound_orders_or_limits(inner):
        return None
    return frm, inner


def _unions_below(frm: Any) -> bool:
    while isinstance(frm, Alias | Subquery):
        frm = frm.element
    return isinstance(frm, CompoundSelect)


def _base(column: Any) -> Any:
    while isinstance(column, Label):
        column = column.element
    return _compat.deannotated(column)


def union_rows_distinct(sel: Select[Any]) -> bool:
    """Whether ``sel`` returns its FROM's UNION rows, one column for each (``Query.union``
    of entities or columns, ordered or limited): then the merge removing duplicate rows
    (``DISTINCT``) is what the UNION does across shards, and each shard's UNION removes
    only its own duplicates first.  No aggregate, GROUP BY or HAVING: those would count
    the duplicates the merge has not removed yet."""
    found = union_in_from(sel)
    if found is None or _keyword(found[1]) != "UNION":
        return False
    subquery, union = found
    parts = _compat.select_parts(sel)
    if parts.group_by or parts.having:
        return False
    first = _compat.ungrouped_select(union.selects[0])
    if not isinstance(first, Select):
        return False
    # the union's columns, by their subquery column and by the first branch's column
    # (the ORM adapts an entity's columns to the subquery when it compiles)
    index: dict[int, int] = {}
    for i, column in enumerate(subquery.c):
        index[id(column)] = i
    for i, column in enumerate(first.selected_columns):
        index.setdefault(id(_base(column)), i)
    covered: list[int] = []
    for raw in parts.raw_columns:
        entity = isinstance(raw, FromClause) and not isinstance(raw, ColumnElement)
        columns: list[Any] = list(raw.c) if entity else [raw]
        for column in columns:
            position = index.get(id(_base(column)))
            if position is None:
                return False
            covered.append(position)
    return sorted(covered) == list(range(len(subquery.c)))
