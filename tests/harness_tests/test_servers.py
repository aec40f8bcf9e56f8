"""The server harness against real servers: start, crash, restart, prepared state, clean-up."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import psycopg2
import pymysql
import pytest
from harness import servers
from harness.servers import (
    ExternalServer,
    ServerStartError,
    clear_prepared,
    list_prepared,
    start_mariadb,
    start_postgres,
    xa_xid_sql,
)
from sqlalchemy.engine import make_url

TESTS_DIR = Path(__file__).resolve().parents[1]


def pg_connect(url: str, autocommit: bool = True) -> Any:
    u = make_url(url)
    conn = psycopg2.connect(host=u.host, port=u.port, user=u.username, dbname=u.database)
    conn.autocommit = autocommit
    return conn


def my_connect(url: str, **kw: Any) -> Any:
    u = make_url(url)
    return pymysql.connect(host=u.host, port=u.port, user=u.username, password="",
                           database=u.database, **kw)


def pg_scalar(url: str, sql: str, params: Any = None) -> Any:
    conn = pg_connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchone()[0]
    finally:
        conn.close()


@pytest.fixture(scope="module")
def own_pg() -> Any:
    """A PostgreSQL server of this module's own: these tests crash it."""
    t0 = time.monotonic()
    server = start_postgres("harness-crash")
    server.total_start_seconds = time.monotonic() - t0
    yield server
    server.teardown()
    assert not server.datadir.exists()


@pytest.fixture(scope="module")
def own_mariadb() -> Any:
    t0 = time.monotonic()
    server = start_mariadb("harness-crash")
    server.total_start_seconds = time.monotonic() - t0
    yield server
    server.teardown()
    assert not server.datadir.exists()


# -- PostgreSQL -------------------------------------------------------------------------------


def test_pg_starts_fast_with_prepared_transactions(own_pg: Any) -> None:
    assert own_pg.total_start_seconds < 5, own_pg.total_start_seconds
    url = own_pg.url()
    assert url == f"{servers.PG_DRIVERNAME}://postgres@127.0.0.1:{own_pg.port}/postgres"
    assert pg_scalar(url, "SHOW max_prepared_transactions") == "64"
    assert int(pg_scalar(url, "SHOW max_connections")) >= 100
    assert pg_scalar(url, "SHOW listen_addresses") == "127.0.0.1"
    assert pg_scalar(url, "SHOW unix_socket_directories").startswith(str(own_pg.base))
    if os.geteuid() == 0:  # the server runs as postgres, not root
        assert os.stat(f"/proc/{own_pg.pid}").st_uid != 0


def _plant_pg_prepared(url: str, gid: str, value: int) -> None:
    conn = pg_connect(url, autocommit=False)
    try:
        with conn.cursor() as cur:
            cur.execute("INSERT INTO t VALUES (%s)", (value,))
            cur.execute("PREPARE TRANSACTION %s", (gid,))
    finally:
        conn.close()


@pytest.mark.crash
@pytest.mark.parametrize("crash", ["immediate", "kill"])
def test_pg_prepared_transaction_survives_crash(own_pg: Any, crash: str) -> None:
    url = own_pg.create_database()
    conn = pg_connect(url)
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE t (x int primary key)")
    conn.close()
    gid = f"ss_crash_{crash}"
    _plant_pg_prepared(url, gid, 1)
    assert list_prepared(url) == [gid]

    if crash == "kill":
        own_pg.kill()
    else:
        own_pg.stop("immediate")
    assert not own_pg.is_running()
    with pytest.raises(psycopg2.OperationalError):
        pg_connect(url)
    t0 = time.monotonic()
    own_pg.start()
    assert time.monotonic() - t0 < 5
    assert own_pg.is_running()

    assert list_prepared(url) == [gid]
    # its lock came back with it
    conn = pg_connect(url)
    with conn.cursor() as cur:
        cur.execute("SET lock_timeout = '100ms'")
        with pytest.raises(psycopg2.errors.LockNotAvailable):
            cur.execute("INSERT INTO t VALUES (1)")
        cur.execute("COMMIT PREPARED %s", (gid,))
        cur.execute("SELECT count(*) FROM t")
        assert cur.fetchone()[0] == 1
    conn.close()
    own_pg.drop_database(make_url(url).database)


