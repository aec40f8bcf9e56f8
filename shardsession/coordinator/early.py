"""Opening the server transactions of a flush's shards in parallel ("early BEGIN").

psycopg2 and psycopg 3 open a transaction with a ``BEGIN`` round trip of its own before
the transaction's first statement, and SQLAlchemy's unit of work writes the shards of a flush
one after another: a flush writing *n* idle PostgreSQL shards waits for *n* BEGINs in a
row. Before such a flush, the BEGINs of all but the first shard are sent from worker
threads, so they overlap the round trips of the first shard's statements.

Thread safety: psycopg2 and psycopg 3 connections may be used from several threads (a lock
inside the driver serialises their use, and both send the BEGIN within the same hold of
that lock as the statement), so a flush statement sent while the early BEGIN runs waits
for it and then runs inside that transaction. The workers never touch SQLAlchemy objects. They
are joined before their connection's transaction can end: after the flush, before the
commit protocol, and before SQLAlchemy rolls a branch back. So no worker runs on a
connection that went back to the pool.

Failure semantics: a failed early BEGIN is only logged (at debug level). The branch's own
next statement meets the same failure (a lost connection, say) and SQLAlchemy reports it
as usual; the commit protocol never relies on the early BEGIN having happened.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import Executor, Future

from .branch import Branch, BranchState

__all__ = ["join", "start"]

log = logging.getLogger(__name__)


def start(pool: Executor, branches: Sequence[Branch]) -> list[Future[None]]:
    """Send the early BEGIN of every idle branch whose driver needs one (in workers)."""
    futures: list[Future[None]] = []
    for b in branches:
        if b.adapter is None or b.state is not BranchState.ACTIVE:
            continue
        run = b.adapter.early_begin(b.dbapi)
        if run is not None:
            futures.append(pool.submit(run))
    return futures


def join(futures: list[Future[None]]) -> None:
    """Wait for early BEGINs (and branch labels, see :mod:`.deadlock`) still running;
    empties ``futures`` (shared with the session)."""
    while futures:
        future = futures.pop()
        try:
            future.result()
        except Exception as e:  # the branch's next statement reports it
            log.debug("early BEGIN failed: %s", e)
