"""Throw-away PostgreSQL and MariaDB servers for the real-server tests.

Each server lives in its own temporary folder (data, socket, pid and log files) and listens on
127.0.0.1 on a free port.  The harness owns the process, so tests can stop, crash (SIGKILL) and
restart it; a system-wide server cannot be used for that, and the system PostgreSQL usually has
``max_prepared_transactions = 0``.

When the tests run as root the servers run as the ``postgres`` / ``mysql`` users (PostgreSQL
refuses to run as root).

Where the servers come from, slot by slot (:func:`get_server`, :func:`find_or_start_servers`):

1. ``SHARDSESSION_PG1_URL`` / ``SHARDSESSION_PG2_URL`` / ``SHARDSESSION_MYSQL_URL``: servers
   someone else runs (``controllable = False``: no stop/kill/restart);
2. the locally installed binaries (a server of our own, ``controllable = True``);
3. ``docker compose`` with the top-level ``docker-compose.yml`` when a docker engine answers.

PostgreSQL URLs name the driver ``SHARDSESSION_PG_DRIVER`` chooses (``psycopg2``, the default,
or ``psycopg`` for psycopg 3): see :data:`PG_DRIVER`.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

START_TIMEOUT = float(os.environ.get("SHARDSESSION_SERVER_START_TIMEOUT", "60"))
STOP_TIMEOUT = 30.0

#: PostgreSQL drivers the suite can run the library under (``SHARDSESSION_PG_DRIVER``)
PG_DRIVERS = ("psycopg2", "psycopg")


def _pg_driver_from_env() -> str:
    value = os.environ.get("SHARDSESSION_PG_DRIVER", "").strip() or "psycopg2"
    if value not in PG_DRIVERS:
        raise ValueError(f"SHARDSESSION_PG_DRIVER={value!r}: expected one of {PG_DRIVERS}")
    return value


#: The DBAPI driver of every PostgreSQL URL this harness hands out: ``psycopg2`` (default)
#: or ``psycopg`` (psycopg 3, SQLAlchemy 2.1's default for ``postgresql://``), chosen once,
#: here, by ``SHARDSESSION_PG_DRIVER``. The harness's own admin work (probing servers,
#: creating databases, clearing prepared transactions) always uses psycopg2 directly.
PG_DRIVER = _pg_driver_from_env()
#: SQLAlchemy drivername of the harness's PostgreSQL URLs
PG_DRIVERNAME = f"postgresql+{PG_DRIVER}"



def client_cursor(dbapi_conn: Any) -> Any:
    """A cursor on a PostgreSQL DBAPI connection (either driver) that binds parameters on
    the client, for utility statements that take no server-side parameters
    (``PREPARE TRANSACTION %s``): psycopg2's cursors always do, psycopg 3's
    ``ClientCursor`` does (its default cursor would send ``$1``)."""
    if type(dbapi_conn).__module__.split(".", 1)[0] == "psycopg":
        import psycopg

        return psycopg.ClientCursor(dbapi_conn)
    return dbapi_conn.cursor()


ENV_URLS = {
    "pg1": "SHARDSESSION_PG1_URL",
    "pg2": "SHARDSESSION_PG2_URL",
    "mysql": "SHARDSESSION_MYSQL_URL",
}

# Prefixes of the transaction ids the library and its tests create; clear_prepared() finishes
# only those by default, so a foreign prepared transaction on a shared server is left alone.
DEFAULT_XID_PREFIXES: tuple[str, ...] = ("shardsession_", "ss")


class ServerUnavailable(RuntimeError):
    """No server of this kind could be found or started; ``str(exc)`` is the reason."""


class ServerStartError(ServerUnavailable):
    """A server process was launched but did not become ready (the message holds its log tail)."""


# --------------------------------------------------------------------------------------------
# helpers


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _find_binary(name: str, candidates: list[str]) -> str | None:
    for pattern in candidates:
        hits = sorted(glob.glob(pattern), reverse=True)  # newest version first
        for hit in hits:
            if os.access(hit, os.X_OK):
                return hit
    return shutil.which(name)


def postgres_bindir() -> Path | None:
    """Folder holding ``initdb`` and ``postgres`` (env ``SHARDSESSION_PG_BINDIR`` wins)."""
    env = os.environ.get("SHARDSESSION_PG_BINDIR")
    if env:
        ok = all(os.access(Path(env) / b, os.X_OK) for b in ("initdb", "postgres"))
        return Path(env) if ok else None
    found = _find_binary(
        "initdb",
        ["/usr/lib/postgresql/15/bin/initdb", "/usr/lib/postgresql/*/bin/initdb",
         "/usr/pgsql-*/bin/initdb", "/usr/local/pgsql/bin/initdb"],
    )
    if found and os.access(Path(found).parent / "postgres", os.X_OK):
        return Path(found).parent
    return None


def mariadb_binaries() -> tuple[str, str] | None:
    """``(mariadbd, mariadb-install-db)`` paths, or None (env ``SHARDSESSION_MARIADB_BINDIR``
    names a folder holding both)."""
    env = os.environ.get("SHARDSESSION_MARIADB_BINDIR")
    if env:
        d = Path(env)
        pairs = [(d / "mariadbd", d / "mariadb-install-db"), (d / "mysqld", d / "mysql_install_db")]
        for srv, inst in pairs:
            if os.access(srv, os.X_OK) and os.access(inst, os.X_OK):
                return str(srv), str(inst)
        return None
    server = _find_binary("mariadbd", ["/usr/sbin/mariadbd", "/usr/sbin/mysqld"])
    installer = shutil.which("mariadb-install-db") or shutil.which("mysql_install_db")
    if installer is None and os.access("/usr/bin/mariadb-install-db", os.X_OK):
        installer = "/usr/bin/mariadb-install-db"
    if server and installer:
        return server, installer
    return None


def _run_as(user: str) -> dict[str, Any]:
    """Popen keyword arguments that drop to ``user`` when we are root (else nothing)."""
    if os.geteuid() != 0:
        return {}
    try:
        pw = pwd.getpwnam(user)
    except KeyError as exc:
        raise ServerUnavailable(f"running as root but there is no {user!r} user") from exc
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


def _chown_tree(path: Path, user: str) -> None:
    if os.geteuid() != 0:
        return
    pw = pwd.getpwnam(user)
    for root, dirs, files in os.walk(path):
        os.chown(root, pw.pw_uid, pw.pw_gid)
        for name in dirs + files:
            os.lchown(os.path.join(root, name), pw.pw_uid, pw.pw_gid)


_BASE_PREFIX = "shardsession-"
_reaped = False


def _make_base(name: str) -> Path:
    global _reaped
    if not _reaped:
        _reaped = True
        reap_stale()
    base = Path(tempfile.mkdtemp(prefix=f"{_BASE_PREFIX}{name}-"))
    base.chmod(0o755)  # the server user must be able to reach its folders
    (base / "owner.pid").write_text(str(os.getpid()))
    return base


def reap_stale() -> list[Path]:
    """Kill the servers and delete the folders left by test processes that died (SIGKILL,
    OOM) before they could clean up; return the folders removed."""
    removed = []
    for base in Path(tempfile.gettempdir()).glob(f"{_BASE_PREFIX}*"):
        try:
            owner = int((base / "owner.pid").read_text())
        except (OSError, ValueError):
            continue  # not ours, or still being created
        if owner == os.getpid() or _pid_alive(owner):
            continue
        for pidfile in (base / "data" / "postmaster.pid", base / "mysqld.pid"):
            try:
                pid = int(pidfile.read_text().split()[0])
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except (OSError, ValueError, IndexError):
                continue
            if str(base).encode() in cmdline:  # really the server of that folder
                children = _children_of(pid)
                for victim in [pid, *children]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(victim, signal.SIGKILL)
                _wait_pids_gone([pid, *children], 5.0)
        shutil.rmtree(base, ignore_errors=True)
        removed.append(base)
    return removed


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<no log: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


def _children_of(pid: int) -> list[int]:
    """All descendants of ``pid`` (read from /proc before the parent dies)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # the command name is in parentheses and may contain spaces
        rest = stat[stat.rfind(b")") + 2:].split()
        parents.setdefault(int(rest[1]), []).append(int(entry))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2:][:1] != b"Z"


