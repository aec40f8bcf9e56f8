"""PostgreSQL adapter: PREPARE TRANSACTION / COMMIT PREPARED through psycopg2 or psycopg 3.

Both drivers are supported (``postgresql+psycopg2://`` and ``postgresql+psycopg://``, the
latter SQLAlchemy 2.1's default for a plain ``postgresql://`` URL). Their differences are
kept in the small helpers at the top of this module and nowhere else:

* :func:`_cursor`: every statement of the protocol goes through a cursor that binds
  parameters on the client (psycopg2's only kind; psycopg 3's ``ClientCursor``) and
  sends the simple query protocol, so a GID becomes an escaped literal
  (``PREPARE TRANSACTION`` takes no server-side parameters, and psycopg 3's default
  cursor would send ``$1``) and the decision insert's ``SET LOCAL``s travel with it in one
  round trip. GIDs are never formatted into SQL text by us;
* :func:`_sqlstate`: the SQLSTATE of an error (psycopg 3 ``sqlstate``, psycopg2
  ``pgcode``), also through SQLAlchemy's wrapper (``.orig``);
* :func:`_begins_next`: whether the driver will send ``BEGIN`` before the connection's
  next statement. psycopg2 decides from its own state, which stays "in a transaction"
  after ``PREPARE TRANSACTION`` until ``commit()``; psycopg 3 decides from the server's
  reported status, which is idle right after ``PREPARE TRANSACTION``.

Both drivers send ``BEGIN`` as a round trip of its own, under the connection's lock,
right before a transaction's first statement, and both document their connections as
safe to share between threads; :meth:`PostgreSQLAdapter.early_begin` relies on that.
SQLAlchemy's sync facades over asyncio drivers (asyncpg, psycopg's async mode: see
:func:`_async_adapted`) get no early BEGIN; their cursors bind on the server, so
statements with parameters are sent one at a time, in asyncpg's ``$n`` style where it
applies (:func:`_numbered`), and GIDs as literals (:func:`_gid_statement`); they are
tested in ``tests/integration/test_asyncio.py``. Any other driver gets the conservative
path and is not tested.

Notes on the server's rules this adapter follows:

* ``COMMIT PREPARED`` must run outside a transaction block and from the GID's database;
  a branch prepared on a connection is finished on that same connection, whose driver
  (psycopg2) may still believe a transaction is open, so the adapter ends that belief with
  ``commit()`` (a no-op on the server, and no round trip at all with psycopg 3) to leave
  nothing for the pool;
* ``pg_prepared_xacts`` lists every database of the server: filter by
  ``current_database()``;
* unknown GID is SQLSTATE 42704 (already finished); 55000 means another session is
  finishing it right now.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy.engine import AdaptedConnection

from ..exc import TransactionError
from ._decisions import DecisionTableSQL
from .base import DECISION_TABLE, Capabilities, DecisionRow, InDoubt

__all__ = ["PostgreSQLAdapter"]

_UNDEFINED_OBJECT = "42704"
_UNDEFINED_TABLE = "42P01"
_UNIQUE_VIOLATION = "23505"
_OBJECT_IN_USE = "55000"
_LOCK_NOT_AVAILABLE = "55P03"
#: SQLSTATE classes an answer to COMMIT may carry although the commit happened or may
#: still happen (connection exception, operator intervention, system and internal errors)
_UNKNOWN_CLASSES = frozenset({"08", "57", "58", "XX"})
#: libpq's PQTRANS_INTRANS / _INERROR / _UNKNOWN (psycopg2 TRANSACTION_STATUS_* and psycopg 3
#: ``pq.TransactionStatus`` share the values)
_PQTRANS_INTRANS = 2
_PQTRANS_INERROR = 3
_PQTRANS_UNKNOWN = 4
#: seconds a decider's session may sit idle inside the transaction holding an uncommitted
#: decision row (between the row's INSERT and its COMMIT) before the server ends it: the
#: bound on how long a coordinator that vanished mid-commit (a half-open connection)
#: blocks recovery's abort claim on that row
DECIDER_IDLE_TIMEOUT = 60.0
#: psycopg2.extensions.STATUS_READY: no transaction open in the driver
_PSYCOPG2_STATUS_READY = 1
#: libpq's PQTRANS_IDLE (psycopg 3 ``pq.TransactionStatus.IDLE``)
_PQTRANS_IDLE = 0

_DDL = (
    f"CREATE TABLE IF NOT EXISTS {DECISION_TABLE} ("
    "gtrid VARCHAR(64) PRIMARY KEY, "
    "outcome CHAR(1) NOT NULL, "
    "decided_at DOUBLE PRECISION NOT NULL, "
    "participants VARCHAR(4000) NOT NULL DEFAULT '')"
)


# --- driver differences ----------------------------------------------------------------


_ABORTED = ("the server aborted this transaction (a statement failed in it and the "
            "transaction went on); PostgreSQL would answer its COMMIT or PREPARE with "
            "ROLLBACK, and its work is lost")
#: SQLSTATE of any statement in a failed transaction
_IN_FAILED_TRANSACTION = "25P02"


def _driver(dbapi_conn: Any) -> str | None:
    """``"psycopg2"``, ``"psycopg"`` (3) or ``None`` (another driver or a wrapper).

    Decided by the top-level package of the connection's class or of one of its bases,
    so a ``connection_factory`` / ``connection_class`` subclass counts as its driver.
    """
    for cls in type(dbapi_conn).__mro__:
        top = cls.__module__.split(".", 1)[0]
        if top in ("psycopg2", "psycopg"):
            return top
    return None


def _cursor(dbapi_conn: Any) -> Any:
    """A cursor that binds parameters on the client and may run several statements.

    psycopg2's cursors always do; psycopg 3's default cursor binds on the server (which
    ``PREPARE TRANSACTION $1`` and multi-statement strings do not allow), so a
    ``ClientCursor`` (psycopg >= 3.1) is used instead, whatever ``cursor_factory`` the
    engine configured. It never prepares statements on the server.
    """
    if _driver(dbapi_conn) == "psycopg":
        import psycopg

        return psycopg.ClientCursor(dbapi_conn)
    return dbapi_conn.cursor()


def _async_adapted(dbapi_conn: Any) -> bool:
    """Whether ``dbapi_conn`` is SQLAlchemy's sync facade over an asyncio driver
    (asyncpg, psycopg's async mode): its cursor binds parameters on the server, so a
    statement with parameters is one statement, and ``PREPARE TRANSACTION`` / ``COMMIT
    PREPARED`` (which take no parameters) get their GID as a literal instead."""
    return isinstance(dbapi_conn, AdaptedConnection)


def _numbered(dbapi_conn: Any, sql: str) -> str:
    """``sql`` (written with ``%s`` markers) in the driver's parameter style: asyncpg
    (SQLAlchemy's ``numeric_dollar``) wants ``$1, $2, ...``. Our statements contain no
    other ``%``."""
    if getattr(getattr(dbapi_conn, "dbapi", None), "paramstyle", None) != "numeric_dollar":
        return sql
    parts = sql.split("%s")
    return "".join(p + (f"${i}" if i < len(parts) else "") for i, p in enumerate(parts, 1))


_GID_CHARS = re.compile(r"[0-9a-z.]{1,200}")


def _gid_statement(dbapi_conn: Any, verb: str, xid: Any) -> tuple[str, tuple[Any, ...] | None]:
    """``verb`` + the GID of ``xid``: bound on the client (psycopg2, psycopg 3), or for
    drivers that bind on the server a quoted literal, rendered only from a validated
    :class:`~shardsession.coordinator.xid.Xid` whose GID is checked again here to be
    made of ``[0-9a-z.]`` alone (nothing to escape, nothing read from a server)."""
    if not _async_adapted(dbapi_conn):
        return f"{verb} %s", (xid.gid,)
    gid = str(xid.gid)
    if _GID_CHARS.fullmatch(gid) is None:
        raise ValueError(f"refusing to render a GID that is not ours: {gid!r}")
    return f"{verb} '{gid}'", None


def _sqlstate(error: BaseException) -> str | None:
    """The SQLSTATE of a driver error (or of the driver error SQLAlchemy wrapped), or
    ``None`` when there is none (a lost connection, a non-driver error)."""
    for err in (error, getattr(error, "orig", None)):
        for attr in ("sqlstate", "pgcode"):  # psycopg 3, psycopg2
            code = getattr(err, attr, None)
            if isinstance(code, str):
                return code
    return None


def _transaction_status(dbapi_conn: Any) -> int | None:
    """libpq's transaction status as the driver knows it (no round trip), or ``None``
    (asyncpg keeps it private)."""
    if _async_adapted(dbapi_conn):
        dbapi_conn = dbapi_conn.driver_connection  # psycopg's AsyncConnection has it
    driver = _driver(dbapi_conn)
    if driver == "psycopg2":
        return int(dbapi_conn.get_transaction_status())
    if driver == "psycopg":
        return int(dbapi_conn.info.transaction_status)
    return None


def _begins_next(dbapi_conn: Any) -> bool:
    """Whether the driver will send ``BEGIN`` (a round trip of its own) before the next
    statement on ``dbapi_conn``: not in autocommit mode, and no transaction open as far
    as the driver knows. ``False`` for an unknown driver (nothing is assumed)."""
    driver = _driver(dbapi_conn)
    if driver is None or dbapi_conn.autocommit:
        return False
    if driver == "psycopg2":
        return bool(dbapi_conn.status == _PSYCOPG2_STATUS_READY)
    return bool(dbapi_conn.info.transaction_status == _PQTRANS_IDLE)


class PostgreSQLAdapter(DecisionTableSQL):
    """Two-phase commit on PostgreSQL (``max_prepared_transactions`` > 0)."""

    name = "postgresql"
    now_sql = "EXTRACT(EPOCH FROM clock_timestamp())"
    # (no FOR SHARE: it needs UPDATE on the table, which the application role lacks; a
    # READ COMMITTED statement reads the latest committed row anyway)
    share_lock_sql = ""
    # the cluster's initdb identifier (readable by every role) and the database
    location_sql = ("SELECT 'postgresql:' || (SELECT system_identifier::text FROM "
                    "pg_control_system()) || '/' || current_database()")
    xid_at_begin = False
    prepared_blocks_connection = False
    wrote_asks_server = True

    def detect(self, dbapi_conn: Any) -> Capabilities:
        cur = _cursor(dbapi_conn)
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
        # psycopg2 and psycopg 3 send BEGIN as a round trip of its own before a
        # transaction's first statement, inside the same hold of the connection's lock as
        # that statement; their connections are documented thread-safe. A flush statement
        # sent meanwhile waits for the lock and then runs in the transaction begun here.
        if not _begins_next(dbapi_conn):
            return None

        def run() -> None:
            if not _begins_next(dbapi_conn):
                return  # the flush got there first (a busy worker pool)
            cur = _cursor(dbapi_conn)
            try:
                cur.execute("SELECT 1")  # the driver sends BEGIN first
            finally:
                cur.close()

        return run

    def _native(self, dbapi_conn: Any, sql: str) -> str:
        return _numbered(dbapi_conn, sql)

    def _exec(self, dbapi_conn: Any, sql: str, params: Sequence[Any] | None = None) -> None:
        cur = _cursor(dbapi_conn)
        try:
            cur.execute(_numbered(dbapi_conn, sql), params)
        finally:
            cur.close()

    def prepare(self, dbapi_conn: Any, xid: Any) -> None:
        problem = self.transaction_problem(dbapi_conn)
        if problem is not None:
            raise TransactionError(f"cannot prepare: {problem}")
        sql, params = _gid_statement(dbapi_conn, "PREPARE TRANSACTION", xid)
        cur = _cursor(dbapi_conn)
        try:
            cur.execute(sql, params)
            # (psycopg2 and psycopg 3 report the command tag; the asyncio facades do not)
            status = getattr(cur, "statusmessage", None)
        finally:
            cur.close()
        # PREPARE TRANSACTION in an aborted transaction is answered ROLLBACK, no error:
        # nothing was prepared and the branch's work is gone.
        if status is not None and str(status).upper().startswith("ROLLBACK"):
            raise TransactionError(
                "PREPARE TRANSACTION was answered ROLLBACK: the server had aborted this "
                "transaction; its work is lost")

    def commit_refused(self, error: BaseException) -> bool:
        # Only an error the server sent (it has a SQLSTATE) says the COMMIT was refused:
        # a deferred constraint, a serialization failure. A lost connection has none.
        code = _sqlstate(error)
        return code is not None and code[:2] not in _UNKNOWN_CLASSES

    def state_needs_asking(self, dbapi_conn: Any) -> bool:
        # asyncpg does not tell whether its transaction failed: wrote_on_server's
        # round trip finds out (the server refuses any statement in a failed one)
        return _transaction_status(dbapi_conn) is None

    def transaction_problem(self, dbapi_conn: Any) -> str | None:
        status = _transaction_status(dbapi_conn)
        if status == _PQTRANS_INERROR:
            return _ABORTED
        if status == _PQTRANS_UNKNOWN:
            return "the connection is bad (libpq transaction status UNKNOWN)"
        return None

    def lost_transaction(self, dbapi_conn: Any, error: BaseException) -> str | None:
        return None  # an aborted transaction stays INERROR: see transaction_problem

    def write_mark(self, dbapi_conn: Any) -> Any:
        return None

    def wrote_on_server(self, dbapi_conn: Any, mark: Any) -> bool | None:
        status = _transaction_status(dbapi_conn)
        if status == _PQTRANS_IDLE:
            return False  # no transaction open: nothing ran in it, nothing was written
        if status is not None and status != _PQTRANS_INTRANS:
            return None  # aborted or unusable: transaction_problem says why
        # (status None: asyncpg; the query below fails in an aborted transaction)
        cur = _cursor(dbapi_conn)
        try:
            # A transaction id is assigned at the first write of any kind (a row written
            # by a function called in a SELECT too; a row lock by FOR UPDATE as well).
            cur.execute("SELECT txid_current_if_assigned() IS NOT NULL")
            row = cur.fetchone()
        except Exception as e:
            if _sqlstate(e) == _IN_FAILED_TRANSACTION:
                raise TransactionError(_ABORTED) from e
            raise
        finally:
            cur.close()
        return bool(row[0]) if row else None

    def session_id(self, dbapi_conn: Any) -> Any | None:
        driver = _driver(dbapi_conn)
        try:
            if driver == "psycopg2":
                return int(dbapi_conn.get_backend_pid())
            if driver == "psycopg":
                return int(dbapi_conn.info.backend_pid)
        except Exception:
            return None
        return None

    def end_session(self, dbapi_conn: Any, session_id: Any) -> None:
        self._exec(dbapi_conn, "SELECT pg_terminate_backend(%s)", (int(session_id),))

    def settle_prepared(self, dbapi_conn: Any) -> None:
        # After PREPARE TRANSACTION the server session is idle but psycopg2 still
        # believes a transaction is open: end that belief (a COMMIT the server answers
        # with a warning). The coordinator does this while the decider commits, so the
        # COMMIT PREPARED that follows costs one round trip, not two. psycopg 3 already
        # knows the session is idle: its commit() returns without sending anything.
        dbapi_conn.commit()

    def _finish_here(self, dbapi_conn: Any, verb: str, xid: Any) -> None:
        if _async_adapted(dbapi_conn):
            # SQLAlchemy's asyncpg facade still holds the transaction it began (and
            # would send BEGIN first): end it (a COMMIT the server answers with a
            # warning; nothing for psycopg's async mode, which follows the server), then
            # run the statement in autocommit, which neither facade sends anything for.
            dbapi_conn.commit()
            dbapi_conn.autocommit = True
            try:
                self._exec(dbapi_conn, *_gid_statement(dbapi_conn, verb, xid))
            finally:
                with contextlib.suppress(Exception):
                    dbapi_conn.autocommit = False
            return
        sql = f"{verb} %s"
        if not _begins_next(dbapi_conn):
            # Not settled (psycopg2), autocommit, or an unknown driver: the driver sends
            # no BEGIN before this statement; end its transaction belief afterwards.
            self._exec(dbapi_conn, sql, (xid.gid,))
            dbapi_conn.commit()
            return
        # Settled (psycopg2) or idle after PREPARE (psycopg 3): the driver would send
        # BEGIN first, and COMMIT/ROLLBACK PREPARED refuses to run in a transaction block;
        # autocommit for this statement only (neither driver sends anything to switch it).
        dbapi_conn.autocommit = True
        try:
            self._exec(dbapi_conn, sql, (xid.gid,))
        finally:
            with contextlib.suppress(Exception):  # a dead connection: keep its error
                dbapi_conn.autocommit = False

    def commit_prepared_here(self, dbapi_conn: Any, xid: Any) -> None:
        self._finish_here(dbapi_conn, "COMMIT PREPARED", xid)

    def rollback_prepared_here(self, dbapi_conn: Any, xid: Any) -> None:
        self._finish_here(dbapi_conn, "ROLLBACK PREPARED", xid)

    def commit_one_phase(self, dbapi_conn: Any, xid: Any | None) -> None:
        dbapi_conn.commit()

    def rollback_active(self, dbapi_conn: Any, xid: Any | None) -> None:
        # A plain ROLLBACK (issued by SQLAlchemy right after) is all PostgreSQL needs.
        return None

    def finish_prepared(self, dbapi_conn: Any, xid: Any, commit: bool) -> bool:
        verb = "COMMIT PREPARED" if commit else "ROLLBACK PREPARED"
        try:
            self._exec(dbapi_conn, *_gid_statement(dbapi_conn, verb, xid))
        except Exception as e:
            if self.is_unknown_xid(e):
                return False
            raise
        return True

    def list_in_doubt(self, dbapi_conn: Any) -> list[InDoubt]:
        # COMMIT/ROLLBACK PREPARED is allowed to the preparing role and to superusers
        # only: a branch this role cannot finish is marked, not attempted blindly.
        cur = _cursor(dbapi_conn)
        try:
            cur.execute(
                "SELECT p.gid, EXTRACT(EPOCH FROM (now() - p.prepared)), p.owner::text, "
                "current_user::text, COALESCE((SELECT rolsuper FROM pg_roles "
                "WHERE rolname = current_user), false) "
                "FROM pg_prepared_xacts p WHERE p.database = current_database()"
            )
            rows = cur.fetchall()
        finally:
            cur.close()
        out = []
        for gid, age, owner, me, superuser in rows:
            blocked = None
            if owner != me and not superuser:
                blocked = (f"prepared by role {owner!r}; role {me!r} is neither that role nor "
                           "a superuser and cannot finish it")
            out.append(InDoubt(gid, float(age) if age is not None else None, owner, blocked))
        return out

    def durability_warnings(self, dbapi_conn: Any) -> list[str]:
        cur = _cursor(dbapi_conn)
        try:
            cur.execute("SHOW synchronous_commit")
            row = cur.fetchone()
        finally:
            cur.close()
        if row and str(row[0]) == "off":
            return ["synchronous_commit = off for this role: ordinary commits can be lost "
                    "on a crash (decision commits force it on with SET LOCAL, prepared "
                    "branches flush anyway)"]
        return []

    def server_key(self, dbapi_conn: Any, url_key: str) -> str:
        # Listing is per database, so each database is its own namespace for recovery.
        return f"postgresql:{url_key}"

    table_exists_sql = "SELECT 1 WHERE to_regclass(%s) IS NOT NULL"

    def ensure_decision_table(self, dbapi_conn: Any) -> None:
        if self.table_exists(dbapi_conn, DECISION_TABLE):
            return  # no DDL: a worker role may not create in the schema
        try:
            self._exec(dbapi_conn, _DDL)
        except Exception as e:
            # Two processes racing on CREATE TABLE IF NOT EXISTS: the loser sees a
            # duplicate in pg_type; the table exists either way.
            if _sqlstate(e) != _UNIQUE_VIOLATION:
                raise

    def insert_decision(self, dbapi_conn: Any, row: DecisionRow, *,
                        lock_timeout: float | None = None) -> None:
        # SET LOCAL: the commit of this transaction is the commit point and must be
        # durable even where the server or role runs with synchronous_commit = off; the
        # setting ends with the transaction, so nothing leaks into the pool. One string,
        # one round trip (client-side binding, see _cursor).
        timeout = ("SET LOCAL idle_in_transaction_session_timeout = "
                   f"{int(DECIDER_IDLE_TIMEOUT * 1000):d}; ")
        if lock_timeout is not None:
            timeout += f"SET LOCAL lock_timeout = {max(1, int(lock_timeout * 1000)):d}; "
        settings = f"SET LOCAL synchronous_commit TO on; {timeout}"
        if _async_adapted(dbapi_conn):
            # Server-side binding takes one statement at a time: the SET LOCALs first.
            for statement in filter(None, (part.strip() for part in settings.split(";"))):
                self._exec(dbapi_conn, statement)
            settings = ""
        self._exec(dbapi_conn, self._insert_decision_sql(settings), self._decision_params(row))

    def read_decisions(self, dbapi_conn: Any) -> list[DecisionRow]:
        """Every decision row; none where the table does not exist yet.

        The missing table is answered here, by SQLSTATE 42P01 (psycopg 3 errors have no
        ``pgcode`` for the generic check of :mod:`shardsession.coordinator.decisions`),
        and only on an autocommit connection: inside a transaction the error has aborted
        it, and the caller must see that.
        """
        try:
            return super().read_decisions(dbapi_conn)
        except Exception as e:
            if _sqlstate(e) == _UNDEFINED_TABLE and dbapi_conn.autocommit:
                return []
            raise

    def delete_decisions(self, dbapi_conn: Any, gtrids: Sequence[str]) -> int:
        if not gtrids:
            return 0
        cur = _cursor(dbapi_conn)
        try:
            sql = f"DELETE FROM {DECISION_TABLE} WHERE gtrid = ANY(%s)"
            cur.execute(_numbered(dbapi_conn, sql), (list(gtrids),))
            return int(cur.rowcount)
        finally:
            cur.close()

    def is_unknown_xid(self, error: BaseException) -> bool:
        return _sqlstate(error) == _UNDEFINED_OBJECT

    def is_duplicate_key(self, error: BaseException) -> bool:
        return _sqlstate(error) == _UNIQUE_VIOLATION

    def is_lock_timeout(self, error: BaseException) -> bool:
        return _sqlstate(error) == _LOCK_NOT_AVAILABLE

    def isolation_problem(self, isolation_level: str | None) -> str | None:
        return None

    def is_busy(self, error: BaseException) -> bool:
        """Another session is finishing the same GID right now."""
        return _sqlstate(error) == _OBJECT_IN_USE
