"""What every benchmark scenario gets: servers, fresh databases, fault proxies, timing."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

from harness import servers
from harness.faultproxy import FaultProxy

from ._proxy_process import ProcessProxy

__all__ = ["BenchEnv", "median_pair"]


class BenchEnv:
    """Servers found or started like the tests do, torn down on exit."""

    def __init__(self) -> None:
        self._servers: dict[str, Any] = {}
        self._proxies: list[FaultProxy | ProcessProxy] = []

    def server(self, slot: str) -> Any:
        """``"pg1"``, ``"pg2"`` or ``"mysql"``: a running server (started on first use)."""
        if slot not in self._servers:
            self._servers[slot] = servers.get_server(slot)
        return self._servers[slot]

    def pg_databases(self, n: int) -> list[str]:
        """``n`` fresh PostgreSQL database URLs, alternating between the two servers."""
        return [self.server("pg1" if i % 2 == 0 else "pg2").create_database() for i in range(n)]

    def proxy(
        self, url: str, *, latency: float = 0.0, process: bool = False
    ) -> tuple[FaultProxy | ProcessProxy, str]:
        """A FaultProxy in front of ``url``'s server and the URL that goes through it.

        ``process=True`` runs the proxy in a child process (latency only, no fault rules),
        so its forwarding threads do not compete with the measured code for the GIL.
        """
        from sqlalchemy.engine import make_url

        u = make_url(url)
        proxy: FaultProxy | ProcessProxy
        if process:
            proxy = ProcessProxy(u.host or "127.0.0.1", u.port or 5432, latency=latency)
        else:
            proxy = FaultProxy(u.host or "127.0.0.1", u.port or 5432, latency=latency)
        self._proxies.append(proxy)
        return proxy, proxy.url_for(url)

    def __enter__(self) -> BenchEnv:
        return self

    def __exit__(self, *exc: Any) -> None:
        for p in self._proxies:
            p.close()
        for s in self._servers.values():
            if getattr(s, "controllable", True):
                s.teardown()


def median_pair(
    ours: Callable[[], float], baseline: Callable[[], float], rounds: int
) -> dict[str, float]:
    """Run both sides alternately ``rounds`` times; medians and their ratio."""
    o: list[float] = []
    b: list[float] = []
    for i in range(rounds):
        # alternate who goes first so warm caches do not favour one side
        if i % 2:
            b.append(baseline())
            o.append(ours())
        else:
            o.append(ours())
            b.append(baseline())
    mo, mb = statistics.median(o), statistics.median(b)
    return {"ours": mo, "baseline": mb, "ratio": mo / mb}
