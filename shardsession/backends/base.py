"""What the coordinator asks of a database: the per-dialect adapter protocol.

Adapters are leaves: they speak to one DBAPI connection, know the SQL of their backend and
nothing of sessions, branches or the protocol's decisions. Every method takes a raw DBAPI
connection (``Connection.connection.dbapi_connection``), so the statements of the protocol
never go through SQLAlchemy's execution events (they are not the application's writes).

Xids reach SQL only as values the driver binds (PostgreSQL) or as hex literals rendered
from a validated :class:`~shardsession.coordinator.xid.Xid` (XA statements, which MariaDB's
grammar does not let us bind); text read back from a server is never executed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = [
    "CLUSTER_TABLE",
    "DECISION_TABLE",
    "BackendAdapter",
    "Capabilities",
    "ClusterRow",
    "DecisionRow",
    "InDoubt",
    "Outcome",
]

#: name of the decision table created on deciders (and by ``create-all``)
DECISION_TABLE = "shardsession_decisions"
#: one-row table next to it holding the identity written into every xid decided there
CLUSTER_TABLE = "shardsession_cluster"


class Outcome:
    """Values of the ``outcome`` column."""

    COMMIT = "C"
    ABORT = "A"


@dataclass(frozen=True)
class InDoubt:
    """A prepared transaction found on a server, exactly as the server listed it.

    ``raw`` is a GID ``str`` (PostgreSQL) or the ``XA RECOVER`` row
    ``(formatID, gtrid_length, bqual_length, data)``; it is untrusted, parsed strictly by
    the coordinator and never executed. ``age`` is in seconds where the server knows it
    (by its own clock). ``blocked`` says why this connection's role cannot finish it
    (PostgreSQL: prepared by another role, and the role listing is not a superuser).
    """

    raw: Any
    age: float | None = None
    owner: str | None = None
    blocked: str | None = None


@dataclass(frozen=True)
class DecisionRow:
    """One row of the decision table.

    ``decided_at`` ``None`` on insert means "the server's clock now" (abort claims: they
    are aged by the server that holds them, never by a coordinator's clock). ``age`` is
    filled on reading: seconds since ``decided_at`` by the server's clock.
    """

    gtrid: str
    outcome: str
    decided_at: float | None
    participants: str = ""
    age: float | None = field(default=None, compare=False)


@dataclass(frozen=True)
class ClusterRow:
    """The cluster table's one row: the identity, where it was created (``None`` in rows
    stored before that was recorded) and the identity a re-keyed copy had before."""

    cluster_id: str
    bound_to: str | None = None
    previous_id: str | None = None


@dataclass
class Capabilities:
    """What a shard's server can do, detected once per engine."""

    can_prepare: bool
    reason: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class BackendAdapter(Protocol):
    """The operations of the commit protocol and of recovery for one dialect."""

    #: SQLAlchemy dialect name this adapter serves
    name: str
    #: the branch must be begun with its xid before its first statement (XA START)
    xid_at_begin: bool
    #: a branch left prepared keeps the session busy: the connection must be discarded
    prepared_blocks_connection: bool
    #: :meth:`wrote_on_server` costs a round trip (run in parallel, in worker threads);
    #: otherwise it is asked of the driver, in the thread that owns the connection
    wrote_asks_server: bool

    def detect(self, dbapi_conn: Any) -> Capabilities:
        """Detect whether this server can prepare (may run a query)."""
        ...

    def begin_branch(self, dbapi_conn: Any, xid: Any) -> None:
        """Start the branch (XA START on MySQL; nothing elsewhere)."""
        ...

    def early_begin(self, dbapi_conn: Any) -> Callable[[], None] | None:
        """A callable that opens the server transaction of this idle connection now, run
        in a worker thread to overlap other shards' round trips; ``None`` when the
        driver opens it without a round trip of its own, the connection is not idle, or
        the driver may not be used from two threads."""
        ...

    def prepare(self, dbapi_conn: Any, xid: Any) -> None:
        """Prepare the active branch on its own connection (phase one)."""
        ...

    def settle_prepared(self, dbapi_conn: Any) -> None:
        """After :meth:`prepare`, bring the driver's own state to idle (the branch stays
        prepared on the server). Run while the decider commits; may cost a round trip."""
        ...

    def commit_prepared_here(self, dbapi_conn: Any, xid: Any) -> None:
        """Commit a branch this connection prepared, leaving the connection idle."""
        ...

    def rollback_prepared_here(self, dbapi_conn: Any, xid: Any) -> None:
        """Roll back a branch this connection prepared, leaving the connection idle."""
        ...

    def commit_one_phase(self, dbapi_conn: Any, xid: Any | None) -> None:
        """Commit the active branch without PREPARE."""
        ...

    def commit_refused(self, error: BaseException) -> bool:
        """Whether ``error``, raised by :meth:`commit_one_phase`, is the server's definite
        answer that the transaction did not commit.

        ``False`` for everything else: a lost connection, an exception a signal handler
        raised while the driver waited (a task time limit, ``KeyboardInterrupt``), a driver
        bug. Once COMMIT may have been sent, only such an answer means "not committed".
        """
        ...

    def transaction_problem(self, dbapi_conn: Any) -> str | None:
        """Why the connection's current transaction can no longer commit what it did
        (the server aborted it), from what the driver knows without a round trip;
        ``None`` when nothing says so."""
        ...

    def lost_transaction(self, dbapi_conn: Any, error: BaseException) -> str | None:
        """Why ``error``, raised earlier in the connection's current transaction (and
        caught by the application), made the server roll the whole transaction back;
        ``None`` when it did not. May ask the server (rare: only after such an error)."""
        ...

    def write_mark(self, dbapi_conn: Any) -> Any:
        """A driver-side mark taken when a branch begins, for :meth:`wrote_on_server`
        (``None`` where the server keeps the answer per transaction)."""
        ...

    def wrote_on_server(self, dbapi_conn: Any, mark: Any) -> bool | None:
        """Ask the server whether the connection's current transaction wrote anything,
        ``mark`` being :meth:`write_mark`'s at its start (``None``: it cannot tell; the
        caller then takes it as a writer)."""
        ...

    def session_id(self, dbapi_conn: Any) -> Any | None:
        """The server's id of the connection's session, known to the driver (no round
        trip), for :meth:`end_session`; ``None`` if unknown."""
        ...

    def end_session(self, dbapi_conn: Any, session_id: Any) -> None:
        """From another (autocommit) connection: end the server session ``session_id``,
        so that its open transaction, if any, rolls back and releases its locks."""
        ...

    def rollback_active(self, dbapi_conn: Any, xid: Any | None) -> None:
        """Roll back the active (unprepared) branch, so a plain ROLLBACK can follow."""
        ...

    def finish_prepared(self, dbapi_conn: Any, xid: Any, commit: bool) -> bool:
        """From any (autocommit) connection: COMMIT/ROLLBACK PREPARED ``xid``.

        :returns: ``False`` when the server does not know the xid (already finished).
        """
        ...

    def list_in_doubt(self, dbapi_conn: Any) -> list[InDoubt]:
        """Return every prepared transaction visible to this database (ours or not)."""
        ...

    def server_key(self, dbapi_conn: Any, url_key: str) -> str:
        """Identity of the namespace in which xids are unique (see recovery grouping)."""
        ...

    # --- decision table -------------------------------------------------------------
    def ensure_decision_table(self, dbapi_conn: Any) -> None:
        """Create the decision table if missing (autocommit connection)."""
        ...

    def insert_decision(self, dbapi_conn: Any, row: DecisionRow, *,
                        lock_timeout: float | None = None) -> None:
        """Insert a decision row in the connection's current transaction, made durable
        at its commit regardless of relaxed-durability settings. ``lock_timeout``: bound
        the wait on a conflicting uncommitted row (seconds; where supported)."""
        ...

    def is_lock_timeout(self, error: BaseException) -> bool:
        """Whether ``error`` is a lock wait that timed out."""
        ...

    def isolation_problem(self, isolation_level: str | None) -> str | None:
        """Why a branch cannot run at ``isolation_level`` (``None``: it can)."""
        ...

    def read_decision(self, dbapi_conn: Any, gtrid: str) -> DecisionRow | None:
        """Return the decision row of ``gtrid`` or ``None``."""
        ...

    def read_decisions(self, dbapi_conn: Any) -> list[DecisionRow]:
        """Return every decision row (recovery's snapshot)."""
        ...

    def delete_decisions(self, dbapi_conn: Any, gtrids: Sequence[str]) -> int:
        """Delete decision rows (autocommit connection); return how many."""
        ...

    def ensure_cluster_table(self, dbapi_conn: Any) -> None:
        """Create the cluster identity table if missing."""
        ...

    def read_cluster_id(self, dbapi_conn: Any) -> str | None:
        """The stored cluster identity (``None``: none stored; the table may be missing)."""
        ...

    def insert_cluster_id(self, dbapi_conn: Any, cluster_id: str,
                          bound_to: str | None = None) -> None:
        """Store the cluster identity (a duplicate key if one is stored already)."""
        ...

    def ensure_cluster_columns(self, dbapi_conn: Any) -> None:
        """Add the columns of the cluster table that older versions did not create."""
        ...

    def server_time(self, dbapi_conn: Any) -> float | None:
        """The server's clock, unix seconds (``None``: no answer)."""
        ...

    def read_cluster_id_locked(self, dbapi_conn: Any) -> str | None:
        """The stored identity, read in the current transaction with a share lock
        (``""``: it cannot be read in this transaction, see the MySQL adapter)."""
        ...

    def read_cluster_row(self, dbapi_conn: Any) -> ClusterRow | None:
        """The cluster table's row (``None``: none stored; the table may be missing)."""
        ...

    def location(self, dbapi_conn: Any) -> str:
        """Where ``dbapi_conn``'s database is (server and database), to tell a copy of
        the cluster table from the original."""
        ...

    def bind_cluster_id(self, dbapi_conn: Any, cluster_id: str, bound_to: str) -> None:
        """Record where an identity stored without a location is."""
        ...

    def rekey_cluster_id(self, dbapi_conn: Any, old: str, new: str, bound_to: str) -> bool:
        """Replace the copied identity ``old`` by ``new`` (``False``: ``old`` is gone)."""
        ...

    def state_needs_asking(self, dbapi_conn: Any) -> bool:
        """Whether only :meth:`wrote_on_server`'s round trip can tell that the server
        aborted the branch's transaction (the driver does not say; asyncpg): it is then
        asked of writers too, and raises ``TransactionError`` for an aborted one."""
        ...

    def durability_warnings(self, dbapi_conn: Any) -> list[str]:
        """Server settings under which a committed decision could be lost on a crash."""
        ...

    def is_unknown_xid(self, error: BaseException) -> bool:
        """Whether ``error`` says the xid is unknown (already finished)."""
        ...

    def is_duplicate_key(self, error: BaseException) -> bool:
        """Whether ``error`` is a primary-key conflict (a decision already claimed)."""
        ...


def printable(value: object, limit: int = 80) -> str:
    """Render untrusted server text for a report: printable ASCII only, bounded."""
    raw = bytes(value) if isinstance(value, (bytes, bytearray)) else None
    text = raw.decode("latin-1") if raw is not None else str(value)
    out = "".join(ch if 32 <= ord(ch) < 127 else f"\\x{ord(ch) & 0xFF:02x}" for ch in text)
    return out if len(out) <= limit else out[:limit] + "..."
