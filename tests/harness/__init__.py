"""Test harness: throw-away real servers, a fault-injecting TCP proxy, 2PC clean-up helpers."""

from __future__ import annotations

import sys
from pathlib import Path

from .faultproxy import FaultProxy, ProxyStats
from .servers import (
    DEFAULT_XID_PREFIXES,
    ExternalServer,
    MariaDBServer,
    PostgresServer,
    ServerSet,
    ServerStartError,
    ServerUnavailable,
    clear_prepared,
    docker_available,
    find_or_start_servers,
    forget_server,
    get_server,
    list_prepared,
    shutdown_servers,
    start_mariadb,
    start_postgres,
    xa_xid_sql,
)

__all__ = [
    "DEFAULT_XID_PREFIXES",
    "ExternalServer",
    "FaultProxy",
    "MariaDBServer",
    "PostgresServer",
    "ProxyStats",
    "ServerSet",
    "ServerStartError",
    "ServerUnavailable",
    "clear_prepared",
    "docker_available",
    "find_or_start_servers",
    "forget_server",
    "get_server",
    "list_prepared",
    "shutdown_servers",
    "start_mariadb",
    "start_postgres",
    "xa_xid_sql",
]


def _alias() -> None:
    """Make ``harness`` and ``tests.harness`` one module, whichever name came first.

    conftest.py puts ``tests/`` on sys.path and imports ``harness``; a test module may import
    ``tests.harness``.  Two copies would mean two server registries (servers started twice)
    and two ``ServerUnavailable`` classes.
    """
    me = sys.modules[__name__]
    here = str(Path(__file__).resolve().parent.parent)
    for other in {"harness", "tests.harness"} - {__name__}:
        if other in sys.modules:
            continue
        parent_name = other.rpartition(".")[0]
        if parent_name:
            parent = sys.modules.get(parent_name)
            paths = [str(Path(p).resolve()) for p in getattr(parent, "__path__", [])]
            if here not in paths:
                continue  # no such package, or a different "tests" package
            parent.harness = me  # type: ignore[union-attr]
        sys.modules[other] = me
        for sub in ("servers", "faultproxy"):
            sys.modules[f"{other}.{sub}"] = sys.modules[f"{__name__}.{sub}"]


_alias()
