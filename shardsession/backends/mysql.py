"""MySQL/MariaDB adapter: XA transactions written by hand (pymysql).

SQLAlchemy's MySQL two-phase support sends ``XA BEGIN`` with a gtrid only and its
``XA RECOVER`` handling drops the branch qualifier and formatID, so every XA statement is
written here. XA statements take no bound parameters in MariaDB's grammar: the xid is
rendered as hex literals from a validated :class:`~shardsession.coordinator.xid.Xid`
(``Xid.xa_literal``), the form the manual recommends; nothing read from a server is ever
rendered into SQL.

Server rules followed here (checked on MariaDB 10.11):

* ``XA START`` must be the first statement of the connection's transaction (error 1400
  XAER_OUTSIDE otherwise); XA needs REPEATABLE READ or stricter;
* in XA ACTIVE or PREPARED state a plain ``ROLLBACK`` fails (1399 XAER_RMFAIL): the
  branch must be ended with ``XA END`` + ``XA ROLLBACK`` first, and a connection whose
  branch is left prepared for recovery cannot be reused: it must be discarded;
* an unknown xid is 1397 XAER_NOTA (already finished, or never prepared);
* ``XA RECOVER`` lists the prepared branches of the whole server, not of one database,
  and any user may finish any of them (``XA_RECOVER_ADMIN`` on MySQL 8 only restricts
  the listing): everyone with an account on the server is inside the trust boundary;
* a branch prepared on a connection that is still open (a live or hung coordinator)
  is listed by ``XA RECOVER`` but answers ``XA COMMIT`` from another connection with
  1397 as if it were unknown: 1397 alone never proves a branch finished;
* before MariaDB 10.5 and MySQL 5.7.7 a prepared branch is rolled back when its
  connection ends: those servers are refused as prepared participants
  (:func:`xa_version_problem`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from ._decisions import DecisionTableSQL
from .base import DECISION_TABLE, Capabilities, DecisionRow, InDoubt

__all__ = ["MySQLAdapter", "xa_version_problem"]

#: the session's counters of rows written (see MySQLAdapter.write_mark)
_HANDLER_COUNTS = ("SHOW SESSION STATUS WHERE Variable_name IN "
                   "('Handler_write', 'Handler_update', 'Handler_delete')")

XAER_NOTA = 1397
XAER_RMFAIL = 1399
DUP_ENTRY = 1062
LOCK_WAIT_TIMEOUT = 1205
DEADLOCK = 1213
#: server errors that may answer a COMMIT which happened or may still happen: shutdown,
#: interrupted query, aborted or killed connection, network errors
_UNKNOWN_ERRNOS = frozenset({1053, 1152, 1153, 1154, 1155, 1156, 1157, 1158, 1159, 1160,
                             1161, 1317, 1927})
_DRIVERS = frozenset({"pymysql", "MySQLdb", "mysql", "mariadb"})
_TOO_WEAK = frozenset({"READ COMMITTED", "READ UNCOMMITTED", "AUTOCOMMIT"})

_DDL = (
    f"CREATE TABLE IF NOT EXISTS {DECISION_TABLE} ("
    "gtrid VARCHAR(64) CHARACTER SET ascii NOT NULL PRIMARY KEY, "
    "outcome CHAR(1) CHARACTER SET ascii NOT NULL, "
    "decided_at DOUBLE NOT NULL, "
    "participants VARCHAR(4000) CHARACTER SET ascii NOT NULL DEFAULT '') ENGINE=InnoDB"
)


_VERSION_RE = re.compile(r"(\d+)\.(\d+)\.(\d+)")


def xa_version_problem(version: str) -> str | None:
    """Why a server reporting ``version`` (``SELECT VERSION()``) cannot keep a prepared XA
    branch across a disconnect, or ``None`` when it can (MariaDB >= 10.5, MySQL >= 5.7.7).

    MariaDB's replication prefix (``5.5.5-10.4.3-MariaDB``) is skipped; an unreadable
    version is refused (nothing is assumed).
    """
    text = str(version)
    mariadb = "mariadb" in text.lower()
    if mariadb and text.startswith("5.5.5-"):
        text = text[len("5.5.5-"):]
    m = _VERSION_RE.match(text)
    if m is None:
        return f"cannot read the server version {version!r}: prepared XA durability unknown"
    v = tuple(int(g) for g in m.groups())
    if mariadb and v < (10, 5, 0):
        return (f"MariaDB {m.group(0)} rolls a prepared XA branch back when its connection "
                "ends (fixed in 10.5): it cannot take part in two-phase commit")
    if not mariadb and v < (5, 7, 7):
        return (f"MySQL {m.group(0)} rolls a prepared XA branch back when its connection "
                "ends (fixed in 5.7.7): it cannot take part in two-phase commit")
    return None


def _errno(error: BaseException) -> int | None:
    err = getattr(error, "orig", None) or error
    args = getattr(err, "args", ())
    if args and isinstance(args[0], int):
        return args[0]
    return None


def _is_driver_error(error: BaseException) -> bool:
    err = getattr(error, "orig", None) or error
    return any(c.__module__.split(".", 1)[0] in _DRIVERS for c in type(err).__mro__)


def _server_info(dbapi_conn: Any) -> Any:
    get = getattr(dbapi_conn, "get_server_info", None)
    return get() if get is not None else ""


class MySQLAdapter(DecisionTableSQL):
    """Two-phase commit on MySQL/MariaDB through XA."""

    name = "mysql"
    now_sql = "UNIX_TIMESTAMP(NOW(6))"
    share_lock_sql = " LOCK IN SHARE MODE"

    def read_cluster_id_locked(self, dbapi_conn: Any) -> str | None:
        # 1412 "Table definition has changed": the cluster table is newer than this
        # transaction's read view, so it was created (with the identity this transaction
        # read from it) while the transaction ran: nothing can be stale. "" = not checked.
        try:
            return super().read_cluster_id_locked(dbapi_conn)
        except Exception as e:
            if getattr(e, "args", None) and e.args[0] == 1412:
                return ""
            raise
    # the server as server_key names it, and the database
    location_sql = ("SELECT CONCAT('mysql:', @@hostname, ':', @@port, ':', @@datadir, '/', "
                    "COALESCE(DATABASE(), ''))")
    xid_at_begin = True
    prepared_blocks_connection = True
    wrote_asks_server = True

    def _exec(self, dbapi_conn: Any, sql: str, params: Sequence[Any] | None = None) -> Any:
        cur = dbapi_conn.cursor()
        try:
            cur.execute(sql, params)
            return cur.fetchall() if cur.description else None
        finally:
            cur.close()

    def detect(self, dbapi_conn: Any) -> Capabilities:
        rows = self._exec(dbapi_conn, "SELECT VERSION()")
        version = str(rows[0][0]) if rows else ""
        problem = xa_version_problem(version)
        if problem is not None:
            return Capabilities(False, problem, {"version": version})
        return Capabilities(True, None, {"version": version})

    def durability_warnings(self, dbapi_conn: Any) -> list[str]:
        rows = self._exec(dbapi_conn,
                          "SELECT @@innodb_flush_log_at_trx_commit, @@log_bin, @@sync_binlog")
        flush, log_bin, sync_binlog = rows[0] if rows else (1, 0, 1)
        out = []
        if int(flush) != 1:
            out.append(f"innodb_flush_log_at_trx_commit = {flush} (not 1): a committed "
                       "decision or prepared branch can be lost if the server crashes")
        if int(log_bin) and int(sync_binlog) != 1:
            out.append(f"binary log on with sync_binlog = {sync_binlog} (not 1): a prepared "
                       "or committed XA branch can be lost if the server crashes")
        return out

    def begin_branch(self, dbapi_conn: Any, xid: Any) -> None:
        self._exec(dbapi_conn, f"XA START {xid.xa_literal}")

    def prepare(self, dbapi_conn: Any, xid: Any) -> None:
        self._exec(dbapi_conn, f"XA END {xid.xa_literal}")
        self._exec(dbapi_conn, f"XA PREPARE {xid.xa_literal}")

    def early_begin(self, dbapi_conn: Any) -> Callable[[], None] | None:
        # PyMySQL connections must not be shared between threads, and MySQL opens the
        # transaction with its first statement anyway.
        return None

    def settle_prepared(self, dbapi_conn: Any) -> None:
        return None

    def commit_prepared_here(self, dbapi_conn: Any, xid: Any) -> None:
        self._exec(dbapi_conn, f"XA COMMIT {xid.xa_literal}")

    def rollback_prepared_here(self, dbapi_conn: Any, xid: Any) -> None:
        self._exec(dbapi_conn, f"XA ROLLBACK {xid.xa_literal}")

    def commit_one_phase(self, dbapi_conn: Any, xid: Any | None) -> None:
        if xid is None:
            dbapi_conn.commit()
            return
        self._exec(dbapi_conn, f"XA END {xid.xa_literal}")
        self._exec(dbapi_conn, f"XA COMMIT {xid.xa_literal} ONE PHASE")

    def commit_refused(self, error: BaseException) -> bool:
        # A server error code (client-side errors are 2000-2999: the reply was lost)
        # that cannot have followed a commit.
        if not _is_driver_error(error):
            return False
        code = _errno(error)
        return (code is not None and (1000 <= code < 2000 or code >= 3000)
                and code not in _UNKNOWN_ERRNOS)

    def state_needs_asking(self, dbapi_conn: Any) -> bool:
        return False

    def transaction_problem(self, dbapi_conn: Any) -> str | None:
        return None  # the server's verdict comes with the error: see lost_transaction

    def lost_transaction(self, dbapi_conn: Any, error: BaseException) -> str | None:
        code = _errno(error)
        if code == DEADLOCK:
            return "a deadlock (1213) made the server roll the whole transaction back"
        if code == LOCK_WAIT_TIMEOUT:
            rows = self._exec(dbapi_conn, "SELECT @@innodb_rollback_on_timeout")
            if rows and int(rows[0][0]):
                return ("a lock wait timeout (1205) with innodb_rollback_on_timeout made "
                        "the server roll the whole transaction back")
        return None

    def write_mark(self, dbapi_conn: Any) -> Any:
        # The session's handler counters of rows written, changed and deleted: they count
        # every row a statement writes, a stored routine's called through a view or a
        # trigger included (not internal temporary tables: Handler_tmp_*), need no
        # privilege, and reading them changes none of them (checked on MariaDB 10.11).
        # One round trip, taken only when a MariaDB branch joins a transaction that
        # already has a shard (never in a single-shard transaction).
        rows = self._exec(dbapi_conn, _HANDLER_COUNTS)
        return tuple(sorted((str(r[0]).lower(), int(r[1])) for r in rows or ()))

    def wrote_on_server(self, dbapi_conn: Any, mark: Any) -> bool | None:
        # Any row written since the branch began (a counter that moved) is a write, even
        # one rolled back to a savepoint since: preparing a reader costs a round trip,
        # releasing a writer with XA ROLLBACK would lose its write. A branch with no mark
        # (a transaction's first shard, which began before it was known to be one of
        # several) is judged by its statements and commits without XA.
        if mark is None:
            return False
        return bool(self.write_mark(dbapi_conn) != mark)

    def session_id(self, dbapi_conn: Any) -> Any | None:
        get = getattr(dbapi_conn, "thread_id", None)
        try:
            return int(get()) if get is not None else None
        except Exception:
            return None

    def end_session(self, dbapi_conn: Any, session_id: Any) -> None:
        try:
            self._exec(dbapi_conn, f"KILL CONNECTION {int(session_id):d}")
        except Exception as e:
            if _errno(e) != 1094:  # unknown thread id: it has ended already
                raise

    def rollback_active(self, dbapi_conn: Any, xid: Any | None) -> None:
        if xid is None:
            return
        try:
            self._exec(dbapi_conn, f"XA END {xid.xa_literal}")
        except Exception as e:
            # Already IDLE (XA END was sent before a failure): go on to XA ROLLBACK.
            if _errno(e) != XAER_RMFAIL:
                raise
        try:
            self._exec(dbapi_conn, f"XA ROLLBACK {xid.xa_literal}")
        except Exception as e:
            if _errno(e) != XAER_NOTA:
                raise

    def finish_prepared(self, dbapi_conn: Any, xid: Any, commit: bool) -> bool:
        verb = "XA COMMIT" if commit else "XA ROLLBACK"
        try:
            self._exec(dbapi_conn, f"{verb} {xid.xa_literal}")
        except Exception as e:
            if self.is_unknown_xid(e):
                return False
            raise
        return True

    def list_in_doubt(self, dbapi_conn: Any) -> list[InDoubt]:
        rows = self._exec(dbapi_conn, "XA RECOVER") or ()
        out: list[InDoubt] = []
        for row in rows:
            # Keep the row as the server sent it; the coordinator parses it strictly.
            out.append(InDoubt(tuple(row[:4]) if len(row) >= 4 else tuple(row), None))
        return out

    def server_key(self, dbapi_conn: Any, url_key: str) -> str:
        # XA RECOVER is server-wide: shards that are databases of one server share it.
        rows = self._exec(dbapi_conn, "SELECT @@hostname, @@port, @@datadir")
        host, port, datadir = rows[0] if rows else (url_key, "", "")
        return f"mysql:{host}:{port}:{datadir}"

    table_exists_sql = ("SELECT 1 FROM information_schema.tables "
                        "WHERE table_schema = DATABASE() AND table_name = %s")

    def ensure_decision_table(self, dbapi_conn: Any) -> None:
        if self.table_exists(dbapi_conn, DECISION_TABLE):
            return  # no DDL: a worker user may lack the CREATE privilege
        self._exec(dbapi_conn, _DDL)

    def insert_decision(self, dbapi_conn: Any, row: DecisionRow, *,
                        lock_timeout: float | None = None) -> None:
        # MariaDB's SET STATEMENT bounds the wait for this statement only (nothing is
        # left on the session); innodb_lock_wait_timeout takes whole seconds.
        prefix = ""
        if lock_timeout is not None and "MariaDB" in str(_server_info(dbapi_conn)):
            prefix = (f"SET STATEMENT innodb_lock_wait_timeout = "
                      f"{max(1, round(lock_timeout)):d} FOR ")
        self._exec(dbapi_conn, self._insert_decision_sql(prefix), self._decision_params(row))

    def is_unknown_xid(self, error: BaseException) -> bool:
        return _errno(error) == XAER_NOTA

    def is_duplicate_key(self, error: BaseException) -> bool:
        return _errno(error) == DUP_ENTRY

    def is_lock_timeout(self, error: BaseException) -> bool:
        return _errno(error) == LOCK_WAIT_TIMEOUT

    def isolation_problem(self, isolation_level: str | None) -> str | None:
        if isolation_level in _TOO_WEAK:
            return (f"MariaDB XA needs REPEATABLE READ or SERIALIZABLE; this connection "
                    f"runs at {isolation_level}")
        return None

    def is_busy(self, error: BaseException) -> bool:
        """MariaDB has no "busy" state for XA: a concurrent finish waits on locks."""
        return False