def test_pg_stop_fast_and_restart_keeps_data(own_pg: Any) -> None:
    url = own_pg.create_database("ss_keep")
    conn = pg_connect(url)
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE k AS SELECT 42 AS v")
    conn.close()
    own_pg.stop()
    assert not own_pg.is_running()
    own_pg.start()
    assert pg_scalar(url, "SELECT v FROM k") == 42
    own_pg.drop_database("ss_keep")


def test_pg_clear_prepared(own_pg: Any) -> None:
    url = own_pg.create_database()
    other = own_pg.create_database()
    for u in (url, other):
        conn = pg_connect(u)
        with conn.cursor() as cur:
            cur.execute("CREATE TABLE t (x int)")
        conn.close()
    hostile = "ss_'; DROP TABLE t; --\\ \"x"
    _plant_pg_prepared(url, "shardsession_1", 1)
    _plant_pg_prepared(url, hostile, 2)
    _plant_pg_prepared(url, "foreign_1", 3)
    _plant_pg_prepared(other, "shardsession_other_db", 4)

    done = clear_prepared(url)  # default prefixes: ours only, this database only
    assert sorted(done) == sorted(["shardsession_1", hostile])
    assert list_prepared(url) == ["foreign_1"]
    assert list_prepared(other) == ["shardsession_other_db"]
    assert clear_prepared(url) == []  # idempotent

    assert clear_prepared(url, None) == ["foreign_1"]
    assert clear_prepared(other, None) == ["shardsession_other_db"]
    assert pg_scalar(url, "SELECT count(*) FROM t") == 0  # all rolled back, table still there
    for u in (url, other):
        own_pg.drop_database(make_url(u).database)


def test_pg_start_failure_reports_log_tail() -> None:
    t0 = time.monotonic()
    with pytest.raises(ServerStartError) as info:
        start_postgres("broken", shared_buffers="lots")
    assert "shared_buffers" in str(info.value)
    assert time.monotonic() - t0 < 10


# -- MariaDB ----------------------------------------------------------------------------------


def test_mariadb_starts_fast_and_xa_works(own_mariadb: Any) -> None:
    assert own_mariadb.total_start_seconds < 5, own_mariadb.total_start_seconds
    url = own_mariadb.url()
    assert url == f"mysql+pymysql://root@127.0.0.1:{own_mariadb.port}/mysql"
    conn = my_connect(url)
    with conn.cursor() as cur:
        cur.execute("SELECT @@bind_address, @@skip_name_resolve, @@log_bin, "
                    "@@innodb_buffer_pool_size")
        bind, skip, log_bin, pool = cur.fetchone()
    conn.close()
    assert bind == "127.0.0.1" and skip == 1 and log_bin == 0
    assert pool == 64 * 1024 * 1024


def _plant_xa(url: str, gtrid: bytes, bqual: bytes, fmt: int, value: int) -> None:
    conn = my_connect(url, autocommit=True)
    xid = xa_xid_sql(fmt, gtrid, bqual)
    try:
        with conn.cursor() as cur:
            cur.execute(f"XA START {xid}")
            cur.execute("INSERT INTO t VALUES (%s)", (value,))
            cur.execute(f"XA END {xid}")
            cur.execute(f"XA PREPARE {xid}")
    finally:
        conn.close()


