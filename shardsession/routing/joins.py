"""Whether a statement relates co-located tables *along their placement*.

Two tables are co-located when the rows a join relates are stored on one shard: a child
follows its parent through a relationship, so ``orders.user_id = users.id`` finds both
rows on the same shard. The same two tables joined on anything else
(``orders.amount = users.id``), or not joined at all (a cross product), relate rows that
one database would pair but that live on different shards: running the statement on each
shard would silently drop those pairs. :func:`unrelated_tables` finds such statements so
the session can refuse them.

The rule: the tables of the statement must be connected by equalities between the column
pairs of the relationships that place them (a child's foreign key to its parent, joined
inheritance's primary key to its base), found in JOIN conditions or in the top-level AND
of the WHERE clause. This is pure analysis of the statement; nothing runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from sqlalchemy import Table
from sqlalchemy.orm import Mapper
from sqlalchemy.sql import operators
from sqlalchemy.sql.elements import BinaryExpression, BooleanClauseList, ColumnClause
from sqlalchemy.sql.selectable import Join

__all__ = ["ColumnKey", "equalities", "placement_pairs", "unrelated_tables"]

#: a column named by its base table's key (an alias counts as its table; the ORM's
#: annotated copies of a table share its key) and its own name
ColumnKey = tuple[str, str]


def _table_key(table: Any) -> str | None:
    while not isinstance(table, Table) and getattr(table, "element", None) is not None:
        table = table.element
    return str(table.key) if isinstance(table, Table) else None


def _key(col: Any) -> ColumnKey | None:
    if not isinstance(col, ColumnClause) or getattr(col, "table", None) is None:
        return None
    table = _table_key(col.table)
    return (table, str(col.name)) if table is not None else None


def _conjuncts(expr: Any) -> Iterator[Any]:
    if isinstance(expr, BooleanClauseList) and expr.operator is operators.and_:
        for clause in expr.clauses:
            yield from _conjuncts(clause)
    elif expr is not None:
        yield expr


def equalities(expr: Any) -> Iterator[tuple[ColumnKey, ColumnKey]]:
    """``column = column`` terms of the top-level AND of ``expr``."""
    for term in _conjuncts(expr):
        if isinstance(term, BinaryExpression) and term.operator is operators.eq:
            left, right = _key(term.left), _key(term.right)
            if left is not None and right is not None and left[0] != right[0]:
                yield left, right


def _join_conditions(froms: Iterable[Any]) -> Iterator[Any]:
    for frm in froms:
        if isinstance(frm, Join):
            yield from _join_conditions((frm.left, frm.right))
            yield frm.onclause


def placement_pairs(mapper: Mapper[Any], parents: Sequence[Any]) -> set[frozenset[ColumnKey]]:
    """Column pairs whose equality keeps related rows of ``mapper`` on one shard: those of
    ``parents`` (the relationships it is placed through) and of its joined-inheritance
    condition."""
    pairs: set[frozenset[ColumnKey]] = set()
    for prop in parents:
        for left, right in prop.local_remote_pairs or ():
            a, b = _key(left), _key(right)
            if a is not None and b is not None:
                pairs.add(frozenset((a, b)))
    m: Mapper[Any] | None = mapper
    while m is not None:
        if m.inherit_condition is not None:
            pairs.update(frozenset(p) for p in equalities(m.inherit_condition))
        m = m.inherits
    return pairs


def unrelated_tables(
    tables: Sequence[Any],
    froms: Iterable[Any],
    where: Any,
    allowed: set[frozenset[ColumnKey]],
    *,
    connected: Sequence[Any] = (),
) -> list[list[str]]:
    """Groups of ``tables`` (by table key) that no placement equality connects.

    Returns ``[]`` when every table is reached from every other through equalities in
    ``allowed`` found in the JOIN conditions of ``froms`` or in ``where`` (a condition or
    a list of them); otherwise the connected groups (two or more). ``connected`` tables
    count as related to each other already (e.g. an enclosing statement's, which its own
    check covers).
    """
    known = [k for k in (_table_key(t) for t in connected) if k is not None]
    wanted = known + [k for k in (_table_key(t) for t in tables) if k is not None]
    parent: dict[str, str] = {k: k for k in wanted}
    for k in known[1:]:
        parent[k] = known[0]

    def find(k: str) -> str:
        parent.setdefault(k, k)
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    # Tables between them (joined through, not selected) connect them too.
    for cond in [*_join_conditions(froms), *(where if isinstance(where, list) else [where])]:
        for left, right in equalities(cond):
            if frozenset((left, right)) in allowed:
                parent[find(left[0])] = find(right[0])
    groups: dict[str, list[str]] = {}
    for k in dict.fromkeys(wanted):
        groups.setdefault(find(k), []).append(k)
    return sorted(sorted(g) for g in groups.values()) if len(groups) > 1 else []
