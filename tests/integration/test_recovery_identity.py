"""Recovery and identity at the edges (issue 11 items 1, 4, 5, 6, 8): clusters sharing
servers, decision rows and their participants, ABORT claims aged by the server's clock,
MariaDB branches still attached to a live session, legacy xids, names that collide."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

from shardsession import ShardedSession
from shardsession.backends import DecisionRow, Outcome, adapter_for
from shardsession.config import Cluster
from shardsession.coordinator import in_doubt, recover
from shardsession.coordinator.decisions import admin_connection
from shardsession.coordinator.identity import ensure_identity, read_identity
from shardsession.coordinator.xid import Xid, legacy_decider_token, new_gtrid
from shardsession.exc import ConfigurationError

from .test_crash_matrix import _create, rows, run_child


@pytest.fixture
def extra_db(request: pytest.FixtureRequest) -> Callable[[Any], str]:
    """``extra_db(server)``: another database on a harness server, dropped afterwards."""

    def make(server: Any) -> str:
        from ._2pc_mixes import _drop

        url = str(server.create_database())
        request.addfinalizer(lambda: _drop(server, url))
        return url

    return make


def engines_of(urls: dict[str, str]) -> dict[str, Engine]:
    return {n: create_engine(u) for n, u in urls.items()}


def dispose(engines: dict[str, Engine]) -> None:
    for e in engines.values():
        e.dispose()


def decision_gtrids(engine: Engine) -> dict[str, str]:
    with engine.connect() as c:
        return dict(c.exec_driver_sql("SELECT gtrid, outcome FROM shardsession_decisions").all())


def xa_listed(engine: Engine) -> set[bytes]:
    with engine.connect() as c:
        c = c.execution_options(isolation_level="AUTOCOMMIT")
        return {bytes(r[3]) if not isinstance(r[3], str) else r[3].encode("latin-1")
                for r in c.exec_driver_sql("XA RECOVER").all()}


# --- item 1: two clusters with the same shard names on shared servers ------------------


def test_recovery_leaves_another_clusters_branches_and_decisions_alone(
    pg_url_a: str, mariadb_url: str, pg_server_a: Any, mariadb_server: Any,
    extra_db: Callable[[Any], str], tmp_path: Any,
) -> None:
    """X (a = MariaDB, b = PostgreSQL) and Y (a = PostgreSQL, b = MariaDB) share one
    MariaDB and one PostgreSQL server. Y crashed after deciding COMMIT (its MariaDB branch
    prepared); X crashed before deciding (its PostgreSQL branch prepared). X's recovery
    rolls back X's branch only: Y's MariaDB branch stays prepared, no row of Y's lands in
    X's decision tables, and Y's own recovery then commits it."""
    x_urls = _create({"a": mariadb_url, "b": pg_url_a})
    y_urls = _create({"a": extra_db(pg_server_a), "b": extra_db(mariadb_server)})
    assert run_child({"urls": y_urls, "crash": "after_decision_commit",
                      "key": 5}).returncode == -signal.SIGKILL
    assert run_child({"urls": x_urls, "crash": "after_all_prepared",
                      "key": 6}).returncode == -signal.SIGKILL
    x, y = engines_of(x_urls), engines_of(y_urls)
    try:
        y_branches = {b for b in xa_listed(y["b"]) if b.startswith(b"ss")}
        assert len(y_branches) == 1  # Y's MariaDB branch (X's first branch has no XA)
        from .test_cli import cli, write_config

        done = cli("recover", "--config", str(write_config(tmp_path / "x.toml", x_urls)),
                   "--grace", "0")
        assert done.returncode == 0, done.stdout + done.stderr  # foreign is not in doubt
        assert "foreign (not touched)" in done.stdout and "rolled_back=1" in done.stdout
        assert "committed=0" in done.stdout and "already_finished=0" in done.stdout
        report = recover(x, grace_period=0)  # a second pass: nothing of X's left
        assert not report.errors, report.errors
        assert report.resolved and not report.rolled_back and not report.committed
        assert report.foreign >= 1
        assert y_branches <= xa_listed(x["a"])  # same server: still prepared, untouched
        # X's tables hold X's claim only; Y's decision is Y's
        assert all(g not in decision_gtrids(x["a"]) for g in decision_gtrids(y["a"]))
        assert list(decision_gtrids(y["a"]).values()) == ["C"]
        assert rows(x, 6) == {"a": 0, "b": 0}
        assert [b.shard for b in in_doubt(x)] == []
        assert [b.shard for b in in_doubt(y)] == ["b"]
        # Y's recovery finishes Y's transaction as Y decided
        report = recover(y, grace_period=0)
        assert report.resolved and [r.shard for r in report.committed] == ["b"]
        assert rows(y, 5) == {"a": 1, "b": 1}
        assert not any(b.startswith(b"ss") for b in xa_listed(y["b"]))
    finally:
        dispose(x)
        dispose(y)


def _decisions_or_none(engine: Engine) -> dict[str, str]:
    from shardsession.coordinator.decisions import read_all

    return {r.gtrid: r.outcome for r in read_all(adapter_for("mysql"), engine)}


def _copy_cluster_table(source_url: str, target_url: str) -> None:
    """What restoring a dump of ``source``'s database as ``target`` does to the cluster
    table (both on one MariaDB server): the same row, every column."""
    src = create_engine(source_url).url.database
    dst = create_engine(target_url)
    try:
        with dst.begin() as c:
            c.exec_driver_sql(f"CREATE TABLE shardsession_cluster LIKE {src}.shardsession_cluster")
            c.exec_driver_sql(f"INSERT INTO shardsession_cluster "
                              f"SELECT * FROM {src}.shardsession_cluster")
    finally:
        dst.dispose()


def test_a_copied_decider_database_never_shares_its_clusters_branches(
    pg_url_a: str, mariadb_url: str, mariadb_server: Any,
    extra_db: Callable[[Any], str], tmp_path: Any,
) -> None:
    """Production X (a = MariaDB, decider; b = PostgreSQL) and staging Y restored from X's
    dump on the same MariaDB server (a = the copy, b = another MariaDB database). Y
    crashed after deciding COMMIT with its MariaDB branch prepared. X's recovery (which
    lists every XA branch of the server) must not take Y's branch for its own: before the
    fix it claimed ABORT and rolled it back, a half-commit. The copy is re-keyed on Y's
    first commit and keeps the copied identity as previous; Y's recovery commits."""
    x_urls = _create({"a": mariadb_url, "b": pg_url_a})
    x = engines_of(x_urls)
    x_identity, _ = ensure_identity(adapter_for("mysql"), x["a"])
    y_urls = _create({"a": extra_db(mariadb_server), "b": extra_db(mariadb_server)})
    _copy_cluster_table(x_urls["a"], y_urls["a"])
    y = engines_of(y_urls)
    try:
        # before Y commits anything, its copied identity is reported, never used
        with pytest.raises(ValueError, match="created in another database"):
            read_identity(adapter_for("mysql"), y["a"])
        assert recover(y, grace_period=0).errors
        assert run_child({"urls": y_urls, "crash": "after_decision_commit",
                          "key": 5}).returncode == -signal.SIGKILL
        y_branches = {b for b in xa_listed(y["b"]) if b.startswith(b"ss")}
        assert len(y_branches) == 1
        y_identity = read_identity(adapter_for("mysql"), y["a"])
        assert y_identity is not None and y_identity != x_identity
        assert all(b.startswith(b"ss2." + y_identity.encode()) for b in y_branches)
        assert read_identity(adapter_for("mysql"), x["a"]) == x_identity  # untouched

        report = recover(x, grace_period=0)
        assert not report.errors, report.errors
        assert report.resolved and not report.rolled_back and report.foreign >= 1
        assert y_branches <= xa_listed(x["a"])  # still prepared
        assert _decisions_or_none(x["a"]) == {}
        report = recover(y, grace_period=0)
        assert report.resolved, report
        assert len(report.committed) == 1  # the one prepared branch of Y's
        assert rows(y, 5) == {"a": 1, "b": 1}
    finally:
        dispose(x)
        dispose(y)


