"""Refuse what cannot be answered exactly across shards, naming the construct.

The rule behind every check: a statement is run unchanged (apart from the rewrites of
:mod:`._plan`) on each shard, so anything whose value depends on rows of *other* shards
would be computed from one shard's rows only. Window functions, uncorrelated subqueries
with aggregates or LIMIT, derived tables that aggregate, INTERSECT... all of those
raise :class:`~shardsession.exc.UnsupportedQueryError`.

Joins and correlated subqueries are evaluated on each shard; that is exact only when the
related rows live on the same shard (as SQLAlchemy's ``horizontal_shard`` also assumes).
A :class:`QueryPlacement` (normally the session's placement) answers that question; with
none, joins are accepted (documented in docs/queries.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from sqlalchemy.sql.elements import (
    ClauseElement,
    ColumnClause,
    ColumnElement,
    FunctionFilter,
    Over,
    WithinGroup,
)
from sqlalchemy.sql.schema import Table
from sqlalchemy.sql.selectable import (
    CTE,
    Alias,
    CompoundSelect,
    FromClause,
    Join,
    Lateral,
    Select,
    SelectBase,
    Subquery,
    TableClause,
    TextualSelect,
)
from sqlalchemy.sql.visitors import iterate

from .. import _compat
from ..exc import UnsupportedQueryError
from ._nodes import (
    OTHER_AGGREGATES,
    SUSPICIOUS_TEXT,
    function_name,
    global_construct,
    opaque_text,
    walk,
)
from ._selfjoin import base_table, check_read_twice, check_self_joins
from ._tables import note_in_link, relating_conditions, tables_in
from ._union_from import union_in_from, union_rows_distinct
from ._unrelated import in_by_key

__all__ = [
    "CheckContext",
    "QueryPlacement",
    "check_expression",
    "check_select",
    "check_subquery",
    "check_write",
    "sharded_tables",
]


@runtime_checkable
class QueryPlacement(Protocol):
    """What the query engine asks the placement about tables (a hook for the session).

    Implementations must be cheap and side-effect free, and give the same answer for a
    table every time: the query engine caches its verdict per statement shape and
    placement object.
    """

    def is_replicated(self, table: FromClause) -> bool:
        """Whether every shard holds all rows of ``table`` (a broadcast table)."""
        ...

    def colocated(self, tables: Sequence[FromClause]) -> bool:
        """Whether rows of ``tables`` that a join or correlation relates are always on
        the same shard (e.g. children placed with their parent)."""
        ...


@dataclass
class CheckContext:
    """State of one statement's checks."""

    placement: QueryPlacement | None
    #: sharded tables of the outer statement (for joins and correlation)
    outer_tables: list[FromClause] = field(default_factory=list)
    #: without a placement: the joins and subqueries that relate rows of sharded tables
    #: (exact only if related rows are co-located, which nothing can check)
    unplaced: list[str] = field(default_factory=list)
    #: UNIONs in FROM whose duplicates the statement's DISTINCT merge removes
    unions_deduplicated: set[int] = field(default_factory=set)


def check_expression(expr: ClauseElement, ctx: CheckContext) -> None:
    """Refuse window functions, non-mergeable aggregates, suspicious text and
    cross-shard subqueries anywhere in ``expr``."""
    in_links: dict[int, Any] = {}  # subquery -> the column compared IN it
    for node in walk(expr):
        note_in_link(node, in_links)
        if isinstance(node, Over):
            raise UnsupportedQueryError(
                "window functions (OVER) see only one shard's rows", construct="OVER"
            )
        if isinstance(node, WithinGroup):
            raise UnsupportedQueryError(
                "ordered-set aggregates (WITHIN GROUP) cannot be merged",
                construct="WITHIN GROUP",
            )
        if isinstance(node, FunctionFilter):
            raise UnsupportedQueryError(
                "aggregate FILTER (WHERE ...) is not merged", construct="FILTER"
            )
        name = function_name(node)
        if name in OTHER_AGGREGATES:
            raise UnsupportedQueryError(
                f"{name}() cannot be merged across shards", construct=f"{name}()"
            )
        if opaque_text(node) is not None and SUSPICIOUS_TEXT.search(
            opaque_text(node) or ""
        ):
            raise UnsupportedQueryError(
                "textual SQL containing a subquery, window or aggregate cannot be "
                "checked for cross-shard correctness",
                construct="text()",
            )
        if isinstance(node, SelectBase):
            check_subquery(node, ctx, in_links.get(id(node)))


