"""Subqueries of a drop-in SELECT that runs on one shard of several.

The statement's own rows are all on that shard (its chooser sent it there), but a
subquery may read a sharded table whose rows live on other shards too: it would see one
shard's rows, as it would in each shard of a fan-out.  So those subqueries get the
fan-out's treatment: an uncorrelated scalar or EXISTS subquery in the statement's own
clauses is computed first (:mod:`._twopass`, by the caller), one nested where that
cannot be done is refused, and one that relates tables the library cannot place emits a
:class:`~shardsession.exc.ColocationWarning`.  Derived tables (subqueries in FROM) are
left as they are: their own WHERE is commonly what routed the statement to the shard.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.sql.elements import ClauseElement, ColumnElement
from sqlalchemy.sql.selectable import FromClause, Join, Select, SelectBase

from .. import _compat
from ._cache import LRUCache
from ._checks import CheckContext, check_subquery, sharded_tables
from ._nodes import walk
from ._tables import note_in_link, tables_in

__all__ = ["one_shard_colocation"]

#: statement cache key -> its co-location notes ("" when none)
_VERDICTS: LRUCache[str] = LRUCache(1024)


def _onclauses(frm: Any) -> list[Any]:
    if isinstance(frm, Join):
        out = [*_onclauses(frm.left), *_onclauses(frm.right)]
        return out + ([frm.onclause] if frm.onclause is not None else [])
    return []


def one_shard_colocation(sel: Select[Any]) -> str | None:
    """The joins and subqueries of ``sel``'s subqueries whose co-location nothing can
    check (``None`` when there are none), for the warning.

    :raises UnsupportedQueryError: a subquery the shard cannot answer alone whatever the
        placement (an uncorrelated aggregate nested where no first pass reaches).
    """
    key = _compat.statement_cache_key(sel)
    if key is not None:
        found = _VERDICTS.get(key)
        if found is not None:
            return found or None
    froms = _compat.final_froms_without_eager_joins(sel)
    ctx = CheckContext(None)
    ctx.outer_tables = sharded_tables([t for f in froms for t in tables_in(f)], ctx)
    parts = _compat.select_parts(sel)
    exprs: list[Any] = [c for c in parts.raw_columns if isinstance(c, ClauseElement)]
    exprs += [*parts.where, *parts.having, *parts.order_by, *parts.group_by]
    exprs += [c for f in froms for c in _onclauses(f)]
    for expr in exprs:
        if isinstance(expr, FromClause) and not isinstance(expr, ColumnElement):
            continue
        in_links: dict[int, Any] = {}
        for node in walk(expr):
            note_in_link(node, in_links)
            if isinstance(node, SelectBase):
                check_subquery(node, ctx, in_links.get(id(node)))
    verdict = "; ".join(dict.fromkeys(ctx.unplaced))
    if key is not None:
        _VERDICTS.put(key, verdict)
    return verdict or None