def test_branches_of_a_copied_identity_are_left_to_the_original(
    mariadb_url: str, mariadb_server: Any, extra_db: Callable[[Any], str],
) -> None:
    """The original X crashed before deciding (a MariaDB branch prepared under X's
    identity); its copy Y, re-keyed, must not claim that branch (it names Y's previous
    identity): never touched, reported as foreign (not an error: a staging copy's recovery
    must not exit 1 over production's in-flight transactions). X's own recovery rolls it
    back."""
    x_urls = _create({"a": mariadb_url, "b": extra_db(mariadb_server)})
    x = engines_of(x_urls)
    ensure_identity(adapter_for("mysql"), x["a"])
    y_urls = _create({"a": extra_db(mariadb_server), "b": extra_db(mariadb_server)})
    _copy_cluster_table(x_urls["a"], y_urls["a"])
    y = engines_of(y_urls)
    try:
        ensure_identity(adapter_for("mysql"), y["a"])  # re-keyed (create-all does this)
        assert run_child({"urls": x_urls, "crash": "after_all_prepared",
                          "key": 7}).returncode == -signal.SIGKILL
        report = recover(y, grace_period=0)
        assert not report.rolled_back and not report.committed
        assert report.foreign == 1 and not report.left_alone and not report.errors
        assert report.resolved and _decisions_or_none(y["a"]) == {}
        assert len(in_doubt(y)) == 1
        report = recover(x, grace_period=0)
        assert report.resolved and len(report.rolled_back) == 1
        assert rows(x, 7) == {"a": 0, "b": 0}
    finally:
        dispose(x)
        dispose(y)


