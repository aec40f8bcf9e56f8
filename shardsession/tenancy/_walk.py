"""Find what the tenant filter cannot reach in a statement: Core references to tenant
tables and raw SQL text.

``with_loader_criteria`` filters ORM entities only; a tenant table named as a Core
object (``Account.__table__``, its alias or columns, ``sqlalchemy.table("account")``),
a mapper of a tenant table that is not the placed one, and SQL text (``text()``,
``literal_column()``, prefixes, suffixes, hints) pass through unfiltered. A tenant-scoped
session refuses a statement that holds any of them.
"""

from __future__ import annotations

import re
import weakref
from typing import Any

from sqlalchemy import Column
from sqlalchemy.orm import Mapper
from sqlalchemy.sql.dml import UpdateBase
from sqlalchemy.sql.elements import ColumnClause, TextClause
from sqlalchemy.sql.selectable import CTE, Select, Subquery, TableClause, TextualSelect

from .._compat import (
    annotations_of,
    lambda_resolved,
    loader_options,
    text_extras,
    walk_children,
)
from ._mappers import TenantMapper

__all__ = ["unfiltered_part"]

#: literal columns SQLAlchemy itself writes (``count(*)``, ``EXISTS (SELECT 1 ...)``)
_HARMLESS_LITERAL = re.compile(r"\*|\d+")


def _tenant_names(owned: dict[Mapper[Any], TenantMapper]) -> set[tuple[str | None, str]]:
    names: set[tuple[str | None, str]] = set()
    for m in owned:
        for t in m.tables:
            names.add((getattr(t, "schema", None), t.name))
    return names


def _owned(owned: dict[Mapper[Any], TenantMapper], mapper: Any) -> bool:
    return mapper is not None and any(b in owned for b in mapper.iterate_to_root())


#: mapper -> its column_property expressions that are not plain columns of its tables
_PROPERTY_EXPRESSIONS: weakref.WeakKeyDictionary[Any, tuple[Any, ...]] = (
    weakref.WeakKeyDictionary())


def _property_expressions(mapper: Any) -> tuple[Any, ...]:
    found = _PROPERTY_EXPRESSIONS.get(mapper)
    if found is None:
        found = tuple(c for prop in mapper.column_attrs for c in prop.columns
                      if not (isinstance(c, Column) and c.table in mapper.tables))
        _PROPERTY_EXPRESSIONS[mapper] = found
    return found


def _entity_tables(element: Any) -> tuple[Any, ...]:
    """The tables of the plain (not aliased) mapped entity an element is annotated
    with: a plain column of one of them in the same SELECT is the filtered one."""
    entity = annotations_of(element).get("parententity")
    if entity is None or getattr(entity, "is_aliased_class", False):
        return ()
    return tuple(entity.mapper.tables)


def unfiltered_part(statement: Any, owned: dict[Mapper[Any], TenantMapper]) -> str | None:
    """Describe the first part of ``statement`` the tenant filter does not reach, or
    ``None`` when every part is filtered (one traversal, no compilation).

    A plain column of a tenant table is accepted only in a SELECT / UPDATE / DELETE
    whose own entity is that table's mapper (the ORM's ``get()`` criterion, say: the
    FROM it names is the entity's, filtered); a plain table or alias of one anywhere is
    refused."""
    names = _tenant_names(owned)
    statement = lambda_resolved(statement)
    stack: list[tuple[Any, frozenset[Any]]] = [(statement, frozenset())]
    for path, exprs in loader_options(statement):  # (with_expression(), .and_()
        on_path = frozenset(t for m in path for t in m.tables)  # criteria: in the
        stack.extend((x, on_path) for x in exprs)  # statement of the path's entities)
    mappers_seen: set[Any] = set()
    seen: set[int] = set()
    while stack:
        e, covered = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, (TextClause, TextualSelect)):
            return "SQL text (text(), from_statement(text()), select_from(text()))"
        if text_extras(e):
            return "a prefix, suffix or hint (prefix_with, suffix_with, with_hint)"
        ann = annotations_of(e)
        if isinstance(e, ColumnClause) and e.is_literal and not _HARMLESS_LITERAL.fullmatch(
            e.name
        ):
            return f"a literal_column({e.name!r})"
        mapper = ann.get("parentmapper")
        if mapper is None and ann.get("parententity") is not None:
            mapper = ann["parententity"].mapper
        if mapper is not None:
            table = getattr(e, "table", e)
            if not _owned(owned, mapper) and (
                (getattr(table, "schema", None), getattr(table, "name", None)) in names
                or any((getattr(t, "schema", None), t.name) in names for t in mapper.tables)
            ):
                return (f"mapper {mapper.class_.__name__}, which maps a tenant table but is "
                        "not the tenant-owned mapper of the placement")
            if mapper not in mappers_seen:
                mappers_seen.add(mapper)
                covered_here = frozenset(mapper.tables)
                stack.extend((c, covered_here) for c in _property_expressions(mapper))
            if not isinstance(e, (Subquery, CTE)):
                continue  # (an ORM attribute or entity: filtered; its table is its own;
                # an entity aliased over a subquery is looked into)
        elif isinstance(e, ColumnClause) and isinstance(e.table, TableClause) and (
            (getattr(e.table, "schema", None), e.table.name) in names
        ):
            if e.table in covered:
                continue  # (the entity's own table in its own statement)
            return (f"the Core table {e.table.name!r} (Table, its alias or columns, or "
                    "sqlalchemy.table()): use the mapped class's attributes")
        elif isinstance(e, TableClause) and (getattr(e, "schema", None), e.name) in names:
            return (f"the Core table {e.name!r} (Table, its alias or columns, or "
                    "sqlalchemy.table()): use the mapped class's attributes")
        children = list(walk_children(e))
        if isinstance(e, (Select, UpdateBase)):
            covered = frozenset(t for c in [*children, getattr(e, "table", None)]
                                for t in _entity_tables(c))
        stack.extend((c, covered) for c in children)
    return None
