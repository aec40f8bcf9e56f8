"""Self-joins of a sharded table: exact only on the placement key.

``select(User.name, u2.name).join(u2, u2.region == User.region)`` pairs users of every
shard; each shard would pair only its own.  Joined on the placement key
(``u2.id == User.id``) both rows are the same shard's, so the join runs on each shard.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

from sqlalchemy.sql import operators
from sqlalchemy.sql.elements import BinaryExpression, BooleanClauseList, ColumnClause, Grouping
from sqlalchemy.sql.selectable import Alias, Join, Select, TableClause

from .. import _compat
from ..exc import UnsupportedQueryError

__all__ = ["base_table", "check_read_twice", "check_self_joins", "conjuncts"]


def base_table(frm: Any) -> Any:
    """The table under an alias (and the ORM's annotations) of a FROM element."""
    frm = _compat.deannotated(frm)
    return frm.element if isinstance(frm, Alias) and isinstance(frm.element, TableClause) else frm


def _join_conditions(froms: Sequence[Any]) -> Iterator[Any]:
    for frm in froms:
        if isinstance(frm, Join):
            yield from _join_conditions((frm.left, frm.right))
            if frm.onclause is not None:
                yield frm.onclause


def conjuncts(expr: Any) -> Iterator[Any]:
    """The terms of the top-level AND of ``expr``."""
    while isinstance(expr, Grouping):
        expr = expr.element
    if isinstance(expr, BooleanClauseList) and expr.operator is operators.and_:
        for clause in expr.clauses:
            yield from conjuncts(clause)
    else:
        yield expr


def _find(group: dict[int, int], k: int) -> int:
    while group[k] != k:
        k = group[k]
    return k


def check_self_joins(sel: Select[Any], tables: Sequence[Any], placement: Any) -> None:
    """A sharded table joined with itself (``aliased(User)``) relates rows of one shard
    only when the join equates the placement key of both FROMs (in JOIN ... ON or the
    top-level AND of WHERE), as ``join(u2, u2.id == User.id)``.

    :raises UnsupportedQueryError: it does not, or the placement cannot say its key.
    """
    key_columns_of = getattr(placement, "key_columns_of", None)
    froms_of: dict[int, list[Any]] = {}
    for t in tables:
        base = base_table(t)
        if placement is not None and not placement.is_replicated(base):
            froms_of.setdefault(id(base), []).append(_compat.deannotated(t))
    conditions = [
        term
        for cond in [
            *_join_conditions(_compat.final_froms_without_eager_joins(sel)),
            *_compat.select_parts(sel).where,
        ]
        for term in conjuncts(cond)
    ]
    for froms in froms_of.values():
        if len(froms) < 2:
            continue
        base = base_table(froms[0])
        keys: Sequence[Any] = key_columns_of(base) if key_columns_of is not None else ()
        group = {id(f): id(f) for f in froms}
        find = partial(_find, group)
        for term in conditions:
            if not (isinstance(term, BinaryExpression) and term.operator is operators.eq):
                continue
            left, right = term.left, term.right
            if not (isinstance(left, ColumnClause) and isinstance(right, ColumnClause)):
                continue
            a = id(_compat.deannotated(getattr(left, "table", None)))
            b = id(_compat.deannotated(getattr(right, "table", None)))
            if (
                len(keys) == 1
                and a in group
                and b in group
                and left.name == right.name == keys[0].name
            ):
                group[find(a)] = find(b)
        if len({find(k) for k in group}) > 1:
            raise UnsupportedQueryError(
                f"a JOIN of {getattr(base, 'name', base)} with itself not on its placement "
                "key pairs rows that may be on different shards",
                construct="self-join not on the placement key",
            )


def check_read_twice(tables: Sequence[Any], placement: Any) -> None:
    """A sharded table read by two FROM elements of which one is a derived table (a CTE
    joined with its alias, a subquery joined with its own table) shows up as the same
    table object twice: the self-join check cannot see which columns the derived table's
    join relates, so such a join is refused unless every copy is on one shard."""
    seen: set[int] = set()
    for t in tables:
        t = _compat.deannotated(t)
        if id(t) in seen and not placement.is_replicated(base_table(t)) and not (
            placement.colocated([base_table(t), base_table(t)])
        ):
            raise UnsupportedQueryError(
                f"{getattr(base_table(t), 'name', t)} is read by two FROM elements, one of "
                "them a derived table (subquery or CTE): a join between them is not checked "
                "for its placement key and may pair rows of different shards",
                construct="sharded table joined with a derived table of itself",
            )
        seen.add(id(t))
