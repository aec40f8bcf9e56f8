"""Preparing the shards of a cluster for atomic commits ahead of time.

The coordinator creates the decision table on first use where it is missing, so nothing
here is required; :func:`prepare_shards` does it up front (``shardsession create-all``)
and reports what each shard can do, so a deployment learns of a server that cannot
prepare (PostgreSQL with ``max_prepared_transactions = 0``, say) before the first
cross-shard commit, not at it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from sqlalchemy.engine import Engine

from ..backends import adapter_for
from .decisions import admin_connection

__all__ = ["ShardSetup", "prepare_shards"]


@dataclass(frozen=True)
class ShardSetup:
    """What :func:`prepare_shards` found and did on one shard."""

    shard: str
    #: the decision table exists now (created or already there)
    decision_table: bool
    #: the server can take part in two-phase commit as a prepared branch
    can_prepare: bool
    #: why it cannot prepare, or why the shard could not be set up
    reason: str | None = None
    #: the shard could not be reached or set up (``reason`` says why)
    failed: bool = False


def prepare_shards(engines: Mapping[str, Engine]) -> list[ShardSetup]:
    """Create the decision table on every shard where it is missing and detect whether
    each shard can prepare. Idempotent; safe to run while applications run.

    Failure semantics: nothing but ``CREATE TABLE IF NOT EXISTS`` of the decision table is
    executed (in autocommit mode). A shard that cannot be reached, or whose dialect
    shardsession has no adapter for, is reported with ``failed=True`` and the others are
    still set up; no exception is raised for a shard's failure.
    """
    out: list[ShardSetup] = []
    for name, engine in engines.items():
        try:
            adapter = adapter_for(engine.dialect.name)
        except KeyError:
            out.append(ShardSetup(name, False, False,
                                  f"no shardsession adapter for dialect {engine.dialect.name!r}",
                                  failed=True))
            continue
        try:
            with admin_connection(engine) as dbapi:
                adapter.ensure_decision_table(dbapi)
                caps = adapter.detect(dbapi)
        except Exception as e:
            out.append(ShardSetup(name, False, False, f"{type(e).__name__}: {e}", failed=True))
            continue
        out.append(ShardSetup(name, True, caps.can_prepare, caps.reason))
    return out
