"""The fault proxy, against an echo server and against real PostgreSQL and MariaDB."""

from __future__ import annotations

import socket
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg2
import pymysql
import pytest
from harness.faultproxy import FaultProxy
from harness.servers import list_prepared, xa_xid_sql
from sqlalchemy.engine import make_url


def _proxy_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("faultproxy-")]


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    yield
    deadline = time.monotonic() + 5
    while _proxy_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _proxy_threads() == []


@dataclass
class Echo:
    host: str
    port: int
    received: list[bytes]


@pytest.fixture
def echo_server() -> Iterator[Echo]:
    """A TCP server that echoes every chunk and records everything it received."""
    listener = socket.create_server(("127.0.0.1", 0))
    received: list[bytes] = []
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                received.append(data)
                try:
                    conn.sendall(data)
                except OSError:
                    return

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield Echo("127.0.0.1", listener.getsockname()[1], received)
    stop.set()
    listener.close()
    t.join(2)


def _client(proxy: FaultProxy) -> socket.socket:
    s = socket.create_connection((proxy.host, proxy.port), timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _closed(s: socket.socket) -> bool:
    try:
        return s.recv(100) == b""
    except OSError:
        return True


# -- echo server (no database) ---------------------------------------------------------------


def test_forwarding_and_stats(echo_server: Echo) -> None:
    with FaultProxy(echo_server.host, echo_server.port) as proxy:
        s = _client(proxy)
        for i in range(5):
            s.sendall(b"ping %d" % i)
            assert s.recv(100) == b"ping %d" % i
        s.close()
        assert proxy.stats.connections == 1
        assert proxy.stats.chunks_forwarded == 10
        assert proxy.stats.dropped == 0


def test_drop_request_across_chunk_boundary(echo_server: Echo) -> None:
    with FaultProxy(echo_server.host, echo_server.port) as proxy:
        proxy.drop_request(b"XA PREPARE")
        s = _client(proxy)
        s.sendall(b"hello")
        assert s.recv(100) == b"hello"
        s.sendall(b"... XA PRE")
        assert s.recv(100) == b"... XA PRE"
        s.sendall(b"PARE 'x'")
        assert _closed(s)
        assert echo_server.received[-1] == b"... XA PRE"
        assert proxy.stats.requests_dropped == 1 and proxy.stats.cuts == 1
        assert proxy.pending_rules == []
        # the rule was used up: a new connection goes through
        s2 = _client(proxy)
        s2.sendall(b"XA PREPARE 'y'")
        assert s2.recv(100) == b"XA PREPARE 'y'"
        s2.close()


def test_drop_reply_forwards_request(echo_server: Echo) -> None:
    with FaultProxy(echo_server.host, echo_server.port) as proxy:
        proxy.drop_reply(b"COMMIT", times=2)
        for _ in range(2):
            s = _client(proxy)
            s.sendall(b"COMMIT PREPARED 'g'")
            assert _closed(s)
            s.close()
        assert echo_server.received.count(b"COMMIT PREPARED 'g'") == 2
        assert proxy.stats.replies_dropped == 2
        proxy.drop_reply(b"COMMIT")
        proxy.clear()
        s = _client(proxy)
        s.sendall(b"COMMIT")
        assert s.recv(100) == b"COMMIT"
        s.close()


def test_url_for() -> None:
    with FaultProxy("127.0.0.1", 1) as proxy:
        url = proxy.url_for("postgresql+psycopg2://u:p%40ss@db.example:5432/app?sslmode=disable")
        u = make_url(url)
        assert (u.host, u.port, u.username, u.password, u.database) == (
            "127.0.0.1", proxy.port, "u", "p@ss", "app")
        assert u.query == {"sslmode": "disable"}


def test_upstream_down_closes_client() -> None:
    with FaultProxy("127.0.0.1", 1) as proxy:
        s = _client(proxy)
        assert _closed(s)
        s.close()
        time.sleep(0.05)
        assert proxy.stats.upstream_failures == 1


def test_many_concurrent_connections_and_clean_close(echo_server: Echo) -> None:
    proxy = FaultProxy(echo_server.host, echo_server.port, latency=0.005)
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            s = _client(proxy)
            for j in range(5):
                msg = b"%d-%d" % (i, j)
                s.sendall(msg)
                assert s.recv(100) == msg
            s.close()
        except BaseException as exc:
            errors.append(exc)

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(150)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    assert errors == []
    # 5 round trips of 5 ms each: connections run side by side, not one after another
    assert elapsed < 3, elapsed
    assert proxy.stats.connections == 150
    # some left open on purpose, then closed by close()
    held = [_client(proxy) for _ in range(20)]
    proxy.close()
    assert all(_closed(s) for s in held)
    for s in held:
        s.close()


# -- PostgreSQL --------------------------------------------------------------------------------


def _pg(url: str, autocommit: bool = True) -> Any:
    u = make_url(url)
    conn = psycopg2.connect(host=u.host, port=u.port, user=u.username, dbname=u.database)
    conn.autocommit = autocommit
    return conn


def _median_select1(conn: Any, n: int = 20) -> float:
    times = []
    with conn.cursor() as cur:
        for _ in range(3):
            cur.execute("SELECT 1")
        for _ in range(n):
            t0 = time.perf_counter()
            cur.execute("SELECT 1")
            cur.fetchone()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


@pytest.mark.parametrize("latency", [0.002, 0.005])
def test_latency_accuracy(pg_url_a: str, fault_proxy: Any, latency: float) -> None:
    proxy = fault_proxy(pg_url_a, latency=latency)
    direct, proxied = _pg(pg_url_a), _pg(proxy.url_for(pg_url_a))
    try:
        for _attempt in range(3):  # a noisy CI neighbour gets a second chance
            diff = _median_select1(proxied) - _median_select1(direct)
            if abs(diff - latency) <= 0.0007:
                break
        assert abs(diff - latency) <= 0.0007, f"added {diff * 1000:.2f} ms"
        proxy.latency = 0.0  # settable at any time
        for _attempt in range(3):  # same second chance as above
            overhead = _median_select1(proxied) - _median_select1(direct)
            if overhead < 0.0007:
                break
        assert overhead < 0.0007, f"proxy overhead {overhead * 1000:.2f} ms"
    finally:
        direct.close()
        proxied.close()


def _pg_table(url: str) -> None:
    conn = _pg(url)
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE t (x int)")
    conn.close()


def _pg_count(url: str) -> int:
    conn = _pg(url)
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM t")
        n = cur.fetchone()[0]
    conn.close()
    return int(n)


def test_pg_drop_request_is_never_executed(pg_url_a: str, fault_proxy: Any) -> None:
    _pg_table(pg_url_a)
    proxy = fault_proxy(pg_url_a)
    proxy.drop_request(b"INSERT INTO t")
    conn = _pg(proxy.url_for(pg_url_a))
    with pytest.raises(psycopg2.OperationalError), conn.cursor() as cur:
        cur.execute("INSERT INTO t VALUES (1)")
    conn.close()
    time.sleep(0.05)
    assert _pg_count(pg_url_a) == 0
    assert proxy.stats.requests_dropped == 1


def test_pg_drop_reply_is_executed(pg_url_a: str, fault_proxy: Any) -> None:
    _pg_table(pg_url_a)
    proxy = fault_proxy(pg_url_a)
    proxy.drop_reply(b"INSERT INTO t")
    conn = _pg(proxy.url_for(pg_url_a))
    with pytest.raises(psycopg2.OperationalError), conn.cursor() as cur:
        cur.execute("INSERT INTO t VALUES (1)")
    conn.close()
    assert _pg_count(pg_url_a) == 1
    assert proxy.stats.replies_dropped == 1


def test_pg_two_phase_faults(pg_url_a: str, fault_proxy: Any) -> None:
    _pg_table(pg_url_a)
    proxy = fault_proxy(pg_url_a)
    purl = proxy.url_for(pg_url_a)

    # PREPARE TRANSACTION lost on the way: nothing prepared, nothing committed
    proxy.drop_request(b"PREPARE TRANSACTION")
    conn = _pg(purl, autocommit=False)
    with pytest.raises(psycopg2.OperationalError), conn.cursor() as cur:
        cur.execute("INSERT INTO t VALUES (1)")
        cur.execute("PREPARE TRANSACTION 'ss_lost'")
    conn.close()
    time.sleep(0.05)
    direct = _pg(pg_url_a)
    with direct.cursor() as cur:
        cur.execute("SELECT gid FROM pg_prepared_xacts WHERE database = current_database()")
        assert cur.fetchall() == []

    # COMMIT PREPARED executed, reply lost
    conn = _pg(purl, autocommit=False)
    with conn.cursor() as cur:
        cur.execute("INSERT INTO t VALUES (2)")
        cur.execute("PREPARE TRANSACTION 'ss_commit'")
    conn.close()
    conn = _pg(purl)
    proxy.drop_reply(b"COMMIT PREPARED")
    with pytest.raises(psycopg2.OperationalError), conn.cursor() as cur:
        cur.execute("COMMIT PREPARED 'ss_commit'")
    conn.close()
    with direct.cursor() as cur:
        cur.execute("SELECT gid FROM pg_prepared_xacts WHERE database = current_database()")
        assert cur.fetchall() == []
        cur.execute("SELECT x FROM t")
        assert cur.fetchall() == [(2,)]
    direct.close()


def test_pg_cut_all(pg_url_a: str, fault_proxy: Any) -> None:
    proxy = fault_proxy(pg_url_a)
    conns = [_pg(proxy.url_for(pg_url_a)) for _ in range(3)]
    assert proxy.stats.active == 3
    proxy.cut_all()
    for conn in conns:
        with pytest.raises(psycopg2.OperationalError), conn.cursor() as cur:
            cur.execute("SELECT 1")
        conn.close()
    assert proxy.stats.active == 0 and proxy.stats.cuts == 3
    conn = _pg(proxy.url_for(pg_url_a))  # new connections still work
    with conn.cursor() as cur:
        cur.execute("SELECT 1")
    conn.close()


# -- MariaDB -----------------------------------------------------------------------------------


def _my(url: str) -> Any:
    u = make_url(url)
    return pymysql.connect(host=u.host, port=u.port, user=u.username, password="",
                           database=u.database, autocommit=True)


def test_mariadb_xa_faults(mariadb_url: str, fault_proxy: Any) -> None:
    direct = _my(mariadb_url)
    with direct.cursor() as cur:
        cur.execute("CREATE TABLE t (x int) ENGINE=InnoDB")
    proxy = fault_proxy(mariadb_url)
    purl = proxy.url_for(mariadb_url)

    # XA PREPARE lost: the branch is never prepared (the server rolls it back on disconnect)
    proxy.drop_request(b"XA PREPARE")
    conn = _my(purl)
    xid = xa_xid_sql(1, b"ss_lost", b"b")
    with pytest.raises(pymysql.err.OperationalError), conn.cursor() as cur:
        cur.execute(f"XA START {xid}")
        cur.execute("INSERT INTO t VALUES (1)")
        cur.execute(f"XA END {xid}")
        cur.execute(f"XA PREPARE {xid}")
    conn.close()
    time.sleep(0.1)
    assert list_prepared(mariadb_url) == []
    with direct.cursor() as cur:
        cur.execute("SELECT count(*) FROM t")
        assert cur.fetchone()[0] == 0

    # XA COMMIT executed, reply lost
    conn = _my(purl)
    xid = xa_xid_sql(1, b"ss_commit", b"b")
    with conn.cursor() as cur:
        cur.execute(f"XA START {xid}")
        cur.execute("INSERT INTO t VALUES (2)")
        cur.execute(f"XA END {xid}")
        cur.execute(f"XA PREPARE {xid}")
    proxy.drop_reply(b"XA COMMIT")
    with pytest.raises(pymysql.err.OperationalError), conn.cursor() as cur:
        cur.execute(f"XA COMMIT {xid}")
    conn.close()
    with direct.cursor() as cur:
        cur.execute("SELECT x FROM t")
        assert cur.fetchall() == ((2,),)
        cur.execute("XA RECOVER")
        assert cur.fetchall() == ()
    direct.close()
