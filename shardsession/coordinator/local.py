"""An embedded, atomic cluster of SQLite shard files, for development, tests and the demo.

SQLite cannot prepare, so two SQLite shards cannot be made atomic by two-phase commit.
They can be made atomic by SQLite itself: database files ATTACHed to one connection commit
together through a super-journal, atomically, as long as the main database is a file (not
``:memory:``) and the journal mode is not WAL (SQLite docs, "Atomic Commit In SQLite" 5.0).

So the local cluster is one SQLite connection per thread (``SingletonThreadPool``) whose
main database is ``_cluster.db`` in the directory and which ATTACHes every shard file as a
schema named after the shard. Each shard's engine is the same engine with a
``schema_translate_map`` sending unqualified tables to that shard's schema. Every shard
of a session therefore runs on the same DBAPI connection and the coordinator sees one
branch (branches are merged by DBAPI connection): a commit is a plain, atomic SQLite
commit, with no decision row and no warning.

The connections use the pysqlite recipe from SQLAlchemy's documentation (driver-level
autocommit off, ``BEGIN`` emitted by a ``begin`` event) so that SAVEPOINT/
``begin_nested()`` work. For your own SQLite engines outside this helper, apply the same
recipe if you use savepoints; several separate SQLite engines written in one transaction
cannot be atomic (``atomic="require"`` refuses, ``"best_effort"`` warns).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.pool import SingletonThreadPool
from sqlalchemy.sql.expression import (
    ReleaseSavepointClause,
    RollbackToSavepointClause,
    SavepointClause,
)

__all__ = ["local_sqlite_cluster", "local_sqlite_engines"]

_SAVEPOINT_CLAUSES = (SavepointClause, RollbackToSavepointClause, ReleaseSavepointClause)
#: key in a pooled connection's ``info``: the savepoint names of its open transaction
_STACK_KEY = "shardsession_savepoints"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


def local_sqlite_engines(
    directory: str | Path, names: Iterable[str], *, pool_size: int = 64, **engine_kw: Any
) -> dict[str, Engine]:
    """Return ``{shard name: Engine}`` for an atomic cluster of SQLite files in ``directory``.

    Shard ``n`` lives in ``<directory>/<n>.db``; ``names`` must be identifiers (they are
    schema names). Tables must be unqualified (schema ``None``).
    """
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    shard_names = list(names)
    for n in shard_names:
        if _NAME.fullmatch(n) is None or n.lower() in ("main", "temp"):
            raise ValueError(f"local shard names must be identifiers, not {n!r}")
    files = {n: str(folder / f"{n}.db") for n in shard_names}
    engine = create_engine(
        f"sqlite:///{folder / '_cluster.db'}",
        poolclass=SingletonThreadPool,
        pool_size=pool_size,
        **engine_kw,
    )

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, record: Any) -> None:
        # Driver-level autocommit: SQLAlchemy's begin event below emits BEGIN itself,
        # which is what makes SAVEPOINT behave (pysqlite's own handling does not).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        try:
            # Rollback journal (the default) on every file: a WAL database would drop
            # the cross-file atomicity of the super-journal.
            cur.execute("PRAGMA journal_mode = DELETE")
            cur.execute("PRAGMA synchronous = FULL")
            for n, path in files.items():
                cur.execute("ATTACH DATABASE ? AS " + n, (path,))
                cur.execute(f"PRAGMA {n}.journal_mode = DELETE")
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        dbapi = conn.connection.dbapi_connection
        # Shards share this connection: only the first of them begins the transaction.
        if not dbapi.in_transaction:
            conn.connection.info.pop(_STACK_KEY, None)  # a new transaction: no savepoints
            conn.exec_driver_sql("BEGIN")

    @event.listens_for(engine, "before_cursor_execute", retval=True)
    def _savepoints(conn: Any, cursor: Any, statement: str, parameters: Any,
                    context: Any, executemany: bool) -> tuple[str, Any]:
        compiled = getattr(context, "compiled", None)
        if compiled is None or not isinstance(compiled.statement, _SAVEPOINT_CLAUSES):
            return statement, parameters
        return _shared_savepoint(conn, compiled.statement, statement), parameters

    return {n: engine.execution_options(schema_translate_map={None: n}) for n in shard_names}


def _shared_savepoint(conn: Any, clause: Any, statement: str) -> str:
    """The SQL for a savepoint statement of one shard's Connection on the shared SQLite
    connection.

    The shards of a session are separate SQLAlchemy Connections on this one SQLite
    connection, each numbering its savepoints from 1, so their SAVEPOINTs go into one
    stack: with SQLAlchemy's names, a ROLLBACK TO from one shard would go back to the
    other's "sa_savepoint_1" (the latest of that name) and keep the rows written in
    between. Each Connection's names get a suffix of their own; then the first
    savepoint of a ``begin_nested()`` level in the stack covers every write of that
    level on every shard (the level's other savepoints were all begun after it), so
    rolling back or releasing it does the whole level, and the other shards' savepoints
    of the level, already gone from the stack with it, have nothing left to do: their
    statements become a no-op instead of SQLite's "no such savepoint".
    """
    name = f"{clause.ident}_{id(conn):x}"
    stack: list[str] = conn.connection.info.setdefault(_STACK_KEY, [])
    if isinstance(clause, SavepointClause):
        stack.append(name)
    elif name not in stack:
        return "SELECT 1"  # undone or released with an earlier savepoint of its level
    elif isinstance(clause, ReleaseSavepointClause):
        del stack[stack.index(name):]
    else:  # ROLLBACK TO keeps the savepoint itself, drops those begun after it
        del stack[stack.index(name) + 1:]
    return statement.replace(clause.ident, name)


def local_sqlite_cluster(directory: str | Path, names: Iterable[str], **kw: Any) -> Any:
    """Return a :class:`shardsession.config.Cluster` over :func:`local_sqlite_engines`."""
    from ..config import Cluster

    return Cluster(dict(local_sqlite_engines(directory, names)), **kw)