def test_a_moved_original_finishes_its_branches_with_adopt_previous(
    mariadb_url: str, mariadb_server: Any, extra_db: Callable[[Any], str],
) -> None:
    """X decided COMMIT (MariaDB decider a) and crashed with b prepared; then its decider
    database was moved (its recorded place no longer matches: a renamed host, say) and
    re-keyed on first use. The branch names the previous identity, but the decider's table
    holds a COMMIT row for exactly its gtrid: recovery follows it (attack 11b B: a
    decision row is looked up by gtrid whatever identity it was recorded under), with or
    without adopt_previous."""
    x_urls = _create({"a": mariadb_url, "b": extra_db(mariadb_server)})
    x = engines_of(x_urls)
    try:
        old, _ = ensure_identity(adapter_for("mysql"), x["a"])
        assert run_child({"urls": x_urls, "crash": "after_decision_commit",
                          "key": 8}).returncode == -signal.SIGKILL
        with x["a"].begin() as c:  # what a move to another host looks like to the row
            c.exec_driver_sql("UPDATE shardsession_cluster SET bound_to = 'mysql:elsewhere'")
        new, _ = ensure_identity(adapter_for("mysql"), x["a"])  # first use: re-keyed
        assert new != old
        report = recover(x, grace_period=0)
        assert len(report.committed) == 1 and not report.errors, report
        assert recover(x, grace_period=0, adopt_previous=True).resolved
        assert rows(x, 8) == {"a": 1, "b": 1}
        assert in_doubt(x) == []
    finally:
        dispose(x)


def test_a_copied_sqlite_decider_file_is_rekeyed(tmp_path: Any) -> None:
    import shutil

    adapter = adapter_for("sqlite")
    original = create_engine(f"sqlite:///{tmp_path / 'prod.db'}")
    copy_path = tmp_path / "staging.db"
    try:
        first, _ = ensure_identity(adapter, original)
        original.dispose()
        shutil.copy(tmp_path / "prod.db", copy_path)
        copy = create_engine(f"sqlite:///{copy_path}")
        with pytest.raises(ValueError, match="created in another database"):
            read_identity(adapter, copy)
        second, stored_before = ensure_identity(adapter, copy)
        assert second != first and not stored_before
        assert read_identity(adapter, copy) == second
        assert ensure_identity(adapter, original) == (first, True)
        copy.dispose()
    finally:
        original.dispose()


# --- item 4: decision rows and their participants ---------------------------------------


