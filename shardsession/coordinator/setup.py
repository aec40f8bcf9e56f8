"""Preparing the shards of a cluster for atomic commits ahead of time.

The coordinator creates the decision table and the cluster identity on first use where
they are missing, so nothing here is required; :func:`prepare_shards` does it up front
(``shardsession create-all``), gives every shard of the cluster one identity where none is
stored yet, and reports what each shard can do, so a deployment learns of a server that
cannot prepare (PostgreSQL with ``max_prepared_transactions = 0``, MariaDB before 10.5) or
that could lose a committed decision in a crash (:func:`shard_health`) before the first
cross-shard commit, not at it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Engine

from ..backends import adapter_for
from ..backends.base import CLUSTER_TABLE, DECISION_TABLE
from .decisions import admin_connection, is_missing_table
from .identity import ensure_identity_here, read_identities, read_identity

__all__ = ["ShardHealth", "ShardSetup", "prepare_shards", "privilege_problems", "shard_health"]

#: statements that change nothing but need the privilege named (checked at parse time)
_PROBES = (
    (DECISION_TABLE, "SELECT", f"SELECT gtrid FROM {DECISION_TABLE} WHERE 1 = 0"),
    (DECISION_TABLE, "INSERT",
     f"INSERT INTO {DECISION_TABLE} SELECT * FROM {DECISION_TABLE} WHERE 1 = 0"),
    (DECISION_TABLE, "DELETE", f"DELETE FROM {DECISION_TABLE} WHERE 1 = 0"),
    (CLUSTER_TABLE, "SELECT", f"SELECT cluster_id FROM {CLUSTER_TABLE} WHERE 1 = 0"),
)


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
    #: the cluster identity stored on the shard
    identity: str | None = None
    #: server settings under which a committed decision or prepared branch may be lost
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class ShardHealth:
    """What :func:`shard_health` found on one shard (nothing is changed)."""

    shard: str
    identity: str | None
    warnings: tuple[str, ...] = ()
    #: the shard could not be checked
    error: str | None = None


def prepare_shards(engines: Mapping[str, Engine]) -> list[ShardSetup]:
    """Create the decision and cluster tables on every shard where they are missing,
    store one cluster identity on every shard that has none, and detect whether each
    shard can prepare and keep its commits through a crash. Idempotent; safe to run
    while applications run.

    The identity stored is the one the shards already have (the first in configuration
    order, if they disagree: an identity in use is never changed, since in-doubt xids
    name it), or a new one.

    Failure semantics: nothing but ``CREATE TABLE IF NOT EXISTS`` of the two tables and
    the insert of a missing identity row is executed (in autocommit mode). A shard that
    cannot be reached, or whose dialect shardsession has no adapter for, is reported with
    ``failed=True`` and the others are still set up; no exception is raised for a shard's
    failure.
    """
    found, _errors = read_identities(engines)
    existing = [i for i in found.values() if i is not None]
    preferred = existing[0] if existing else None
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
                identity, _ = ensure_identity_here(adapter, dbapi, preferred)
                preferred = preferred or identity
                caps = adapter.detect(dbapi)
                warnings = tuple(adapter.durability_warnings(dbapi))
        except Exception as e:
            out.append(ShardSetup(name, False, False, f"{type(e).__name__}: {e}", failed=True))
            continue
        out.append(ShardSetup(name, True, caps.can_prepare, caps.reason,
                              identity=identity, warnings=warnings))
    return out


def privilege_problems(dialect: str, dbapi: Any) -> list[str]:
    """What the connected role lacks to take part in commits and recovery (an empty list:
    nothing). ``dbapi`` is in autocommit mode; only statements that touch no row are sent.

    Needed everywhere: SELECT, INSERT, DELETE on ``shardsession_decisions`` and SELECT on
    ``shardsession_cluster``. On PostgreSQL a role that is not a superuser can finish only
    the prepared transactions it prepared itself (said here as a note).
    """
    problems: list[str] = []
    missing: set[str] = set()
    for table, privilege, sql in _PROBES:
        if table in missing:
            continue
        cur = dbapi.cursor()
        try:
            cur.execute(sql)
        except Exception as e:
            if is_missing_table(e):
                # created on first use (or by create-all): nothing to check yet
                missing.add(table)
            else:
                problems.append(f"cannot {privilege} on {table}: {type(e).__name__}: "
                                f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}")
        finally:
            cur.close()
    if dialect == "postgresql":
        cur = dbapi.cursor()
        try:
            cur.execute("SELECT current_user::text, rolsuper FROM pg_roles "
                        "WHERE rolname = current_user")
            row = cur.fetchone()
        finally:
            cur.close()
        if row is not None and not row[1]:
            problems.append(f"role {row[0]!r} is not a superuser: it can finish only the "
                            "prepared transactions it prepared itself (run recovery as the "
                            "application's role or a superuser)")
    return problems


def shard_health(engines: Mapping[str, Engine]) -> list[ShardHealth]:
    """The identity stored on each shard, the server settings that put a committed
    decision at risk, and the privileges the connected role lacks (read only; for
    ``shardsession status``)."""
    out: list[ShardHealth] = []
    for name, engine in engines.items():
        try:
            adapter = adapter_for(engine.dialect.name)
        except KeyError:
            continue
        try:
            with admin_connection(engine) as dbapi:
                lacking = tuple(privilege_problems(adapter.name, dbapi))
        except Exception as e:
            out.append(ShardHealth(name, None, (), f"{type(e).__name__}: {e}"))
            continue
        try:
            try:
                identity = read_identity(adapter, engine)
            except Exception as e:
                raise RuntimeError(
                    f"cannot read the cluster identity: {type(e).__name__}: {e}") from e
            with admin_connection(engine) as dbapi:
                warnings = tuple(adapter.durability_warnings(dbapi)) + lacking
                caps = adapter.detect(dbapi)
            if not caps.can_prepare and caps.reason and adapter.name != "sqlite":
                warnings += (f"cannot prepare: {caps.reason}",)
        except Exception as e:
            out.append(ShardHealth(name, None, lacking, f"{type(e).__name__}: {e}"))
            continue
        out.append(ShardHealth(name, identity, warnings))
    return out
