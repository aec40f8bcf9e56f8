"""``shardsession demo``: the embedded story and the story on servers that can prepare
(a crash between PREPARE and the decision, and after the decision, each finished by
recovery), in plain words, with its checks."""

from __future__ import annotations

import time
from pathlib import Path

from .test_cli import write_config
from .test_cli_config import run


def test_embedded_demo_tells_the_story(tmp_path: Path) -> None:
    started = time.monotonic()
    proc = run("demo", "--dir", str(tmp_path / "demo"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "SQLAlchemy:   15 rows, each shard's top 5" in out
    assert "shardsession: 5 rows, the global top 5" in out
    assert "shardsession: 45 (one number" in out
    assert "total balance 3000" in out and "demo passed" in out
    assert "left all or nothing: total balance 3000" in out
    assert (tmp_path / "demo" / "north.db").exists()  # kept, and named
    assert str(tmp_path / "demo") in out
    assert time.monotonic() - started < 60


def test_demo_on_servers_crashes_and_recovers(
    pg_url_a: str, pg_url_b: str, mariadb_url: str, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "cluster.toml",
                          {"north": pg_url_a, "south": pg_url_b, "west": mariadb_url})
    proc = run("demo", "--config", str(config), cwd=tmp_path)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "killed after PREPARE on one shard, before the decision" in out
    assert "killed after the decision was committed, before COMMIT PREPARED" in out
    assert out.count("branch(es) in doubt") == 2
    assert "recover: committed=0 rolled_back=1; total balance now 3000" in out
    assert "recover: committed=1 rolled_back=0; total balance now 3000" in out
    assert "(half of the transfer is visible)" in out
    assert "demo passed" in out
