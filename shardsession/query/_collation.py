"""Which collation a string expression has on a shard, and how to compare under it.

The collation of a sort, group or compared expression comes, in this order, from an
explicit ``COLLATE``, from the column type's ``collation``, or from the server's catalog
(PostgreSQL ``pg_attribute.attcollation``/``pg_collation``, MariaDB/MySQL
``information_schema.columns``, SQLite the declared ``COLLATE`` of the column in
``sqlite_master``).  Each collation known to be reproducible exactly becomes a
:class:`Collation` with a Python key; any other is returned with ``key=None,
exact=False`` and the caller refuses the statement.

Catalog answers are read by :mod:`._catalog` (cached per engine).  MariaDB's
``*_general_ci`` weight tables are read from the server once per server version (one
query of 65,536 rows).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Column
from sqlalchemy.engine import Connection
from sqlalchemy.sql import operators
from sqlalchemy.sql.elements import (
    BinaryExpression,
    ClauseElement,
    CollationClause,
    ColumnClause,
    Grouping,
    Label,
    UnaryExpression,
)
from sqlalchemy.sql.expression import TableClause
from sqlalchemy.types import Enum, String

from ._catalog import (
    clear_cache,
    mysql_columns,
    mysql_connection_collation,
    pg_columns,
    pg_default,
    sqlite_columns,
)
from ._dialect import (
    ValueKey,
    ascii_nocase_key,
    code_point_pad_key,
    rtrim_key,
    weight_table_pad_key,
)

__all__ = ["BINARY", "Collation", "clear_cache", "expression_collation", "is_string"]


@dataclass(frozen=True)
class Collation:
    """How a backend compares strings under one collation.

    :ivar ident: equal for collations that compare exactly alike (on any backend).
    :ivar key: Python key reproducing the comparison (``None``: code point order).
    :ivar exact: ``False`` when no exact Python comparison is known (refuse).
    """

    ident: str
    key: ValueKey | None
    exact: bool = True
    name: str = ""


#: code point order: SQLite BINARY, PostgreSQL "C"/"POSIX"/ucs_basic, MariaDB *_nopad_bin
BINARY = Collation("binary", None, True, "binary")
_NOCASE = Collation("sqlite-nocase", ascii_nocase_key, True, "NOCASE")
_RTRIM = Collation("sqlite-rtrim", rtrim_key, True, "RTRIM")
_BIN_PAD = Collation("binary-pad-space", code_point_pad_key, True, "*_bin")


def _unknown(dialect: str, name: str) -> Collation:
    return Collation(f"{dialect}:{name}", None, False, name)


Lookup = Callable[[Any, str], str | None]


def is_string(type_: Any) -> bool:
    """Whether values of ``type_`` compare as strings under a collation."""
    return isinstance(type_, String) and not isinstance(type_, Enum)


# -- names to collations -----------------------------------------------------------------

_PG_BINARY = {"c", "posix", "ucs_basic", "pg_c_utf8"}
_MY_CHARSETS = ("utf8mb4", "utf8mb3", "utf8", "latin1", "ascii")


def _sqlite(name: str) -> Collation:
    low = name.lower()
    if low == "binary":
        return BINARY
    if low == "nocase":
        return _NOCASE
    if low == "rtrim":
        return _RTRIM
    return _unknown("sqlite", name)


def _postgresql(name: str) -> Collation:
    if name.lower() in _PG_BINARY:
        return BINARY
    return _unknown("postgresql", name)


class _WeightTables:
    """MariaDB per-character weight tables, read from the server once per version."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tables: dict[tuple[str, str], Collation] = {}

    def get(self, conn: Connection | None, collation: str, pad: bool) -> Collation:
        if conn is None:
            return _unknown("mysql", collation)
        version = str(conn.dialect.server_version_info)
        cache_key = (version, collation)
        with self._lock:
            found = self._tables.get(cache_key)
        if found is not None:
            return found
        charset = collation.split("_", 1)[0]
        # Collation and charset names are checked against a fixed pattern before
        # they reach SQL text (they come from the catalog or the column type).
        if not re.fullmatch(r"[a-z0-9]+_general(_nopad)?_ci", collation):
            return _unknown("mysql", collation)
        weigh = (
            f"WEIGHT_STRING(CONVERT(CHAR(seq USING utf32) USING {charset}) "
            f"COLLATE {collation})"
        )
        rows = conn.exec_driver_sql(f"SELECT seq, {weigh} FROM seq_0_to_65535").all()
        table = [0] * 65536
        for seq, weight in rows:
            table[int(seq)] = int.from_bytes(weight, "big") if weight else 0
        beyond_row = conn.exec_driver_sql(
            f"SELECT WEIGHT_STRING(CONVERT(CHAR(128512 USING utf32) USING {charset}) "
            f"COLLATE {collation})"
        ).scalar()
        beyond = int.from_bytes(beyond_row, "big") if beyond_row else 0xFFFD
        space = table[32]
        key: ValueKey
        if pad:
            key = weight_table_pad_key(table, beyond, space)
        else:
            size = len(table)

            def key(value: str) -> tuple[int, ...]:
                return tuple(table[o] if (o := ord(c)) < size else beyond for c in value)

        made = Collation(f"mysql-weights:{version}:{collation}", key, True, collation)
        with self._lock:
            self._tables[cache_key] = made
        return made


