"""``UNION`` and ``UNION ALL`` of row SELECTs across shards.

Each branch that reads sharded tables returns, on each shard, that shard's part of its
rows; so the shards' ``UNION ALL`` answers together are one database's (a bag), and for
``UNION`` the merge removes the duplicates that several shards return.  A branch is
checked like a statement of its own (:func:`shardsession.query._reads_sharded_tables`)
and must be a plain row SELECT (no aggregate, GROUP BY, DISTINCT, LIMIT: those would
need a merge of the branch first).  ORDER BY, LIMIT and OFFSET of the union are applied
after the merge (each shard returns ``LIMIT offset+limit`` rows, sorted).  INTERSECT and
EXCEPT pair rows of different shards: refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

from sqlalchemy.exc import CompileError
from sqlalchemy.sql.selectable import Select

from .. import _compat
from ..exc import UnsupportedQueryError
from ._columns import parse_order_by, resolve_nulls
from ._ordering import SortKey

__all__ = ["CompoundPlan", "plan_compound"]


#: a UNION's statement (``CompoundSelect`` takes a type argument on SQLAlchemy 2.1 only)
CompoundSelectAny: TypeAlias = Any


@dataclass
class CompoundPlan:
    statement: CompoundSelectAny
    branches: tuple[Select[Any], ...]
    distinct: bool
    sort_keys: list[SortKey]
    limit: int | None
    offset: int
    visible: int


def _unsupported(message: str, construct: str = "UNION/INTERSECT/EXCEPT") -> Exception:
    return UnsupportedQueryError(message, construct=construct)


def plan_compound(stmt: CompoundSelectAny, dialects: Sequence[str]) -> CompoundPlan:
    """The plan of a UNION / UNION ALL across shards of ``dialects``.

    :raises UnsupportedQueryError: INTERSECT/EXCEPT, a nested set operation, an ORDER BY
        the merge cannot place, LIMIT/OFFSET expressions, or NULL ordering that differs
        between the shards' dialects.
    """
    keyword = str(getattr(stmt.keyword, "value", stmt.keyword)).upper()
    if keyword not in ("UNION", "UNION ALL"):
        raise _unsupported(f"{keyword} pairs rows of different shards; it is not merged")
    branches = []
    for branch in stmt.selects:
        branch = _compat.ungrouped_select(branch)
        if not isinstance(branch, Select):
            raise _unsupported("a nested set operation is not merged")
        branches.append(branch)
    try:
        limit, offset = _compat.limit_offset_values(stmt)  # type: ignore[arg-type]
    except CompileError as err:
        raise _unsupported(
            "LIMIT/OFFSET must be integers to be applied across shards",
            "LIMIT/OFFSET expression",
        ) from err
    if getattr(stmt, "_fetch_clause", None) is not None:
        raise _unsupported("FETCH of a UNION is not merged; use limit()", "FETCH")
    keys = stmt.selected_columns.keys()
    columns = list(stmt.selected_columns)
    if keyword == "UNION" and any(
        _compat.string_may_fold(c.type, dialects) for b in branches for c in b.selected_columns
    ):
        # UNION deduplicates by Python equality after the merge.
        raise _unsupported(
            "UNION (not ALL) of strings whose collation may fold values (MySQL/MariaDB, "
            "or a collation of the column) is not merged; UNION ALL is",
            "UNION of strings with a collation",
        )
    sort_keys = []
    for element in getattr(stmt, "_order_by_clauses", ()):
        item = parse_order_by(element)
        if isinstance(item.target, str):
            matches = [i for i, k in enumerate(keys) if k == item.target]
        else:
            matches = [i for i, c in enumerate(columns) if c is item.target]
        if len(matches) != 1:
            raise _unsupported(
                "ORDER BY of a UNION must name one of its columns", "ORDER BY of UNION"
            )
        nulls_first, mixed = resolve_nulls(item, dialects)
        if mixed:
            raise _unsupported(
                "ORDER BY of a UNION over shards that order NULLs differently",
                "ORDER BY of UNION (mixed dialects)",
            )
        sort_keys.append(SortKey(matches[0], item.descending, nulls_first))
    per_shard = stmt
    if offset:
        per_shard = per_shard.offset(None)
        if limit is not None:
            per_shard = per_shard.limit(limit + offset)
    return CompoundPlan(
        statement=per_shard,
        branches=tuple(branches),
        distinct=keyword == "UNION",
        sort_keys=sort_keys,
        limit=limit,
        offset=offset or 0,
        visible=len(keys),
    )

