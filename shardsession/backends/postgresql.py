"""PostgreSQL adapter: PREPARE TRANSACTION / COMMIT PREPARED through psycopg2.

GIDs are always passed as bound parameters, which psycopg2 renders as escaped literals
(``PREPARE TRANSACTION`` takes no server-side parameters); they are never formatted into
SQL text. Notes on the server's rules this adapter follows:

* ``COMMIT PREPARED`` must run outside a transaction block and from the GID's database;
  a branch prepared on a connection is finished on that same connection, whose driver still
  believes a transaction is open, so the adapter ends that belief with ``commit()`` (a
  no-op on the server) to leave nothing for the pool;
* ``pg_prepared_xacts`` lists every database of the server: filter by
  ``current_database()``;
* unknown GID is SQLSTATE 42704 (already finished); 55000 means another session is
  finishing it right now.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

from ._decisions import DecisionTableSQL
from .base import DECISION_TABLE, Capabilities, DecisionRow, InDoubt

__all__ = ["PostgreSQLAdapter"]

_UNDEFINED_OBJECT = "42704"
_UNIQUE_VIOLATION = "23505"
_OBJECT_IN_USE = "55000"
_LOCK_NOT_AVAILABLE = "55P03"
#: psycopg2.extensions.STATUS_READY: no transaction open in the driver
_STATUS_READY = 1

_DDL = (
    f"CREATE TABLE IF NOT EXISTS {DECISION_TABLE} ("
    "gtrid VARCHAR(64) PRIMARY KEY, "
    "outcome CHAR(1) NOT NULL, "
    "decided_at DOUBLE PRECISION NOT NULL, "
    "participants VARCHAR(4000) NOT NULL DEFAULT '')"
)


def _pgcode(error: BaseException) -> str | None:
    code = getattr(error, "pgcode", None)
    if code is None:
        code = getattr(getattr(error, "orig", None), "pgcode", None)
    return code if isinstance(code, str) else None


class PostgreSQLAdapter(DecisionTableSQL):
    """Two-phase commit on PostgreSQL (``max_prepared_transactions`` > 0)."""

    name = "postgresql"
    xid_at_begin = False
    prepared_blocks_connection = False

    def detect(self, dbapi_conn: Any) -> Capabilities:
        cur = dbapi_conn.cursor()
        try:
            cur.execute("SHOW max_prepared_transactions")
            row = cur.fetchone()
        finally:
            cur.close()
        n = int(row[0]) if row else 0
        if n <= 0:
            return Capabilities(
                False,
                "PostgreSQL max_prepared_transactions = 0: this server cannot prepare "
                "transactions; set max_prepared_transactions (e.g. 64) in postgresql.conf "
                "and restart it",
                {"max_prepared_transactions": n},
            )
        return Capabilities(True, None, {"max_prepared_transactions": n})

    def begin_branch(self, dbapi_conn: Any, xid: Any) -> None:
        # The GID is given at PREPARE time; the transaction begins with its first statement.
        return None

    def early_begin(self, dbapi_conn: Any) -> Callable[[], None] | None:
        # psycopg2 sends BEGIN as a round trip of its own before a transaction's first
        # statement; its connections are thread-safe (a lock serialises their use).
        if (
            not type(dbapi_conn).__module__.startswith("psycopg2")
            or dbapi_conn.autocommit
            or dbapi_conn.status != _STATUS_READY
        ):
            return None

        def run() -> None:
            if dbapi_conn.status != _STATUS_READY:
                return  # the flush got there first (a busy worker pool)
            cur = dbapi_conn.cursor()
            try:
                cur.execute("SELECT 1")  # psycopg2 sends BEGIN first
            finally:
                cur.close()

        return run

    def _exec(self, dbapi_conn: Any, sql: str, params: Sequence[Any] | None = None) -> None:
        cur = dbapi_conn.cursor()
        try:
            cur.execute(sql, params)
        finally:
            cur.close()

    def prepare(self, dbapi_conn: Any, xid: Any) -> None:
        self._exec(dbapi_conn, "PREPARE TRANSACTION %s", (xid.gid,))

    def settle_prepared(self, dbapi_conn: Any) -> None:
        # After PREPARE TRANSACTION the server session is idle but psycopg2 still
        # believes a transaction is open: end that belief (a COMMIT the server answers
        # with a warning). The coordinator does this while the decider commits, so the
        # COMMIT PREPARED that follows costs one round trip, not two.
        dbapi_conn.commit()

    def _finish_here(self, dbapi_conn: Any, sql: str, xid: Any) -> None:
        if getattr(dbapi_conn, "status", None) != _STATUS_READY or dbapi_conn.autocommit:
            # Not settled (or not psycopg2): the driver sends no BEGIN before this
            # statement; end its transaction belief afterwards.
            self._exec(dbapi_conn, sql, (xid.gid,))
            dbapi_conn.commit()
            return
        # Settled: the driver would send BEGIN first, and COMMIT/ROLLBACK PREPARED
        # refuses to run in a transaction block; autocommit for this statement only
        # (psycopg2 sends nothing to switch it).
        dbapi_conn.autocommit = True
        try:
            self._exec(dbapi_conn, sql, (xid.gid,))
        finally:
            with contextlib.suppress(Exception):  # a dead connection: keep its error
                dbapi_conn.autocommit = False

    def commit_prepared_here(self, dbapi_conn: Any, xid: Any) -> None:
        self._finish_here(dbapi_conn, "COMMIT PREPARED %s", xid)

    def rollback_prepared_here(self, dbapi_conn: Any, xid: Any) -> None:
        self._finish_here(dbapi_conn, "ROLLBACK PREPARED %s", xid)

    def commit_one_phase(self, dbapi_conn: Any, xid: Any | None) -> None:
        dbapi_conn.commit()

    def rollback_active(self, dbapi_conn: Any, xid: Any | None) -> None:
        # A plain ROLLBACK (issued by SQLAlchemy right after) is all PostgreSQL needs.
        return None

    def finish_prepared(self, dbapi_conn: Any, xid: Any, commit: bool) -> bool:
        verb = "COMMIT PREPARED %s" if commit else "ROLLBACK PREPARED %s"
        try:
            self._exec(dbapi_conn, verb, (xid.gid,))
        except Exception as e:
            if self.is_unknown_xid(e):
                return False
            raise
        return True

    def list_in_doubt(self, dbapi_conn: Any) -> list[InDoubt]:
        cur = dbapi_conn.cursor()
        try:
            cur.execute(
                "SELECT gid, EXTRACT(EPOCH FROM (now() - prepared)) "
                "FROM pg_prepared_xacts WHERE database = current_database()"
            )
            rows = cur.fetchall()
        finally:
            cur.close()
        return [InDoubt(gid, float(age) if age is not None else None) for gid, age in rows]

    def server_key(self, dbapi_conn: Any, url_key: str) -> str:
        # Listing is per database, so each database is its own namespace for recovery.
        return f"postgresql:{url_key}"

    def ensure_decision_table(self, dbapi_conn: Any) -> None:
        try:
            self._exec(dbapi_conn, _DDL)
        except Exception as e:
            # Two processes racing on CREATE TABLE IF NOT EXISTS: the loser sees a
            # duplicate in pg_type; the table exists either way.
            if _pgcode(e) != _UNIQUE_VIOLATION:
                raise

    def insert_decision(self, dbapi_conn: Any, row: DecisionRow, *,
                        lock_timeout: float | None = None) -> None:
        # SET LOCAL: the commit of this transaction is the commit point and must be
        # durable even where the server or role runs with synchronous_commit = off; the
        # setting ends with the transaction, so nothing leaks into the pool.
        timeout = ""
        if lock_timeout is not None:
            timeout = f"SET LOCAL lock_timeout = {max(1, int(lock_timeout * 1000)):d}; "
        self._exec(
            dbapi_conn,
            self._insert_decision_sql(f"SET LOCAL synchronous_commit TO on; {timeout}"),
            self._decision_params(row),
        )

    def delete_decisions(self, dbapi_conn: Any, gtrids: Sequence[str]) -> int:
        if not gtrids:
            return 0
        cur = dbapi_conn.cursor()
        try:
            cur.execute(f"DELETE FROM {DECISION_TABLE} WHERE gtrid = ANY(%s)", (list(gtrids),))
            return int(cur.rowcount)
        finally:
            cur.close()

    def is_unknown_xid(self, error: BaseException) -> bool:
        return _pgcode(error) == _UNDEFINED_OBJECT

    def is_duplicate_key(self, error: BaseException) -> bool:
        return _pgcode(error) == _UNIQUE_VIOLATION

    def is_lock_timeout(self, error: BaseException) -> bool:
        return _pgcode(error) == _LOCK_NOT_AVAILABLE

    def isolation_problem(self, isolation_level: str | None) -> str | None:
        return None

    def is_busy(self, error: BaseException) -> bool:
        """Another session is finishing the same GID right now."""
        return _pgcode(error) == _OBJECT_IN_USE