def test_a_config_lacking_a_participant_keeps_the_decision_row(
    pg_url_a: str, pg_url_b: str, mariadb_url: str, tmp_path: Any,
) -> None:
    """COMMIT decided on alpha, branches prepared on beta and gamma. A recovery whose
    config lacks gamma commits beta but must not delete the COMMIT row (it reports it);
    a full recovery later commits gamma instead of presuming an abort."""
    urls = _create({"alpha": pg_url_a, "beta": pg_url_b, "gamma": mariadb_url})
    assert run_child({"urls": urls, "crash": "after_decision_commit",
                      "key": 3}).returncode == -signal.SIGKILL
    full = engines_of(urls)
    lagging = {n: full[n] for n in ("alpha", "beta")}
    try:
        for _ in range(2):  # the second pass sees beta finished
            report = recover(lagging, grace_period=0)
            assert not report.resolved
            assert [k[0] for k in report.decisions_kept] == ["alpha"]
            assert "not configured" in report.decisions_kept[0][2]
            assert report.decisions_deleted == 0
        assert list(decision_gtrids(full["alpha"]).values()) == ["C"]
        # the command says so too, with exit status 1
        from .test_cli import cli, write_config

        config = write_config(tmp_path / "lagging.toml",
                              {n: urls[n] for n in ("alpha", "beta")})
        done = cli("recover", "--config", str(config))
        assert done.returncode == 1 and "decision kept: alpha" in done.stdout, done.stdout
        report = recover(full, grace_period=0)
        assert not report.errors and [r.shard for r in report.committed] == ["gamma"]
        assert rows(full, 3) == {"alpha": 1, "beta": 1, "gamma": 1}
        report = recover(full, grace_period=0)
        assert report.resolved and report.decisions_deleted == 1
        assert decision_gtrids(full["alpha"]) == {}
    finally:
        dispose(full)


def test_a_participant_configured_as_another_database_keeps_the_commit_row(
    pg_url_a: str, mariadb_url: str, pg_server_a: Any, extra_db: Callable[[Any], str],
) -> None:
    """COMMIT decided on alpha (MariaDB), beta's branch prepared on PostgreSQL. A recovery
    whose config points beta at *another* database of the same server sees no branch
    there: it must keep the COMMIT row (an error naming beta), so that the recovery with
    the right config commits beta's branch instead of presuming an abort (half-commit)."""
    urls = _create({"alpha": mariadb_url, "beta": pg_url_a})
    wrong_urls = _create({"alpha": mariadb_url, "beta": extra_db(pg_server_a)})
    assert run_child({"urls": urls, "crash": "after_decision_commit",
                      "key": 4}).returncode == -signal.SIGKILL
    full, wrong = engines_of(urls), engines_of(wrong_urls)
    try:
        for _ in range(2):
            report = recover(wrong, grace_period=0)
            assert not report.resolved and report.decisions_deleted == 0
            assert [k[0] for k in report.decisions_kept] == ["alpha"]
            assert "participant shard beta" in report.decisions_kept[0][2]
            assert any("beta" in e for e in report.errors), report.errors
        assert list(decision_gtrids(full["alpha"]).values()) == ["C"]
        report = recover(full, grace_period=0)
        assert not report.errors and [r.shard for r in report.committed] == ["beta"]
        assert rows(full, 4) == {"alpha": 1, "beta": 1}
        report = recover(full, grace_period=0)
        assert report.resolved and report.decisions_deleted == 1
    finally:
        dispose(full)
        dispose(wrong)


# --- item 6: ABORT claims are aged by the claiming server's clock -----------------------


def _plant_prepared_pg(engine: Engine, gid: str, row: int) -> None:
    from harness.servers import client_cursor

    raw: Any = engine.raw_connection()
    try:
        cur = client_cursor(raw.dbapi_connection)
        cur.execute("INSERT INTO t VALUES (%s)", (row,))
        cur.execute("PREPARE TRANSACTION %s", (gid,))
        raw.commit()
    finally:
        raw.close()


@pytest.fixture
def pg2(pg_url_a: str, pg_url_b: str) -> Iterator[dict[str, Engine]]:
    engines = {"alpha": create_engine(pg_url_a), "beta": create_engine(pg_url_b)}
    for e in engines.values():
        with e.begin() as c:
            c.exec_driver_sql("CREATE TABLE t (id int primary key)")
    yield engines
    dispose(engines)


