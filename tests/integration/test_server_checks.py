"""Version and durability checks on real servers (issue 11 item 10): MariaDB/MySQL
versions that lose prepared XA, settings that can lose a committed decision, a PostgreSQL
recovery role that cannot finish what another role prepared."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

from shardsession.backends import DecisionRow, Outcome, adapter_for
from shardsession.backends.mysql import xa_version_problem
from shardsession.coordinator import in_doubt, recover
from shardsession.coordinator.decisions import admin_connection
from shardsession.coordinator.identity import ensure_identity
from shardsession.coordinator.setup import prepare_shards, shard_health
from shardsession.coordinator.xid import Xid, new_gtrid

ROOT = str(Path(__file__).resolve().parents[2])


@pytest.mark.parametrize(("version", "refused"), [
    ("10.4.32-MariaDB", True),
    ("5.5.5-10.4.3-MariaDB-log", True),  # MariaDB's replication prefix
    ("10.5.0-MariaDB", False),
    ("10.11.19-MariaDB-log", False),
    ("5.5.5-10.6.12-MariaDB", False),
    ("5.7.6-log", True),
    ("5.7.7", False),
    ("8.0.36", False),
    ("garbage", True),
])
def test_xa_version_check(version: str, refused: bool) -> None:
    assert (xa_version_problem(version) is not None) == refused


def test_the_real_mariadb_is_accepted_for_two_phase_commit(mariadb_url: str) -> None:
    e = create_engine(mariadb_url)
    try:
        with admin_connection(e) as dbapi:
            caps = adapter_for("mysql").detect(dbapi)
        assert caps.can_prepare, caps.reason
        assert "MariaDB" in caps.extra["version"]
        assert xa_version_problem(caps.extra["version"]) is None
    finally:
        e.dispose()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shardsession", *args], capture_output=True,
                          text=True, timeout=60, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})


def test_mariadb_durability_settings_are_warned_about(mariadb_url: str, tmp_path: Path) -> None:
    e = create_engine(mariadb_url)
    try:
        assert shard_health({"m": e})[0].warnings == ()
        with e.connect() as c:
            c = c.execution_options(isolation_level="AUTOCOMMIT")
            c.exec_driver_sql("SET GLOBAL innodb_flush_log_at_trx_commit = 2")
        try:
            [health] = shard_health({"m": e})
            assert any("innodb_flush_log_at_trx_commit = 2" in w for w in health.warnings)
            [setup] = prepare_shards({"m": e})  # create-all warns as well
            assert any("innodb_flush_log_at_trx_commit" in w for w in setup.warnings)
            config = tmp_path / "m.toml"
            plain_url = make_url(mariadb_url).render_as_string(False)
            config.write_text(f'[shards.m]\nurl = "{plain_url}"\n')
            for command in ("create-all", "status"):
                done = _cli(command, "--config", str(config))
                assert done.returncode == 0, done.stdout + done.stderr
                assert "warning: m: innodb_flush_log_at_trx_commit = 2" in done.stdout
        finally:
            with e.connect() as c:
                c = c.execution_options(isolation_level="AUTOCOMMIT")
                c.exec_driver_sql("SET GLOBAL innodb_flush_log_at_trx_commit = 1")
        assert shard_health({"m": e})[0].warnings == ()
    finally:
        e.dispose()


def test_synchronous_commit_off_is_warned_about_and_forced_on_for_decisions(
    pg_url_a: str,
) -> None:
    database = make_url(pg_url_a).database
    e = create_engine(pg_url_a)
    try:
        assert shard_health({"p": e})[0].warnings == ()
        with e.connect() as c:
            c = c.execution_options(isolation_level="AUTOCOMMIT")
            c.exec_driver_sql(f'ALTER DATABASE "{database}" SET synchronous_commit = off')
        e.dispose()  # new sessions get the setting
        [health] = shard_health({"p": e})
        assert any("synchronous_commit = off" in w for w in health.warnings)
        pg = adapter_for("postgresql")
        with admin_connection(e) as admin:
            pg.ensure_decision_table(admin)
        cluster, _ = ensure_identity(pg, e)
        with e.connect() as c:
            dbapi = c.connection.dbapi_connection
            cur = dbapi.cursor()
            cur.execute("SHOW synchronous_commit")
            assert cur.fetchone()[0] == "off"
            pg.insert_decision(dbapi, DecisionRow(new_gtrid("p", cluster=cluster),
                                                  Outcome.COMMIT, time.time(), ""))
            cur.execute("SHOW synchronous_commit")
            assert cur.fetchone()[0] == "on"  # the decision's transaction commits durably
            dbapi.rollback()
    finally:
        e.dispose()


def test_a_recovery_role_that_cannot_finish_a_branch_is_shown(
    pg_url_a: str, tmp_path: Path,
) -> None:
    """A branch prepared by the superuser; status and recovery run as a plain role: status
    says it cannot finish it, and recovery leaves it in doubt with that reason."""
    from harness.servers import client_cursor

    url = make_url(pg_url_a)
    admin_engine = create_engine(url)
    role = "ss_plain_recovery"
    with admin_engine.connect() as c:
        c = c.execution_options(isolation_level="AUTOCOMMIT")
        c.exec_driver_sql(f"DROP ROLE IF EXISTS {role}")
        c.exec_driver_sql(f"CREATE ROLE {role} LOGIN")
        c.exec_driver_sql("CREATE TABLE t (id int primary key)")
    pg = adapter_for("postgresql")
    with admin_connection(admin_engine) as admin:
        pg.ensure_decision_table(admin)
    cluster, _ = ensure_identity(pg, admin_engine)
    with admin_engine.connect() as c:
        c = c.execution_options(isolation_level="AUTOCOMMIT")
        c.exec_driver_sql(f"GRANT SELECT, INSERT, DELETE ON shardsession_decisions, "
                          f"shardsession_cluster TO {role}")
    gtrid = new_gtrid("p", cluster=cluster, now=time.time() - 3600)
    xid = Xid.branch(gtrid, 1)
    raw: Any = admin_engine.raw_connection()
    cur = client_cursor(raw.dbapi_connection)
    cur.execute("INSERT INTO t VALUES (1)")
    cur.execute("PREPARE TRANSACTION %s", (xid.gid,))
    raw.commit()
    raw.close()
    plain = create_engine(url.set(username=role))
    try:
        [branch] = in_doubt({"p": plain})
        assert branch.blocked is not None and role in branch.blocked
        report = recover({"p": plain}, grace_period=0)
        assert not report.resolved and report.errors
        assert [why for _r, why in report.left_alone] == ["recovery role cannot finish it"]
        config = tmp_path / "c.toml"
        config.write_text(f'[shards.p]\nurl = "{url.set(username=role).render_as_string(False)}"\n')
        status = _cli("status", "--config", str(config))
        assert status.returncode == 1 and "CANNOT FINISH" in status.stdout, status.stdout
        assert f"cluster identity: {cluster}" in status.stdout
        # the superuser can: the ABORT claim the plain role wrote is followed
        report = recover({"p": admin_engine}, grace_period=0)
        assert report.resolved and len(report.rolled_back) == 1
    finally:
        plain.dispose()
        with admin_engine.connect() as c:
            c = c.execution_options(isolation_level="AUTOCOMMIT")
            c.exec_driver_sql(f"DROP OWNED BY {role}")
            c.exec_driver_sql(f"DROP ROLE IF EXISTS {role}")
        admin_engine.dispose()
