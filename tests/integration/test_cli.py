"""The ``shardsession`` command: recover and status on real servers, config errors, demo."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import servers
from sqlalchemy import create_engine, func, inspect, select

from shardsession.config import Cluster
from shardsession.coordinator import in_doubt
from shardsession.exc import ConfigurationError

from ._2pc_child import tables
from .test_crash_matrix import _create, run_child

ROOT = str(Path(__file__).resolve().parents[2])


def cli(*args: str, timeout: float = 60, path: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shardsession", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (ROOT, path) if p)},
    )


def write_config(path: Path, urls: dict[str, str], extra: str = "") -> Path:
    text = extra + "".join(f'[shards.{n}]\nurl = "{u}"\n\n' for n, u in urls.items())
    path.write_text(text)
    return path


def count(urls: dict[str, str], key: int) -> dict[str, int]:
    _md, tbl = tables(list(urls))
    out = {}
    for n, u in urls.items():
        e = create_engine(u)
        with e.connect() as c:
            out[n] = int(
                c.scalar(select(func.count()).select_from(tbl[n]).where(tbl[n].c.id == key)) or 0
            )
        e.dispose()
    return out


@pytest.mark.parametrize(
    ("point", "outcome"), [("after_all_prepared", 0), ("after_decision_commit", 1)]
)
def test_recover_command_finishes_in_doubt_transactions(
    pg_url_a: str, mariadb_url: str, tmp_path: Path, point: str, outcome: int
) -> None:
    urls = _create({"alpha": pg_url_a, "beta": mariadb_url})
    proc = run_child({"urls": urls, "crash": point, "key": 7})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    config = write_config(tmp_path / "cluster.toml", urls, "[cluster]\nrecovery_grace = 0\n\n")

    status = cli("status", "--config", str(config))
    assert status.returncode == 1, status.stderr  # something of ours is in doubt
    assert "age=" in status.stdout and "decider=alpha" in status.stdout

    done = cli("recover", "--config", str(config))
    assert done.returncode == 0, done.stdout + done.stderr
    assert count(urls, 7) == {"alpha": outcome, "beta": outcome}
    engines = {n: create_engine(u) for n, u in urls.items()}
    assert in_doubt(engines) == []
    for e in engines.values():
        e.dispose()
    assert cli("status", "--config", str(config)).returncode == 0
    again = cli("recover", "--config", str(config))
    assert again.returncode == 0 and "committed=0 rolled_back=0" in again.stdout
    assert "password" not in done.stdout + done.stderr


def test_recover_watch_stops_cleanly_on_sigterm(pg_url_a: str, tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.toml", {"alpha": pg_url_a})
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "shardsession",
            "recover",
            "--config",
            str(config),
            "--watch",
            "--interval",
            "0.2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    # wait (bounded) until two passes have been reported, then ask it to stop
    assert proc.stdout is not None
    seen: list[str] = []
    deadline = time.monotonic() + 60
    while sum("committed=0" in line for line in seen) < 2 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert sum("committed=0" in line for line in seen) >= 2, "".join(seen) + out


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "needs at least one [shards.NAME]"),
        ("[shards.a]\n", 'needs url = "..."'),
        ('[shards.a]\nurl = "not a url"\n', "not a database URL"),
        ('[shards.a]\nurl = "sqlite://"\n[cluster]\natomic = "maybe"\n', "atomic must be"),
        ('[shards.a]\nurl = "sqlite://"\n[cluster]\ndecider = "b"\n', "decider 'b'"),
        ('[shards.a]\nurl = "sqlite://"\n[cluster]\ncolour = 1\n', "unknown [cluster] keys"),
        ('[shards.a]\nurl = "sqlite://"\n[extra]\n', "unknown top-level tables"),
        ("[shards.a\n", "invalid TOML"),
        ('[shards."a b"]\nurl = "sqlite://"\n', "shard ids are identifiers"),
    ],
)
def test_bad_config_files(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigurationError, match=message.replace("[", r"\[").replace(".", r"\.")):
        Cluster.from_toml(path)
    proc = cli("recover", "--config", str(path))
    assert proc.returncode == 2 and message.split()[0] in proc.stderr


def test_config_masks_passwords_and_shares_engines(tmp_path: Path) -> None:
    cluster = Cluster(
        {
            "a": "postgresql+psycopg2://app:s3cret@db1/app",
            "b": "postgresql+psycopg2://app:s3cret@db1/app",
            "c": "sqlite://",
        }
    )
    assert "s3cret" not in repr(cluster)
    assert cluster.engines["a"] is cluster.engines["b"]  # one database, one pool
    assert cluster.engines["c"] is not cluster.engines["a"]
    with pytest.raises(ConfigurationError) as ei:
        Cluster({"a": "postgresql+nodriver://app:s3cret@db1/app"})
    assert "s3cret" not in str(ei.value)


def test_demo_command(tmp_path: Path) -> None:
    proc = cli("demo", "--dir", str(tmp_path / "demo"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "demo passed" in proc.stdout


MODELS = """
from sqlalchemy import Column, Integer, MetaData, String, Table