def sharded_tables(tables: Sequence[FromClause], ctx: CheckContext) -> list[FromClause]:
    out: list[FromClause] = []
    for t in tables:
        base = t.element if isinstance(t, Alias) and isinstance(t.element, TableClause) else t
        if not isinstance(base, TableClause):
            continue
        if ctx.placement is not None and ctx.placement.is_replicated(base):
            continue
        out.append(base)
    return out


def _check_colocated(tables: Sequence[FromClause], ctx: CheckContext, what: str) -> None:
    if len(tables) < 2:
        return
    names = ", ".join(sorted({getattr(t, "name", repr(t)) for t in tables}))
    if ctx.placement is None:
        ctx.unplaced.append(f"{what} over {names}")
        return
    if not ctx.placement.colocated(tables):
        raise UnsupportedQueryError(
            f"{what} over tables whose related rows may be on different shards ({names})",
            construct=what,
        )


def check_subquery(sel: SelectBase, ctx: CheckContext, in_left: Any = None) -> None:
    """A subquery inside an expression (scalar, IN, EXISTS); ``in_left`` is the column
    of ``in_left IN (sel)`` when that is how it is used."""
    sel = _compat.ungrouped_select(sel)
    if isinstance(sel, CompoundSelect):
        raise UnsupportedQueryError(
            "set operations (UNION, ...) are not merged", construct="UNION/INTERSECT/EXCEPT"
        )
    if not isinstance(sel, Select):
        raise UnsupportedQueryError("textual subqueries cannot be checked", construct="text()")
    inner = tables_in(sel)
    # (by the tables under the ORM's annotated copies: one table, several objects)
    outer_ids = {id(_compat.deannotated(t)) for t in ctx.outer_tables}
    # Correlated: a column of the enclosing statement's FROM objects is used inside
    # (compared by object: an aliased table is a different FROM).
    referenced = {
        id(_compat.deannotated(node.table))
        for node in iterate(sel)
        if isinstance(node, ColumnClause) and getattr(node, "table", None) is not None
    }
    # SQLAlchemy only auto-correlates when the subquery keeps a FROM of its own;
    # ``select(avg(t.c.x))`` inside a select from ``t`` is the global average.
    own_froms = _compat.final_froms_without_eager_joins(sel)
    correlated = (
        bool(referenced & outer_ids)
        and _compat.auto_correlates(sel)
        and any(id(_compat.deannotated(f)) not in outer_ids for f in own_froms)
    )
    inner_sharded = sharded_tables(inner, ctx)
    found_global = global_construct(sel)
    if found_global is not None and not correlated and inner_sharded:
        raise UnsupportedQueryError(
            f"an uncorrelated subquery with {found_global} would be computed from "
            "each shard's rows only",
            construct=f"subquery with {found_global}",
        )
    if not correlated and in_left is None and inner_sharded:
        # A scalar or EXISTS subquery that does not depend on the row around it reads
        # the whole table: each shard would see only its own rows.  (Those in a fan-out
        # SELECT's own clauses are computed first, see _twopass; what is left here is
        # nested in a derived table, a subquery or a JOIN condition, or in a write.)
        raise UnsupportedQueryError(
            "an uncorrelated scalar or EXISTS subquery over sharded tables would be "
            "evaluated on each shard's rows only",
            construct="uncorrelated subquery",
        )
    sub_ctx = CheckContext(ctx.placement, ctx.outer_tables + inner_sharded, ctx.unplaced)
    _check_select_body(sel, sub_ctx, top_level=False)
    outer_sharded = sharded_tables(ctx.outer_tables, ctx)
    # The subquery's own FROM list: a correlated reference to an enclosing table is that
    # table's row, not a second scan of it.
    own_sharded = sharded_tables(
        [
            t
            for f in own_froms
            for t in tables_in(f)
            if not (correlated and id(_compat.deannotated(t)) in outer_ids)
        ],
        ctx,
    )
    if (
        not correlated
        and len(own_sharded) == 1
        and [_compat.deannotated(t) for t in outer_sharded]
        == [_compat.deannotated(own_sharded[0])]
        and in_by_key(sel, in_left, own_sharded, ctx.placement)
    ):
        # `key IN (SELECT key FROM t ...)` over the statement's own table t: a row's
        # membership is decided by the rows of its own shard (docs/queries.md).
        return
    _check_colocated(outer_sharded + own_sharded, ctx, "subquery")
    if (correlated or in_left is not None) and own_sharded and outer_sharded:
        _check_related(sel, ctx, outer_sharded, own_sharded, own_froms, in_left)


