"""Refuse what cannot be answered exactly across shards, naming the construct.

The rule behind every check: a statement is run unchanged (apart from the rewrites of
:mod:`._plan`) on each shard, so anything whose value depends on rows of *other* shards
would be computed from one shard's rows only. Window functions, uncorrelated subqueries
with aggregates or LIMIT, derived tables that aggregate, set operations... all of those
raise :class:`~shardsession.exc.UnsupportedQueryError`.

Joins and correlated subqueries are evaluated on each shard; that is exact only when the
related rows live on the same shard (as SQLAlchemy's ``horizontal_shard`` also assumes).
A :class:`QueryPlacement` (normally the session's placement) answers that question; with
none, joins are accepted (documented in docs/queries.md).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from sqlalchemy.sql import operators
from sqlalchemy.sql.elements import (
    BinaryExpression,
    ClauseElement,
    ClauseList,
    ColumnClause,
    ColumnElement,
    FunctionFilter,
    Grouping,
    Label,
    Over,
    TextClause,
    UnaryExpression,
    WithinGroup,
)
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.sql.schema import Table
from sqlalchemy.sql.selectable import (
    CTE,
    Alias,
    CompoundSelect,
    FromClause,
    Join,
    Lateral,
    ScalarSelect,
    Select,
    SelectBase,
    Subquery,
    TableClause,
    TextualSelect,
)
from sqlalchemy.sql.util import find_tables
from sqlalchemy.sql.visitors import iterate

from .. import _compat
from ..exc import UnsupportedQueryError
from ._selfjoin import base_table, check_self_joins, conjuncts
from ._union_from import union_in_from, union_rows_distinct

__all__ = [
    "KNOWN_SCALAR_FUNCTIONS",
    "MERGEABLE_AGGREGATES",
    "CheckContext",
    "QueryPlacement",
    "aggregate_kind",
    "check_write",
    "contains_aggregate",
    "distinct_argument",
    "global_construct",
    "might_aggregate",
    "unwrap_label",
]

#: aggregates whose per-shard partials combine exactly
MERGEABLE_AGGREGATES = frozenset({"count", "sum", "min", "max", "avg"})

#: aggregate (and grouping) functions of the supported backends that do not combine;
#: any of these refuses the statement.  Functions not listed are taken as scalar.
OTHER_AGGREGATES = frozenset(
    {
        "array_agg", "string_agg", "group_concat", "json_agg", "jsonb_agg",
        "json_object_agg", "jsonb_object_agg", "json_arrayagg", "json_objectagg",
        "json_group_array", "json_group_object", "xmlagg", "listagg", "bool_and",
        "bool_or", "every", "bit_and", "bit_or", "bit_xor", "stddev", "stddev_pop",
        "stddev_samp", "std", "variance", "var_pop", "var_samp", "covar_pop",
        "covar_samp", "corr", "regr_slope", "regr_intercept", "regr_count", "regr_r2",
        "regr_avgx", "regr_avgy", "regr_sxx", "regr_syy", "regr_sxy", "mode",
        "median", "percentile_cont", "percentile_disc", "rank", "dense_rank",
        "percent_rank", "cume_dist", "total", "any_value", "count_big",
        "approx_count_distinct", "grouping", "rollup", "cube", "grouping_sets",
        "range_agg", "range_intersect_agg",
    }
)  # fmt: skip

#: row-level functions of the supported backends: computed from one row's values, the
#: same on whichever shard holds the row.  A function not listed here (nor an aggregate
#: of :data:`MERGEABLE_AGGREGATES`) in the select list, GROUP BY, HAVING or
#: ORDER BY of a fan-out refuses the statement: it may be an aggregate.
KNOWN_SCALAR_FUNCTIONS = frozenset(
    {
        "abs", "ceil", "ceiling", "floor", "round", "trunc", "truncate", "sign", "mod",
        "power", "pow", "sqrt", "exp", "ln", "log", "log10", "greatest", "least",
        "coalesce", "ifnull", "nullif", "nvl", "lower", "upper", "length",
        "char_length", "character_length", "octet_length", "substr", "substring",
        "trim", "ltrim", "rtrim", "replace", "concat", "concat_ws", "instr", "strpos",
        "position", "left", "right", "lpad", "rpad", "reverse", "repeat", "date",
        "time", "datetime", "julianday", "strftime", "date_trunc", "date_part",
        "extract", "to_char", "year", "month", "day", "hour", "minute", "second",
        "now", "current_date", "current_time", "current_timestamp", "localtime",
        "localtimestamp", "typeof", "hex", "md5", "random",
    }
)  # fmt: skip

# Textual SQL is opaque; refuse fragments that could hide a cross-row computation.
_SUSPICIOUS_TEXT = re.compile(
    r"\b(select|over|"
    + "|".join(sorted(MERGEABLE_AGGREGATES | OTHER_AGGREGATES))
    + r")\b\s*\(?",
    re.IGNORECASE,
)


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


def unwrap_label(expr: Any) -> Any:
    """Return the expression under any number of labels."""
    while isinstance(expr, Label):
        expr = expr.element
    return expr


def _function_name(expr: Any) -> str | None:
    if isinstance(expr, FunctionElement):
        return str(getattr(expr, "name", "")).lower() or None
    return None


def aggregate_kind(expr: Any, *, distinct_ok: bool = False) -> str | None:
    """``"count"``, ``"sum"``, ... when ``expr`` (under labels) is a mergeable aggregate;
    with ``distinct_ok``, ``"count_distinct"``, ``"sum_distinct"`` or ``"avg_distinct"``
    for those over ``DISTINCT x`` (merged from each shard's distinct values of ``x``).

    :raises UnsupportedQueryError: for DISTINCT inside SUM/AVG/COUNT without
        ``distinct_ok``.
    """
    expr = unwrap_label(expr)
    name = _function_name(expr)
    if name not in MERGEABLE_AGGREGATES:
        return None
    if distinct_argument(expr) is not None and name not in ("min", "max"):
        # (MIN/MAX of distinct values is the same MIN/MAX)
        if distinct_ok:
            return f"{name}_distinct"
        raise UnsupportedQueryError(
            f"{name.upper()}(DISTINCT ...) cannot be merged across shards (a value may "
            "occur on several shards)",
            construct=f"{name.upper()}(DISTINCT)",
        )
    return name


def distinct_argument(aggregate: Any) -> Any:
    """``x`` of ``agg(DISTINCT x)`` (under labels), else ``None``."""
    for arg in getattr(unwrap_label(aggregate), "clauses", ClauseList()).clauses:
        if isinstance(arg, UnaryExpression) and arg.operator is operators.distinct_op:
            return arg.element
    return None


def _walk(expr: ClauseElement) -> Iterator[ClauseElement]:
    """Yield ``expr`` and its sub-expressions, stopping at subqueries and FROM elements
    (yielded, not entered).  A function call is entered: SQLAlchemy makes every function
    a FROM element too (it can be table-valued), and an aggregate, window or subquery
    inside ``coalesce(...)`` is as much part of the expression as one outside it."""
    stack = [expr]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, SelectBase) or (
            isinstance(node, FromClause) and not isinstance(node, ColumnElement)
        ):
            continue
        stack.extend(node.get_children())


def might_aggregate(expr: ClauseElement) -> bool:
    """Whether ``expr`` has, outside of subqueries, an aggregate or a function that is
    not known to be row-level (a user-defined or backend aggregate the planner does not
    know reads many rows as well)."""
    for node in _walk(expr):
        name = _function_name(node)
        if name is not None and name not in KNOWN_SCALAR_FUNCTIONS:
            return True
        if isinstance(node, WithinGroup | FunctionFilter):
            return True
    return False


def contains_aggregate(expr: ClauseElement) -> bool:
    """Whether ``expr`` has an aggregate function outside of subqueries."""
    for node in _walk(expr):
        name = _function_name(node)
        if name in MERGEABLE_AGGREGATES or name in OTHER_AGGREGATES:
            return True
        if isinstance(node, WithinGroup | FunctionFilter):
            return True
    return False


def _note_in_link(node: ClauseElement, in_links: dict[int, Any]) -> None:
    """Remember ``column`` for the subquery of ``column [NOT] IN (subquery)``, keyed by
    the subquery's identity as :func:`_walk` yields it."""
    if (
        isinstance(node, BinaryExpression)
        and node.operator in (operators.in_op, operators.not_in_op)
        and isinstance(node.left, ColumnClause)
    ):
        right: Any = node.right
        while isinstance(right, Grouping | ScalarSelect):
            right = right.element
        in_links[id(right)] = node.left


def _relating_conditions(sub: Select[Any], in_left: Any) -> list[Any]:
    """The conditions that may relate ``sub``'s rows to the enclosing statement's: its
    WHERE terms, plus ``in_left = <its one column>`` when it is ``in_left IN (sub)``."""
    parts = _compat.select_parts(sub)
    conditions: list[Any] = list(parts.where)
    columns = [c for c in parts.raw_columns if isinstance(c, ColumnClause)]
    if in_left is not None and len(parts.raw_columns) == 1 and columns:
        conditions.append(in_left == columns[0])
    return conditions


def _opaque_text(node: ClauseElement) -> str | None:
    """The SQL of a ``text()`` or ``literal_column()`` node (else ``None``)."""
    if isinstance(node, TextClause):
        return node.text
    if isinstance(node, ColumnClause) and node.is_literal:
        return str(node.name)
    return None


def check_expression(expr: ClauseElement, ctx: CheckContext) -> None:
    """Refuse window functions, non-mergeable aggregates, suspicious text and
    cross-shard subqueries anywhere in ``expr``."""
    in_links: dict[int, Any] = {}  # subquery -> the column compared IN it
    for node in _walk(expr):
        _note_in_link(node, in_links)
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
        name = _function_name(node)
        if name in OTHER_AGGREGATES:
            raise UnsupportedQueryError(
                f"{name}() cannot be merged across shards", construct=f"{name}()"
            )
        if _opaque_text(node) is not None and _SUSPICIOUS_TEXT.search(
            _opaque_text(node) or ""
        ):
            raise UnsupportedQueryError(
                "textual SQL containing a subquery, window or aggregate cannot be "
                "checked for cross-shard correctness",
                construct="text()",
            )
        if isinstance(node, SelectBase):
            check_subquery(node, ctx, in_links.get(id(node)))


def global_construct(sel: Select[Any]) -> str | None:
    """Name the construct that makes ``sel``'s result depend on all of a table's rows."""
    parts = _compat.select_parts(sel)
    if parts.group_by:
        return "GROUP BY"
    if parts.having:
        return "HAVING"
    if parts.distinct or parts.distinct_on:
        return "DISTINCT"
    if (
        parts.limit_clause is not None
        or parts.offset_clause is not None
        or parts.fetch_clause is not None
    ):
        return "LIMIT/OFFSET"
    for col in parts.raw_columns:
        if isinstance(col, ClauseElement) and might_aggregate(col):
            return "aggregate"
    for col in parts.order_by:
        if might_aggregate(col):
            return "aggregate"
    return None


def _tables_in(clause: ClauseElement) -> list[FromClause]:
    return list(find_tables(clause, check_columns=True, include_aliases=True))


def _sharded(tables: Sequence[FromClause], ctx: CheckContext) -> list[FromClause]:
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
    inner = _tables_in(sel)
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
    inner_sharded = _sharded(inner, ctx)
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
    outer_sharded = _sharded(ctx.outer_tables, ctx)
    # The subquery's own FROM list: a correlated reference to an enclosing table is that
    # table's row, not a second scan of it.
    own_sharded = _sharded(
        [
            t
            for f in own_froms
            for t in _tables_in(f)
            if not (correlated and id(_compat.deannotated(t)) in outer_ids)
        ],
        ctx,
    )
    if (
        not correlated
        and len(own_sharded) == 1
        and [_compat.deannotated(t) for t in outer_sharded]
        == [_compat.deannotated(own_sharded[0])]
        and _in_by_key(sel, in_left, own_sharded, ctx.placement)
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
    apart = joined_apart(outer, inner, froms, _relating_conditions(sel, in_left))
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
            inner_tables = _sharded(_tables_in(inner), ctx)
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
    if _tables_in(frm):
        raise UnsupportedQueryError(
            f"FROM element {type(frm).__name__} is not understood by the merge",
            construct=type(frm).__name__,
        )
    # Table-valued functions, VALUES ...: the same on every shard, nothing to check.


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
        sharded = _sharded(own, ctx)
        if not sharded:
            raise UnsupportedQueryError(
                "a UNION branch over replicated tables only would return its rows once "
                "per shard",
                construct="UNION branch",
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
            ctx.placement, ctx.outer_tables + _sharded(tables[known:], ctx), ctx.unplaced
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
    sharded = _sharded(tables, ctx)
    distinct = list({id(base_table(t)): t for t in sharded}.values())
    if ctx.placement is not None and len(distinct) < len(sharded):
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
    ctx.outer_tables = _sharded([_compat.dml_table(stmt)], ctx)
    for expr in _compat.dml_expressions(stmt):
        check_expression(expr, ctx)


def _same_column(column: Any, key: Any, table: Any) -> bool:
    # (ORM expressions carry annotated copies of a table's columns)
    column = unwrap_label(column)
    return getattr(column, "table", None) is table and getattr(column, "key", None) == key.key


def _in_by_key(sub: Select[Any], in_left: Any, tables: list[Any], placement: Any) -> bool:
    """Whether ``in_left IN (sub)`` compares one table's placement key with the same key
    selected by ``sub`` from that table: membership of a row is then decided by rows of
    its own shard."""
    key_columns_of = getattr(placement, "key_columns_of", None)
    if in_left is None or key_columns_of is None or len(tables) != 1:
        return False
    keys = key_columns_of(tables[0])
    columns = _compat.select_parts(sub).raw_columns
    return (len(keys) == 1 and len(columns) == 1
            and _same_column(in_left, keys[0], tables[0])
            and _same_column(columns[0], keys[0], tables[0]))


def unrelated_subquery(sel: Any, placement: Any) -> str | None:
    """Describe the first subquery of ``sel`` (a SELECT, UPDATE or DELETE) over sharded
    tables that does not relate its rows to ``sel``'s along the placement (correlated, or
    ``col IN (subquery)``, by a placement equality); ``None`` when there is none.

    Wherever ``sel`` runs (one shard or each shard), such a subquery sees only the rows of
    the shard it runs on: an uncorrelated ``EXISTS``, a global scalar aggregate, an ``IN``
    on a column other than the placement key. Used by the session's router, which also
    sees statements pruned to one shard (the fan-out checks above see fan-out SELECTs
    only). Subqueries nested inside subqueries are left to the fan-out checks.
    """
    joined_apart = getattr(placement, "tables_joined_apart", None)
    if joined_apart is None:
        return None
    ctx = CheckContext(placement)
    exprs: list[Any]
    if isinstance(sel, Select):
        froms: Sequence[Any] = _compat.final_froms_without_eager_joins(sel)
        parts = _compat.select_parts(sel)
        exprs = [c for c in parts.raw_columns if isinstance(c, ClauseElement)]
        exprs += [*parts.where, *parts.having, *parts.order_by, *parts.group_by]
    else:  # UPDATE / DELETE: its table, its WHERE and the values it sets
        froms = [_compat.dml_table(sel)]
        exprs = _compat.dml_expressions(sel)
    outer = _sharded([t for f in froms for t in _tables_in(f)], ctx)
    outer_ids = {id(t) for t in outer}
    for expr in exprs:
        if isinstance(expr, FromClause) and not isinstance(expr, ColumnElement):
            continue
        in_links: dict[int, Any] = {}
        for node in _walk(expr):
            _note_in_link(node, in_links)
            if not isinstance(node, SelectBase):
                continue
            sub = _compat.ungrouped_select(node)
            if not isinstance(sub, Select):
                continue
            own_froms = _compat.final_froms_without_eager_joins(sub)
            own = _sharded([t for f in own_froms for t in _tables_in(f)], ctx)
            if not _compat.correlates_enclosing(sub, own_froms):
                # SQLAlchemy leaves the statement's own tables in this subquery: it reads
                # them whole (e.g. a global aggregate of the statement's table).
                same = [t for t in own if id(t) in outer_ids]
                if same and not _in_by_key(sub, in_links.get(id(node)), same, placement):
                    names = ", ".join(sorted({str(getattr(t, "name", t)) for t in same}))
                    return (
                        f"a subquery reads {names} again, uncorrelated, and not as an IN "
                        "on its placement key: it would see only the rows of the shard it "
                        "runs on"
                    )
            twin = _twin_not_on_key(sub, own_froms, outer, in_links.get(id(node)), placement)
            if twin is not None:
                return (
                    f"a subquery reads {twin} again through an alias, not related to the "
                    "statement's row by its placement key: it would see only the rows of "
                    "the shard it runs on"
                )
            own = [t for t in own if id(t) not in outer_ids]
            if not own:
                continue
            conditions = _relating_conditions(sub, in_links.get(id(node)))
            if not outer or joined_apart(outer, own, own_froms, conditions):
                names = ", ".join(sorted({str(getattr(t, "name", t)) for t in own}))
                return (
                    f"a subquery over {names} is not related to the statement's rows along "
                    "the placement relationship (correlated, or IN, by a child's foreign key "
                    "to its parent): it would see only the rows of the shard it runs on"
                )
    return None


def _twin_not_on_key(
    sub: Select[Any], froms: Sequence[Any], outer: Sequence[Any], in_left: Any, placement: Any
) -> str | None:
    """The name of a sharded table that ``sub`` reads through an alias (its own copy,
    ``aliased(User)``) while the enclosing statement reads it too, without equating the
    alias's placement key with the enclosing row's (``twin.id == User.id``): the twins it
    relates (same name, same region...) may live on other shards."""
    outer_bases = {id(base_table(t)) for t in outer}
    conditions = [t for c in _relating_conditions(sub, in_left) for t in conjuncts(c)]
    for frm in froms:
        for found in _tables_in(frm):
            alias = _compat.deannotated(found)
            if not (isinstance(alias, Alias) and isinstance(alias.element, TableClause)):
                continue
            base = base_table(alias)
            if id(base) not in outer_bases or placement.is_replicated(base):
                continue
            if placement.colocated([base, base]):
                continue  # pinned: every copy is on one shard
            keys = placement.key_columns_of(base)
            if not (len(keys) == 1 and any(
                _equates_key(term, alias, base, keys[0].name) for term in conditions
            )):
                return str(getattr(base, "name", base))
    return None


def _equates_key(term: Any, alias: Any, base: Any, key: str) -> bool:
    """Whether ``term`` is ``alias.key == <the enclosing FROM of base>.key``."""
    if not (isinstance(term, BinaryExpression) and term.operator is operators.eq):
        return False
    sides = (term.left, term.right)
    if not all(isinstance(c, ColumnClause) and c.name == key for c in sides):
        return False
    owners = [_compat.deannotated(getattr(c, "table", None)) for c in sides]
    return any(o is alias for o in owners) and any(
        o is not alias and base_table(o) is base for o in owners
    )
