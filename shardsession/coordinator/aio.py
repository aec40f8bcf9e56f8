"""Recovery from asyncio programs: :func:`arecover` and :func:`ain_doubt`.

They run :func:`~.recovery.recover` / :func:`~.recovery.in_doubt` unchanged in
SQLAlchemy's asyncio greenlet, the way ``AsyncConnection.run_sync`` runs sync code, so
shards given as ``AsyncEngine`` (asyncpg, psycopg's async mode, aiomysql, asyncmy,
aiosqlite) are read and finished through their own drivers while the event loop keeps
serving other tasks between round trips. Plain ``Engine`` shards may be mixed in; their
IO blocks the loop, as any sync call from a coroutine does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .. import _compat
from .recovery import InDoubtBranch, RecoveryReport, in_doubt, recover

__all__ = ["ain_doubt", "arecover"]


def _sync(shards: Mapping[str, Any]) -> dict[str, Any]:
    return {name: _compat.sync_bind(engine) for name, engine in shards.items()}


async def arecover(shards: Mapping[str, Any], **options: Any) -> RecoveryReport:
    """Run one recovery pass over ``shards`` (shard id -> ``AsyncEngine`` or ``Engine``).

    Takes the keyword options of :func:`~.recovery.recover` (``grace_period``...).

    Failure semantics: those of :func:`~.recovery.recover`: each branch is finished on
    its own, a failure is recorded in the report's ``errors`` and that branch stays
    prepared for the next pass. Cancelling the awaiting task interrupts the pass between
    two statements; what it finished stays finished, the rest stays in doubt for the
    next pass (recovery is idempotent).
    """
    report: RecoveryReport = await _compat.run_in_greenlet(recover, _sync(shards), **options)
    return report


async def ain_doubt(shards: Mapping[str, Any]) -> list[InDoubtBranch]:
    """Our prepared branches on ``shards`` (shard id -> ``AsyncEngine`` or ``Engine``),
    as :func:`~.recovery.in_doubt` lists them."""
    found: list[InDoubtBranch] = await _compat.run_in_greenlet(in_doubt, _sync(shards))
    return found