def test_abort_claims_are_aged_by_the_claim_not_the_coordinators_clock(
    pg2: dict[str, Engine],
) -> None:
    """A coordinator whose clock is ten days behind: its gtrid looks ten days old. The
    ABORT claim recovery writes must still outlive the retention counted from the claim
    (by the server's clock), or the late coordinator could commit after it was forgotten."""
    a, b = pg2["alpha"], pg2["beta"]
    cluster, _ = ensure_identity(adapter_for("postgresql"), a)
    gtrid = new_gtrid("alpha", cluster=cluster, now=time.time() - 10 * 86400)
    _plant_prepared_pg(b, Xid.branch(gtrid, 1).gid, 1)
    report = recover(pg2, grace_period=60)
    assert [r.gtrid for r in report.rolled_back] == [gtrid]
    for _ in range(2):
        report = recover(pg2, grace_period=60)  # default retention: 7 days from the claim
        assert report.resolved and report.decisions_deleted == 0
        assert decision_gtrids(a) == {gtrid: "A"}
    with a.connect() as c:
        stamped = c.scalar(text("SELECT EXTRACT(EPOCH FROM clock_timestamp()) - decided_at "
                                "FROM shardsession_decisions"))
    assert 0 <= float(stamped) < 120  # the server's clock at claim time
    # the late coordinator's decision loses to the claim that is still there
    with a.connect() as c:
        dbapi = c.connection.dbapi_connection
        with pytest.raises(Exception) as ei:
            adapter_for("postgresql").insert_decision(
                dbapi, DecisionRow(gtrid, Outcome.COMMIT, time.time(), ""))
        assert adapter_for("postgresql").is_duplicate_key(ei.value)
        dbapi.rollback()
    report = recover(pg2, grace_period=60, abort_retention=0)
    assert report.decisions_deleted == 1 and decision_gtrids(a) == {}


# --- item 8: a MariaDB branch attached to a live (hung) coordinator ----------------------


def test_unknown_xid_from_a_branch_still_attached_is_not_finished(mariadb_url: str) -> None:
    """The branch is prepared on a connection that stays open. XA COMMIT from recovery's
    connection answers 1397 "unknown XID", yet XA RECOVER lists it: recovery must report it
    in doubt (exit status 1), and finish it once the session is gone."""
    m = create_engine(mariadb_url)
    with m.begin() as c:
        c.exec_driver_sql("CREATE TABLE t (id int primary key)")
    adapter = adapter_for("mysql")
    cluster, _ = ensure_identity(adapter, m)
    gtrid = new_gtrid("m", cluster=cluster, now=time.time() - 3600)
    xid = Xid.branch(gtrid, 1)
    with admin_connection(m) as admin:
        adapter.ensure_decision_table(admin)
        adapter.insert_decision(admin, DecisionRow(gtrid, Outcome.COMMIT, time.time(),
                                                   f"b001@{_token('m')}"))
    # a DBAPI connection of its own (no pool to reset it): the coordinator's session
    cargs, cparams = m.dialect.create_connect_args(m.url)
    live: Any = m.dialect.connect(*cargs, **cparams)
    try:
        cur = live.cursor()
        cur.execute(f"XA START {xid.xa_literal}")
        cur.execute("INSERT INTO t VALUES (9)")
        cur.execute(f"XA END {xid.xa_literal}")
        cur.execute(f"XA PREPARE {xid.xa_literal}")
        report = recover({"m": m}, grace_period=0)
        assert not report.resolved
        assert not report.committed and not report.already_finished
        assert [(r.bqual, why) for r, why in report.left_alone] == [
            ("b001", "still prepared after it was finished (attached to a live session?)")]
        assert [b.xid for b in in_doubt({"m": m})] == [xid]
        assert decision_gtrids(m) == {gtrid: "C"}  # still needed
    finally:
        live.close()  # the coordinator's session ends; the branch stays prepared
    deadline = time.monotonic() + 10
    while True:
        report = recover({"m": m}, grace_period=0)
        if report.committed or time.monotonic() > deadline:
            break
        time.sleep(0.2)  # the server may take a moment to detach the branch
    assert [r.bqual for r in report.committed] == ["b001"] and report.resolved
    with m.connect() as c:
        assert c.exec_driver_sql("SELECT id FROM t").scalars().all() == [9]
    m.dispose()


def _token(shard: str) -> str:
    from shardsession.coordinator.xid import shard_token

    return shard_token(shard)


# --- legacy xids (format ss1) ------------------------------------------------------------


