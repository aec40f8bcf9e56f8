"""The current tenant of a context, and the hooks tenant-scoped sessions call.

A leaf module: :mod:`shardsession.session` reads the contextvar and calls the hooks, and
:mod:`shardsession.tenancy` (which sits on the session) sets them, so the session never
imports the tenancy package.
"""

from __future__ import annotations

import contextvars
from typing import Any, Protocol

__all__ = ["TenancyHooks", "current_tenant", "hooks", "set_hooks", "tenant_var"]

#: the tenant of the current context (``tenant_scope``); ``None``: no tenant
tenant_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "shardsession_tenant", default=None
)


def current_tenant() -> str | None:
    """The tenant of the current context (thread or asyncio task), or ``None``."""
    return tenant_var.get()


class TenancyHooks(Protocol):
    """What a session calls for tenant-owned mappers (see shardsession.tenancy._session)."""

    def on_session(self, session: Any, tenant: str | int | None) -> None: ...

    def on_execute(self, session: Any, orm_context: Any) -> None: ...

    def before_flush(self, session: Any) -> None: ...

    def after_begin(self, session: Any, connection: Any) -> None: ...

    def check_object(self, session: Any, instance: Any) -> None: ...

    def check_mappings(
        self, session: Any, mapper: Any, mappings: list[Any], *, isupdate: bool, isstates: bool
    ) -> None: ...


_hooks: list[TenancyHooks] = []


def hooks() -> TenancyHooks | None:
    """The installed hooks (``None`` until :mod:`shardsession.tenancy` is imported)."""
    return _hooks[0] if _hooks else None


def set_hooks(h: TenancyHooks) -> None:
    """Install the tenancy hooks (once, by :mod:`shardsession.tenancy`)."""
    _hooks[:] = [h]
