"""Multi-tenant services: tenant-scoped sessions, the tenant directory, tenant scopes.

Each tenant's rows live on one shard, assigned by a :class:`TenantDirectory` (a real
table). Mappers placed by :class:`TenantSharding` are *tenant-owned*. A session created
with ``tenant="acme"`` (or inside ``with tenant_scope("acme"):``) sends every statement
on tenant-owned mappers to acme's shard and filters it to acme's rows, gives new
objects acme's key, and refuses to read or write another tenant's rows. See
``docs/tenancy.md``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from .._scope import current_tenant, tenant_var
from ._directory import TenantDirectory, tenancy_metadata
from ._move import MoveReport, move_tenant
from ._session import CHECKED_OPTION
from ._sharding import TenantSharding

__all__ = [
    "CHECKED_OPTION",
    "MoveReport",
    "TenantDirectory",
    "TenantSharding",
    "current_tenant",
    "move_tenant",
    "tenancy_metadata",
    "tenant_scope",
]


@contextlib.contextmanager
def tenant_scope(tenant: str | int) -> Iterator[str]:
    """Make ``tenant`` the current tenant of this context (thread or asyncio task):
    sessions created inside are scoped to it. Nested scopes restore the outer one on
    exit; a new asyncio task copies the scope of the code that created it, and a new
    thread starts without one.

    A session keeps the tenant it was created with: leaving the scope does not change
    the tenant of a session created inside it, and a session used inside the scope of
    another tenant (or one without a tenant used inside a scope) raises
    :class:`~shardsession.exc.TenantIsolationError` on tenant-owned mappers.
    """
    from ._directory import tenant_key

    key = tenant_key(tenant)
    token = tenant_var.set(key)
    try:
        yield key
    finally:
        tenant_var.reset(token)