def test_legacy_branches_follow_their_decision_and_are_never_claimed_by_default(
    pg2: dict[str, Engine],
) -> None:
    a, b = pg2["alpha"], pg2["beta"]
    old = int(time.time()) - 3600

    def legacy() -> str:
        import secrets

        return f"ss1.{old:08x}.{legacy_decider_token('alpha')}.{secrets.token_hex(16)}"

    decided, undecided = legacy(), legacy()
    _plant_prepared_pg(b, Xid.branch(decided, 1).gid, 1)
    _plant_prepared_pg(b, Xid.branch(undecided, 1).gid, 2)
    with admin_connection(a) as admin:
        pg = adapter_for("postgresql")
        pg.ensure_decision_table(admin)
        # an old coordinator's row: participants name no shard
        pg.insert_decision(admin, DecisionRow(decided, Outcome.COMMIT, time.time(), "b001"))
    report = recover(pg2, grace_period=0)
    assert [r.gtrid for r in report.committed] == [decided]
    assert [(r.gtrid, "legacy" in why) for r, why in report.left_alone] == [(undecided, True)]
    assert not report.resolved and not report.errors
    report = recover(pg2, grace_period=0)
    assert report.legacy_rows_kept == 1 and decided in decision_gtrids(a)  # never deleted
    report = recover(pg2, grace_period=0, claim_legacy=True)
    assert [r.gtrid for r in report.rolled_back] == [undecided] and report.resolved
    with b.connect() as c:
        assert c.exec_driver_sql("SELECT id FROM t").scalars().all() == [1]
    # the legacy claim ages out like any claim; the legacy COMMIT row stays
    report = recover(pg2, grace_period=0, abort_retention=0)
    assert report.decisions_deleted == 1 and decision_gtrids(a) == {decided: "C"}


# --- names that collide ------------------------------------------------------------------


