"""Subqueries not related to their statement's rows along the placement.

Asked by the session's router (:mod:`shardsession._placed`) of every SELECT, UPDATE and
DELETE under a placement, wherever it runs: such a subquery sees only the rows of the
shard it runs on.  Also :func:`in_by_key`, the one ``IN`` form that is exact anyway.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy.sql import operators
from sqlalchemy.sql.elements import (
    BinaryExpression,
    ClauseElement,
    ColumnClause,
    ColumnElement,
)
from sqlalchemy.sql.selectable import Alias, FromClause, Select, SelectBase, TableClause

from .. import _compat
from ._nodes import unwrap_label, walk
from ._selfjoin import base_table, conjuncts
from ._tables import note_in_link, relating_conditions, tables_in
from ._twopass import computed_first

__all__ = ["in_by_key", "unrelated_subquery"]


def _same_column(column: Any, key: Any, table: Any) -> bool:
    # (ORM expressions carry annotated copies of a table's columns)
    column = unwrap_label(column)
    return getattr(column, "table", None) is table and getattr(column, "key", None) == key.key


def in_by_key(sub: Select[Any], in_left: Any, tables: list[Any], placement: Any) -> bool:
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
    exprs: list[Any]
    if isinstance(sel, Select):
        froms: Sequence[Any] = _compat.final_froms_without_eager_joins(sel)
        parts = _compat.select_parts(sel)
        exprs = [c for c in parts.raw_columns if isinstance(c, ClauseElement)]
        exprs += [*parts.where, *parts.having, *parts.order_by, *parts.group_by]
    else:  # UPDATE / DELETE: its table, its WHERE and the values it sets
        froms = [_compat.dml_table(sel)]
        exprs = _compat.dml_expressions(sel)
    outer = _sharded_tables([t for f in froms for t in tables_in(f)], placement)
    # (a fan-out, or a statement sent to one shard, computes these first: see _twopass)
    first = computed_first(sel, placement) if isinstance(sel, Select) else set()
    outer_ids = {id(t) for t in outer}
    for expr in exprs:
        if isinstance(expr, FromClause) and not isinstance(expr, ColumnElement):
            continue
        in_links: dict[int, Any] = {}
        for node in walk(expr):
            note_in_link(node, in_links)
            if not isinstance(node, SelectBase):
                continue
            sub = _compat.ungrouped_select(node)
            if not isinstance(sub, Select) or id(sub) in first:
                continue
            own_froms = _compat.final_froms_without_eager_joins(sub)
            own = _sharded_tables([t for f in own_froms for t in tables_in(f)], placement)
            if not _compat.correlates_enclosing(sub, own_froms):
                # SQLAlchemy leaves the statement's own tables in this subquery: it reads
                # them whole (e.g. a global aggregate of the statement's table).
                same = [t for t in own if id(t) in outer_ids]
                if same and not in_by_key(sub, in_links.get(id(node)), same, placement):
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
            conditions = relating_conditions(sub, in_links.get(id(node)))
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
    conditions = [t for c in relating_conditions(sub, in_left) for t in conjuncts(c)]
    for frm in froms:
        for found in tables_in(frm):
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


def _sharded_tables(tables: Sequence[FromClause], placement: Any) -> list[FromClause]:
    """The tables (aliases as their table) that ``placement`` does not replicate."""
    out: list[FromClause] = []
    for t in tables:
        base = t.element if isinstance(t, Alias) and isinstance(t.element, TableClause) else t
        if isinstance(base, TableClause) and not placement.is_replicated(base):
            out.append(base)
    return out
