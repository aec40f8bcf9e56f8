"""The decision table's SQL shared by the adapters (only the parameter style differs)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .base import DECISION_TABLE, DecisionRow

__all__ = ["DecisionTableSQL"]

_COLUMNS = "gtrid, outcome, decided_at, participants"


class DecisionTableSQL:
    """Read, insert and delete decision rows through a DBAPI connection.

    Subclasses set :attr:`placeholder` to their driver's parameter marker; values are
    always bound, never formatted into the SQL (gtrids read back are untrusted text).
    """

    placeholder = "%s"

    def _native(self, dbapi_conn: Any, sql: str) -> str:
        """``sql`` in the parameter style of ``dbapi_conn``'s driver (as written here by
        default; the PostgreSQL adapter renumbers for asyncpg)."""
        return sql

    def _rows(self, dbapi_conn: Any, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        cur = dbapi_conn.cursor()
        try:
            cur.execute(self._native(dbapi_conn, sql), params)
            return list(cur.fetchall()) if cur.description else []
        finally:
            cur.close()

    def _insert_decision_sql(self, prefix: str = "") -> str:
        p = self.placeholder
        return f"{prefix}INSERT INTO {DECISION_TABLE} ({_COLUMNS}) VALUES ({p}, {p}, {p}, {p})"

    @staticmethod
    def _decision_params(row: DecisionRow) -> tuple[Any, ...]:
        return (row.gtrid, row.outcome, row.decided_at, row.participants)

    def read_decision(self, dbapi_conn: Any, gtrid: str) -> DecisionRow | None:
        rows = self._rows(
            dbapi_conn,
            f"SELECT {_COLUMNS} FROM {DECISION_TABLE} WHERE gtrid = {self.placeholder}",
            (gtrid,),
        )
        return _decision(rows[0]) if rows else None

    def read_decisions(self, dbapi_conn: Any) -> list[DecisionRow]:
        return [
            _decision(r) for r in self._rows(dbapi_conn, f"SELECT {_COLUMNS} FROM {DECISION_TABLE}")
        ]

    def delete_decisions(self, dbapi_conn: Any, gtrids: Sequence[str]) -> int:
        n = 0
        cur = dbapi_conn.cursor()
        sql = self._native(
            dbapi_conn, f"DELETE FROM {DECISION_TABLE} WHERE gtrid = {self.placeholder}")
        try:
            for g in gtrids:
                cur.execute(sql, (g,))
                n += max(cur.rowcount, 0)
        finally:
            cur.close()
        return n


def _decision(r: Sequence[Any]) -> DecisionRow:
    return DecisionRow(str(r[0]), str(r[1]), float(r[2]), str(r[3]))