def _check_related(
    sel: Select[Any],
    ctx: CheckContext,
    outer: list[FromClause],
    inner: list[FromClause],
    froms: Sequence[Any],
    in_left: Any,
) -> None:
    """A correlated or IN subquery must relate its rows to the enclosing statement's along
    the placement (``orders.user_id = users.id``), or each shard would pair only its own
    rows. Asked of placements that can tell (``tables_joined_apart``, as
    :class:`~shardsession.routing.Placement` does); others keep the co-location check."""
    joined_apart = getattr(ctx.placement, "tables_joined_apart", None)
    if joined_apart is None:
        return
    apart = joined_apart(outer, inner, froms, relating_conditions(sel, in_left))
    if apart:
        raise UnsupportedQueryError(
            "a subquery relates rows of "
            + " and ".join("(" + ", ".join(g) + ")" for g in apart)
            + " other than along their placement relationship (a child's foreign key to "
            "its parent): rows it would pair may be on different shards",
            construct="subquery not related along the placement relationship",
        )


def _check_from(frm: FromClause, ctx: CheckContext, tables: list[FromClause]) -> None:
    if isinstance(frm, Lateral):
        raise UnsupportedQueryError("LATERAL is not merged", construct="LATERAL")
    # An alias of an alias (Query.count() makes one) is the inner FROM renamed.
    while isinstance(frm, Alias | Subquery) and isinstance(frm.element, Alias | Subquery):
        frm = frm.element
    if isinstance(frm, Join):
        _check_from(frm.left, ctx, tables)
        _check_from(frm.right, ctx, tables)
        if frm.onclause is not None:
            check_expression(frm.onclause, ctx)
        return
    if isinstance(frm, Lateral):
        raise UnsupportedQueryError("LATERAL is not merged", construct="LATERAL")
    if isinstance(frm, CTE) and getattr(frm, "recursive", False):
        raise UnsupportedQueryError("recursive CTEs are not merged", construct="WITH RECURSIVE")
    if isinstance(frm, Subquery | CTE | Alias) and isinstance(frm.element, SelectBase):
        inner = frm.element
        if isinstance(inner, CompoundSelect):
            _check_union_from(inner, ctx, tables)
            return
        if isinstance(inner, TextualSelect) or not isinstance(inner, Select):
            raise UnsupportedQueryError(
                "textual subqueries cannot be checked", construct="text()"
            )
        construct = global_construct(inner)
        if construct is not None:
            inner_tables = sharded_tables(tables_in(inner), ctx)
            if inner_tables:
                raise UnsupportedQueryError(
                    f"a derived table (subquery in FROM) with {construct} would be "
                    "computed from each shard's rows only",
                    construct=f"FROM subquery with {construct}",
                )
        _check_select_body(inner, ctx, top_level=False, collect=tables)
        return
    if isinstance(frm, Alias) and isinstance(frm.element, TableClause):
        tables.append(frm)
        return
    if isinstance(frm, TableClause | Table):
        tables.append(frm)
        return
    if tables_in(frm):
        raise UnsupportedQueryError(
            f"FROM element {type(frm).__name__} is not understood by the merge",
            construct=type(frm).__name__,
        )


