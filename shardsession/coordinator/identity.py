"""The cluster identity: generated once per decider database, stored next to its decision
table (``shardsession_cluster``, one row), written into every xid decided there.

Recovery takes a prepared branch for its own only when the decider shard its xid names
stores exactly the identity its xid carries; anything else is foreign and untouched. The
identity is a property of the *database* holding the decisions, not of a config file: two
deployments with copied configs (staging and production with the same shard names) on
shared servers still get different identities, because their decider databases differ.

The row also records where it was created (``bound_to``: the server and database, see
the adapters' ``location_sql``). A copy of the database (production's dump restored as
staging, on the same server or another) carries the same row, and its branches would
otherwise be taken for the original's by the original's recovery (MariaDB lists every
branch of a server): a row found somewhere else than where it was created is re-keyed
(a new identity, the copied one kept as ``previous_id``) before the copy prepares
anything, and until then recovery and ``status`` report it as an error. Branches naming
a shard's previous identity are reported and never touched, unless recovery is told that
this database *is* the original, moved (``recover(adopt_previous=True)``).

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
import threading
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Engine
from sqlalchemy.pool import SingletonThreadPool, StaticPool

from ..backends import BackendAdapter, adapter_for
from ..backends.base import ClusterRow
from ..exc import CapabilityError
from .decisions import admin_connection, is_missing_table
from .xid import is_cluster_id, new_cluster_id

if TYPE_CHECKING:
    from .branch import Branch

__all__ = [
    "CopiedIdentity",
    "IdentityCache",
    "ensure_identity",
    "ensure_identity_here",
    "read_identities",
    "read_identities_full",
    "read_identity",
    "read_identity_row",
]

log = logging.getLogger(__name__)


def _checked(value: str | None) -> str | None:
    if value is not None and not is_cluster_id(value):
        # Not something we wrote: never compare xids against it (nothing is ours then).
        raise ValueError(f"the stored cluster identity is malformed: {value[:40]!r}")
    return value


class CopiedIdentity(ValueError):
    """The identity stored in this database was created in another one: the database
    (or its cluster table) is a copy, a dump restored elsewhere, a file copied."""


def _copied(identity: str, bound_to: str, here: str) -> CopiedIdentity:
    return CopiedIdentity(
        f"the cluster identity {identity} stored here was created in another database "
        f"({bound_to!r}; this is {here!r}): a copy, such as a restored dump. Its branches "
        "are not taken for this cluster's; the next cross-shard commit or create-all "
        "gives this database an identity of its own")


def read_identity_row(adapter: BackendAdapter, engine: Engine) -> ClusterRow | None:
    """The cluster row stored on ``engine``'s database, checked; ``None`` when none is
    stored.

    :raises CopiedIdentity: the row was created in another database (a copy).
    :raises ValueError: the stored value is not an identity of ours.
    """
    with admin_connection(engine) as dbapi:
        try:
            row = adapter.read_cluster_row(dbapi)
        except Exception as e:
            if is_missing_table(e):
                return None
            raise
        if row is None:
            return None
        _checked(row.cluster_id)
        if row.previous_id is not None:
            _checked(row.previous_id)
        if row.bound_to is not None:
            here = adapter.location(dbapi)
            if row.bound_to != here:
                raise _copied(row.cluster_id, row.bound_to, here)
        return row


def read_identity(adapter: BackendAdapter, engine: Engine) -> str | None:
    """The identity stored on ``engine``'s database; ``None`` when none is stored.

    :raises CopiedIdentity: the identity was created in another database (a copy).
    :raises ValueError: the stored value is not an identity of ours.
    """
    row = read_identity_row(adapter, engine)
    return row.cluster_id if row is not None else None


def ensure_identity_here(adapter: BackendAdapter, dbapi: Any,
                         preferred: str | None = None) -> tuple[str, bool]:
    """Read the identity on ``dbapi`` (in its current transaction or autocommit), storing
    ``preferred`` (or a new one) when none is stored, bound to this database.

    A row created in another database (a copy: a dump restored elsewhere) is re-keyed:
    a new identity (``preferred`` if given and different) replaces it, and the copied one
    is kept as ``previous_id`` so that recovery reports, and never touches, branches
    naming it (they may be the original's). A row stored before locations were recorded
    is bound to this database.

    :returns: ``(identity, was stored before)``; ``False`` means this call inserted or
        re-keyed it (committed only when ``dbapi``'s transaction commits, unless
        autocommit).
    :raises CopiedIdentity: a copied row that another process re-keyed to a third place
        (never expected; nothing is stored then).
    """
    adapter.ensure_cluster_table(dbapi)
    adapter.ensure_cluster_columns(dbapi)
    here = adapter.location(dbapi)
    row = adapter.read_cluster_row(dbapi)
    if row is not None:
        current = row.cluster_id
        _checked(current)
        if row.bound_to is None:
            adapter.bind_cluster_id(dbapi, current, here)
            return current, True
        if row.bound_to == here:
            return current, True
        fresh = (preferred if preferred is not None and preferred != current
                 else new_cluster_id())
        if adapter.rekey_cluster_id(dbapi, current, fresh, here):
            log.warning("the cluster identity %s was created in %r, not here (%r): a copy; "
                        "re-keyed to %s", current, row.bound_to, here, fresh)
            return fresh, False
        row = adapter.read_cluster_row(dbapi)  # another process re-keyed it first
        if row is None or row.bound_to != here:
            raise _copied(current, (row.bound_to if row else None) or "?", here)
        _checked(row.cluster_id)
        return row.cluster_id, True
    fresh = preferred if preferred is not None else new_cluster_id()
    try:
        adapter.insert_cluster_id(dbapi, fresh, here)
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
    """``({shard: identity or None}, {shard: error})`` for every shard with an adapter
    (a copied identity is an error)."""
    found, _previous, errors = read_identities_full(engines)
    return found, errors


def read_identities_full(engines: Mapping[str, Engine]) -> tuple[
        dict[str, str | None], dict[str, str], dict[str, str]]:
    """``({shard: identity or None}, {shard: identity it had before it was re-keyed as a
    copy}, {shard: error})`` for every shard with an adapter."""
    found: dict[str, str | None] = {}
    previous: dict[str, str] = {}
    errors: dict[str, str] = {}
    for name, engine in engines.items():
        try:
            adapter = adapter_for(engine.dialect.name)
        except KeyError:
            continue
        try:
            row = read_identity_row(adapter, engine)
        except Exception as e:
            errors[name] = f"cannot read the cluster identity: {type(e).__name__}: {e}"
            continue
        found[name] = row.cluster_id if row is not None else None
        if row is not None and row.previous_id is not None:
            previous[name] = row.previous_id
    return found, previous, errors


def _sqlite_shares_connection(engine: Engine) -> bool:
    """Whether another connection of ``engine`` is not a separate connection to its file.

    A second connection to an in-memory database is another database; a pool that hands
    one connection per thread (``SingletonThreadPool``, as the local SQLite cluster uses)
    or one for all (``StaticPool``) gives back the transaction's own connection, and
    switching that to autocommit would commit the transaction's pending writes.
    """
    url = engine.url
    if url.database in (None, "", ":memory:") or url.query.get("mode") == "memory":
        return True
    return isinstance(engine.pool, (SingletonThreadPool, StaticPool))


class IdentityCache:
    """A coordinator's identities of decider databases, read or stored once per engine."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._known: weakref.WeakKeyDictionary[Engine, str] = weakref.WeakKeyDictionary()
        self._tried: weakref.WeakSet[Engine] = weakref.WeakSet()
        #: identities chosen for SQLite deciders whose connection cannot commit on its own
        self._pending: weakref.WeakKeyDictionary[Engine, str] = weakref.WeakKeyDictionary()

    def _keep(self, engine: Engine, identity: str) -> str:
        with self._lock:
            self._known[engine] = identity
        return identity

    def for_engine(self, engine: Engine, adapter: BackendAdapter | None) -> str:
        """The identity of a decider no transaction of ours holds: stored first, committed
        on a connection of its own, if there is none.

        A SQLite engine whose other connection is not a separate one (in memory, or a
        ``SingletonThreadPool`` / ``StaticPool``: the thread's connection, which another
        transaction may hold with pending writes) is never switched to autocommit nor
        committed here: on a ``SingletonThreadPool`` its identity is read in whatever
        transaction that connection holds; when none is stored (or the pool would reset
        the connection on return: ``StaticPool``) one is chosen now (the same for every
        transaction of this process) and stored with the first decision
        (:meth:`confirm`).
        """
        known = self._known.get(engine)
        if known is not None:
            return known
        if adapter is None:
            # No decision can be stored there: the commit is refused before any PREPARE.
            return new_cluster_id()
        if adapter.name == "sqlite" and _sqlite_shares_connection(engine):
            return self._read_shared(engine, adapter)
        return self._keep(engine, ensure_identity(adapter, engine)[0])

    def _read_shared(self, engine: Engine, adapter: BackendAdapter) -> str:
        if not isinstance(engine.pool, SingletonThreadPool):
            # Another checkout of a StaticPool's one connection (or a separate in-memory
            # database) would be reset on return, rolling back its holder's writes:
            # choose now, and let confirm() find what is stored.
            with self._lock:
                return self._pending.setdefault(engine, new_cluster_id())
        # SingletonThreadPool hands this thread's checkout back, counted: closing it does
        # not reset the connection. No autocommit, no commit: a SELECT only.
        with engine.connect() as conn:
            dbapi = conn.connection.dbapi_connection
            try:
                row = adapter.read_cluster_row(dbapi)
            except Exception as e:
                if not is_missing_table(e):
                    raise
                row = None
            if row is not None:
                _checked(row.cluster_id)
                if row.bound_to is None or row.bound_to == adapter.location(dbapi):
                    return self._keep(engine, row.cluster_id)
        with self._lock:
            return self._pending.setdefault(engine, new_cluster_id())

    def forget(self, engine: Engine) -> None:
        """Drop what is known of ``engine``'s identity (read or chosen again next time)."""
        with self._lock:
            self._known.pop(engine, None)
            self._pending.pop(engine, None)

    def confirm(self, branch: Branch, cluster: str) -> None:
        """Make sure the decider ``branch`` (chosen before it joined, see
        :meth:`for_engine`) stores ``cluster``, in its own transaction when the identity
        was only chosen: it then commits with the decision, or not at all.

        :raises CapabilityError: the database stores another identity (another process
            stored one first): nothing is prepared yet; the commit is refused.
        """
        if self._known.get(branch.engine) == cluster or branch.adapter is None:
            return
        identity, stored_before = ensure_identity_here(branch.adapter, branch.dbapi, cluster)
        if identity != cluster:
            if stored_before:  # the next transaction names the stored one
                with self._lock:
                    self._pending.pop(branch.engine, None)
                self._keep(branch.engine, identity)
            raise CapabilityError(
                f"the decider shard {branch.shard_id!r} stores the cluster identity "
                f"{identity}, not {cluster} chosen for this transaction (stored by "
                "another process, or before this one could read it without touching a "
                "shared connection); nothing was committed, retry the transaction",
                shard_id=str(branch.shard_id))
        if stored_before:
            self._keep(branch.engine, identity)

    def for_branch(self, branch: Branch) -> str:
        """The identity of a decider branch's database.

        Committed on a connection of its own, before any branch is prepared under it;
        on a SQLite database the branch's own transaction holds (in memory, or locked by
        its writes) it is stored in that transaction and so commits with the decision.
        """
        known = self._known.get(branch.engine)
        if known is not None:
            return known
        adapter = branch.adapter
        if adapter is not None and adapter.name == "sqlite" and (
                branch.wrote or _sqlite_shares_connection(branch.engine)):
            identity, stored_before = ensure_identity_here(adapter, branch.dbapi)
            if not stored_before:
                return identity  # commits with this transaction, or not at all: not kept
            return self._keep(branch.engine, identity)
        return self.for_engine(branch.engine, adapter)

    def early(self, branch: Branch) -> None:
        """Store a SQLite shard's identity as it joins a transaction, before it writes (it
        may become the decider later, when its own writes lock the file)."""
        engine = branch.engine
        if (branch.adapter is None or branch.adapter.name != "sqlite" or branch.wrote
                or engine in self._known or engine in self._tried
                or _sqlite_shares_connection(engine)):
            return
        # Once per engine: a file locked by another process makes this wait SQLite's busy
        # timeout, which later transactions must not pay again.
        with self._lock:
            self._tried.add(engine)
        try:
            self.for_engine(engine, branch.adapter)
        except Exception as e:  # retried at commit, in the transaction if need be
            log.info("shard %s: cluster identity not stored yet: %s", branch.shard_id, e)
