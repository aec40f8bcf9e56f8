"""Recovery against planted state: decisions to follow, claims, orphans, foreign and hostile
prepared transactions (which must be left untouched and never executed)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from harness.servers import client_cursor
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

from shardsession.backends import adapter_for
from shardsession.coordinator import in_doubt, recover
from shardsession.coordinator.identity import ensure_identity
from shardsession.coordinator.xid import Xid, new_cluster_id, new_gtrid

from .conftest import prepared_gids, row_ids


@pytest.fixture
def pg(pg_url_a: str, pg_url_b: str) -> Iterator[dict[str, Engine]]:
    engines = {"alpha": create_engine(pg_url_a), "beta": create_engine(pg_url_b)}
    for e in engines.values():
        with e.begin() as c:
            c.exec_driver_sql("CREATE TABLE t (id int primary key)")
    yield engines
    for e in engines.values():
        e.dispose()


def identity(engine: Engine) -> str:
    """The cluster identity of ``engine``'s database (stored now if it has none)."""
    return ensure_identity(adapter_for(engine.dialect.name), engine)[0]


def gtrid_of(engine: Engine, decider: str, now: float | None = None) -> str:
    """A gtrid of the cluster whose decider ``decider`` is ``engine``'s database."""
    return new_gtrid(decider, cluster=identity(engine), now=now)


def plant_pg(engine: Engine, gid: str, row: int | None = None) -> None:
    raw: Any = engine.raw_connection()
    try:
        cur = client_cursor(raw.dbapi_connection)
        cur.execute("INSERT INTO t VALUES (%s)" if row is not None else "SELECT 1",
                    (row,) if row is not None else None)
        cur.execute("PREPARE TRANSACTION %s", (gid,))
        raw.commit()
    finally:
        raw.close()


def rollback_pg(engine: Engine, to_finish: list[str]) -> None:
    """ROLLBACK PREPARED each GID (bound on the client: the statement takes no server-side
    parameters, which psycopg 3's default cursor would send)."""
    raw: Any = engine.raw_connection()
    try:
        raw.dbapi_connection.autocommit = True
        cur = client_cursor(raw.dbapi_connection)
        for gid in to_finish:
            cur.execute("ROLLBACK PREPARED %s", (gid,))
        raw.dbapi_connection.autocommit = False
    finally:
        raw.close()


def decide(engine: Engine, gtrid: str, outcome: str) -> None:
    with engine.begin() as c:
        c.exec_driver_sql(
            "CREATE TABLE IF NOT EXISTS shardsession_decisions (gtrid varchar(64) primary key,"
            " outcome char(1) not null, decided_at double precision not null,"
            " participants varchar(4000) not null default '')")
        c.execute(text("INSERT INTO shardsession_decisions VALUES (:g, :o, 0, '')"),
                  {"g": gtrid, "o": outcome})


def test_follow_claim_orphan_and_grace(pg: dict[str, Engine]) -> None:
    a, b = pg["alpha"], pg["beta"]
    old = time.time() - 3600
    g_commit = gtrid_of(a, "alpha", now=old)
    g_abort = gtrid_of(a, "alpha", now=old)
    g_orphan = gtrid_of(a, "alpha", now=old)
    g_undecided = gtrid_of(a, "alpha", now=old)
    g_young = gtrid_of(a, "alpha")
    plant_pg(b, Xid.branch(g_commit, 1).gid, 1)
    plant_pg(b, Xid.branch(g_abort, 1).gid, 2)
    plant_pg(b, Xid.branch(g_undecided, 1).gid, 3)
    plant_pg(b, Xid.branch(g_young, 1).gid, 4)
    decide(a, g_commit, "C")
    decide(a, g_abort, "A")
    decide(a, g_orphan, "C")
    report = recover(pg, grace_period=60)
    assert {r.gtrid for r in report.committed} == {g_commit}
    assert {r.gtrid for r in report.rolled_back} == {g_abort, g_undecided}
    assert [r.gtrid for r, _ in report.left_alone] == [g_young]
    assert not report.resolved  # something of ours is still in doubt
    assert row_ids(b) == {1}
    assert prepared_gids(b) == {Xid.branch(g_young, 1).gid}
    with a.connect() as c:
        rows = dict(c.exec_driver_sql("SELECT gtrid, outcome FROM shardsession_decisions").all())
    # the orphan went; the claim for g_undecided is kept (abort retention)
    assert g_orphan not in rows and rows[g_undecided] == "A"
    # next pass: committed/aborted rows whose branches are gone are collected
    report = recover(pg, grace_period=0)
    assert {r.gtrid for r in report.rolled_back} == {g_young}
    report = recover(pg, grace_period=0, abort_retention=0)
    assert report.resolved
    with a.connect() as c:
        assert c.exec_driver_sql("SELECT count(*) FROM shardsession_decisions").scalar() == 0
    assert in_doubt(pg) == []