metadata = MetaData()
Table("cli_accounts", metadata, Column("id", Integer, primary_key=True), Column("v", String(9)))
"""


def _tables_of(url: str) -> set[str]:
    e = create_engine(url)
    try:
        return set(inspect(e).get_table_names())
    finally:
        e.dispose()


def test_create_all_sets_up_every_shard(pg_url_a: str, mariadb_url: str, tmp_path: Path) -> None:
    (tmp_path / "ss_cli_models.py").write_text(MODELS)
    urls = {"alpha": pg_url_a, "beta": mariadb_url, "gamma": f"sqlite:///{tmp_path / 'g.db'}"}
    config = write_config(tmp_path / "cluster.toml", urls)
    for _ in range(2):  # idempotent
        done = cli("create-all", "--config", str(config), "--metadata", "ss_cli_models:metadata",
                   path=str(tmp_path))
        assert done.returncode == 0, done.stdout + done.stderr
        out = done.stdout.splitlines()
        assert "alpha: decision table ready, 1 application tables present; can prepare" in out
        assert "beta: decision table ready, 1 application tables present; can prepare" in out
        assert any(line.startswith("gamma: decision table ready, 1 application tables present;"
                                   " cannot prepare") for line in out), out
    for url in urls.values():
        assert {"shardsession_decisions", "cli_accounts"} <= _tables_of(url)


def test_create_all_reports_shards_that_cannot_prepare_or_fail(tmp_path: Path) -> None:
    noprep = servers.start_postgres("noprep", max_prepared_transactions=0)
    try:
        urls = {"ok": f"sqlite:///{tmp_path / 'ok.db'}", "noprep": noprep.create_database(),
                "gone": f"postgresql+psycopg2://postgres@127.0.0.1:{servers.free_port()}/x"}
        config = write_config(tmp_path / "cluster.toml", urls)
        done = cli("create-all", "--config", str(config))
        assert done.returncode == 1, done.stdout + done.stderr
        out = done.stdout.splitlines()
        assert any(line.startswith("noprep: decision table ready; cannot prepare (PostgreSQL "
                                   "max_prepared_transactions = 0") for line in out), out
        assert any(line.startswith("gone: FAILED: OperationalError") for line in out), out
        assert any(line.startswith("ok: decision table ready; cannot prepare") for line in out)
        assert "shardsession_decisions" in _tables_of(urls["noprep"])
    finally:
        noprep.teardown()


@pytest.mark.parametrize("spec", ["no_such_module:metadata", "os:path", "nocolon"])
def test_create_all_rejects_a_bad_metadata_spec(tmp_path: Path, spec: str) -> None:
    config = write_config(tmp_path / "cluster.toml", {"a": f"sqlite:///{tmp_path / 'a.db'}"})
    done = cli("create-all", "--config", str(config), "--metadata", spec)
    assert done.returncode == 2 and "--metadata" in done.stderr, done.stderr
    assert not (tmp_path / "a.db").exists() or "shardsession_decisions" not in _tables_of(
        f"sqlite:///{tmp_path / 'a.db'}")
