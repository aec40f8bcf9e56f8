"""The decision and cluster tables' SQL shared by the adapters (only the parameter style
and the server's clock expression differ)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .base import CLUSTER_TABLE, DECISION_TABLE, ClusterRow, DecisionRow

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
    #: ``CREATE TABLE`` of the cluster table (the dialects agree on these types).
    #: ``bound_to`` is where the identity was created (:attr:`location_sql`), NULL in rows
    #: stored before it existed; ``previous_id`` the identity a re-keyed copy had.
    cluster_ddl = (
        f"CREATE TABLE IF NOT EXISTS {CLUSTER_TABLE} ("
        "singleton CHAR(1) NOT NULL PRIMARY KEY, "
        "cluster_id VARCHAR(32) NOT NULL, "
        "created_at DOUBLE PRECISION NOT NULL, "
        "bound_to VARCHAR(600), "
        "previous_id VARCHAR(32))"
    )
    #: a query of one text value naming the database this connection is in, as a copy of
    #: it (a dump restored elsewhere, a file copied) would not: server and database
    location_sql = "SELECT ''"

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

    def ensure_cluster_columns(self, dbapi_conn: Any) -> None:
        """Add ``bound_to`` and ``previous_id`` to a cluster table created before them
        (autocommit, or on SQLite in any transaction)."""
        for column, ddl in (("bound_to", "VARCHAR(600)"), ("previous_id", "VARCHAR(32)")):
            try:
                self._rows(dbapi_conn, f"SELECT {column} FROM {CLUSTER_TABLE} WHERE 1 = 0")
                continue
            except Exception:  # (autocommit, or SQLite: the failure ends nothing)
                pass
            try:
                self._rows(dbapi_conn, f"ALTER TABLE {CLUSTER_TABLE} ADD COLUMN {column} {ddl}")
            except Exception:
                # another process added it first: fine if it is there now
                self._rows(dbapi_conn, f"SELECT {column} FROM {CLUSTER_TABLE} WHERE 1 = 0")

    def location(self, dbapi_conn: Any) -> str:
        rows = self._rows(dbapi_conn, self.location_sql)
        return str(rows[0][0]) if rows and rows[0][0] is not None else ""

    def read_cluster_row(self, dbapi_conn: Any) -> ClusterRow | None:
        p = self.placeholder
        try:
            rows = self._rows(dbapi_conn, f"SELECT cluster_id, bound_to, previous_id "
                                          f"FROM {CLUSTER_TABLE} WHERE singleton = {p}",
                              (_SINGLETON,))
        except Exception:
            # a table created before bound_to existed (read-only callers do not add it)
            rows = [(*r, None, None) for r in self._rows(
                dbapi_conn, f"SELECT cluster_id FROM {CLUSTER_TABLE} WHERE singleton = {p}",
                (_SINGLETON,))]
        if not rows:
            return None
        cid, bound, previous = rows[0][0], rows[0][1], rows[0][2]
        return ClusterRow(str(cid), None if bound is None else str(bound),
                          None if previous is None else str(previous))

    def server_time(self, dbapi_conn: Any) -> float | None:
        """The server's clock, unix seconds (``None``: no answer)."""
        rows = self._rows(dbapi_conn, f"SELECT {self.now_sql}")
        return float(rows[0][0]) if rows and rows[0][0] is not None else None

    #: what makes a SELECT read the latest committed row and hold it (a re-key waits)
    share_lock_sql = ""

    def read_cluster_id_locked(self, dbapi_conn: Any) -> str | None:
        """The stored identity, read in ``dbapi_conn``'s transaction with a share lock
        (the latest committed one; a concurrent re-key waits for this transaction)."""
        p = self.placeholder
        rows = self._rows(dbapi_conn, f"SELECT cluster_id FROM {CLUSTER_TABLE} "
                                      f"WHERE singleton = {p}{self.share_lock_sql}",
                          (_SINGLETON,))
        return str(rows[0][0]) if rows and rows[0][0] is not None else None

    def read_cluster_id(self, dbapi_conn: Any) -> str | None:
        row = self.read_cluster_row(dbapi_conn)
        return row.cluster_id if row is not None else None

    def insert_cluster_id(self, dbapi_conn: Any, cluster_id: str,
                          bound_to: str | None = None) -> None:
        p = self.placeholder
        self._rows(dbapi_conn, f"INSERT INTO {CLUSTER_TABLE} "
                               "(singleton, cluster_id, created_at, bound_to) "
                               f"VALUES ({p}, {p}, {self.now_sql}, {p})",
                   (_SINGLETON, cluster_id, bound_to))

    def bind_cluster_id(self, dbapi_conn: Any, cluster_id: str, bound_to: str) -> None:
        """Bind a row stored before ``bound_to`` existed to where it is now."""
        p = self.placeholder
        self._rows(dbapi_conn, f"UPDATE {CLUSTER_TABLE} SET bound_to = {p} "
                               f"WHERE singleton = {p} AND cluster_id = {p} AND bound_to IS NULL",
                   (bound_to, _SINGLETON, cluster_id))

    def rekey_cluster_id(self, dbapi_conn: Any, old: str, new: str, bound_to: str) -> bool:
        """Replace a copied identity ``old`` by ``new`` bound here; ``False`` when the row
        no longer holds ``old`` (another process re-keyed it first)."""
        p = self.placeholder
        cur = dbapi_conn.cursor()
        try:
            cur.execute(self._native(
                dbapi_conn,
                f"UPDATE {CLUSTER_TABLE} SET cluster_id = {p}, bound_to = {p}, "
                f"previous_id = {p}, created_at = {self.now_sql} "
                f"WHERE singleton = {p} AND cluster_id = {p}"),
                (new, bound_to, old, _SINGLETON, old))
            return bool(cur.rowcount and cur.rowcount > 0)
        finally:
            cur.close()


def _decision(r: Sequence[Any]) -> DecisionRow:
    age = float(r[4]) if len(r) > 4 and r[4] is not None else None
    return DecisionRow(str(r[0]), str(r[1]), float(r[2]), str(r[3]), age)
