"""Participant faults mid-protocol: a server crashed and restarted, or a session killed.

Server crash: PostgreSQL stopped with ``pg_ctl stop -m immediate`` (SIGQUIT), MariaDB
SIGKILLed, at a protocol step (the coordinator's ``crash_point`` hook runs in-process), then
restarted. Session kill: ``pg_terminate_backend`` / ``KILL CONNECTION`` of the coordinator's
own branch session at the same steps. Each time the client gets the exception class that
matches the outcome, recovery converges to all-or-nothing, nothing of ours stays in doubt,
and a commit the client saw succeed before the fault is still there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pymysql
import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session

from shardsession.coordinator import TransactionCoordinator, in_doubt, recover
from shardsession.exc import CommitIncomplete, OutcomeUnknown, PrepareFailed

from ._2pc_child import tables
from .test_crash_matrix import rows

pytestmark = pytest.mark.crash

# point -> (crash_point name, victim role, exception the client gets, outcome)
POINTS: dict[str, tuple[str, str, type[Exception], int]] = {
    # the victim's branch is active (not prepared): its work is lost, nothing commits
    "before_prepare": ("after_writes", "participant", PrepareFailed, 0),
    # the victim prepared; the decision commits elsewhere; COMMIT PREPARED cannot reach it
    "after_prepare": ("after_prepare", "participant", CommitIncomplete, 1),
    # decision durable, the victim dies before its COMMIT PREPARED
    "commit_phase": ("after_decision_commit", "participant", CommitIncomplete, 1),
    # the decider dies with the decision uncommitted: the reply never comes
    "decider": ("before_decision_commit", "decider", OutcomeUnknown, 0),
}


@pytest.fixture
def shards(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """alpha on PostgreSQL (pg_server_a), beta on MariaDB, with their servers."""
    urls = {"alpha": request.getfixturevalue("pg_url_a"),
            "beta": request.getfixturevalue("mariadb_url")}
    servers = {"alpha": request.getfixturevalue("pg_server_a"),
               "beta": request.getfixturevalue("mariadb_server")}
    md, _ = tables(list(urls))
    for url in urls.values():
        e = create_engine(url)
        md.create_all(e)
        e.dispose()
    yield {"urls": urls, "servers": servers}
    for s in servers.values():
        if s.controllable and not s.is_running():
            s.start()


def _backend_pid(s: Session, engine: Engine) -> int:
    conn = s.connection(bind_arguments={"bind": engine})
    sql = "SELECT pg_backend_pid()" if engine.dialect.name == "postgresql" \
        else "SELECT CONNECTION_ID()"
    return int(conn.exec_driver_sql(sql).scalar_one())


def _kill_session(url: str, pid: int) -> None:
    u = make_url(url)
    if u.get_backend_name() == "postgresql":
        import psycopg2

        c = psycopg2.connect(host=u.host, port=u.port, user=u.username, dbname=u.database)
        try:
            c.autocommit = True
            with c.cursor() as cur:
                cur.execute("SELECT pg_terminate_backend(%s)", (pid,))
        finally:
            c.close()
        return
    c = pymysql.connect(host=u.host, port=u.port or 3306, user=u.username or "root",
                        password=u.password or "", autocommit=True)
    try:
        with c.cursor() as cur:
            cur.execute(f"KILL CONNECTION {int(pid)}")
    finally:
        c.close()


def _crash_server(server: Any) -> None:
    if server.kind == "postgresql":
        server.stop("immediate")
    else:
        server.kill()


def _commit(urls: dict[str, str], decider: str, key: int,
            fault: Callable[[str, dict[str, int]], None] | None = None) -> None:
    """One transaction writing ``key`` on both shards; the decider begins first."""
    engines = {n: create_engine(u) for n, u in urls.items()}
    _md, tbl = tables(list(urls))
    pids: dict[str, int] = {}
    coord = TransactionCoordinator(
        decider=decider,
        crash_point=(lambda point: fault(point, pids)) if fault else None,
    )
    try:
        s = Session()
        coord.install(s, {e: n for n, e in engines.items()}.__getitem__)
        order = [decider, *(n for n in engines if n != decider)]
        for n in order:
            pids[n] = _backend_pid(s, engines[n])
            s.connection(bind_arguments={"bind": engines[n]}).execute(
                tbl[n].insert().values(id=key, v="x"))
        try:
            s.commit()
        finally:
            s.close()
    finally:
        coord.close()
        for e in engines.values():
            e.dispose()


@pytest.mark.parametrize("point", list(POINTS))
@pytest.mark.parametrize("victim", ["alpha", "beta"], ids=["pg", "mariadb"])
@pytest.mark.parametrize("kind", ["server", "session"])
def test_participant_fault(shards: dict[str, Any], kind: str, victim: str, point: str) -> None:
    urls, servers = shards["urls"], shards["servers"]
    server = servers[victim]
    if kind == "server" and not server.controllable:
        pytest.skip(f"{server.kind} is external (controllable = False): cannot crash it")
    step, role, exc, outcome = POINTS[point]
    other = "beta" if victim == "alpha" else "alpha"
    decider = victim if role == "decider" else other

    _commit(urls, decider, key=1)  # a commit the client saw succeed before the fault
    fired: list[str] = []

    def fault(name: str, pids: dict[str, int]) -> None:
        if fired or name.split(":")[0] != step:
            return
        fired.append(name)
        if kind == "server":
            _crash_server(server)
        else:
            _kill_session(urls[victim], pids[victim])

    with pytest.raises(exc) as ei:
        _commit(urls, decider, key=2, fault=fault)
    assert fired and ei.value.gtrid
    if kind == "server":
        server.start()
    engines = {n: create_engine(u) for n, u in urls.items()}
    try:
        report = recover(engines, grace_period=0)
        assert not report.errors, report.errors
        assert in_doubt(engines) == []
        assert rows(engines, 2) == dict.fromkeys(engines, outcome), report
        assert rows(engines, 1) == dict.fromkeys(engines, 1)
        assert recover(engines, grace_period=0).resolved
    finally:
        for e in engines.values():
            e.dispose()
    _commit(urls, decider, key=3)  # the restarted servers take new work


@pytest.mark.parametrize("delay", [0.0, 0.3], ids=["racing", "after_it_ran"])
def test_mariadb_decider_killed_mid_commit(shards: dict[str, Any], delay: float,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """MariaDB decides (beta, first, no XA), PostgreSQL alpha is prepared. The decider's
    COMMIT is sent and mariadbd is SIGKILLed before its reply is read: at once (racing
    the COMMIT) or 0.3 s later (it ran). The client gets OutcomeUnknown if the reply
    was lost; after the restart, the decision row is there or not, and recovery makes
    both shards agree with it: all or nothing. When the reply was read before the
    connection died, commit() returns or raises CommitIncomplete ("is committed"):
    before, SQLAlchemy's own end of the dead connection raised a bare OperationalError
    over a committed transaction."""
    import time

    import pymysql.connections
    from pymysql.constants import COMMAND

    urls, servers = shards["urls"], shards["servers"]
    server = servers["beta"]
    if not server.controllable:
        pytest.skip("MariaDB is external (controllable = False): cannot crash it")
    _commit(urls, "beta", key=1)
    armed: list[bool] = []
    real_commit = pymysql.connections.Connection.commit

    def commit_then_crash(self: Any) -> None:
        if not armed:
            return real_commit(self)
        armed.clear()
        # pymysql's own commit() is these two steps; the crash comes between them
        self._execute_command(COMMAND.COM_QUERY, "COMMIT")
        time.sleep(delay)
        server.kill()
        self._read_ok_packet()  # raises unless the reply arrived before the kill

    def fault(name: str, pids: dict[str, int]) -> None:
        if name.split(":")[0] == "before_decision_commit":
            armed.append(True)

    monkeypatch.setattr(pymysql.connections.Connection, "commit", commit_then_crash)
    unknown: OutcomeUnknown | None = None
    try:
        _commit(urls, "beta", key=2, fault=fault)
    except OutcomeUnknown as e:  # the COMMIT's reply was lost with the server
        unknown = e
    except CommitIncomplete as e:  # the reply came, then SQLAlchemy's end failed
        assert "is committed" in str(e) and not e.pending_shards
    monkeypatch.undo()
    assert not armed and not server.is_running()
    server.start()
    engines = {n: create_engine(u) for n, u in urls.items()}
    try:
        decided = "C"  # the reply came before the server died: committed
        if unknown is not None:
            with engines["beta"].connect() as c:
                decided = c.exec_driver_sql(
                    "SELECT outcome FROM shardsession_decisions WHERE gtrid = %s",
                    (unknown.gtrid,)).scalar()
        want = 1 if decided == "C" else 0
        if delay:
            assert want == 1  # the COMMIT ran before the crash: durable
        report = recover(engines, grace_period=0)
        assert not report.errors, report.errors
        assert in_doubt(engines) == []
        assert rows(engines, 2) == dict.fromkeys(engines, want), (decided, report)
        assert rows(engines, 1) == dict.fromkeys(engines, 1)
        assert recover(engines, grace_period=0).resolved
    finally:
        for e in engines.values():
            e.dispose()
    _commit(urls, "beta", key=3)  # the restarted server takes new work