@pytest.mark.crash
def test_mariadb_xa_prepared_survives_sigkill(own_mariadb: Any) -> None:
    url = own_mariadb.create_database()
    conn = my_connect(url, autocommit=True)
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE t (x int primary key) ENGINE=InnoDB")
    conn.close()
    # binary bytes, a quote and a NUL: only hex literals can carry these
    gtrid, bqual = b"ss_\x00'\xff\"g1", b"shard-\x01"
    _plant_xa(url, gtrid, bqual, 7, 1)
    assert (7, gtrid, bqual) in list_prepared(url)

    own_mariadb.kill()
    assert not own_mariadb.is_running()
    t0 = time.monotonic()
    own_mariadb.start()
    assert time.monotonic() - t0 < 5
    assert (7, gtrid, bqual) in list_prepared(url)

    conn = my_connect(url, autocommit=True)
    with conn.cursor() as cur:
        cur.execute("SET SESSION innodb_lock_wait_timeout = 1")
        with pytest.raises(pymysql.err.OperationalError):  # still locked by the branch
            cur.execute("INSERT INTO t VALUES (1)")
        cur.execute(f"XA COMMIT {xa_xid_sql(7, gtrid, bqual)}")
        cur.execute("SELECT count(*) FROM t")
        assert cur.fetchone()[0] == 1
    conn.close()
    assert list_prepared(url) == []
    own_mariadb.drop_database(make_url(url).database)


def test_mariadb_clear_prepared(own_mariadb: Any) -> None:
    url = own_mariadb.create_database()
    conn = my_connect(url, autocommit=True)
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE t (x int primary key) ENGINE=InnoDB")
    conn.close()
    _plant_xa(url, b"shardsession_\x00\xfe'", b"b1", 1, 1)
    _plant_xa(url, b"ss_x", b"", 1, 2)
    _plant_xa(url, b"foreign", b"b", 3, 3)

    done = clear_prepared(url)
    assert sorted(done) == sorted([(1, b"shardsession_\x00\xfe'", b"b1"), (1, b"ss_x", b"")])
    assert list_prepared(url) == [(3, b"foreign", b"b")]
    assert clear_prepared(url, None) == [(3, b"foreign", b"b")]
    assert list_prepared(url) == []
    own_mariadb.drop_database(make_url(url).database)


def test_mariadb_log_bin_option() -> None:
    server = start_mariadb("binlog", log_bin=True, innodb_flush_log_at_trx_commit=1)
    try:
        conn = my_connect(server.url())
        with conn.cursor() as cur:
            cur.execute("SELECT @@log_bin, @@innodb_flush_log_at_trx_commit")
            assert cur.fetchone() == (1, 1)
        conn.close()
    finally:
        server.teardown()


def test_xa_xid_sql_is_hex_only() -> None:
    assert xa_xid_sql(1, b"a'b", b"") == "X'612762','',1"
    assert xa_xid_sql(0, b"", b"\x00") == "'',X'00',0"


# -- fixtures, external servers, slot selection ------------------------------------------------


def test_fresh_database_fixtures(pg_url_a: str, pg_url_b: str, mariadb_url: str,
                                 request: pytest.FixtureRequest) -> None:
    a, b = make_url(pg_url_a), make_url(pg_url_b)
    assert a.port != b.port  # two separate clusters
    assert a.database.startswith("ss_test_")
    assert pg_scalar(pg_url_a, "SELECT current_database()") == a.database
    assert pg_scalar(pg_url_b, "SHOW max_prepared_transactions") == "64"
    conn = my_connect(mariadb_url)
    with conn.cursor() as cur:
        cur.execute("SELECT DATABASE()")
        assert cur.fetchone()[0] == make_url(mariadb_url).database
    conn.close()
    markers = {m.name for m in request.node.iter_markers()}
    assert {"postgresql", "mysql"} <= markers


def test_fresh_database_is_dropped_afterwards(pg_server_a: Any) -> None:
    # pg_url_a of the previous test is gone
    names = pg_scalar(pg_server_a.url(), "SELECT string_agg(datname, ',') FROM pg_database")
    assert "ss_test_" not in names


