"""The decision and cluster tables' SQL shared by the adapters (only the parameter style
and the server's clock expression differ)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .base import CLUSTER_TABLE, DECISION_TABLE, DecisionRow

__all__ = ["DecisionTableSQL"]

_COLUMNS = "gtrid, outcome, decided_at, participants"
#: the constant key of the cluster table's one row: a second insert is a duplicate key
_SINGLETON = "x"


class DecisionTableSQL:
    """Read, insert and delete decision rows and the cluster identity through a DBAPI
    connection.

    Subclasses set :attr:`placeholder` to their driver's parameter marker and
    :attr:`now_sql` to their server's clock in unix seconds; values are always bound,
    never formatted into the SQL (gtrids read back are untrusted text).
    """

    placeholder = "%s"
    #: the server's current time in unix seconds (an SQL expression)
    now_sql = "0"
    #: ``CREATE TABLE`` of the cluster table (the dialects agree on these types)
    cluster_ddl = (
        f"CREATE TABLE IF NOT EXISTS {CLUSTER_TABLE} ("
        "singleton CHAR(1) NOT NULL PRIMARY KEY, "
        "cluster_id VARCHAR(32) NOT NULL, "
        "created_at DOUBLE PRECISION NOT NULL)"
    )

    #: SQL answering one row when the table named by the one parameter exists (``None``:
    #: no such check, the ``IF NOT EXISTS`` DDL is always sent)
    table_exists_sql: str | None = None

    def table_exists(self, dbapi_conn: Any, table: str) -> bool:
        """Whether ``table`` exists where unqualified names resolve (no DDL is sent).

        PostgreSQL checks the right to create in the schema even for ``CREATE TABLE IF
        NOT EXISTS`` of an existing table, and MySQL/MariaDB the CREATE privilege: a
        worker role granted only SELECT/INSERT/DELETE must never send DDL for a table
        that is there.
        """
        if self.table_exists_sql is None:
            return False
        return bool(self._rows(dbapi_conn, self.table_exists_sql, (table,)))

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

    def is_duplicate_key(self, error: BaseException) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def _insert_decision_sql(self, prefix: str = "") -> str:
        # decided_at NULL -> the server's clock (abort claims; see DecisionRow)
        p = self.placeholder
        return (f"{prefix}INSERT INTO {DECISION_TABLE} ({_COLUMNS}) "
                f"VALUES ({p}, {p}, COALESCE({p}, {self.now_sql}), {p})")

    @staticmethod
    def _decision_params(row: DecisionRow) -> tuple[Any, ...]:
        return (row.gtrid, row.outcome, row.decided_at, row.participants)

    def _select(self) -> str:
        return f"SELECT {_COLUMNS}, {self.now_sql} - decided_at FROM {DECISION_TABLE}"

    def read_decision(self, dbapi_conn: Any, gtrid: str) -> DecisionRow | None:
        rows = self._rows(dbapi_conn, f"{self._select()} WHERE gtrid = {self.placeholder}",
                          (gtrid,))
        return _decision(rows[0]) if rows else None

    def read_decisions(self, dbapi_conn: Any) -> list[DecisionRow]:
        return [_decision(r) for r in self._rows(dbapi_conn, self._select())]

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

    # --- cluster identity -----------------------------------------------------------

    def ensure_cluster_table(self, dbapi_conn: Any) -> None:
        if self.table_exists(dbapi_conn, CLUSTER_TABLE):
            return
        try:
            self._rows(dbapi_conn, self.cluster_ddl)
        except Exception as e:
            # Two processes racing on CREATE TABLE IF NOT EXISTS (PostgreSQL: a duplicate
            # in pg_type): the table exists either way.
            if not self.is_duplicate_key(e):
                raise

    def read_cluster_id(self, dbapi_conn: Any) -> str | None:
        rows = self._rows(dbapi_conn, f"SELECT cluster_id FROM {CLUSTER_TABLE} "
                                      f"WHERE singleton = {self.placeholder}", (_SINGLETON,))
        return str(rows[0][0]) if rows else None

    def insert_cluster_id(self, dbapi_conn: Any, cluster_id: str) -> None:
        p = self.placeholder
        self._rows(dbapi_conn, f"INSERT INTO {CLUSTER_TABLE} (singleton, cluster_id, created_at) "
                               f"VALUES ({p}, {p}, {self.now_sql})", (_SINGLETON, cluster_id))


def _decision(r: Sequence[Any]) -> DecisionRow:
    age = float(r[4]) if len(r) > 4 and r[4] is not None else None
    return DecisionRow(str(r[0]), str(r[1]), float(r[2]), str(r[3]), age)