def test_shard_ids_that_name_one_decider_are_refused(
    pg_url_a: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    e = create_engine(pg_url_a)
    try:
        with pytest.raises(ConfigurationError, match="same name"):
            ShardedSession(shards={1: e, "1": e}, shard_chooser=lambda *a, **k: "1",
                           identity_chooser=lambda *a, **k: ["1"],
                           execute_chooser=lambda *a, **k: ["1"])
        with pytest.raises(ConfigurationError, match="same name"):
            recover({1: e, "1": e})  # type: ignore[dict-item]
        # a 60-bit token collision is refused as well (forced here: none is known)
        from shardsession.coordinator import xid as xid_module

        monkeypatch.setattr(xid_module, "shard_token", lambda sid: "aaaaaaaaaaaa")
        with pytest.raises(ConfigurationError, match="same token"):
            Cluster({"eu": pg_url_a, "us": pg_url_a})
    finally:
        e.dispose()


def test_shard_ids_bound_later_are_checked_too(
    pg_url_a: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``bind_shard`` after construction refuses an id naming the same decider as a
    configured one (same text, or a forced token collision) and changes nothing."""
    e = create_engine(pg_url_a)
    try:
        s = ShardedSession(shards={"1": e, "eu": e}, shard_chooser=lambda *a, **k: "1",
                           identity_chooser=lambda *a, **k: ["1"],
                           execute_chooser=lambda *a, **k: ["1"])
        with pytest.raises(ConfigurationError, match="same name"):
            s.bind_shard(1, e)
        s.bind_shard("eu", e)  # replacing a shard's bind is no collision
        from shardsession.coordinator import xid as xid_module

        real = xid_module.shard_token
        monkeypatch.setattr(xid_module, "shard_token",
                            lambda sid: "aaaaaaaaaaaa" if sid in ("eu", "us") else real(sid))
        with pytest.raises(ConfigurationError, match="same token"):
            s.bind_shard("us", e)
        monkeypatch.undo()
        s.bind_shard("us", e)
        with s.connection(bind_arguments={"shard_id": "us"}) as c:
            assert c.exec_driver_sql("SELECT 1").scalar() == 1
        s.close()
    finally:
        e.dispose()


def test_identity_is_stored_once_and_shown(pg_url_a: str, mariadb_url: str) -> None:
    from shardsession.coordinator.setup import prepare_shards

    engines = engines_of({"p": pg_url_a, "m": mariadb_url})
    try:
        assert read_identity(adapter_for("postgresql"), engines["p"]) is None
        first = prepare_shards(engines)
        ids = {s.identity for s in first}
        assert len(ids) == 1 and None not in ids  # one identity for the cluster
        again = prepare_shards(engines)
        assert {s.identity for s in again} == ids  # generated once
        cluster = Cluster({"p": engines["p"], "m": engines["m"]})
        assert set(cluster.identities().values()) == ids
        # what the coordinator writes into a gtrid decided on a shard
        from shardsession.coordinator import TransactionCoordinator

        coordinator = TransactionCoordinator()
        assert {coordinator.engine_identity(e) for e in engines.values()} == ids
    finally:
        dispose(engines)


# --- a SQLite decider whose identity could only commit with its first decision ----------


def test_branches_of_an_unset_sqlite_decider_are_reported_not_foreign(
    request: pytest.FixtureRequest,
) -> None:
    """SQLite writes first (its file locked), has no identity yet, and the coordinator dies
    after a PREPARE: the identity never committed. Recovery cannot prove the branches its
    own, so it never finishes them, but it reports them in doubt (exit status 1) with what
    to do, instead of calling them foreign."""
    from ._2pc_mixes import THREE_WAY, mix_urls

    urls = _create(mix_urls(request, THREE_WAY))
    assert run_child({"urls": urls, "crash": "after_prepare",
                      "key": 4}).returncode == -signal.SIGKILL
    engines = engines_of(urls)
    try:
        report = recover(engines, grace_period=0)
        assert not report.resolved and not report.committed and not report.rolled_back
        assert report.left_alone and all("stores no cluster identity" in why
                                         for _r, why in report.left_alone)
        assert {b.decider for b in in_doubt(engines)} == {"gamma"}
        # the next cross-shard commit stores an identity: the branch stays reported
        # (attack 11b N), never foreign, recover never exits 0 over it
        assert run_child({"urls": urls, "crash": "none", "key": 5}).returncode == 0
        report = recover(engines, grace_period=0)
        assert not report.resolved and report.foreign == 0, report.foreign_ids
        assert report.left_alone and all("holds no decision row" in why
                                          for _r, why in report.left_alone)
        assert not report.committed and not report.rolled_back
    finally:
        dispose(engines)


def test_a_cluster_stores_a_sqlite_shards_identity_on_first_connect(
    tmp_path: Any, pg_url_a: str,
) -> None:
    cluster = Cluster({"s": f"sqlite:///{tmp_path / 's.db'}", "p": pg_url_a})
    try:
        engine = cluster.engines["s"]
        with engine.connect() as c:
            c.exec_driver_sql("SELECT 1")
        stored = read_identity(adapter_for("sqlite"), engine)
        assert stored is not None
        assert cluster.identities()["s"] == stored
    finally:
        cluster.dispose()


# --- attack 11b: stale identities, decisions under another identity -------------------------


def test_a_process_holding_a_stale_identity_cannot_decide(
    tmp_path: Any, pg_server_a: Any, extra_db: Callable[[Any], str],
) -> None:
    """One SQLite decider file seen at two paths (two mounts): a process caches the
    identity read at one path, another process re-keys the file at the other. The first
    process's next cross-shard commit must fail before its commit point (nothing
    committed, nothing left prepared) instead of deciding under the stale identity; its
    retry commits."""
    import os

    from shardsession import Placement

    (tmp_path / "real").mkdir()
    (tmp_path / "mount").mkdir()
    real, mount = tmp_path / "real" / "d.db", tmp_path / "mount" / "d.db"
    pg = create_engine(extra_db(pg_server_a))
    first = {"s": create_engine(f"sqlite:///{real}"), "p": pg}
    with first["s"].begin() as c:
        c.exec_driver_sql("CREATE TABLE t (id INTEGER PRIMARY KEY)")
    os.link(real, mount)
    second = {"s": create_engine(f"sqlite:///{mount}"), "p": pg}
    with pg.begin() as c:
        c.exec_driver_sql("CREATE TABLE t (id INTEGER PRIMARY KEY)")

    def commit(engines: dict[str, Engine], key: int) -> None:
        s = ShardedSession(shards=engines, placement=Placement({}), atomic="require")
        try:
            for n in ("p", "s"):
                s.connection(bind_arguments={"shard_id": n}).execute(
                    text("INSERT INTO t VALUES (:k)"), {"k": key})
            s.commit()
        finally:
            s.close()

    def keys(engine: Engine) -> set[int]:
        with engine.connect() as c:
            return {r[0] for r in c.exec_driver_sql("SELECT id FROM t")}

    try:
        commit(first, 1)
        commit(second, 2)  # re-keys the file: it was created at the other path
        with pytest.raises(Exception, match="re-keyed by another process"):
            commit(first, 3)
        assert 3 not in keys(pg) and 3 not in keys(first["s"])
        with pg.connect() as c:
            assert c.exec_driver_sql("SELECT count(*) FROM pg_prepared_xacts "
                                     "WHERE database = current_database()").scalar() == 0
        commit(first, 4)
        assert keys(pg) == keys(first["s"]) == {1, 2, 4}
    finally:
        dispose(first)
        dispose(second)


def test_a_branch_decided_under_another_identity_follows_its_decision_row(
    tmp_path: Any, pg_server_a: Any, extra_db: Callable[[Any], str],
) -> None:
    """A branch whose xid names an identity its decider no longer stores (decided before
    two re-keys) while the decider's table holds a COMMIT row for exactly its gtrid is
    never foreign: recovery commits it by that row (and never deletes the row)."""
    from shardsession.coordinator.xid import new_cluster_id, participants_text

    s = create_engine(f"sqlite:///{tmp_path / 's.db'}")
    p = create_engine(extra_db(pg_server_a))
    engines = {"s": s, "p": p}
    try:
        with p.begin() as c:
            c.exec_driver_sql("CREATE TABLE t (id INTEGER PRIMARY KEY)")
        adapter = adapter_for("sqlite")
        current, _ = ensure_identity(adapter, s)
        old = time.time() - 3600
        gtrid = new_gtrid("s", cluster=new_cluster_id(), now=old)
        _plant_prepared_pg(p, Xid.branch(gtrid, 1).gid, 7)
        with admin_connection(s) as dbapi:
            adapter.ensure_decision_table(dbapi)
            adapter.insert_decision(dbapi, DecisionRow(
                gtrid, Outcome.COMMIT, old, participants_text([(Xid.branch(gtrid, 1), "p")])))
        report = recover(engines, grace_period=0)
        assert report.foreign == 0, report.foreign_ids
        assert [(r.shard, r.gtrid) for r in report.committed] == [("p", gtrid)]
        with p.connect() as c:
            assert c.exec_driver_sql("SELECT id FROM t").scalar() == 7
        assert recover(engines, grace_period=0).resolved
        assert decision_gtrids(s) == {gtrid: "C"}
        assert read_identity(adapter, s) == current
    finally:
        dispose(engines)


def test_a_gtrid_created_in_the_servers_future_is_not_left_for_the_grace_period(
    mariadb_url: str, mariadb_server: Any, extra_db: Callable[[Any], str],
) -> None:
    """A coordinator whose clock runs a day ahead crashed after PREPARE on a MariaDB-only
    transaction (XA RECOVER keeps no prepare time): its gtrid's creation time lies in the
    decider server's future, so it is not trusted for the grace period; recovery claims
    the abort now instead of leaving the branch (and its locks) for a day."""
    alpha = create_engine(mariadb_url)
    beta_url = extra_db(mariadb_server)
    beta = create_engine(beta_url)
    engines = {"alpha": alpha, "beta": beta}
    try:
        with beta.begin() as c:
            c.exec_driver_sql("CREATE TABLE t (id INTEGER PRIMARY KEY)")
        cluster, _ = ensure_identity(adapter_for("mysql"), alpha)
        gtrid = new_gtrid("alpha", cluster=cluster, now=time.time() + 86400)
        xid = Xid.branch(gtrid, 1)
        raw: Any = beta.raw_connection()
        cur = raw.dbapi_connection.cursor()
        cur.execute(f"XA START {xid.xa_literal}")
        cur.execute("INSERT INTO t VALUES (9)")
        cur.execute(f"XA END {xid.xa_literal}")
        cur.execute(f"XA PREPARE {xid.xa_literal}")
        raw.invalidate()  # a prepared XA branch survives its connection
        report = recover(engines, grace_period=60)
        # (one MariaDB server: its branches are listed once, under its first shard)
        assert [r.gtrid for r in report.rolled_back] == [gtrid], report
        assert decision_gtrids(alpha).get(gtrid) == "A"
        with beta.connect() as c:
            assert c.exec_driver_sql("SELECT count(*) FROM t").scalar() == 0
    finally:
        dispose(engines)
