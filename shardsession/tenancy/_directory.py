"""The tenant directory: which shard holds each tenant, in a real table, cached in process.

Two tables (created by ``shardsession create-all`` on every shard, or by
:meth:`TenantDirectory.create_tables`):

* ``shardsession_tenants (tenant, shard, version)`` on the directory's database: the
  assignment. ``version`` starts at 1 and is raised by every move of the tenant.
* ``shardsession_tenant_owners (tenant, version)`` on every data shard: the shard holds
  the tenant at that version. A move changes both rows of the old and the new shard in
  its one atomic transaction.

The process caches ``tenant -> (shard, version)``. A cached answer is used to route, and
every transaction of a tenant-scoped session checks it on the shard itself before its
first statement there (:meth:`TenantDirectory.check_owner`, one ``SELECT`` of the owner
row under a shared lock, in the session's own transaction): a shard that does not hold
the tenant at the cached version refreshes the cache and raises the retryable
:class:`~shardsession.exc.StaleTenantDirectoryError`, so a stale cache is never used to
read from or write to the wrong shard.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    MetaData,
    String,
    Table,
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from ..exc import (
    ConfigurationError,
    StaleTenantDirectoryError,
    TenantError,
    UnknownShardError,
    UnknownTenantError,
)

__all__ = ["TenantDirectory", "tenancy_metadata", "tenant_key", "tenant_owners", "tenants_table"]

#: the tables of the tenant directory (create them with ``tenancy_metadata.create_all``)
tenancy_metadata = MetaData()

# 191 characters: the longest VARCHAR a MariaDB utf8mb4 primary key may index everywhere
tenants_table = Table(
    "shardsession_tenants",
    tenancy_metadata,
    Column("tenant", String(191), primary_key=True),
    Column("shard", String(64), nullable=False),
    Column("version", BigInteger, nullable=False),
)
tenant_owners = Table(
    "shardsession_tenant_owners",
    tenancy_metadata,
    Column("tenant", String(191), primary_key=True),
    Column("version", BigInteger, nullable=False),
)


#: a tenant id's text: lowercase ASCII letters, digits, ``_ . -`` (an int's text too)
_TENANT_ID = re.compile(r"-?[a-z0-9][a-z0-9_.\-]{0,189}")


def tenant_key(tenant: Any) -> str:
    """The directory's text for a tenant id: a ``str`` of 1 to 191 characters of
    lowercase ASCII letters, digits, ``_``, ``.`` and ``-`` (starting with a letter or
    digit), or an ``int``. The charset is what makes ids compare as the bytes they are
    everywhere: under a case-, accent- or trailing-space-insensitive collation (MariaDB's
    defaults) ``"Acme"``, ``"acme "`` and ``"ACMÉ"`` would be the same row as ``"acme"``.

    :raises TenantError: any other value (``bool``, ``float``, ``bytes``, uppercase or
        non-ASCII text, spaces).
    """
    if type(tenant) is int:
        return str(tenant)
    if type(tenant) is str and _TENANT_ID.fullmatch(tenant):
        return tenant
    if type(tenant) is str:
        raise TenantError(
            "a tenant id is 1 to 191 characters of a-z, 0-9, '_', '.', '-' (lowercase "
            f"ASCII, starting with a letter or digit), not {tenant!r}",
            tenant=None,
        )
    raise TenantError(f"a tenant id is a str or an int, not {tenant!r}", tenant=None)


class TenantDirectory:
    """Tenant -> shard, kept in the table ``shardsession_tenants``.

    ::

        directory = TenantDirectory("main")          # the table lives on shard "main"
        placement = Placement({Account: TenantSharding(Account.tenant_id, directory)})
        Session = cluster.sessionmaker(placement)     # binds the directory to the engines
        directory.add("acme")                         # placed on the shard with fewest tenants

    :param engine_or_shard_name: the :class:`~sqlalchemy.engine.Engine` holding the
        directory table, or the id of the shard that holds it (resolved when the
        directory is bound to the cluster's engines).
    :param shards: the cluster's ``{shard id: Engine}``; also bound by the first
        :class:`~shardsession.ShardedSession` created with a placement that uses this
        directory, or by :meth:`bind`.

    Tenant ids are ``str`` (1 to 191 characters of ``a-z 0-9 _ . -``, see
    :func:`tenant_key`) or ``int``; the directory stores their text, so ``42`` and
    ``"42"`` are one tenant. The directory is thread-safe.
    """

    def __init__(
        self, engine_or_shard_name: Engine | str, *, shards: Mapping[str, Engine] | None = None
    ) -> None:
        if isinstance(engine_or_shard_name, Engine):
            self._engine: Engine | None = engine_or_shard_name
            self._shard_name: str | None = None
        elif isinstance(engine_or_shard_name, str) and engine_or_shard_name:
            self._engine = None
            self._shard_name = engine_or_shard_name
        else:
            raise ConfigurationError(
                f"TenantDirectory needs an Engine or a shard id, not {engine_or_shard_name!r}"
            )
        self._shards: dict[str, Engine] = {}
        self._cache: dict[str, tuple[str, int]] = {}
        self._lock = threading.Lock()
        if shards is not None:
            self.bind(shards)

    # -- configuration -------------------------------------------------------------------

    def bind(self, shards: Mapping[str, Any]) -> None:
        """Give the directory the cluster's engines (``{shard id: Engine}``).

        :raises ConfigurationError: the directory's shard is not among them, or the
            directory is already bound to other shard ids.
        """
        engines = {name: getattr(b, "engine", b) for name, b in shards.items()}
        if self._shards:
            if set(self._shards) != set(engines):
                raise ConfigurationError(
                    f"this TenantDirectory is bound to shards {sorted(self._shards)}; "
                    f"create another one for shards {sorted(engines)}"
                )
            return
        if self._shard_name is not None:
            engine = engines.get(self._shard_name)
            if engine is None:
                raise ConfigurationError(
                    f"TenantDirectory shard {self._shard_name!r} is not one of the shards "
                    f"{sorted(engines)}"
                )
            self._engine = engine
        self._shards = engines

    @property
    def engine(self) -> Engine:
        """The engine of the directory table.

        :raises ConfigurationError: named by shard id and not bound yet.
        """
        if self._engine is None:
            raise ConfigurationError(
                f"TenantDirectory({self._shard_name!r}) is not bound to the cluster's engines "
                "yet: create a session with its placement first, or call bind(engines)"
            )
        return self._engine

    @property
    def shard_ids(self) -> list[str]:
        """The shards tenants may be placed on (empty until bound)."""
        return sorted(self._shards)

    def create_tables(self) -> None:
        """Create the directory table on the directory's database and the owner table
        on every bound shard (idempotent; ``shardsession create-all`` does the same)."""
        engines = {id(e): e for e in (self.engine, *self._shards.values())}
        for engine in engines.values():
            tenancy_metadata.create_all(engine)

    # -- lookups ---------------------------------------------------------------------------

    def shard_of(self, tenant: Any) -> str:
        """The shard holding ``tenant`` (from the cache; read from the table on a miss).

        :raises UnknownTenantError: the directory has no row for the tenant.
        """
        key = tenant_key(tenant)
        hit = self._cache.get(key)
        if hit is not None:
            return hit[0]
        return self._load(key)[0]

    def entry(self, tenant: Any) -> tuple[str, int]:
        """``(shard, version)`` of ``tenant`` as cached (read on a miss).

        :raises UnknownTenantError: the directory has no row for the tenant.
        """
        key = tenant_key(tenant)
        hit = self._cache.get(key)
        return hit if hit is not None else self._load(key)

    def refresh(self, tenant: Any = None) -> None:
        """Forget the cached answer for ``tenant`` (every tenant when ``None``)."""
        with self._lock:
            if tenant is None:
                self._cache.clear()
            else:
                self._cache.pop(tenant_key(tenant), None)

    def _load(self, key: str) -> tuple[str, int]:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(tenants_table.c.shard, tenants_table.c.version).where(
                    tenants_table.c.tenant == key
                )
            ).first()
        if row is None:
            raise UnknownTenantError(
                f"tenant {key!r} is not in the tenant directory; add it first "
                "(TenantDirectory.add)",
                tenant=key,
            )
        found = (str(row[0]), int(row[1]))
        with self._lock:
            self._cache[key] = found
        return found

    def tenants(self, shard: str | None = None) -> list[str]:
        """Every tenant in the directory (of ``shard`` only, when given), sorted; read
        from the table, not the cache."""
        stmt = select(tenants_table.c.tenant).order_by(tenants_table.c.tenant)
        if shard is not None:
            stmt = stmt.where(tenants_table.c.shard == shard)
        with self.engine.connect() as conn:
            return [str(t) for t in conn.execute(stmt).scalars()]

    def assignments(self) -> dict[str, tuple[str, int]]:
        """``{tenant: (shard, version)}`` for every tenant, read from the table."""
        stmt = select(tenants_table).order_by(tenants_table.c.tenant)
        with self.engine.connect() as conn:
            return {str(r.tenant): (str(r.shard), int(r.version)) for r in conn.execute(stmt)}

    # -- placing a new tenant --------------------------------------------------------------

    def add(self, tenant: Any, shard: str | None = None) -> str:
        """Place a new tenant and return its shard.

        ``shard=None`` places it by this rule: the bound shard with the fewest tenants
        in the directory, ties broken by shard id. Adding a tenant that is already
        there returns its shard (when ``shard`` is ``None`` or names that shard).

        Two steps: the owner row on the chosen shard, then the directory row (the
        commit point). Two processes adding one tenant at once agree on the first
        directory row committed; the loser removes its own owner row.

        :raises UnknownShardError: ``shard`` is not a bound shard.
        :raises TenantError: the tenant is already on another shard than ``shard``
            (moving a tenant is :func:`~shardsession.tenancy.move_tenant`'s work).

        Failure semantics: a crash between the two steps leaves an owner row on a shard
        that no directory row names; it grants nothing (a session checks the owner row
        against the directory's version and shard), and a later ``add`` of the tenant
        on that shard reuses it.
        """
        key = tenant_key(tenant)
        if not self._shards:
            raise ConfigurationError(
                "TenantDirectory.add needs the cluster's engines: bind(engines) first"
            )
        if shard is not None and shard not in self._shards:
            raise UnknownShardError(
                f"unknown shard id {shard!r}; configured shards are {sorted(self._shards)}",
                shard_id=shard,
            )
        self.refresh(key)
        try:
            existing = self._load(key)
        except UnknownTenantError:
            existing = None
        if existing is not None:
            return self._same(key, existing[0], shard)
        target = shard if shard is not None else self._least_loaded()
        mine = _write_owner(self._shards[target], key, 1)
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(tenants_table).values(tenant=key, shard=target, version=1))
        except IntegrityError:
            winner = self._load(key)
            if winner[0] != target and mine:
                with self._shards[target].begin() as conn:
                    conn.execute(delete(tenant_owners).where(tenant_owners.c.tenant == key))
            return self._same(key, winner[0], shard)
        with self._lock:
            self._cache[key] = (target, 1)
        return target

    @staticmethod
    def _same(key: str, current: str, asked: str | None) -> str:
        if asked is not None and asked != current:
            raise TenantError(
                f"tenant {key!r} is already on shard {current!r}, not {asked!r}; "
                "move it with move_tenant",
                tenant=key,
            )
        return current

    def _least_loaded(self) -> str:
        counts = dict.fromkeys(sorted(self._shards), 0)
        stmt = select(tenants_table.c.shard, func.count()).group_by(tenants_table.c.shard)
        with self.engine.connect() as conn:
            for name, n in conn.execute(stmt):
                if name in counts:
                    counts[name] = int(n)
        return min(counts, key=lambda s: (counts[s], s))

    # -- the check a tenant-scoped session makes on the shard ------------------------------

    def check_owner(self, tenant: Any, shard: str, connection: Connection) -> None:
        """Check, in ``connection``'s transaction on ``shard``, that the shard holds
        ``tenant`` at the cached version, and lock the owner row against a move (a
        shared lock on PostgreSQL and MariaDB; SQLite's transaction lock does it there)
        until the transaction ends.

        :raises StaleTenantDirectoryError: it does not (the cache is refreshed first);
            roll back and run the unit of work again.
        """
        key = tenant_key(tenant)
        cached = self.entry(key)
        version = connection.execute(
            select(tenant_owners.c.version)
            .where(tenant_owners.c.tenant == key)
            .with_for_update(read=True)
        ).scalar()
        if cached == (shard, version):
            return
        self.refresh(key)
        raise StaleTenantDirectoryError(
            f"shard {shard!r} does not hold tenant {key!r} at directory version "
            f"{cached[1]} (it holds version {version}); the tenant moved or is moving: roll "
            "back and retry",
            tenant=key,
            shard_id=shard,
        )

    def __repr__(self) -> str:
        where = self._shard_name if self._shard_name is not None else repr(self._engine)
        return f"TenantDirectory({where})"


def _write_owner(engine: Engine, key: str, version: int) -> bool:
    """Write the owner row; ``False`` when one was there already (a leftover of an
    interrupted ``add``: no directory row names the tenant, so it is set to
    ``version``)."""
    try:
        with engine.begin() as conn:
            conn.execute(insert(tenant_owners).values(tenant=key, version=version))
    except IntegrityError:
        with engine.begin() as conn:
            conn.execute(
                update(tenant_owners).where(tenant_owners.c.tenant == key).values(version=version)
            )
        return False
    return True
