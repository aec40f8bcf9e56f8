"""The cluster identity: generated once per decider database, stored next to its decision
table (``shardsession_cluster``, one row), written into every xid decided there.

Recovery takes a prepared branch for its own only when the decider shard its xid names
stores exactly the identity its xid carries; anything else is foreign and untouched. The
identity is a property of the *database* holding the decisions, not of a config file: two
deployments with copied configs (staging and production with the same shard names) on
shared servers still get different identities, because their decider databases differ.
``shardsession create-all`` gives every shard of a cluster the same identity where none is
stored yet; ``shardsession status`` shows them.

An identity must be durable before any branch is prepared under it: otherwise a crash
could leave branches naming an identity no database stores, which recovery could not
attribute. It is therefore committed on a connection of its own (autocommit), except on
a SQLite database whose only connection is the transaction's own (``:memory:``, or the
file already locked by the transaction's writes): there it commits with the first
decision, and a crash before that commit leaves branches recovery reports as foreign
(run ``create-all`` once, or use :class:`~shardsession.config.Cluster`, which sets SQLite
identities up on first connect, to close that window).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from sqlalchemy.engine import Engine

from ..backends import BackendAdapter, adapter_for
from .decisions import admin_connection, is_missing_table
from .xid import is_cluster_id, new_cluster_id

__all__ = ["ensure_identity", "ensure_identity_here", "read_identities", "read_identity"]

log = logging.getLogger(__name__)


def _checked(value: str | None) -> str | None:
    if value is not None and not is_cluster_id(value):
        # Not something we wrote: never compare xids against it (nothing is ours then).
        raise ValueError(f"the stored cluster identity is malformed: {value[:40]!r}")
    return value


def read_identity(adapter: BackendAdapter, engine: Engine) -> str | None:
    """The identity stored on ``engine``'s database; ``None`` when none is stored.

    :raises ValueError: the stored value is not an identity of ours.
    """
    with admin_connection(engine) as dbapi:
        try:
            return _checked(adapter.read_cluster_id(dbapi))
        except Exception as e:
            if is_missing_table(e):
                return None
            raise


def ensure_identity_here(adapter: BackendAdapter, dbapi: Any,
                         preferred: str | None = None) -> tuple[str, bool]:
    """Read the identity on ``dbapi`` (in its current transaction or autocommit), storing
    ``preferred`` (or a new one) when none is stored.

    :returns: ``(identity, was stored before)``; ``False`` means this call inserted it
        (committed only when ``dbapi``'s transaction commits, unless autocommit).
    """
    adapter.ensure_cluster_table(dbapi)
    current = _checked(adapter.read_cluster_id(dbapi))
    if current is not None:
        return current, True
    fresh = preferred if preferred is not None else new_cluster_id()
    try:
        adapter.insert_cluster_id(dbapi, fresh)
    except Exception as e:
        if not adapter.is_duplicate_key(e):
            raise
        # another process stored one first: that one is the identity
        won = _checked(adapter.read_cluster_id(dbapi))
        if won is None:
            raise
        return won, True
    log.info("stored cluster identity %s", fresh)
    return fresh, False


def ensure_identity(adapter: BackendAdapter, engine: Engine,
                    preferred: str | None = None) -> tuple[str, bool]:
    """The identity of ``engine``'s database, stored now (committed, on a connection of its
    own) if it has none: ``preferred`` if given, else a new one.

    Safe to run from several processes at once: the one-row table's primary key lets one
    insert win, and the others read the winner.

    :returns: ``(identity, was stored before)``.
    """
    with admin_connection(engine) as dbapi:
        return ensure_identity_here(adapter, dbapi, preferred)


def read_identities(engines: Mapping[str, Engine]) -> tuple[dict[str, str | None],
                                                             dict[str, str]]:
    """``({shard: identity or None}, {shard: error})`` for every shard with an adapter."""
    found: dict[str, str | None] = {}
    errors: dict[str, str] = {}
    for name, engine in engines.items():
        try:
            adapter = adapter_for(engine.dialect.name)
        except KeyError:
            continue
        try:
            found[name] = read_identity(adapter, engine)
        except Exception as e:
            errors[name] = f"cannot read the cluster identity: {type(e).__name__}: {e}"
    return found, errors
