"""Shared fixtures: real servers (started lazily), fresh databases, fault proxies, markers.

Servers: ``pg_server_a`` / ``pg_server_b`` (two PostgreSQL clusters, max_prepared_transactions
= 64) and ``mariadb_server``, each started the first time a test asks for it and stopped at the
end of the session.  ``pg_url_a`` / ``pg_url_b`` / ``mariadb_url`` give each test a fresh
database (and roll back leftover prepared transactions before and after it).

Where the servers come from: see ``tests/harness/servers.py`` (environment URLs
``SHARDSESSION_PG1_URL`` / ``SHARDSESSION_PG2_URL`` / ``SHARDSESSION_MYSQL_URL``, else local
binaries, else docker).  Without a server the test is skipped; with
``SHARDSESSION_REQUIRE_BACKENDS=1`` it fails instead, and so does the run if any test was
skipped for want of a backend.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from harness import servers as _servers  # noqa: E402
from harness.faultproxy import FaultProxy  # noqa: E402
from harness.servers import DEFAULT_XID_PREFIXES, clear_prepared  # noqa: E402

BACKEND_SKIP_PREFIX = "backend unavailable"


def require_backends() -> bool:
    """True when ``SHARDSESSION_REQUIRE_BACKENDS`` asks for missing servers to fail the run."""
    value = os.environ.get("SHARDSESSION_REQUIRE_BACKENDS", "").strip().lower()
    return value not in ("", "0", "false", "no", "off")


def _sigterm_to_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    # A CI job cancelled with SIGTERM would skip atexit and leave our servers running:
    # turn it into an interrupt, so fixture finalizers and atexit stop them.
    if (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL):
        signal.signal(signal.SIGTERM, _sigterm_to_interrupt)


def _server_or_skip(slot: str) -> Any:
    try:
        server = _servers.get_server(slot)
    except _servers.ServerUnavailable as exc:
        msg = f"{BACKEND_SKIP_PREFIX}: {exc}"
        if require_backends():
            pytest.fail(f"{msg} (SHARDSESSION_REQUIRE_BACKENDS is set)", pytrace=False)
        pytest.skip(msg)
    return server


def _ensure_running(server: Any) -> None:
    # a crash test that failed before restarting its server must not break the next test
    if server.controllable and not server.is_running():
        server.start()


# --------------------------------------------------------------------------------------------
# servers (session scope, lazy)


def _server_fixture(slot: str) -> Iterator[Any]:
    server = _server_or_skip(slot)
    yield server
    if server.controllable:
        server.teardown()
    _servers.forget_server(slot)


@pytest.fixture(scope="session")
def pg_server_a() -> Iterator[Any]:
    """First PostgreSQL server (max_prepared_transactions = 64)."""
    yield from _server_fixture("pg1")


@pytest.fixture(scope="session")
def pg_server_b() -> Iterator[Any]:
    """Second, separate PostgreSQL server (max_prepared_transactions = 64)."""
    yield from _server_fixture("pg2")


@pytest.fixture(scope="session")
def mariadb_server() -> Iterator[Any]:
    """A MariaDB server (XA on InnoDB; binary log off)."""
    yield from _server_fixture("mysql")


# --------------------------------------------------------------------------------------------
# fresh databases (function scope)


def _fresh_database(server: Any) -> Iterator[str]:
    from sqlalchemy.engine import make_url

    _ensure_running(server)
    url = server.create_database()
    # our own database (PostgreSQL) or our own server: every prepared transaction is a leftover
    everything = server.kind == "postgresql" or server.controllable
    prefixes = None if everything else DEFAULT_XID_PREFIXES
    clear_prepared(url, prefixes)
    yield url
    _ensure_running(server)
    clear_prepared(url, prefixes)
    server.drop_database(make_url(url).database)


@pytest.fixture
def pg_url_a(pg_server_a: Any) -> Iterator[str]:
    """URL of a fresh database on ``pg_server_a`` (dropped after the test)."""
    yield from _fresh_database(pg_server_a)


@pytest.fixture
def pg_url_b(pg_server_b: Any) -> Iterator[str]:
    """URL of a fresh database on ``pg_server_b`` (dropped after the test)."""
    yield from _fresh_database(pg_server_b)


@pytest.fixture
def mariadb_url(mariadb_server: Any) -> Iterator[str]:
    """URL of a fresh database on ``mariadb_server`` (dropped after the test)."""
    yield from _fresh_database(mariadb_server)


@pytest.fixture
def sqlite_dir(tmp_path: Path) -> Path:
    """An empty folder for SQLite database files."""
    path = tmp_path / "sqlite"
    path.mkdir()
    return path


@pytest.fixture
def twophase_cleanup() -> Iterator[Callable[..., None]]:
    """``register(url, prefixes=DEFAULT_XID_PREFIXES)``: clear leftover prepared transactions
    on ``url`` now and again after the test."""
    registered: list[tuple[str, Any]] = []

    def register(url: str, prefixes: Any = DEFAULT_XID_PREFIXES) -> None:
        clear_prepared(url, prefixes)
        registered.append((url, prefixes))

    yield register
    for url, prefixes in registered:
        clear_prepared(url, prefixes)


@pytest.fixture
def fault_proxy() -> Iterator[Callable[..., FaultProxy]]:
    """Factory: ``fault_proxy(target, latency=0.0)`` where target is a URL, a server object or
    ``(host, port)``; every proxy is closed after the test."""
    proxies: list[FaultProxy] = []

    def make(target: Any, *, latency: float = 0.0) -> FaultProxy:
        if isinstance(target, str):
            proxy = FaultProxy.for_url(target, latency=latency)
        elif isinstance(target, tuple):
            proxy = FaultProxy(target[0], int(target[1]), latency=latency)
        else:
            proxy = FaultProxy(target.host, int(target.port), latency=latency)
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.close()


# --------------------------------------------------------------------------------------------
# markers


_TOKEN_SPLIT = re.compile(r"[^a-z0-9]+")


def _backends_in(text: str) -> set[str]:
    found = set()
    for token in _TOKEN_SPLIT.split(text.lower()):
        if not token:
            continue
        if re.fullmatch(r"pg\d*", token) or "postgres" in token:
            found.add("postgresql")
        if "mysql" in token or "mariadb" in token:
            found.add("mysql")
        if "sqlite" in token:
            found.add("sqlite")
    return found


def backend_markers(item: pytest.Item) -> set[str]:
    """Backend markers implied by a test's fixtures and parameters."""
    found: set[str] = set()
    for name in getattr(item, "fixturenames", ()):
        if name.startswith(("pg_", "postgres")):
            found.add("postgresql")
        if "mariadb" in name or "mysql" in name:
            found.add("mysql")
        if "sqlite" in name:
            found.add("sqlite")
    callspec = getattr(item, "callspec", None)
    if callspec is not None:
        found |= _backends_in(callspec.id)
        for value in callspec.params.values():
            if isinstance(value, str):
                found |= _backends_in(value)
    return found


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        present = {m.name for m in item.iter_markers()}
        for marker in sorted(backend_markers(item) - present):
            item.add_marker(getattr(pytest.mark, marker))


# --------------------------------------------------------------------------------------------
# SHARDSESSION_REQUIRE_BACKENDS: a skipped backend test fails the run


_BACKEND_WORDS = re.compile(r"postgres|mysql|mariadb|server|backend|docker|database", re.I)
_backend_skips: list[tuple[str, str]] = []


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = _skip_reason(report)
    marked = bool({"postgresql", "mysql"} & set(report.keywords))
    if BACKEND_SKIP_PREFIX in reason or (marked and _BACKEND_WORDS.search(reason)):
        _backend_skips.append((report.nodeid, reason))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _servers.shutdown_servers()
    if require_backends() and _backend_skips and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if not (require_backends() and _backend_skips):
        return
    terminalreporter.section("SHARDSESSION_REQUIRE_BACKENDS", sep="=", red=True)
    terminalreporter.write_line(
        f"{len(_backend_skips)} test(s) skipped for want of a backend; failing the run:")
    for nodeid, reason in _backend_skips[:50]:
        terminalreporter.write_line(f"  {nodeid}: {reason}")
