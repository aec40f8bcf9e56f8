"""A fault-injecting TCP proxy to put between the library and one database server.

Each proxied connection has three threads: a reader of client->server data, a scheduler that
forwards it after ``latency`` (so connections never wait on each other and byte order is kept),
and a pump for server->client data.  Rules match substrings of client->server data (psycopg2
sends simple Query messages and pymysql COM_QUERY packets, both with the SQL text in clear;
psycopg 3 sends the protocol's own statements -- BEGIN, COMMIT, PREPARE TRANSACTION, COMMIT
PREPARED, the decision insert -- as simple Query messages too, and statements with server-side
parameters as Parse messages whose SQL text is in clear, with ``$n`` for the values):

- :meth:`FaultProxy.drop_request`: the matching chunk is swallowed and the connection cut;
  the server never sees the statement.
- :meth:`FaultProxy.drop_reply`: the matching chunk is forwarded and executed, the server's
  reply is swallowed and the connection cut.

Standard library only.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

_BUFSIZE = 65536
# After the first chunk of a swallowed reply, keep swallowing until the server is quiet this long.
_REPLY_QUIET = 0.01


@dataclass
class ProxyStats:
    """Counters; read them any time (ints are updated under the proxy's lock)."""

    connections: int = 0
    active: int = 0
    chunks_forwarded: int = 0  # both directions
    bytes_forwarded: int = 0
    requests_dropped: int = 0
    replies_dropped: int = 0
    cuts: int = 0  # connections the proxy closed on purpose (rules and cut_all)
    upstream_failures: int = 0

    @property
    def dropped(self) -> int:
        return self.requests_dropped + self.replies_dropped


@dataclass
class _Rule:
    kind: str  # "request" | "reply"
    pattern: bytes
    remaining: int


_FORWARD, _CUT, _EOF = "forward", "cut", "eof"


@dataclass(eq=False)
class _Conn:
    proxy: FaultProxy
    client: socket.socket
    server: socket.socket
    outq: queue.SimpleQueue[tuple[str, float, bytes, bool]] = field(
        default_factory=queue.SimpleQueue)
    closed: threading.Event = field(default_factory=threading.Event)
    swallow_reply: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)
    tail: bytes = b""

    def start(self) -> None:
        for target, label in ((self._read_client, "c2s-read"), (self._write_server, "c2s-write"),
                              (self._pump_server, "s2c")):
            t = threading.Thread(target=target, name=f"faultproxy-{self.proxy.port}-{label}",
                                 daemon=True)
            self.threads.append(t)
            t.start()

    # -- client -> server -------------------------------------------------------------------

    def _read_client(self) -> None:
        try:
            while not self.closed.is_set():
                try:
                    data = self.client.recv(_BUFSIZE)
                except OSError:
                    break
                arrived = time.perf_counter()
                if not data:
                    self.outq.put((_EOF, arrived, b"", False))
                    return
                action = self.proxy._match(self.tail, data)
                self.tail = (self.tail + data)[-self.proxy._max_tail:]
                if action == "request":
                    # swallow it, but deliver what came before it first (order is kept)
                    self.outq.put((_CUT, arrived, b"", False))
                    return
                self.outq.put((_FORWARD, arrived, data, action == "reply"))
        finally:
            # wake the writer if we stopped because of an error
            self.outq.put((_EOF, time.perf_counter(), b"", False))

    def _write_server(self) -> None:
        while True:
            kind, arrived, data, arm_reply = self.outq.get()
            if self.closed.is_set():
                return
            delay = self.proxy.latency
            if delay > 0:
                deadline = arrived + delay
                # time.sleep (clock_nanosleep) overshoots less than Event.wait; sleep in
                # slices so a cut connection does not keep its thread for long
                while (remaining := deadline - time.perf_counter()) > 0:
                    time.sleep(min(remaining, 0.05))
                    if self.closed.is_set():
                        return
            if kind == _CUT:
                self.proxy._count("requests_dropped")
                self.cut(deliberate=True)
                return
            if kind == _EOF:
                self.cut()
                return
            if arm_reply:
                self.swallow_reply.set()  # before sending: the reply may come back at once
            self.proxy._count("chunks_forwarded", len(data))  # before: the reply may be quick
            try:
                self.server.sendall(data)
            except OSError:
                self.cut()
                return

    # -- server -> client -------------------------------------------------------------------

    def _pump_server(self) -> None:
        while not self.closed.is_set():
            try:
                data = self.server.recv(_BUFSIZE)
            except OSError:
                break
            if not data:
                break
            if self.swallow_reply.is_set():
                self._swallow_rest()
                self.proxy._count("replies_dropped")
                self.cut(deliberate=True)
                return
            self.proxy._count("chunks_forwarded", len(data))
            try:
                self.client.sendall(data)
            except OSError:
                break
        self.cut()

    def _swallow_rest(self) -> None:
        with contextlib.suppress(OSError):
            self.server.settimeout(_REPLY_QUIET)
            while self.server.recv(_BUFSIZE):
                pass

    # -- teardown ---------------------------------------------------------------------------

    def cut(self, deliberate: bool = False) -> None:
        """Close both sides (idempotent); threads blocked in recv wake up and exit."""
        with self.proxy._lock:
            if self.closed.is_set():
                return
            self.closed.set()
            self.proxy.stats.active -= 1
            if deliberate:
                self.proxy.stats.cuts += 1
        self.outq.put((_EOF, 0.0, b"", False))
        for s in (self.client, self.server):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()

    def join(self, timeout: float) -> None:
        me = threading.current_thread()
        for t in self.threads:
            if t is not me:
                t.join(timeout)