HOSTILE_PG = [
    "other_app_42",
    "ss1.'; DROP TABLE t; --",
    "ss1.\\'\\\\",
    "ss1.x\nCOMMIT PREPARED 'y'",
    "ss1." + "9" * 190,
    Xid.branch(new_gtrid("alpha", cluster=new_cluster_id(), now=1), 0).gid + ";",
]


def test_foreign_and_hostile_pg_untouched(pg: dict[str, Engine], pg_server_a: Any) -> None:
    b = pg["beta"]
    for gid in HOSTILE_PG:
        plant_pg(b, gid)
    # ours in format, but in another database of the same server: not ours to finish here
    other_url = pg_server_a.create_database()
    other = create_engine(other_url)
    with other.begin() as c:
        c.exec_driver_sql("CREATE TABLE t (id int primary key)")
    foreign_db_gid = Xid.branch(gtrid_of(pg["alpha"], "alpha", now=1), 1).gid
    plant_pg(other, foreign_db_gid, 9)
    try:
        report = recover(pg, grace_period=0)
        assert report.resolved and report.foreign == len(HOSTILE_PG)
        assert prepared_gids(b) == set(HOSTILE_PG)
        assert prepared_gids(other) == {foreign_db_gid}
        assert row_ids(b) == set()
        assert in_doubt(pg) == []
    finally:
        rollback_pg(other, [foreign_db_gid])
        other.dispose()
        rollback_pg(b, HOSTILE_PG)


def test_mariadb_foreign_hostile_and_unconfigured_decider(mariadb_url: str) -> None:
    e = create_engine(mariadb_url)
    with e.begin() as c:
        c.exec_driver_sql("CREATE TABLE t (id int primary key)")
    ours_unknown = Xid.branch(gtrid_of(e, "not-in-config", now=1), 0)
    planted = [
        "X'6f74686572',X'31',1",  # other application
        f"X'{b'ss2.'.hex()}27',X'3b',{ours_unknown.xa_parts[2]}",  # our formatID, hostile bytes
        f"X'{('ss2.' + 'a' * 60).encode().hex()}',X'{b'b000'.hex()}',{ours_unknown.xa_parts[2]}",
        ours_unknown.xa_literal,
    ]
    raws = []
    for xid in planted:
        raw: Any = e.raw_connection()
        cur = raw.cursor()
        cur.execute(f"XA START {xid}")
        cur.execute("XA END " + xid)
        cur.execute("XA PREPARE " + xid)
        raws.append(raw)
    try:
        report = recover({"m": e}, grace_period=0)
        assert report.foreign >= 3
        # ours by format, decider not configured: reported, never guessed
        assert [r.bqual for r, _ in report.left_alone] == ["b000"]
        assert report.errors and not report.resolved
        with e.connect() as c:
            c = c.execution_options(isolation_level="AUTOCOMMIT")
            listed = c.exec_driver_sql("XA RECOVER").all()
        assert len([r for r in listed if r[0] in (1, ours_unknown.xa_parts[2])]) >= 4
    finally:
        for raw, xid in zip(raws, planted, strict=True):
            cur = raw.cursor()
            cur.execute("XA ROLLBACK " + xid)
            raw.close()
        e.dispose()


def test_claim_does_not_hang_on_a_live_coordinator(pg: dict[str, Engine]) -> None:
    """A coordinator holds its COMMIT row uncommitted on the decider: the abort claim
    waits at most ``claim_timeout``, leaves the gtrid alone, and the next pass follows the
    decision once it commits."""
    gtrid = gtrid_of(pg["alpha"], "alpha", now=time.time() - 3600)
    decide(pg["alpha"], gtrid_of(pg["alpha"], "alpha"), "A")  # creates the table
    plant_pg(pg["beta"], Xid.branch(gtrid, 1).gid, row=7)
    with pg["alpha"].connect() as live:
        live.execute(text("INSERT INTO shardsession_decisions VALUES (:g, 'C', 0, '')"),
                     {"g": gtrid})
        t0 = time.monotonic()
        report = recover(pg, grace_period=0, claim_timeout=0.3)
        assert time.monotonic() - t0 < 5
        assert not report.errors, report.errors
        assert [reason for _r, reason in report.left_alone] == ["decision in progress"]
        live.commit()
    report = recover(pg, grace_period=0)
    assert report.resolved and len(report.committed) == 1
    assert row_ids(pg["beta"]) == {7}


def test_in_doubt_raises_recovery_error_when_a_shard_is_down(pg: dict[str, Engine]) -> None:
    from harness.servers import PG_DRIVERNAME, free_port

    from shardsession.exc import RecoveryError

    dead = create_engine(f"{PG_DRIVERNAME}://postgres@127.0.0.1:{free_port()}/x",
                         connect_args={"connect_timeout": 2})
    with pytest.raises(RecoveryError) as ei:
        in_doubt({**pg, "gone": dead})
    assert ei.value.shard_id == "gone"
    dead.dispose()
