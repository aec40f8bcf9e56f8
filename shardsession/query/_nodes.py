"""What a node of a statement is, for the cross-shard checks and the statement model.

Names of aggregates (mergeable or not) and of row-level functions, a walk of an
expression that enters function calls but not subqueries, and the constructs that make
a SELECT's rows depend on all of a table's rows (:func:`global_construct`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from sqlalchemy.sql import operators
from sqlalchemy.sql.elements import (
    ClauseElement,
    ClauseList,
    ColumnClause,
    ColumnElement,
    FunctionFilter,
    Label,
    TextClause,
    UnaryExpression,
    WithinGroup,
)
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.sql.selectable import FromClause, Select, SelectBase

from .. import _compat
from ..exc import UnsupportedQueryError

__all__ = [
    "KNOWN_SCALAR_FUNCTIONS",
    "MERGEABLE_AGGREGATES",
    "OTHER_AGGREGATES",
    "SUSPICIOUS_TEXT",
    "aggregate_kind",
    "contains_aggregate",
    "distinct_argument",
    "function_name",
    "global_construct",
    "might_aggregate",
    "opaque_text",
    "unwrap_label",
    "walk",
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
        "localtimestamp", "typeof", "hex", "md5", "random", "json_array",
        "json_object", "json_build_array", "json_build_object", "jsonb_build_array",
        "jsonb_build_object", "json_extract", "json_array_length", "json_type",
        "json_quote", "json_valid", "to_json", "to_jsonb",
    }
)  # fmt: skip


# Textual SQL is opaque; refuse fragments that could hide a cross-row computation.
SUSPICIOUS_TEXT = re.compile(
    r"\b(select|over|"
    + "|".join(sorted(MERGEABLE_AGGREGATES | OTHER_AGGREGATES))
    + r")\b\s*\(?",
    re.IGNORECASE,
)


def unwrap_label(expr: Any) -> Any:
    """Return the expression under any number of labels."""
    while isinstance(expr, Label):
        expr = expr.element
    return expr


def function_name(expr: Any) -> str | None:
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
    name = function_name(expr)
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


def walk(expr: ClauseElement) -> Iterator[ClauseElement]:
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
    for node in walk(expr):
        name = function_name(node)
        if name is not None and name not in KNOWN_SCALAR_FUNCTIONS:
            return True
        if isinstance(node, WithinGroup | FunctionFilter):
            return True
    return False


def contains_aggregate(expr: ClauseElement) -> bool:
    """Whether ``expr`` has an aggregate function outside of subqueries."""
    for node in walk(expr):
        name = function_name(node)
        if name in MERGEABLE_AGGREGATES or name in OTHER_AGGREGATES:
            return True
        if isinstance(node, WithinGroup | FunctionFilter):
            return True
    return False


def opaque_text(node: ClauseElement) -> str | None:
    """The SQL of a ``text()`` or ``literal_column()`` node (else ``None``)."""
    if isinstance(node, TextClause):
        return node.text
    if isinstance(node, ColumnClause) and node.is_literal:
        return str(node.name)
    return None


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