def _wait_pids_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = [p for p in pids if _pid_alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.01)
        alive = [p for p in alive if _pid_alive(p)]
    return alive


# Every server this process started, torn down at exit even if pytest dies half-way.
_LIVE: set[_LocalServer] = set()
_LIVE_LOCK = threading.Lock()


@atexit.register
def _teardown_all() -> None:
    with _LIVE_LOCK:
        servers = list(_LIVE)
    for server in servers:
        with contextlib.suppress(Exception):
            server.teardown()


# --------------------------------------------------------------------------------------------
# local servers


@dataclass(eq=False)
class _LocalServer:
    host: str
    port: int
    datadir: Path
    base: Path = field(repr=False)
    name: str = field(repr=False, default="server")
    controllable: bool = field(default=True, init=False)
    startup_seconds: float = field(default=0.0, init=False)
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    kind = "server"

    @property
    def logfile(self) -> Path:
        return self.base / "server.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _user(self) -> str:
        raise NotImplementedError

    def _probe(self) -> None:
        """Raise unless the server accepts a connection and answers a query."""
        raise NotImplementedError

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start (or restart, on the same port and data) the server and wait until it answers."""
        if self.is_running():
            return
        t0 = time.monotonic()
        with open(self.logfile, "ab") as logf:
            logf.write(f"\n=== harness: starting {self.kind} on port {self.port} ===\n".encode())
            logf.flush()
            self._proc = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                cwd=self.base,
                start_new_session=True,  # a Ctrl-C to pytest must not reach the server first
                **_run_as(self._user()),
            )
        with _LIVE_LOCK:
            _LIVE.add(self)
        deadline = t0 + START_TIMEOUT
        last: BaseException | None = None
        while True:
            if self._proc.poll() is not None:
                raise ServerStartError(
                    f"{self.kind} on port {self.port} exited with code {self._proc.returncode} "
                    f"during start-up; log {self.logfile}:\n{_log_tail(self.logfile)}"
                )
            try:
                self._probe()
                break
            except Exception as exc:  # not ready yet
                last = exc
            if time.monotonic() > deadline:
                self._hard_kill()
                raise ServerStartError(
                    f"{self.kind} on port {self.port} not ready after {START_TIMEOUT:.0f} s "
                    f"(last error: {last}); log {self.logfile}:\n{_log_tail(self.logfile)}"
                )
            time.sleep(0.02)
        self.startup_seconds = time.monotonic() - t0
        log.info("%s %s ready on port %d in %.2f s", self.kind, self.name, self.port,
                 self.startup_seconds)

    def _signal_stop(self, sig: int) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        children = _children_of(proc.pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            log.warning("%s on port %d ignored signal %d; killing it", self.kind, self.port, sig)
            self._hard_kill()
            return
        self._reap(children)

    def _reap(self, children: list[int]) -> None:
        # Children outliving the parent would keep the port or shared memory busy.
        for pid in _wait_pids_gone(children, 5.0):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _wait_pids_gone(children, 5.0)

    def _hard_kill(self) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        children = _children_of(proc.pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _wait_pids_gone(children, 5.0)

    def kill(self) -> None:
        """Crash the server: SIGKILL the server process (and whatever it forked)."""
        self._hard_kill()

    def teardown(self) -> None:
        """Stop the server (fast) and delete its folder."""
        try:
            if self.is_running():
                self._signal_stop(signal.SIGINT if self.kind == "postgresql" else signal.SIGTERM)
        finally:
            self._hard_kill()
            with _LIVE_LOCK:
                _LIVE.discard(self)
            shutil.rmtree(self.base, ignore_errors=True)


@dataclass(eq=False)
class PostgresServer(_LocalServer):
    """A PostgreSQL cluster of our own; superuser ``postgres``, trust authentication."""

    settings: dict[str, str] = field(default_factory=dict, repr=False)
    bindir: Path = field(default=Path("/usr/lib/postgresql/15/bin"), repr=False)

    kind = "postgresql"

    @property
    def sockdir(self) -> Path:
        return self.base / "sock"

    def _user(self) -> str:
        return "postgres"

    def _command(self) -> list[str]:
        cmd = [str(self.bindir / "postgres"), "-D", str(self.datadir), "-p", str(self.port)]
        for key, value in self.settings.items():
            cmd += ["-c", f"{key}={value}"]
        return cmd

    def _probe(self) -> None:
        import psycopg2

        conn = psycopg2.connect(host=self.host, port=self.port, user="postgres",
                                dbname="postgres", connect_timeout=2)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
        finally:
            conn.close()

    def url(self, database: str = "postgres") -> str:
        return f"{PG_DRIVERNAME}://postgres@{self.host}:{self.port}/{database}"

    def create_database(self, name: str | None = None) -> str:
        return _pg_create_database(self.host, self.port, "postgres", None, name, self.url)

    def drop_database(self, name: str) -> None:
        _pg_drop_database(self.host, self.port, "postgres", None, name)

    def stop(self, mode: str = "fast") -> None:
        """Stop like ``pg_ctl stop -m smart|fast|immediate`` (immediate = crash-like)."""
        sig = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}
        if mode not in sig:
            raise ValueError(f"unknown stop mode {mode!r}")
        self._signal_stop(sig[mode])


@dataclass(eq=False)
class MariaDBServer(_LocalServer):
    """A MariaDB server of our own; ``root`` with an empty password over TCP."""

    mariadbd: str = field(default="/usr/sbin/mariadbd", repr=False)
    options: list[str] = field(default_factory=list, repr=False)

    kind = "mariadb"

    def _user(self) -> str:
        return "mysql"

    def _command(self) -> list[str]:
        return [self.mariadbd, "--no-defaults", *self.options, f"--port={self.port}"]

    def _connect(self, database: str | None = None, **kw: Any) -> Any:
        import pymysql

        return pymysql.connect(host=self.host, port=self.port, user="root", password="",
                               database=database, connect_timeout=2, **kw)

    def _probe(self) -> None:
        conn = self._connect()
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
        finally:
            conn.close()

    def url(self, database: str = "mysql") -> str:
        return f"mysql+pymysql://root@{self.host}:{self.port}/{database}"

    def create_database(self, name: str | None = None) -> str:
        return _my_create_database(self.host, self.port, "root", "", name, self.url)

    def drop_database(self, name: str) -> None:
        _my_drop_database(self.host, self.port, "root", "", name)

    def stop(self) -> None:
        """Clean shutdown (SIGTERM)."""
        self._signal_stop(signal.SIGTERM)


_PG_DEFAULTS = {
    "listen_addresses": "127.0.0.1",
    "max_connections": "200",
    "shared_buffers": "32MB",
    # Safe for process crashes (the OS keeps written WAL), not for power loss: fine for tests.
    "fsync": "off",
    "full_page_writes": "off",
    "logging_collector": "off",
    "log_min_messages": "warning",
    "log_line_prefix": "%m [%p] ",
    "timezone": "UTC",
    "max_locks_per_transaction": "128",
}


def start_postgres(
    name: str, *, max_prepared_transactions: int = 64, **settings: Any
) -> PostgresServer:
    """Initialise and start a PostgreSQL cluster in a temporary folder on a free port.

    ``settings`` become ``-c key=value`` options (e.g. ``fsync="on"``, ``max_connections=300``);
    booleans are written as on/off.
    """
    bindir = postgres_bindir()
    if bindir is None:
        raise ServerUnavailable("PostgreSQL binaries (initdb, postgres) not found")
    user_kw = _run_as("postgres")
    base = _make_base(f"pg-{name}")
    datadir = base / "data"
    try:
        (base / "sock").mkdir()
        _chown_tree(base / "sock", "postgres")
        if os.geteuid() == 0:
            os.chown(base, pwd.getpwnam("postgres").pw_uid, -1)
        init = subprocess.run(
            [str(bindir / "initdb"), "-D", str(datadir), "-U", "postgres", "-A", "trust",
             "--no-sync", "-E", "UTF8", "--locale=C"],
            stdin=subprocess.DEVNULL, capture_output=True, cwd=base, timeout=120, **user_kw,
        )
        if init.returncode != 0:
            raise ServerStartError(
                f"initdb failed ({init.returncode}):\n"
                f"{(init.stdout + init.stderr).decode(errors='replace')[-3000:]}"
            )
        conf = dict(_PG_DEFAULTS)
        conf["unix_socket_directories"] = str(base / "sock")
        conf["max_prepared_transactions"] = str(max_prepared_transactions)
        for key, value in settings.items():
            if isinstance(value, bool):
                value = "on" if value else "off"
            conf[key] = str(value)
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise
    return _start_on_free_port(
        lambda port: PostgresServer(host="127.0.0.1", port=port, datadir=datadir, base=base,
                                    name=name, settings=conf, bindir=bindir)
    )


def start_mariadb(name: str, *, log_bin: bool = False, **settings: Any) -> MariaDBServer:
    """Install and start a MariaDB server in a temporary folder on a free port.

    ``settings`` become ``--key=value`` options (underscores kept; ``True`` gives ``--key``).
    """
    binaries = mariadb_binaries()
    if binaries is None:
        raise ServerUnavailable("MariaDB binaries (mariadbd, mariadb-install-db) not found")
    mariadbd, installer = binaries
    user_kw = _run_as("mysql")
    base = _make_base(f"mariadb-{name}")
    datadir = base / "data"
    try:
        if os.geteuid() == 0:
            os.chown(base, pwd.getpwnam("mysql").pw_uid, -1)
        innodb = ["--innodb-buffer-pool-size=64M", "--innodb-log-file-size=48M"]
        inst = subprocess.run(
            [installer, "--no-defaults", f"--datadir={datadir}",
             "--auth-root-authentication-method=normal", "--skip-test-db",
             "--skip-name-resolve", *innodb],
            stdin=subprocess.DEVNULL, capture_output=True, cwd=base, timeout=180, **user_kw,
        )
        if inst.returncode != 0:
            raise ServerStartError(
                f"mariadb-install-db failed ({inst.returncode}):\n"
                f"{(inst.stdout + inst.stderr).decode(errors='replace')[-3000:]}"
            )
        opts = [
            f"--datadir={datadir}",
            f"--socket={base / 'mysqld.sock'}",
            f"--pid-file={base / 'mysqld.pid'}",
            "--bind-address=127.0.0.1",
            "--skip-name-resolve",
            *innodb,
            "--max-connections=300",
            "--character-set-server=utf8mb4",
            "--collation-server=utf8mb4_general_ci",
            "--innodb-fast-shutdown=1",
        ]
        if log_bin:
            opts += [f"--log-bin={datadir / 'binlog'}", "--server-id=1",
                     "--binlog-format=ROW"]
        for key, value in settings.items():
            key = key.replace("_", "-")
            if value is True:
                opts.append(f"--{key}")
            elif value is False:
                opts.append(f"--skip-{key}")
            else:
                opts.append(f"--{key}={value}")
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise
    return _start_on_free_port(
        lambda port: MariaDBServer(host="127.0.0.1", port=port, datadir=datadir, base=base,
                                   name=name, mariadbd=mariadbd, options=opts)
    )


def _start_on_free_port(make: Any, attempts: int = 3) -> Any:
    """Start a server, retrying on a new port if another process grabbed the one we picked."""
    for attempt in range(attempts):
        server = make(free_port())
        try:
            server.start()
            return server
        except ServerStartError as exc:
            text = str(exc).lower()
            if attempt + 1 < attempts and ("address already in use" in text
                                           or "could not create any tcp/ip" in text
                                           or "do you already have another" in text):
                server._hard_kill()
                continue
            server.teardown()
            raise
        except BaseException:
            server.teardown()
            raise
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------------------------
# databases


def _unique_db_name(prefix: str = "ss_test") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def _check_ident(name: str) -> str:
    if not name or not all(c.isalnum() or c == "_" for c in name) or len(name) > 60:
        raise ValueError(f"unsafe database name {name!r}")
    return name


def _pg_create_database(host: str, port: int, user: str, password: str | None,
                        name: str | None, make_url: Any) -> str:
    import psycopg2

    name = _check_ident(name or _unique_db_name())
    conn = psycopg2.connect(host=host, port=port, user=user, password=password,
                            dbname="postgres", connect_timeout=10)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()
    return str(make_url(name))


def _pg_drop_database(host: str, port: int, user: str, password: str | None, name: str) -> None:
    import psycopg2

    name = _check_ident(name)
    conn = psycopg2.connect(host=host, port=port, user=user, password=password,
                            dbname="postgres", connect_timeout=10)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = %s AND pid <> pg_backend_pid()", (name,))
            # WITH (FORCE) also terminates; the loop covers a session racing to connect
            for attempt in range(20):
                try:
                    cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                    return
                except psycopg2.errors.ObjectInUse:
                    if attempt == 19:
                        raise
                    time.sleep(0.1)
    finally:
        conn.close()


def _my_create_database(host: str, port: int, user: str, password: str, name: str | None,
                        make_url: Any) -> str:
    import pymysql

    name = _check_ident(name or _unique_db_name())
    conn = pymysql.connect(host=host, port=port, user=user, password=password,
                           connect_timeout=10)
    try:
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
    finally:
        conn.close()
    return str(make_url(name))


def _my_drop_database(host: str, port: int, user: str, password: str, name: str) -> None:
    import pymysql

    name = _check_ident(name)
    conn = pymysql.connect(host=host, port=port, user=user, password=password,
                           connect_timeout=10)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT id FROM information_schema.processlist "
                        "WHERE db = %s AND id <> CONNECTION_ID()", (name,))
            for (pid,) in cur.fetchall():
                with contextlib.suppress(pymysql.MySQLError):
                    cur.execute(f"KILL CONNECTION {int(pid)}")
            # a prepared XA branch holding a metadata lock must not hang the suite
            cur.execute("SET SESSION lock_wait_timeout = 10")
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
    finally:
        conn.close()


# --------------------------------------------------------------------------------------------
# servers someone else runs


@dataclass(eq=False)
class ExternalServer:
    """A server given by URL (environment or docker): usable, but not ours to stop or kill."""

    base_url: str
    controllable: bool = field(default=False, init=False)
    kind: str = field(default="", init=False)
    startup_seconds: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        from sqlalchemy.engine import make_url

        u = make_url(self.base_url)
        self._url = u
        backend = u.get_backend_name()
        if backend == "postgresql":
            self.kind = "postgresql"
            # a plain postgresql:// URL, or any when SHARDSESSION_PG_DRIVER asks for a driver
            if u.drivername == "postgresql" or "SHARDSESSION_PG_DRIVER" in os.environ:
                self._url = u.set(drivername=PG_DRIVERNAME)
        elif backend in ("mysql", "mariadb"):
            self.kind = "mariadb"
            if "+" not in u.drivername:
                self._url = u.set(drivername=f"{backend}+pymysql")
        else:
            raise ValueError(f"unsupported server URL backend {backend!r}")

    @property
    def host(self) -> str:
        return self._url.host or "127.0.0.1"

    @property
    def port(self) -> int:
        return self._url.port or (5432 if self.kind == "postgresql" else 3306)

    @property
    def default_database(self) -> str:
        return self._url.database or ("postgres" if self.kind == "postgresql" else "mysql")

    def url(self, database: str | None = None) -> str:
        return self._url.set(database=database or self.default_database).render_as_string(
            hide_password=False)

    def create_database(self, name: str | None = None) -> str:
        u = self._url
        if self.kind == "postgresql":
            return _pg_create_database(self.host, self.port, u.username or "postgres",
                                       u.password, name, self.url)
        return _my_create_database(self.host, self.port, u.username or "root",
                                   u.password or "", name, self.url)

    def drop_database(self, name: str) -> None:
        u = self._url
        if self.kind == "postgresql":
            _pg_drop_database(self.host, self.port, u.username or "postgres", u.password, name)
        else:
            _my_drop_database(self.host, self.port, u.username or "root", u.password or "", name)

    def is_running(self) -> bool:
        return True

    def _not_ours(self, *args: Any, **kw: Any) -> None:
        raise ServerUnavailable(f"{self.kind} at {self.host}:{self.port} is external "
                                "(controllable = False): cannot stop, start or kill it")

    stop = start = kill = _not_ours

    def teardown(self) -> None:
        pass


# --------------------------------------------------------------------------------------------
# docker


_COMPOSE_FILE = Path(__file__).resolve().parents[2] / "docker-compose.yml"
_COMPOSE_PROJECT = "shardsession-tests"
# published ports in docker-compose.yml
_DOCKER_URLS = {
    "pg1": f"{PG_DRIVERNAME}://postgres@127.0.0.1:55432/postgres",
    "pg2": f"{PG_DRIVERNAME}://postgres@127.0.0.1:55433/postgres",
    "mysql": "mysql+pymysql://root@127.0.0.1:53307/mysql",
}
_docker_state: dict[str, Any] = {}


def docker_available() -> bool:
    """True when a docker engine answers ``docker info`` (``SHARDSESSION_NO_DOCKER=1``: never)."""
    if os.environ.get("SHARDSESSION_NO_DOCKER") or shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=15).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _docker_up() -> None:
    """``docker compose up --wait`` once per process (what pytest-docker does, minus pytest)."""
    if "error" in _docker_state:
        raise ServerUnavailable(_docker_state["error"])
    if _docker_state.get("up"):
        return
    cmd = ["docker", "compose", "-f", str(_COMPOSE_FILE), "-p", _COMPOSE_PROJECT]
    try:
        res = subprocess.run([*cmd, "up", "-d", "--wait"], capture_output=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as exc:
        _docker_state["error"] = f"docker compose up failed: {exc}"
        raise ServerUnavailable(_docker_state["error"]) from exc
    if res.returncode != 0:
        _docker_state["error"] = ("docker compose up failed: "
                                  + res.stderr.decode(errors="replace")[-2000:])
        raise ServerUnavailable(_docker_state["error"])
    _docker_state["up"] = True
    atexit.register(lambda: subprocess.run([*cmd, "down", "-v"], capture_output=True,
                                           timeout=120, check=False))


# --------------------------------------------------------------------------------------------
# slots: pg1, pg2, mysql


Server = PostgresServer | MariaDBServer | ExternalServer

_slots: dict[str, Server] = {}
_slot_errors: dict[str, str] = {}
_slots_lock = threading.Lock()


def get_server(slot: str) -> Server:
    """The server for ``slot`` ("pg1", "pg2" or "mysql"), found or started once per process.

    :raises ServerUnavailable: with the reason (remembered: later calls fail the same way fast).
    """
    if slot not in ENV_URLS:
        raise ValueError(f"unknown server slot {slot!r}")
    with _slots_lock:
        if slot in _slots:
            return _slots[slot]
        if slot in _slot_errors:
            raise ServerUnavailable(_slot_errors[slot])
        try:
            server = _find_or_start(slot)
        except ServerUnavailable as exc:
            _slot_errors[slot] = str(exc)
            raise
        _slots[slot] = server
        return server


def _find_or_start(slot: str) -> Server:
    env_url = os.environ.get(ENV_URLS[slot])
    if env_url:
        return ExternalServer(env_url)
    reasons: list[str] = []
    try:
        if slot == "mysql":
            return start_mariadb(slot)
        return start_postgres(slot, max_prepared_transactions=64)
    except ServerStartError:
        raise  # binaries exist but are broken: say so rather than fall through to docker
    except ServerUnavailable as exc:
        reasons.append(str(exc))
    if docker_available():
        _docker_up()
        return ExternalServer(_DOCKER_URLS[slot])
    reasons.append("no docker engine")
    return _raise(f"no {slot} server: set {ENV_URLS[slot]}, install the server binaries "
                  f"(.ci/install-servers.sh) or run a docker engine ({'; '.join(reasons)})")


def _raise(msg: str) -> Any:
    raise ServerUnavailable(msg)


@dataclass
class ServerSet:
    """What :func:`find_or_start_servers` found: a server or None per slot, and reasons."""

    pg1: Server | None = None
    pg2: Server | None = None
    mysql: Server | None = None
    reasons: dict[str, str] = field(default_factory=dict)

    @property
    def reason(self) -> str | None:
        """All failures in one string, or None when every requested slot has a server."""
        if not self.reasons:
            return None
        return "; ".join(f"{k}: {v}" for k, v in self.reasons.items())

    def close(self) -> None:
        shutdown_servers()


def find_or_start_servers(slots: tuple[str, ...] = ("pg1", "pg2", "mysql")) -> ServerSet:
    """Find or start a server per slot; a slot that fails is None with its reason recorded."""
    result = ServerSet()
    for slot in slots:
        try:
            setattr(result, slot, get_server(slot))
        except ServerUnavailable as exc:
            result.reasons[slot] = str(exc)
    return result


def forget_server(slot: str) -> None:
    """Tear down the server of ``slot`` if we started it, and forget it (and any error)."""
    with _slots_lock:
        server = _slots.pop(slot, None)
        _slot_errors.pop(slot, None)
    if server is not None and server.controllable:
        server.teardown()


def shutdown_servers() -> None:
    """Tear down every server this process started (idempotent)."""
    with _slots_lock:
        _slots.clear()
        _slot_errors.clear()
    _teardown_all()


# --------------------------------------------------------------------------------------------
# prepared transactions


def _prefix_ok(xid: bytes, prefixes: tuple[str | bytes, ...] | None) -> bool:
    if prefixes is None:
        return True
    return any(xid.startswith(p.encode() if isinstance(p, str) else p) for p in prefixes)


def list_prepared(url: str) -> list[Any]:
    """Prepared transactions visible from ``url``.

    PostgreSQL: GIDs (str) of the current database.  MariaDB: ``(formatID, gtrid, bqual)``
    tuples with bytes gtrid/bqual (XA is server-wide).
    """
    from sqlalchemy.engine import make_url

    u = make_url(url)
    if u.get_backend_name() == "postgresql":
        import psycopg2

        conn = psycopg2.connect(host=u.host, port=u.port, user=u.username, password=u.password,
                                dbname=u.database, connect_timeout=10)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SELECT gid FROM pg_prepared_xacts "
                            "WHERE database = current_database() ORDER BY prepared")
                return [row[0] for row in cur.fetchall()]
        finally:
            conn.close()
    conn = _my_raw(u)
    try:
        return _xa_recover(conn)
    finally:
        conn.close()


def _my_raw(u: Any) -> Any:
    import pymysql

    return pymysql.connect(host=u.host, port=u.port or 3306, user=u.username or "root",
                           password=u.password or "", database=u.database,
                           connect_timeout=10, autocommit=True)


def _xa_recover(conn: Any) -> list[tuple[int, bytes, bytes]]:
    out = []
    with conn.cursor() as cur:
        cur.execute("XA RECOVER")
        for format_id, gtrid_len, bqual_len, data in cur.fetchall():
            if isinstance(data, str):  # decoded by the driver: undo it losslessly
                data = data.encode("utf-8", "surrogateescape")
            g, b = int(gtrid_len), int(bqual_len)
            out.append((int(format_id), bytes(data[:g]), bytes(data[g:g + b])))
    return out


def xa_xid_sql(format_id: int, gtrid: bytes, bqual: bytes) -> str:
    """An XA xid as SQL text built only from hex literals and an integer (no quoting needed)."""
    fmt = int(format_id)
    g = "X'" + gtrid.hex() + "'" if gtrid else "''"
    b = "X'" + bqual.hex() + "'" if bqual else "''"
    return f"{g},{b},{fmt}"


def clear_prepared(
    url: str, prefixes: tuple[str | bytes, ...] | None = DEFAULT_XID_PREFIXES
) -> list[Any]:
    """Roll back leftover prepared transactions; return what was rolled back.

    PostgreSQL: rows of ``pg_prepared_xacts`` in the URL's database whose GID starts with one
    of ``prefixes`` (``None``: all of them).  MariaDB: ``XA RECOVER`` then ``XA ROLLBACK`` of
    the xids whose gtrid starts with one of ``prefixes`` (``None``: all, server-wide).  A
    transaction finished by someone else meanwhile is ignored.
    """
    from sqlalchemy.engine import make_url

    u = make_url(url)
    done: list[Any] = []
    if u.get_backend_name() == "postgresql":
        import psycopg2

        conn = psycopg2.connect(host=u.host, port=u.port, user=u.username, password=u.password,
                                dbname=u.database, connect_timeout=10)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SELECT gid FROM pg_prepared_xacts "
                            "WHERE database = current_database()")
                for (gid,) in cur.fetchall():
                    if not _prefix_ok(gid.encode(), prefixes):
                        continue
                    try:
                        # client-side quoting by psycopg2: the GID is data, never SQL text
                        cur.execute("ROLLBACK PREPARED %s", (gid,))
                        done.append(gid)
                    except psycopg2.errors.UndefinedObject:
                        pass  # 42704: finished meanwhile
        finally:
            conn.close()
        return done
    import pymysql

    conn = _my_raw(u)
    try:
        with conn.cursor() as cur:
            for format_id, gtrid, bqual in _xa_recover(conn):
                if not _prefix_ok(gtrid, prefixes):
                    continue
                try:
                    cur.execute("XA ROLLBACK " + xa_xid_sql(format_id, gtrid, bqual))
                    done.append((format_id, gtrid, bqual))
                except pymysql.MySQLError as exc:
                    if exc.args and exc.args[0] == 1397:  # XAER_NOTA: finished meanwhile
                        continue
                    raise
    finally:
        conn.close()
    return done
