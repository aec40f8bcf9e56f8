"""``TenantSharding``: the placement rule of tenant-owned mappers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..exc import ConfigurationError, RoutingError, TenantError, UnknownTenantError
from ..routing.strategies import KeySpec, KeyStrategy
from ._directory import TenantDirectory

__all__ = ["TenantSharding"]


class TenantSharding(KeyStrategy):
    """Place a tenant-owned mapper's rows on the shard its tenant is assigned to.

    ::

        Placement({
            Account: TenantSharding(Account.tenant_id, directory),
            Invoice: TenantSharding(Invoice.tenant_id, directory),
            LineItem: Follows(LineItem.invoice),   # its foreign key carries tenant_id
            Country: Broadcast(),
        })

    In a tenant-scoped session (``ShardedSession(..., tenant="acme")`` or inside
    :func:`~shardsession.tenancy.tenant_scope`) every statement on these mappers goes to
    the tenant's shard only and is filtered by ``key_column == tenant``; a mapper that
    ``Follows`` one of them is filtered by its foreign key column(s) that carry the
    tenant key, and refused in such a session when it has none.

    :param key_column: the tenant key attribute (``Account.tenant_id`` or its name).
    :param directory: the :class:`TenantDirectory` that assigns tenants to shards.
    :param allow_unscoped: ``False`` refuses statements on this mapper in a session
        without a tenant (:class:`~shardsession.exc.TenantRequiredError`); by default
        such a session reads across tenants with the exact cross-shard reads.
    """

    def __init__(
        self, key_column: KeySpec, directory: TenantDirectory, *, allow_unscoped: bool = True
    ) -> None:
        super().__init__(key_column)
        if len(self.key) != 1:
            raise ConfigurationError("TenantSharding takes one tenant key column")
        if not isinstance(directory, TenantDirectory):
            raise ConfigurationError(
                f"TenantSharding needs a TenantDirectory, not {directory!r}"
            )
        self.directory = directory
        self.allow_unscoped = allow_unscoped
        self._shards: list[str] = []

    def bind(self, all_shards: Sequence[str]) -> None:
        self._shards = sorted(all_shards)

    def bind_engines(self, engines: Mapping[str, Any]) -> None:
        self.directory.bind(engines)

    def shard_for(self, value: Any) -> str:
        if value is None:
            raise RoutingError("a tenant key value is None", shard_id=None)
        try:  # (the directory keys tenants by their text: 42 and "42" are one tenant)
            return self.directory.shard_of(value)
        except UnknownTenantError:
            raise
        except TenantError as e:  # not a tenant id at all: no shard holds it
            raise RoutingError(e.message, shard_id=None) from e

    def candidate_shards(self) -> Sequence[str]:
        return list(self._shards)

    def __repr__(self) -> str:
        return f"TenantSharding({self.key[0]}, {self.directory!r})"