_WEIGHTS = _WeightTables()


def _mysql(name: str, conn: Connection | None) -> Collation:
    low = name.lower()
    charset = low.split("_", 1)[0]
    if low == "binary" or charset not in _MY_CHARSETS:
        # binary strings are bytes; other character sets are not modelled
        return BINARY if low == "binary" else _unknown("mysql", name)
    if low.endswith("_nopad_bin"):
        return BINARY
    if low.endswith("_bin"):
        return _BIN_PAD
    if low.endswith("_general_ci"):
        return _WEIGHTS.get(conn, low, pad=True)
    if low.endswith("_general_nopad_ci"):
        return _WEIGHTS.get(conn, low, pad=False)
    return _unknown("mysql", name)


def collation_named(dialect: str, name: str, conn: Connection | None = None) -> Collation:
    """The :class:`Collation` a backend means by ``name``."""
    if dialect == "sqlite":
        return _sqlite(name)
    if dialect == "postgresql":
        return _postgresql(name)
    if dialect in ("mysql", "mariadb"):
        return _mysql(name, conn)
    return _unknown(dialect, name)


def column_collation(conn: Connection | None, dialect: str, column: Column[Any]) -> Collation:
    """The collation of a table column on the shard behind ``conn``."""
    declared = getattr(column.type, "collation", None)
    if declared:
        return collation_named(dialect, str(declared), conn)
    table = column.table
    if conn is None or not isinstance(table, TableClause):
        return _unknown(dialect, "unknown")
    if dialect == "sqlite":
        names = sqlite_columns(conn, table)
        return _sqlite(names.get(column.name, "BINARY"))
    if dialect == "postgresql":
        pg = pg_columns(conn, table)
        found = pg.get(column.name)
        return _postgresql(found) if found else _unknown(dialect, "unknown")
    if dialect in ("mysql", "mariadb"):
        my = mysql_columns(conn, table)
        found = my.get(column.name)
        return _mysql(found, conn) if found else _unknown(dialect, "unknown")
    return _unknown(dialect, "unknown")


def _connection_default(conn: Connection | None, dialect: str) -> Collation:
    if conn is None:
        return _unknown(dialect, "default")
    if dialect == "postgresql":
        return _postgresql(pg_default(conn))
    if dialect in ("mysql", "mariadb"):
        return _mysql(mysql_connection_collation(conn), conn)
    return BINARY


def expression_collation(expr: Any, dialect: str, conn: Connection | None) -> Collation:
    """The collation ``expr`` compares under on a shard of ``dialect``.

    An explicit ``COLLATE`` wins; a column has its own; any other expression has BINARY
    on SQLite and, on PostgreSQL and MariaDB, the collation of the string columns it is
    made of (implicit derivation), or the database's default without any.  Columns of
    different collations give an inexact answer (the caller refuses).
    """
    expr = unwrap(expr)
    if isinstance(expr, BinaryExpression) and expr.operator is operators.collate:
        right: Any = expr.right
        while isinstance(right, Grouping):
            right = right.element
        if isinstance(right, CollationClause):
            return collation_named(dialect, right.collation.strip('"`'), conn)
        return _unknown(dialect, "COLLATE expression")
    if isinstance(expr, ColumnClause) and not isinstance(expr.table, TableClause | None):
        # a column of an alias or a subquery: its collation is that of what it selects
        base = _base_of(expr)
        if base is None:
            return _unknown(dialect, "column of a derived table")
        return expression_collation(base, dialect, conn)
    if isinstance(expr, Column) and expr.table is not None:
        return column_collation(conn, dialect, expr)
    if dialect == "sqlite":
        return BINARY
    leaves = _string_columns(expr)
    if leaves is None:
        return _unknown(dialect, "COLLATE inside an expression")
    if not leaves:
        return _connection_default(conn, dialect)
    found = {column_collation(conn, dialect, c) for c in leaves}
    if len(found) == 1:
        return found.pop()
    return _unknown(dialect, "mixed collations")


def _base_of(column: ColumnClause[Any]) -> Any:
    """What a column of an alias or a subquery stands for (``None``: not one thing)."""
    bases = [b for b in column.base_columns if b is not column]
    return bases[0] if len(bases) == 1 else None


def _string_columns(expr: Any) -> list[Column[Any]] | None:
    out: list[Column[Any]] = []
    stack = [expr]
    while stack:
        node = stack.pop()
        if isinstance(node, BinaryExpression) and node.operator is operators.collate:
            return None
        if isinstance(node, ColumnClause) and node.table is not None and is_string(node.type):
            if isinstance(node, Column) and isinstance(node.table, TableClause):
                out.append(node)
                continue
            base = _base_of(node)
            if base is None or base is node:
                return None
            stack.append(base)
            continue
        if isinstance(node, ClauseElement):
            stack.extend(node.get_children())
    return out


def unwrap(expr: Any) -> Any:
    """``expr`` without labels, groupings and a column-level ``distinct()`` (which
    compares its operand as the operand's collation does)."""
    while True:
        if isinstance(expr, Label | Grouping) or (
            isinstance(expr, UnaryExpression) and expr.operator is operators.distinct_op
        ):
            expr = expr.element
        else:
            return expr