class FaultProxy:
    """TCP proxy on ``127.0.0.1:<free port>`` to ``target_host:target_port`` with faults.

    ``latency`` (seconds, settable any time) delays every client->server chunk.  Use as a
    context manager or call :meth:`close`.
    """

    def __init__(self, target_host: str, target_port: int, *, latency: float = 0.0,
                 host: str = "127.0.0.1") -> None:
        self.target_host = target_host
        self.target_port = int(target_port)
        self.latency = float(latency)
        self.host = host
        self.stats = ProxyStats()
        self._lock = threading.Lock()
        self._rules: list[_Rule] = []
        self._max_tail = 1
        self._conns: set[_Conn] = set()
        self._closing = threading.Event()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, 0))
        self._listener.listen(256)
        self.port: int = self._listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept_loop,
                                          name=f"faultproxy-{self.port}-accept", daemon=True)
        self._acceptor.start()

    def __repr__(self) -> str:
        return (f"FaultProxy({self.host}:{self.port} -> {self.target_host}:{self.target_port}, "
                f"latency={self.latency})")

    @classmethod
    def for_url(cls, url: str, **kw: Any) -> FaultProxy:
        """A proxy to the host and port of a SQLAlchemy URL."""
        from sqlalchemy.engine import make_url

        u = make_url(url)
        default = 5432 if u.get_backend_name() == "postgresql" else 3306
        return cls(u.host or "127.0.0.1", u.port or default, **kw)

    def url_for(self, url: str) -> str:
        """The same SQLAlchemy URL, with host and port replaced by the proxy's."""
        from sqlalchemy.engine import make_url

        return make_url(url).set(host=self.host, port=self.port).render_as_string(
            hide_password=False)

    # -- rules --------------------------------------------------------------------------------

    def drop_request(self, pattern: bytes, *, times: int = 1) -> None:
        """Swallow the next ``times`` client->server chunks containing ``pattern``, cutting
        each connection: the server never executes the statement."""
        self._add_rule("request", pattern, times)

    def drop_reply(self, pattern: bytes, *, times: int = 1) -> None:
        """Forward the next ``times`` chunks containing ``pattern`` (the server executes them),
        swallow the server's reply and cut the connection."""
        self._add_rule("reply", pattern, times)

    def _add_rule(self, kind: str, pattern: bytes, times: int) -> None:
        if not isinstance(pattern, bytes) or not pattern:
            raise TypeError("pattern must be non-empty bytes")
        if times < 1:
            raise ValueError("times must be >= 1")
        with self._lock:
            self._rules.append(_Rule(kind, pattern, times))
            self._max_tail = max(self._max_tail, len(pattern) - 1, 1)

    def clear(self) -> None:
        """Remove all rules (latency is left as it is)."""
        with self._lock:
            self._rules.clear()

    @property
    def pending_rules(self) -> list[tuple[str, bytes, int]]:
        with self._lock:
            return [(r.kind, r.pattern, r.remaining) for r in self._rules]

    def _match(self, tail: bytes, data: bytes) -> str | None:
        with self._lock:
            for rule in self._rules:
                # only matches that end in the new data: none is counted twice
                keep = len(rule.pattern) - 1
                window = tail[-keep:] if keep else b""
                if rule.pattern in window + data:
                    rule.remaining -= 1
                    if rule.remaining <= 0:
                        self._rules.remove(rule)
                    return rule.kind
        return None

    def _count(self, name: str, nbytes: int = 0) -> None:
        with self._lock:
            setattr(self.stats, name, getattr(self.stats, name) + 1)
            if nbytes:
                self.stats.bytes_forwarded += nbytes

    # -- connections --------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                if self._closing.is_set():
                    return
                time.sleep(0.01)
                continue
            if self._closing.is_set():
                client.close()
                return
            try:
                server = socket.create_connection((self.target_host, self.target_port),
                                                  timeout=10)
                server.settimeout(None)
            except OSError as exc:
                log.debug("faultproxy %d: upstream connect failed: %s", self.port, exc)
                with self._lock:
                    self.stats.upstream_failures += 1
                client.close()
                continue
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(self, client, server)
            with self._lock:
                # forget finished connections, keep those whose threads still run (for close)
                self._conns = {c for c in self._conns
                               if not c.closed.is_set() or any(t.is_alive() for t in c.threads)}
                self._conns.add(conn)
                self.stats.connections += 1
                self.stats.active += 1
            conn.start()

    def cut_all(self) -> None:
        """Close every proxied connection now (new connections are still accepted)."""
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            conn.cut(deliberate=True)

    def close(self) -> None:
        """Stop listening, cut every connection and join all threads."""
        if self._closing.is_set():
            return
        self._closing.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept() on Linux
        with contextlib.suppress(OSError):
            self._listener.close()
        self._acceptor.join(5)
        with self._lock:
            conns = list(self._conns)
            self._conns.clear()
        for conn in conns:
            conn.cut()
        for conn in conns:
            conn.join(5)

    @property
    def closed(self) -> bool:
        return self._closing.is_set()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
