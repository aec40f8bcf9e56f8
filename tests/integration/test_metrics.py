"""Structured records and Prometheus metrics of known commits, fan-outs and recoveries,
and the recovery worker's ``/metrics`` and ``/healthz``."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import servers
from prometheus_client import CollectorRegistry
from sqlalchemy import Integer, create_engine, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from shardsession import HashSharding, Placement
from shardsession.coordinator import TransactionCoordinator, recover
from shardsession.coordinator.local import local_sqlite_cluster
from shardsession.exc import AtomicityUnavailableError
from shardsession.metrics import Metrics, install, uninstall

from ._2pc_child import tables
from .test_cli import write_config
from .test_crash_matrix import _create, run_child

ROOT = str(Path(__file__).resolve().parents[2])


@pytest.fixture
def metrics() -> Iterator[Metrics]:
    m = install(CollectorRegistry())
    yield m
    uninstall(m)


def value(m: Metrics, name: str, **labels: str) -> float:
    v = m.registry.get_sample_value(name, labels)
    return 0.0 if v is None else v


def _session(engines: dict[str, object], coord: TransactionCoordinator) -> Session:
    s = Session()
    names = {e: n for n, e in engines.items()}
    coord.install(s, names.__getitem__)
    return s


def test_commit_kinds_phases_and_records(
    pg_url_a: str, pg_url_b: str, tmp_path: Path, metrics: Metrics,
    caplog: pytest.LogCaptureFixture,
) -> None:
    urls = _create({"alpha": pg_url_a, "beta": pg_url_b})
    engines = {n: create_engine(u) for n, u in urls.items()}
    _md, tbl = tables(list(urls))
    coord = TransactionCoordinator(atomic="require")
    try:
        # one writer: one-phase
        s = _session(engines, coord)  # type: ignore[arg-type]
        s.connection(bind_arguments={"bind": engines["alpha"]}).execute(
            tbl["alpha"].insert().values(id=1, v="x"))
        s.commit()
        assert value(metrics, "shardsession_commits_total", kind="one_phase") == 1
        assert value(metrics, "shardsession_commits_total", kind="two_phase") == 0

        # two writers: two-phase, with every phase timed and the records logged
        caplog.set_level(logging.DEBUG, logger="shardsession.trace")
        s = _session(engines, coord)  # type: ignore[arg-type]
        for n in ("alpha", "beta"):
            s.connection(bind_arguments={"bind": engines[n]}).execute(
                tbl[n].insert().values(id=2, v="x"))
        s.commit()
        assert value(metrics, "shardsession_commits_total", kind="two_phase") == 1
        for phase in ("prepare", "decision", "commit"):
            assert value(metrics, "shardsession_commit_phase_seconds_count", phase=phase) == 1
            assert value(metrics, "shardsession_commit_phase_seconds_sum", phase=phase) > 0
        assert value(metrics, "shardsession_commit_width_count") == 1
        assert value(metrics, "shardsession_commit_width_sum") == 2
        fields = [r.shardsession for r in caplog.records  # type: ignore[attr-defined]
                  if hasattr(r, "shardsession")]
        by_event = {(f["event"], f["shard"]): f for f in fields}
        prepared = [f for f in fields if f["event"] == "prepare"]
        assert len(prepared) == 1 and prepared[0]["outcome"] == "ok"
        gtrid = prepared[0]["gtrid"]
        assert gtrid and prepared[0]["duration"] > 0
        decider = by_event[("decision", "alpha")] if ("decision", "alpha") in by_event \
            else by_event[("decision", "beta")]
        assert decider["outcome"] == "commit" and decider["gtrid"] == gtrid
        assert {prepared[0]["shard"], decider["shard"]} == {"alpha", "beta"}
        assert [f["outcome"] for f in fields if f["event"] == "commit_prepared"] == ["ok"]
        assert [f["outcome"] for f in fields if f["event"] == "commit"] == ["two_phase"]
    finally:
        for e in engines.values():
            e.dispose()

    # two SQLite files cannot be atomic: refused, nothing committed
    lite = {n: create_engine(f"sqlite:///{tmp_path / n}.db") for n in ("x", "y")}
    _lmd, ltbl = tables(list(lite))
    for n, e in lite.items():
        ltbl[n].create(e)
    s = _session(lite, TransactionCoordinator(atomic="require"))  # type: ignore[arg-type]
    for n in lite:
        s.connection(bind_arguments={"bind": lite[n]}).execute(
            ltbl[n].insert().values(id=1, v="x"))
    with pytest.raises(AtomicityUnavailableError):
        s.commit()
    s.close()
    for e in lite.values():
        e.dispose()
    assert value(metrics, "shardsession_commits_total", kind="refused") == 1


class _Base(DeclarativeBase):
    pass


class Thing(_Base):
    __tablename__ = "metric_things"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)


def test_fanout_metrics(tmp_path: Path, metrics: Metrics) -> None:
    cluster = local_sqlite_cluster(tmp_path, ["a", "b", "c"])
    cluster.create_all(_Base.metadata)
    Session_ = cluster.sessionmaker(Placement({Thing: HashSharding(Thing.id)}))
    with Session_.begin() as s:
        s.add_all([Thing(id=i) for i in range(20)])
    before = value(metrics, "shardsession_fanout_width_count")
    with Session_() as s:
        assert s.scalar(select(func.count()).select_from(Thing)) == 20
    cluster.dispose()
    assert value(metrics, "shardsession_fanout_width_count") == before + 1
    assert value(metrics, "shardsession_fanout_width_bucket", le="3.0") >= 1
    assert value(metrics, "shardsession_fanout_seconds_count") >= 1


def test_recovery_metrics(pg_url_a: str, pg_url_b: str, metrics: Metrics,
                          caplog: pytest.LogCaptureFixture) -> None:
    urls = _create({"alpha": pg_url_a, "beta": pg_url_b})
    proc = run_child({"urls": urls, "crash": "after_decision_commit", "key": 5})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    engines = {n: create_engine(u) for n, u in urls.items()}
    caplog.set_level(logging.INFO, logger="shardsession.trace")
    try:
        report = recover(engines, grace_period=0)
    finally:
        for e in engines.values():
            e.dispose()
    assert len(report.committed) == 1 and report.resolved
    assert value(metrics, "shardsession_recovery_actions_total", action="commit") == 1
    assert value(metrics, "shardsession_recovery_passes_total", result="resolved") == 1
    assert value(metrics, "shardsession_recovery_pass_seconds_count") == 1
    actions = [r.shardsession for r in caplog.records  # type: ignore[attr-defined]
               if getattr(r, "shardsession", {}).get("event") == "recovery_action"]
    assert [(a["outcome"], a["shard"]) for a in actions] == [
        ("commit", report.committed[0].shard)]
    assert actions[0]["gtrid"] == report.committed[0].gtrid


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_worker_serves_metrics_and_health(pg_url_a: str, pg_url_b: str, tmp_path: Path) -> None:
    urls = _create({"alpha": pg_url_a, "beta": pg_url_b})
    proc = run_child({"urls": urls, "crash": "after_all_prepared", "key": 6})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    config = write_config(tmp_path / "c.toml", urls, "[cluster]\nrecovery_grace = 3600\n\n")
    port = servers.free_port()
    worker = subprocess.Popen(
        [sys.executable, "-m", "shardsession", "recover", "--config", str(config), "--watch",
         "--interval", "0.5", "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    try:
        deadline = time.monotonic() + 60
        body = b""
        while time.monotonic() < deadline:
            try:
                code, body = _get(f"http://127.0.0.1:{port}/metrics")
            except OSError:
                code = 0
            if code == 200 and b'shardsession_in_doubt_branches{shard="' in body:
                break
            time.sleep(0.3)
        text = body.decode()
        # within the grace period: one prepared branch left in doubt, none finished
        assert 'shardsession_recovery_actions_total{action="left_in_doubt"}' in text, text
        in_doubt = {line.split("}")[0].split('"')[1]: float(line.split()[-1])
                    for line in text.splitlines()
                    if line.startswith("shardsession_in_doubt_branches{")}
        assert sorted(in_doubt.values()) == [0.0, 1.0], text
        assert "shardsession_in_doubt_oldest_seconds" in text
        code, health = _get(f"http://127.0.0.1:{port}/healthz")
        assert code == 200, health
        doc = json.loads(health)
        assert doc["healthy"] is True and doc["resolved"] is False
        assert _get(f"http://127.0.0.1:{port}/other")[0] == 404
    finally:
        worker.send_signal(signal.SIGTERM)
        _out, err = worker.communicate(timeout=30)
    assert worker.returncode == 1, err  # left in doubt: the last pass was not resolved
    engines = {n: create_engine(u) for n, u in urls.items()}
    try:
        recover(engines, grace_period=0)  # leave nothing prepared behind
    finally:
        for e in engines.values():
            e.dispose()


def test_listen_needs_watch_and_a_good_address(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.toml", {"a": f"sqlite:///{tmp_path / 'a.db'}"})
    for args, message in ((("--listen", "9999"), "--listen needs --watch"),
                          (("--watch", "--listen", "host:port"), "--listen wants HOST:PORT"),
                          (("--watch", "--listen", "99999"), "out of range")):
        proc = subprocess.run(
            [sys.executable, "-m", "shardsession", "recover", "--config", str(config), *args],
            capture_output=True, text=True, cwd=ROOT, timeout=60,
            env={**os.environ, "PYTHONPATH": ROOT},
        )
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)


def test_healthz_is_503_while_a_shard_cannot_be_reached(tmp_path: Path) -> None:
    """A pass that completes with errors (here: one shard refuses connections) is not
    healthy: the worker cannot do its job there."""
    gone = servers.free_port()
    config = write_config(tmp_path / "c.toml", {
        "a": f"sqlite:///{tmp_path / 'a.db'}",
        "gone": f"postgresql+psycopg2://app@127.0.0.1:{gone}/x",
    })
    port = servers.free_port()
    worker = subprocess.Popen(
        [sys.executable, "-m", "shardsession", "recover", "--config", str(config), "--watch",
         "--interval", "0.5", "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    try:
        deadline = time.monotonic() + 60
        doc: dict[str, object] = {}
        while time.monotonic() < deadline:
            try:
                code, body = _get(f"http://127.0.0.1:{port}/healthz")
            except OSError:
                code, body = 0, b""
            if body:
                doc = json.loads(body)
                if doc["last_pass_completed"]:
                    break
            time.sleep(0.3)
        assert doc.get("last_pass_completed") is True, doc
        assert code == 503 and doc["healthy"] is False, doc
        assert isinstance(doc["last_pass_errors"], int) and doc["last_pass_errors"] >= 1, doc
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.communicate(timeout=30)


def test_listen_on_an_ipv6_address(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.toml", {"a": f"sqlite:///{tmp_path / 'a.db'}"})
    port = servers.free_port()
    worker = subprocess.Popen(
        [sys.executable, "-m", "shardsession", "recover", "--config", str(config), "--watch",
         "--interval", "0.5", "--listen", f"[::1]:{port}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    try:
        deadline = time.monotonic() + 60
        code = 0
        while time.monotonic() < deadline and worker.poll() is None:
            try:
                code, _body = _get(f"http://[::1]:{port}/healthz")
            except OSError:
                code = 0
            if code == 200:
                break
            time.sleep(0.3)
        assert code == 200, worker.poll()
    finally:
        worker.send_signal(signal.SIGTERM)
        _out, err = worker.communicate(timeout=30)
    assert worker.returncode == 0, err