def _check_union_from(
    union: Any, ctx: CheckContext, tables: list[FromClause]
) -> None:
    """A UNION ALL in FROM is each shard's part of its rows when every branch is a plain
    row SELECT over sharded tables; a UNION too when the statement around it removes
    the duplicates across shards (``union_rows_distinct``, marked in ``ctx``)."""
    keyword = str(getattr(union.keyword, "value", union.keyword)).upper()
    if keyword != "UNION ALL" and not (keyword == "UNION" and id(union) in ctx.unions_deduplicated):
        raise UnsupportedQueryError(
            "set operations (UNION, ...) in FROM are merged only as UNION ALL, or as the "
            "rows of Query.union() selected whole",
            construct="UNION/INTERSECT/EXCEPT",
        )
    for branch in union.selects:
        branch = _compat.ungrouped_select(branch)
        if not isinstance(branch, Select) or isinstance(branch, TextualSelect):
            raise UnsupportedQueryError(
                "a nested set operation is not merged", construct="UNION/INTERSECT/EXCEPT")
        own: list[FromClause] = []
        if global_construct(branch) is not None:
            raise UnsupportedQueryError(
                f"a UNION branch with {global_construct(branch)} in FROM would be computed "
                "from each shard's rows only",
                construct="UNION branch",
            )
        _check_select_body(branch, ctx, top_level=False, collect=own)
        sharded = sharded_tables(own, ctx)
        if not sharded:
            raise UnsupportedQueryError(
                "a UNION branch over replicated tables only would return its rows once "
                "per shard",
                construct="UNION branch",
            )
        if ctx.placement is not None and len(sharded) > 1:
            # (the session's router checks how a statement's tables are joined, not a
            # UNION branch's; as for a top-level UNION)
            raise UnsupportedQueryError(
                "a UNION branch that joins sharded tables is not merged under a placement",
                construct="UNION branch with a join",
            )
        _check_colocated(sharded, ctx, "JOIN")
        if not tables:
            tables.append(own[0])


def _check_select_body(
    sel: Select[Any],
    ctx: CheckContext,
    *,
    top_level: bool,
    collect: list[FromClause] | None = None,
) -> list[FromClause]:
    tables: list[FromClause] = [] if collect is None else collect
    known = len(tables)
    for frm in _compat.final_froms_without_eager_joins(sel):
        _check_from(frm, ctx, tables)
    for cte in _compat.select_parts(sel).ctes:
        _check_from(cte, ctx, tables)
    if top_level:
        ctx.outer_tables = list(tables)
    elif collect is not None:
        # A derived table's clauses are their own scope: a subquery in its WHERE relates
        # to the derived table's rows (an IN on a non-key column must be seen as one).
        ctx = CheckContext(
            ctx.placement, ctx.outer_tables + sharded_tables(tables[known:], ctx), ctx.unplaced
        )
    parts = _compat.select_parts(sel)
    exprs: list[Any] = [c for c in parts.raw_columns if isinstance(c, ClauseElement)]
    exprs += list(parts.where) + list(parts.having) + list(parts.order_by)
    exprs += list(parts.group_by)
    for expr in exprs:
        if isinstance(expr, FromClause) and not isinstance(expr, ColumnElement):
            continue  # a table or entity selected whole (a function is a column)
        check_expression(expr, ctx)
    return tables


def check_select(sel: Select[Any], ctx: CheckContext) -> list[FromClause]:
    """Check a top-level SELECT; return its sharded tables (empty: only replicated or no
    tables, so one shard answers it).

    :raises UnsupportedQueryError: naming the first construct that cannot be merged.
    """
    if _compat.select_parts(sel).distinct and union_rows_distinct(sel):
        found = union_in_from(sel)
        assert found is not None
        ctx.unions_deduplicated.add(id(found[1]))
    tables = _check_select_body(sel, ctx, top_level=True)
    sharded = sharded_tables(tables, ctx)
    distinct = list({id(base_table(t)): t for t in sharded}.values())
    if ctx.placement is not None and len(distinct) < len(sharded):
        check_read_twice(tables, ctx.placement)
        check_self_joins(sel, tables, ctx.placement)
        sharded_apart = distinct  # a table joined with itself on its key is one table
    else:
        sharded_apart = sharded
    _check_colocated(sharded_apart, ctx, "JOIN")
    return sharded


def check_write(stmt: Any, ctx: CheckContext) -> None:
    """Check the subqueries of an UPDATE or DELETE that runs on several shards: each
    shard evaluates them on its own rows, so an uncorrelated one with an aggregate
    (``SET x = (SELECT max(x) FROM t)``) would write each shard's own answer.

    :raises UnsupportedQueryError: such a subquery; nothing was sent to any shard.
    """
    ctx.outer_tables = sharded_tables([_compat.dml_table(stmt)], ctx)
    for expr in _compat.dml_expressions(stmt):
        check_expression(expr, ctx)
