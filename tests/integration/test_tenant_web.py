"""The ASGI and WSGI tenant middleware, with minimal applications over SQLite shards."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from wsgiref.util import setup_testing_defaults

import pytest
from sqlalchemy import create_engine, select

from shardsession import ShardedSession
from shardsession.tenancy import current_tenant, tenant_scope
from shardsession.tenancy.web import (
    TenantMiddleware,
    TenantWSGIMiddleware,
    header_resolver,
    path_resolver,
    subdomain_resolver,
)

from .test_tenant_isolation import SHARDS, Account, Env, _seed


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    engines = {s: create_engine(f"sqlite:///{tmp_path}/{s}.db") for s in SHARDS}
    e = Env(engines)
    _seed(e)
    yield e
    for engine in engines.values():
        engine.dispose()


def _asgi_app(env: Env) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.sleep(0.01)  # other requests interleave here
        with env.Session() as s:  # created inside the request: scoped by the middleware
            body = {"tenant": s.tenant, "state": scope["state"]["tenant"],
                    "accounts": sorted(a.id for a in s.scalars(select(Account)))}
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": json.dumps(body).encode()})

    return app


async def _call(app: Any, path: str = "/", headers: list[tuple[bytes, bytes]] | None = None
                ) -> tuple[int, bytes]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": path, "headers": headers or []}
    await app(scope, receive, send)
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def test_asgi_scopes_concurrent_requests_to_their_tenants(env: Env) -> None:
    app = TenantMiddleware(_asgi_app(env), header_resolver("X-Tenant"))

    async def main() -> list[tuple[int, bytes]]:
        calls = [_call(app, headers=[(b"x-tenant", t.encode())])
                 for t in ("acme", "globex", "initech", "hooli") * 3]
        return await asyncio.gather(*calls)

    results = asyncio.run(main())
    for (status, body), tenant in zip(results, ("acme", "globex", "initech", "hooli") * 3,
                                      strict=True):
        assert status == 200
        got = json.loads(body)
        base = {"acme": 100, "globex": 200, "initech": 300, "hooli": 400}[tenant]
        assert got == {"tenant": tenant, "state": tenant, "accounts": [base + 1, base + 2]}
    assert current_tenant() is None  # nothing left behind in the caller


def test_asgi_without_a_tenant(env: Env) -> None:
    app = TenantMiddleware(_asgi_app(env), header_resolver("X-Tenant"))
    status, body = asyncio.run(_call(app))
    assert status == 400 and body == b"no tenant in the request"
    status, body = asyncio.run(_call(app, headers=[(b"x-tenant", b"x" * 500)]))
    assert status == 400 and body == b"malformed tenant id"


def test_resolvers() -> None:
    asgi = {"headers": [(b"host", b"acme.example.com:8000")], "path": "/initech/x"}
    assert subdomain_resolver("example.com")(asgi) == "acme"
    assert subdomain_resolver("example.com")({"headers": [(b"host", b"example.com")]}) is None
    assert subdomain_resolver("example.com")({"headers": [(b"host", b"a.b.example.com")]}) is None
    assert path_resolver()(asgi) == "initech"
    environ = {"HTTP_X_TENANT": "globex", "PATH_INFO": "/hooli/", "HTTP_HOST": "z.example.com"}
    assert header_resolver("X-Tenant")(environ) == "globex"
    assert path_resolver()(environ) == "hooli"
    assert subdomain_resolver("example.com")(environ) == "z"


def test_wsgi_scopes_the_request_and_its_lazy_body(env: Env) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "application/json")])
        yield environ["shardsession.tenant"].encode() + b" "
        with env.Session() as s:  # opened while the server iterates the body
            yield json.dumps(sorted(a.id for a in s.scalars(select(Account)))).encode()

    wrapped = TenantWSGIMiddleware(app, path_resolver())
    for tenant, want in (("globex", b"globex [201, 202]"), ("acme", b"acme [101, 102]")):
        environ: dict[str, Any] = {"PATH_INFO": f"/{tenant}/accounts", "wsgi.input": io.BytesIO()}
        setup_testing_defaults(environ)
        statuses: list[str] = []
        body = wrapped(environ, lambda status, headers, _s=statuses: _s.append(status))
        assert b"".join(body) == want and statuses == ["200 OK"]
        assert current_tenant() is None
    environ = {"PATH_INFO": "/"}
    setup_testing_defaults(environ)
    statuses = []
    assert list(wrapped(environ, lambda s, h: statuses.append(s))) == [b"no tenant in the request"]
    assert statuses == ["400 Bad Request"]


def test_async_sessions_in_concurrent_tasks(env: Env) -> None:
    """AsyncSession over aiosqlite shards (the same SQLite files), tasks interleaved."""
    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

    shards = {n: create_async_engine(str(e.url).replace("sqlite://", "sqlite+aiosqlite://"))
              for n, e in env.engines.items()}
    Async = async_sessionmaker(sync_session_class=ShardedSession, shards=shards,
                               placement=env.placement)

    async def read(tenant: str, explicit: bool) -> set[int]:
        if explicit:
            async with Async(tenant=tenant) as s:
                return {a.id for a in (await s.scalars(select(Account))).all()}
        with tenant_scope(tenant):
            await asyncio.sleep(0.01)
            async with Async() as s:
                got = (await s.scalars(select(Account))).all()
                assert await s.get(Account, 301) is None or tenant == "initech"
                return {a.id for a in got}

    async def main() -> list[set[int]]:
        try:
            return await asyncio.gather(
                read("acme", False), read("globex", True), read("initech", False),
                read("hooli", True))
        finally:
            for e in shards.values():
                await e.dispose()

    assert asyncio.run(main()) == [{101, 102}, {201, 202}, {301, 302}, {401, 402}]
