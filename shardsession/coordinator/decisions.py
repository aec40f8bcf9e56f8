"""Decision records on a decider shard: reading, claiming and deleting them.

The table (``shardsession_decisions``: gtrid primary key, outcome ``C``/``A``,
``decided_at``, participants) is created on first use where it is missing. An ABORT claim's
``decided_at`` is the claiming server's clock; ``participants`` of a COMMIT row names the
shard (by token) of every prepared branch. Its primary key
is what makes presumed abort safe: a coordinator's COMMIT row and a recoverer's ABORT
claim for the same gtrid cannot both commit; whichever commits first wins and the loser
reads and follows the winner.

Privileges: whoever can insert into this table can force the outcome of an in-doubt
transaction; grant INSERT/DELETE on it only to the application role and the recovery
worker.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from sqlalchemy.engine import Engine

from ..backends import BackendAdapter, DecisionRow, Outcome

log = logging.getLogger(__name__)

__all__ = [
    "CLAIM_LOCK_TIMEOUT",
    "ClaimBlocked",
    "admin_connection",
    "claim_abort",
    "is_missing_table",
    "read_all",
]


@contextlib.contextmanager
def admin_connection(engine: Engine) -> Iterator[Any]:
    """A pooled DBAPI connection in autocommit mode (restored when it goes back)."""
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT")
        yield conn.connection.dbapi_connection


def is_missing_table(error: BaseException) -> bool:
    """Whether ``error`` says the decision table does not exist (nothing decided there)."""
    code = getattr(error, "sqlstate", None) or getattr(error, "pgcode", None)  # psycopg 3 / 2
    if code == "42P01":
        return True
    args = getattr(error, "args", ())
    if args and args[0] == 1146:
        return True
    return "no such table" in str(error)


def read_all(adapter: BackendAdapter, engine: Engine) -> list[DecisionRow]:
    """Every decision row on ``engine`` (empty when the table does not exist yet)."""
    with admin_connection(engine) as dbapi:
        try:
            return adapter.read_decisions(dbapi)
        except Exception as e:
            if is_missing_table(e):
                return []
            raise


#: seconds an abort claim waits for a live coordinator's uncommitted decision row
CLAIM_LOCK_TIMEOUT = 5.0


class ClaimBlocked(Exception):
    """The claim waited :data:`CLAIM_LOCK_TIMEOUT` on another transaction's row for the
    same gtrid (a live coordinator deciding right now): try again on the next pass."""


def claim_abort(adapter: BackendAdapter, engine: Engine, gtrid: str,
                *, lock_timeout: float = CLAIM_LOCK_TIMEOUT) -> tuple[bool, str | None]:
    """Try to record ABORT for ``gtrid``; return ``(won, outcome now recorded)``.

    Runs in its own short transaction so it commits (or conflicts) on its own. If a
    coordinator's COMMIT row for the same gtrid is still uncommitted, the insert waits for
    it: whichever commits first wins. The wait is bounded by ``lock_timeout`` where the
    backend allows it (PostgreSQL ``SET LOCAL lock_timeout``, MariaDB ``SET STATEMENT``):
    a coordinator stuck with its decision uncommitted cannot hang recovery.

    :raises ClaimBlocked: the wait timed out; nothing was recorded.
    """
    try:
        with admin_connection(engine) as admin:
            adapter.ensure_decision_table(admin)
    except Exception as e:
        # A recovery role may lack the right to create tables (PostgreSQL checks it even
        # for an existing table): the insert below says whether the table is there.
        log.debug("decision table not ensured: %s", e)
    with engine.connect() as conn:
        dbapi: Any = conn.connection.dbapi_connection
        try:
            # decided_at None: the server's clock stamps the claim, which is what ABORT
            # rows are aged by (a coordinator's clock may be days off).
            adapter.insert_decision(dbapi, DecisionRow(gtrid, Outcome.ABORT, None, ""),
                                    lock_timeout=lock_timeout)
            dbapi.commit()
            return True, Outcome.ABORT
        except Exception as e:
            dbapi.rollback()
            if adapter.is_lock_timeout(e):
                raise ClaimBlocked(f"abort claim for {gtrid} timed out after "
                                   f"{lock_timeout:g} s waiting for a live coordinator") from e
            if not adapter.is_duplicate_key(e):
                raise
        row = adapter.read_decision(dbapi, gtrid)
        dbapi.rollback()
        return False, (row.outcome if row else None)
