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

__all__ = ["local_sqlite_cluster", "local_sqlite_engines"]

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
            conn.exec_driver_sql("BEGIN")

    return {n: engine.execution_options(schema_translate_map={None: n}) for n in shard_names}


def local_sqlite_cluster(directory: str | Path, names: Iterable[str], **kw: Any) -> Any:
    """Return a :class:`shardsession.config.Cluster` over :func:`local_sqlite_engines`."""
    from ..config import Cluster

    return Cluster(dict(local_sqlite_engines(directory, names)), **kw)
