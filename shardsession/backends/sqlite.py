"""SQLite adapter: no prepared state, so SQLite can only be the decider.

A SQLite transaction cannot survive its connection and no other connection can finish it,
so SQLite never prepares. It is the ideal decider ("logging last resource"): its data and
the decision row commit in one local transaction. That commit must be durable, so the
decider commit runs with ``PRAGMA synchronous = FULL`` (``NORMAL`` in WAL mode can lose a
commit on power loss) and restores the connection's own setting afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ._decisions import DecisionTableSQL
from .base import DECISION_TABLE, Capabilities, DecisionRow, InDoubt

__all__ = ["SQLiteAdapter", "total_changes"]

_DDL = (
    f"CREATE TABLE IF NOT EXISTS {DECISION_TABLE} ("
    "gtrid VARCHAR(64) NOT NULL PRIMARY KEY, "
    "outcome CHAR(1) NOT NULL, "
    "decided_at REAL NOT NULL, "
    "participants VARCHAR(4000) NOT NULL DEFAULT '')"
)

_FULL = 2


def _driver_connection(dbapi_conn: Any) -> Any:
    """The driver's own connection: ``sqlite3``'s, or aiosqlite's under SQLAlchemy's
    asyncio facade (whose ``total_changes`` / ``in_transaction`` read the same)."""
    return getattr(dbapi_conn, "driver_connection", dbapi_conn)


def total_changes(dbapi_conn: Any) -> int:
    """Rows changed on the connection since it opened (triggers and foreign key
    actions included); no round trip."""
    return int(_driver_connection(dbapi_conn).total_changes)


class SQLiteAdapter(DecisionTableSQL):
    """SQLite as a one-phase participant and decider."""

    name = "sqlite"
    placeholder = "?"
    now_sql = "((julianday('now') - 2440587.5) * 86400.0)"
    # the main database's file ('' in memory)
    location_sql = "SELECT 'sqlite:' || file FROM pragma_database_list WHERE name = 'main'"
    xid_at_begin = False
    prepared_blocks_connection = False
    wrote_asks_server = False

    def _exec(self, dbapi_conn: Any, sql: str, params: Sequence[Any] = ()) -> Any:
        cur = dbapi_conn.cursor()
        try:
            cur.execute(sql, params)
            return cur.fetchall() if cur.description else None
        finally:
            cur.close()

    def detect(self, dbapi_conn: Any) -> Capabilities:
        return Capabilities(False, "SQLite cannot prepare a transaction (no two-phase commit)")

    def begin_branch(self, dbapi_conn: Any, xid: Any) -> None:
        return None

    def prepare(self, dbapi_conn: Any, xid: Any) -> None:
        raise NotImplementedError("SQLite cannot prepare")

    def early_begin(self, dbapi_conn: Any) -> Callable[[], None] | None:
        return None  # SQLite has no round trips

    def settle_prepared(self, dbapi_conn: Any) -> None:
        return None

    def commit_prepared_here(self, dbapi_conn: Any, xid: Any) -> None:
        raise NotImplementedError("SQLite cannot prepare")

    def rollback_prepared_here(self, dbapi_conn: Any, xid: Any) -> None:
        raise NotImplementedError("SQLite cannot prepare")

    def commit_one_phase(self, dbapi_conn: Any, xid: Any | None) -> None:
        rows = self._exec(dbapi_conn, "PRAGMA synchronous")
        level = int(rows[0][0]) if rows else _FULL
        if level >= _FULL:
            dbapi_conn.commit()
            return
        # The decider's commit is the commit point of a global transaction: it must
        # reach the disk before we report success. Restore the user's level after.
        self._exec(dbapi_conn, "PRAGMA synchronous = FULL")
        try:
            dbapi_conn.commit()
        finally:
            self._exec(dbapi_conn, f"PRAGMA synchronous = {level:d}")

    def commit_refused(self, error: BaseException) -> bool:
        # An in-process library: an error from COMMIT means it did not commit (SQLite
        # rolls a failed commit back, or leaves the transaction open on SQLITE_BUSY).
        import sqlite3

        return isinstance(getattr(error, "orig", None) or error, sqlite3.Error)

    def state_needs_asking(self, dbapi_conn: Any) -> bool:
        return False

    def transaction_problem(self, dbapi_conn: Any) -> str | None:
        return None

    def lost_transaction(self, dbapi_conn: Any, error: BaseException) -> str | None:
        # SQLite rolls the whole transaction back on some errors (SQLITE_FULL, IOERR,
        # NOMEM, a RAISE(ROLLBACK) trigger): the connection then has none open.
        if not _driver_connection(dbapi_conn).in_transaction:
            return f"SQLite rolled the transaction back after an error ({error})"
        return None

    def write_mark(self, dbapi_conn: Any) -> Any:
        return total_changes(dbapi_conn)

    def wrote_on_server(self, dbapi_conn: Any, mark: Any) -> bool | None:
        # total_changes counts every row changed on the connection since it opened
        # (triggers and foreign key actions included): compare with the branch's start.
        if mark is None:
            return None
        return total_changes(dbapi_conn) > int(mark)

    def session_id(self, dbapi_conn: Any) -> Any | None:
        return None

    def end_session(self, dbapi_conn: Any, session_id: Any) -> None:
        return None

    def rollback_active(self, dbapi_conn: Any, xid: Any | None) -> None:
        return None

    def finish_prepared(self, dbapi_conn: Any, xid: Any, commit: bool) -> bool:
        return False

    def list_in_doubt(self, dbapi_conn: Any) -> list[InDoubt]:
        return []

    def durability_warnings(self, dbapi_conn: Any) -> list[str]:
        # The decider's commit forces synchronous = FULL itself (commit_one_phase).
        return []

    def server_key(self, dbapi_conn: Any, url_key: str) -> str:
        return f"sqlite:{url_key}"

    def ensure_decision_table(self, dbapi_conn: Any) -> None:
        self._exec(dbapi_conn, _DDL)

    def insert_decision(self, dbapi_conn: Any, row: DecisionRow, *,
                        lock_timeout: float | None = None) -> None:
        self._exec(dbapi_conn, self._insert_decision_sql(), self._decision_params(row))

    def is_unknown_xid(self, error: BaseException) -> bool:
        return False

    def is_duplicate_key(self, error: BaseException) -> bool:
        text = str(error)
        return "UNIQUE constraint failed" in text or "PRIMARY KEY" in text

    def is_lock_timeout(self, error: BaseException) -> bool:
        return "database is locked" in str(error)

    def isolation_problem(self, isolation_level: str | None) -> str | None:
        return None

    def is_busy(self, error: BaseException) -> bool:
        return "database is locked" in str(error)
