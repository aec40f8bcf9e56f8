"""A FaultProxy in a child process: modelled network latency outside the measured process.

The proxy of ``tests/harness/faultproxy.py`` forwards bytes with three Python threads per
connection.  Run inside the benchmark process, those threads compete with the code being
measured for the GIL (four proxied connections waking up at once delay each other and the
client), which a real network never does.  :class:`ProcessProxy` runs the same FaultProxy
in a child Python process, one per proxied server, so the benchmark only pays for what a
client pays for: its own CPU and the round trips.

The child is started as ``python benchmarks/_proxy_process.py HOST PORT LATENCY``; it prints
its listening port on one line, then serves until its stdin is closed (so it also goes away
when the parent dies).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

__all__ = ["ProcessProxy"]


class ProcessProxy:
    """A FaultProxy to ``target_host:target_port`` running in a child process.

    Only latency is modelled (fault rules need the in-process proxy).
    """

    def __init__(self, target_host: str, target_port: int, *, latency: float = 0.0) -> None:
        self.host = "127.0.0.1"
        self.latency = latency
        self._child = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), target_host, str(target_port),
             repr(float(latency))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._child.stdout is not None
        line = self._child.stdout.readline().strip()
        if not line.isdigit():
            self.close()
            raise RuntimeError(f"proxy child did not start (said {line!r})")
        self.port = int(line)

    def url_for(self, url: str) -> str:
        """The same SQLAlchemy URL, with host and port replaced by the proxy's."""
        from sqlalchemy.engine import make_url

        return make_url(url).set(host=self.host, port=self.port).render_as_string(
            hide_password=False
        )

    def close(self) -> None:
        """Stop the child (closing its stdin) and wait for it."""
        if self._child.poll() is not None:
            return
        assert self._child.stdin is not None
        try:
            self._child.stdin.close()
            self._child.wait(5)
        except (OSError, subprocess.TimeoutExpired):
            self._child.kill()
            self._child.wait(5)


def _serve(argv: list[str]) -> int:
    sys.path.insert(0, str(ROOT / "tests"))
    from harness.faultproxy import FaultProxy

    host, port, latency = argv[0], int(argv[1]), float(argv[2])
    proxy = FaultProxy(host, port, latency=latency)
    print(proxy.port, flush=True)
    try:
        sys.stdin.read()  # returns when the parent closes the pipe (or exits)
    finally:
        proxy.close()
    return 0


if __name__ == "__main__":
    sys.exit(_serve(sys.argv[1:]))
