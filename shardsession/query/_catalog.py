"""Collations as the servers' catalogs declare them, read once per engine and table.

PostgreSQL ``pg_attribute.attcollation`` / ``pg_collation`` and the database default,
MariaDB/MySQL ``information_schema.columns`` and the connection collation, SQLite the
``COLLATE`` a column declares in ``sqlite_master``.  A column's collation is assumed not
to change while the process runs (:func:`clear_cache` after an ``ALTER``).
"""

from __future__ import annotations

import re
import threading
import weakref
from collections.abc import Callable
from typing import Any

from sqlalchemy.engine import Connection, Engine
from sqlalchemy.sql.expression import TableClause

__all__ = [
    "cached",
    "clear_cache",
    "mysql_columns",
    "mysql_connection_collation",
    "pg_columns",
    "pg_default",
    "sqlite_columns",
    "sqlite_declared_collations",
]


_CATALOG: weakref.WeakKeyDictionary[Engine, dict[tuple[Any, ...], Any]] = (
    weakref.WeakKeyDictionary()
)
_CATALOG_LOCK = threading.Lock()


def clear_cache() -> None:
    """Forget every collation read from a server (after an ``ALTER ... COLLATE``)."""
    with _CATALOG_LOCK:
        _CATALOG.clear()


def cached(conn: Connection, key: tuple[Any, ...], load: Callable[[], Any]) -> Any:
    engine = conn.engine
    with _CATALOG_LOCK:
        per_engine = _CATALOG.setdefault(engine, {})
        if key in per_engine:
            return per_engine[key]
    value = load()
    with _CATALOG_LOCK:
        _CATALOG.setdefault(engine, {})[key] = value
    return value


def pg_default(conn: Connection) -> str:
    def load() -> str:
        version = conn.dialect.server_version_info or (0,)
        if version >= (15,):
            row = conn.exec_driver_sql(
                "SELECT datcollate, datlocprovider FROM pg_database "
                "WHERE datname = current_database()"
            ).one()
            # An ICU or builtin default is not "C" even when datcollate says so.
            return str(row[0]) if row[1] == "c" else f"provider {row[1]}"
        return str(
            conn.exec_driver_sql(
                "SELECT datcollate FROM pg_database WHERE datname = current_database()"
            ).scalar()
        )

    return str(cached(conn, ("pg-default",), load))


def pg_columns(conn: Connection, table: TableClause) -> dict[str, str]:
    def load() -> dict[str, str]:
        rows = conn.exec_driver_sql(
            "SELECT a.attname, coll.collname, coll.collprovider, coll.collisdeterministic "
            "FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "LEFT JOIN pg_collation coll ON coll.oid = a.attcollation "
            "WHERE c.relname = %(t)s AND n.nspname = COALESCE(%(s)s, current_schema()) "
            "AND a.attnum > 0 AND NOT a.attisdropped",
            {"t": table.name, "s": table.schema},
        ).all()
        out = {}
        for name, collname, provider, deterministic in rows:
            if collname is None:
                continue
            if collname == "default":
                out[name] = pg_default(conn)
            elif not deterministic or provider != "c":
                out[name] = f"{collname} (provider {provider})"
            else:
                out[name] = str(collname)
        return out

    result: dict[str, str] = cached(conn, ("pg", table.schema, table.name), load)
    return result


def mysql_columns(conn: Connection, table: TableClause) -> dict[str, str]:
    def load() -> dict[str, str]:
        rows = conn.exec_driver_sql(
            "SELECT column_name, collation_name FROM information_schema.columns "
            "WHERE table_schema = COALESCE(%(s)s, DATABASE()) AND table_name = %(t)s",
            {"t": table.name, "s": table.schema},
        ).all()
        return {str(n): str(c) for n, c in rows if c is not None}

    result: dict[str, str] = cached(conn, ("mysql", table.schema, table.name), load)
    return result


_COLLATE = re.compile(
    r"\bCOLLATE\s+(?:\"([^\"]+)\"|'([^']+)'|`([^`]+)`|\[([^\]]+)\]|(\w+))", re.IGNORECASE
)
_CONSTRAINT = re.compile(r"(CONSTRAINT|PRIMARY|UNIQUE|CHECK|FOREIGN)\b", re.IGNORECASE)
_NAME = re.compile(r"\s*(?:\"((?:[^\"]|\"\")+)\"|`([^`]+)`|\[([^\]]+)\]|'([^']+)'|(\w+))")


def _split_top_level(body: str) -> list[str]:
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(body):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "\"'`[":
            quote = "]" if ch == "[" else ch
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(body[start:i])
            start = i + 1
    parts.append(body[start:])
    return parts


def sqlite_declared_collations(sql: str) -> dict[str, str]:
    """``{column: collation}`` from an SQLite ``CREATE TABLE`` statement (BINARY when
    the column declares none)."""
    body = sql[sql.index("(") + 1 : sql.rindex(")")]
    out = {}
    for part in _split_top_level(body):
        if _CONSTRAINT.match(part.strip()):
            continue
        named = _NAME.match(part)
        if named is None:
            continue
        name = next(g for g in named.groups() if g is not None).replace('""', '"')
        found = _COLLATE.search(part, named.end())
        out[name] = next(g for g in found.groups() if g is not None) if found else "BINARY"
    return out


def sqlite_columns(conn: Connection, table: TableClause) -> dict[str, str]:
    def load() -> dict[str, str]:
        master = "sqlite_master" if table.schema is None else f'"{table.schema}".sqlite_master'
        sql = conn.exec_driver_sql(
            f"SELECT sql FROM {master} WHERE type = 'table' AND name = ?", (table.name,)
        ).scalar()
        return {} if sql is None else sqlite_declared_collations(str(sql))

    result: dict[str, str] = cached(conn, ("sqlite", table.schema, table.name), load)
    return result




def mysql_connection_collation(conn: Connection) -> str:
    """The collation of string literals on a MariaDB/MySQL connection."""
    return str(
        cached(
            conn,
            ("mysql-connection",),
            lambda: str(conn.exec_driver_sql("SELECT @@collation_connection").scalar()),
        )
    )
