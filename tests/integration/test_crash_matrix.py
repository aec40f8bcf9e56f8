"""Crash matrix: a child coordinator is SIGKILLed at each protocol step, then recovery runs.

After recovery every transaction is all-or-nothing on every shard, nothing of ours is in
doubt, commits the protocol had made durable are present, and pooled connections are clean.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, func, select
from sqlalchemy.engine import Engine

from shardsession.coordinator import in_doubt, recover

from ._2pc_child import tables
from ._2pc_mixes import MIXES, THREE_WAY, mix_urls

pytestmark = pytest.mark.crash

CHILD = str(Path(__file__).with_name("_2pc_child.py"))
ROOT = str(Path(__file__).resolve().parents[2])

# step -> expected outcome after recovery (REFERENCE.md crash-point matrix)
POINTS = {
    "during_writes": "abort",  # S0
    "after_writes": "abort",  # S0/S2: nothing prepared yet
    "after_prepare": "abort",  # S2: one PREPARE done
    "after_all_prepared": "abort",  # S3
    "before_decision_commit": "abort",  # S3
    "after_decision_commit": "commit",  # S5
    "after_commit_prepared": "commit",  # S6
    "after_all_committed": "commit",  # S8
    "none": "commit",
}


def run_child(cfg: dict[str, object]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, CHILD, json.dumps(cfg)], capture_output=True, text=True, timeout=60,
        cwd=ROOT, env={"PYTHONPATH": ROOT, "PATH": "/usr/bin:/bin"},
    )


def _create(u: dict[str, str]) -> dict[str, str]:
    md, _ = tables(list(u))
    for url in u.values():
        e = create_engine(url)
        md.drop_all(e)
        md.create_all(e)
        e.dispose()
    return u


@pytest.fixture(params=MIXES)
def urls(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    yield _create(mix_urls(request, request.param))


def rows(engines: dict[str, Engine], key: int) -> dict[str, int]:
    _md, tbl = tables(list(engines))
    out = {}
    for n, e in engines.items():
        with e.connect() as c:
            out[n] = int(c.scalar(select(func.count()).select_from(tbl[n]).where(
                tbl[n].c.id == key)) or 0)
    return out


def crash_then_recover(urls: dict[str, str], point: str) -> None:
    proc = run_child({"urls": urls, "crash": point, "key": 1})
    if point == "none":
        assert proc.returncode == 0, proc.stderr
    else:
        assert proc.returncode == -signal.SIGKILL, proc.stderr
    engines = {n: create_engine(u) for n, u in urls.items()}
    try:
        report = recover(engines, grace_period=0)
        assert not report.errors, report.errors
        assert in_doubt(engines) == []
        got = rows(engines, 1)
        want = 1 if POINTS[point] == "commit" else 0
        assert got == dict.fromkeys(engines, want), (point, got, report)
        again = recover(engines, grace_period=0)  # idempotent
        assert again.resolved and not again.committed and not again.rolled_back
        # pooled connections reused after the crash and recovery are clean
        proc = run_child({"urls": urls, "crash": "none", "key": 2})
        assert proc.returncode == 0, proc.stderr
        assert rows(engines, 2) == dict.fromkeys(engines, 1)
    finally:
        for e in engines.values():
            e.dispose()


@pytest.mark.parametrize("point", list(POINTS))
def test_crash_then_recover(urls: dict[str, str], point: str) -> None:
    crash_then_recover(urls, point)


# The three-way mix and the binary-log server on a subset of points (runtime budget): one
# before the decision with a branch prepared, the decision itself, and the commit phase.
SUBSET = ["after_prepare", "before_decision_commit", "after_decision_commit",
          "after_commit_prepared"]


@pytest.mark.postgresql
@pytest.mark.mysql
@pytest.mark.sqlite
@pytest.mark.parametrize("point", SUBSET)
def test_crash_three_way(request: pytest.FixtureRequest, point: str) -> None:
    """PostgreSQL + MariaDB + SQLite, SQLite holding the decision.

    SQLite writes first, so its file is locked when it becomes the decider: its cluster
    identity is set up beforehand (create-all, or a Cluster's first connect), as the docs
    require; without it see test_recovery_identity's unattributed-branch test."""
    urls = _create(mix_urls(request, THREE_WAY))
    setup_identities(urls)
    crash_then_recover(urls, point)


def setup_identities(urls: dict[str, str]) -> None:
    """What ``shardsession create-all`` does first: one cluster identity on every shard."""
    from shardsession.coordinator.setup import prepare_shards

    engines = {n: create_engine(u) for n, u in urls.items()}
    assert not any(s.failed for s in prepare_shards(engines))
    for e in engines.values():
        e.dispose()


@pytest.fixture(scope="module")
def mariadb_binlog_server() -> Iterator[Any]:
    """A MariaDB server of its own with the binary log on (MDEV-21469 territory)."""
    from harness.servers import ServerUnavailable, start_mariadb

    try:
        server = start_mariadb("binlog", log_bin=True)
    except ServerUnavailable as e:
        pytest.skip(f"backend unavailable: MariaDB with binlog: {e}")
    yield server
    server.teardown()


@pytest.fixture
def mariadb_binlog_url(mariadb_binlog_server: Any) -> Iterator[str]:
    from harness.servers import clear_prepared

    url = mariadb_binlog_server.create_database()
    clear_prepared(url, None)
    yield url
    clear_prepared(url, None)


@pytest.mark.postgresql
@pytest.mark.mysql
@pytest.mark.parametrize("point", SUBSET)
def test_crash_mariadb_binlog(request: pytest.FixtureRequest, point: str) -> None:
    """PostgreSQL + MariaDB with ``log_bin`` on: prepared XA branches and their recovery
    go through the binary log's two-phase commit with InnoDB."""
    crash_then_recover(_create(mix_urls(request, "pg+mariadb_binlog")), point)


@pytest.mark.parametrize("first,outcome", [("after_decision_commit", "commit"),
                                           ("after_all_prepared", "abort")])
@pytest.mark.parametrize("rpoint", ["recovery_after_claim", "recovery_after_finish"])
def test_crash_inside_recovery(request: pytest.FixtureRequest, first: str, outcome: str,
                               rpoint: str) -> None:
    u = mix_urls(request, "pg+mariadb")
    md, _ = tables(list(u))
    for url in u.values():
        e = create_engine(url)
        md.create_all(e)
        e.dispose()
    assert run_child({"urls": u, "crash": first, "key": 1}).returncode == -signal.SIGKILL
    r = run_child({"urls": u, "crash": rpoint, "key": 1, "mode": "recover"})
    assert r.returncode in (0, -signal.SIGKILL), r.stderr
    engines = {n: create_engine(x) for n, x in u.items()}
    report = recover(engines, grace_period=0)
    assert not report.errors
    assert in_doubt(engines) == []
    want = 1 if outcome == "commit" else 0
    assert rows(engines, 1) == dict.fromkeys(engines, want)
    for e in engines.values():
        e.dispose()