def test_external_server_from_env(monkeypatch: pytest.MonkeyPatch, own_pg: Any) -> None:
    monkeypatch.setenv("SHARDSESSION_PG1_URL", f"postgresql://postgres@127.0.0.1:{own_pg.port}/x")
    server = servers._find_or_start("pg1")
    assert isinstance(server, ExternalServer)
    assert server.controllable is False
    assert server.url("db1") == f"{servers.PG_DRIVERNAME}://postgres@127.0.0.1:{own_pg.port}/db1"
    url = server.create_database()
    assert pg_scalar(url, "SELECT 1") == 1
    server.drop_database(make_url(url).database)
    with pytest.raises(servers.ServerUnavailable):
        server.kill()
    assert own_pg.is_running()


def test_find_or_start_servers_reports_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARDSESSION_PG_BINDIR", "/nonexistent")
    monkeypatch.setenv("SHARDSESSION_NO_DOCKER", "1")
    monkeypatch.delenv("SHARDSESSION_PG1_URL", raising=False)
    with pytest.raises(servers.ServerUnavailable, match="SHARDSESSION_PG1_URL"):
        servers._find_or_start("pg1")


@pytest.fixture(params=["sqlite", "postgresql", "mysql"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_markers_from_parametrised_fixture(backend: str, request: pytest.FixtureRequest) -> None:
    markers = {m.name for m in request.node.iter_markers()}
    assert backend in markers
    assert not ({"sqlite", "postgresql", "mysql"} - {backend}) & markers


def test_marker_from_sqlite_fixture(sqlite_dir: Path, request: pytest.FixtureRequest) -> None:
    assert sqlite_dir.is_dir() and not any(sqlite_dir.iterdir())
    assert request.node.get_closest_marker("sqlite") is not None


_PROBE = """
import pytest

def test_needs_pg(pg_server_a):
    pass

def test_plain():
    pass
"""


@pytest.mark.parametrize("require", ["", "1"])
def test_require_backends_mode(tmp_path: Path, require: str) -> None:
    (tmp_path / "conftest.py").write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(TESTS_DIR)!r})
        exec(compile(open({str(TESTS_DIR / 'conftest.py')!r}).read(), "conftest_under_test",
                     "exec"))
    """))
    (tmp_path / "test_probe.py").write_text(_PROBE)
    env = dict(os.environ, SHARDSESSION_PG_BINDIR="/nonexistent", SHARDSESSION_NO_DOCKER="1",
               SHARDSESSION_REQUIRE_BACKENDS=require)
    env.pop("SHARDSESSION_PG1_URL", None)
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    out = res.stdout + res.stderr
    if require:
        assert res.returncode == 1, out
        assert "backend unavailable" in out and "1 error" in out, out
    else:
        assert res.returncode == 0, out
        assert "1 skipped" in out and "backend unavailable" in out, out


def test_require_backends_fails_run_on_backend_skip(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(TESTS_DIR)!r})
        exec(compile(open({str(TESTS_DIR / 'conftest.py')!r}).read(), "conftest_under_test",
                     "exec"))
    """))
    (tmp_path / "test_probe.py").write_text(textwrap.dedent("""
        import pytest

        @pytest.mark.postgresql
        def test_self_skipping():
            pytest.skip("postgres server too old")
    """))
    for require, code in (("1", 1), ("", 0)):
        env = dict(os.environ, SHARDSESSION_REQUIRE_BACKENDS=require)
        res = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
        )
        assert res.returncode == code, res.stdout + res.stderr
        if require:
            assert "SHARDSESSION_REQUIRE_BACKENDS" in res.stdout


def test_reap_stale_removes_folders_of_dead_owners(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = Path(servers.tempfile.mkdtemp(prefix="shardsession-stale-"))
    (stale / "owner.pid").write_text(str(dead.pid))
    mine = Path(servers.tempfile.mkdtemp(prefix="shardsession-mine-"))
    (mine / "owner.pid").write_text(str(os.getpid()))
    try:
        removed = servers.reap_stale()
        assert stale in removed and not stale.exists()
        assert mine.exists()
    finally:
        servers.shutil.rmtree(stale, ignore_errors=True)
        servers.shutil.rmtree(mine, ignore_errors=True)
