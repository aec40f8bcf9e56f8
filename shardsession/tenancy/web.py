"""Scope each web request to its tenant: an ASGI middleware and a WSGI middleware.

A *resolver* takes the request (the ASGI ``scope`` or the WSGI ``environ``) and returns
the tenant id, or ``None`` when the request names none. Ready-made resolvers read a
header, the subdomain or the first path segment; a token claim is a one-line resolver of
your own. The request then runs inside :func:`~shardsession.tenancy.tenant_scope`, so
every session created while handling it is scoped to that tenant::

    app = TenantMiddleware(app, header_resolver("x-tenant"))

A request whose resolver returns ``None`` gets ``400`` (``required=True``, the default)
or runs without a tenant (``required=False``). A malformed tenant id gets ``400``.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Any

from ..exc import TenantError
from . import tenant_scope

__all__ = [
    "TenantMiddleware",
    "TenantWSGIMiddleware",
    "header_resolver",
    "path_resolver",
    "subdomain_resolver",
]

#: ASGI scope or WSGI environ -> tenant id (or an awaitable of it, for ASGI), or None
Resolver = Callable[[Mapping[str, Any]], Any]


def header_resolver(name: str) -> Resolver:
    """The tenant is the value of request header ``name`` (ASGI and WSGI)."""
    wanted = name.lower().encode("latin-1")
    environ_key = "HTTP_" + name.upper().replace("-", "_")

    def resolve(request: Mapping[str, Any]) -> str | None:
        if "headers" in request:  # ASGI
            for key, value in request["headers"]:
                if key.lower() == wanted:
                    return bytes(value).decode("latin-1").strip() or None
            return None
        value = request.get(environ_key)
        return value.strip() or None if isinstance(value, str) else None

    return resolve


def subdomain_resolver(domain: str) -> Resolver:
    """The tenant is the label in front of ``domain`` in the Host header
    (``acme.example.com`` with ``domain="example.com"``)."""
    suffix = "." + domain.lower().lstrip(".")

    def resolve(request: Mapping[str, Any]) -> str | None:
        host = header_resolver("host")(request) or request.get("SERVER_NAME") or ""
        host = host.split(":", 1)[0].lower()
        if not host.endswith(suffix):
            return None
        label = host[: -len(suffix)]
        return label if label and "." not in label else None

    return resolve


def path_resolver() -> Resolver:
    """The tenant is the first path segment (``/acme/invoices``)."""

    def resolve(request: Mapping[str, Any]) -> str | None:
        path = request.get("path") if "headers" in request else request.get("PATH_INFO")
        first = (path or "").lstrip("/").split("/", 1)[0]
        return first or None

    return resolve


class TenantMiddleware:
    """ASGI middleware: runs each HTTP and WebSocket request inside the tenant scope its
    resolver names, and stores the tenant in ``scope["state"]["tenant"]``. Lifespan and
    other messages pass through unscoped.

    :param app: the ASGI application.
    :param resolver: ``scope -> tenant | None`` (may be ``async``).
    :param required: answer ``400`` when the resolver finds no tenant; otherwise the
        request runs without one.
    """

    def __init__(self, app: Any, resolver: Resolver, *, required: bool = True) -> None:
        self.app = app
        self.resolver = resolver
        self.required = required

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope.get("type") not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        tenant = self.resolver(scope)
        if inspect.isawaitable(tenant):
            tenant = await tenant
        if tenant is None:
            if self.required:
                await _reject(scope, send, b"no tenant in the request")
                return
            await self.app(scope, receive, send)
            return
        try:
            scoped = tenant_scope(tenant)
            key = scoped.__enter__()
        except TenantError:
            await _reject(scope, send, b"malformed tenant id")
            return
        try:
            scope.setdefault("state", {})["tenant"] = key
            await self.app(scope, receive, send)
        finally:
            scoped.__exit__(None, None, None)


async def _reject(scope: Mapping[str, Any], send: Callable[[Any], Awaitable[None]],
                  body: bytes) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
        return
    await send({"type": "http.response.start", "status": 400,
                "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
    await send({"type": "http.response.body", "body": body})


class TenantWSGIMiddleware:
    """WSGI middleware: runs the application, and the iteration of its response, inside
    the tenant scope its resolver names; the tenant is also in
    ``environ["shardsession.tenant"]``.

    :param app: the WSGI application.
    :param resolver: ``environ -> tenant | None``.
    :param required: answer ``400`` when the resolver finds no tenant.
    """

    def __init__(self, app: Any, resolver: Resolver, *, required: bool = True) -> None:
        self.app = app
        self.resolver = resolver
        self.required = required

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        tenant = self.resolver(environ)
        if tenant is None:
            if self.required:
                return _wsgi_reject(start_response, b"no tenant in the request")
            result: Iterable[bytes] = self.app(environ, start_response)
            return result
        try:
            with tenant_scope(tenant) as key:
                environ["shardsession.tenant"] = key
                result = self.app(environ, start_response)
        except TenantError:
            return _wsgi_reject(start_response, b"malformed tenant id")
        return _ScopedBody(result, key)


def _wsgi_reject(start_response: Any, body: bytes) -> list[bytes]:
    start_response("400 Bad Request", [("Content-Type", "text/plain; charset=utf-8")])
    return [body]


class _ScopedBody:
    """A WSGI response body whose iteration (and ``close()``) runs in the tenant scope:
    a lazily produced body may open sessions while the server reads it."""

    def __init__(self, body: Iterable[bytes], tenant: str) -> None:
        self._body = body
        self._tenant = tenant

    def __iter__(self) -> Iterator[bytes]:
        with tenant_scope(self._tenant):
            it = iter(self._body)
        while True:
            with tenant_scope(self._tenant):
                try:
                    chunk = next(it)
                except StopIteration:
                    return
            yield chunk

    def close(self) -> None:
        close = getattr(self._body, "close", None)
        if close is not None:
            with tenant_scope(self._tenant):
                close()
