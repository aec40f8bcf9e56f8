"""The recovery worker's small HTTP endpoint: ``/metrics`` (Prometheus text format) and
``/healthz`` (200 while recovery passes run and complete without errors, 503
otherwise), on a stdlib
threading server in a daemon thread."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from ..exc import ConfigurationError

__all__ = ["WorkerEndpoint", "parse_listen"]


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``PORT`` (all interfaces) -> ``(host, port)``.

    :raises ConfigurationError: not that form, or a port outside 0..65535.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = "", text
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigurationError(f"--listen wants HOST:PORT or PORT, not {text!r}") from None
    if not 0 <= port <= 65535:
        raise ConfigurationError(f"--listen: port {port} is out of range")
    return host.strip("[]"), port


class _IPv6Server(ThreadingHTTPServer):
    """The endpoint on an IPv6 address (``--listen [::1]:9464``)."""

    address_family = socket.AF_INET6


class WorkerEndpoint:
    """Serves the metrics of ``registry`` and the worker's health.

    Healthy: the last pass completed without errors no longer ago than ``stale_after``
    seconds. Branches deliberately left in doubt (within the grace period) do not make
    a worker unhealthy; a pass that raised, or that reported errors (a shard it could not
    reach or list, a branch it could not finish, a decision it could not read or
    delete), does: such a worker is not doing its job.
    """

    def __init__(self, host: str, port: int, registry: Any, stale_after: float) -> None:
        self.registry = registry
        self.stale_after = stale_after
        self.started = time.time()
        self.last_pass: float | None = None
        self.last_ok = False
        self.last_errors = 0
        self.last_resolved: bool | None = None
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] == "/metrics":
                    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

                    self._send(200, generate_latest(endpoint.registry), CONTENT_TYPE_LATEST)
                elif self.path.split("?")[0] == "/healthz":
                    code, body = endpoint.health()
                    self._send(code, json.dumps(body).encode(), "application/json")
                else:
                    self._send(404, b"not found: /metrics or /healthz\n", "text/plain")

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # scrapes every few seconds: not worth a line each

        server_class = _IPv6Server if ":" in host else ThreadingHTTPServer
        self.server = server_class((host, port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever,
                                        name="shardsession-http", daemon=True)
        self._thread.start()

    def record_pass(self, ok: bool, resolved: bool | None, errors: int = 0) -> None:
        """Note a pass: ``ok`` it completed, with ``errors`` errors reported."""
        self.last_pass, self.last_ok, self.last_resolved = time.time(), ok, resolved
        self.last_errors = errors

    def health(self) -> tuple[int, dict[str, Any]]:
        now = time.time()
        age = None if self.last_pass is None else now - self.last_pass
        healthy = (self.last_ok and self.last_errors == 0 and age is not None
                   and age <= self.stale_after)
        return (200 if healthy else 503), {
            "healthy": healthy, "last_pass_age": age, "last_pass_completed": self.last_ok,
            "last_pass_errors": self.last_errors, "resolved": self.last_resolved,
        }

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
