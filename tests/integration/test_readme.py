"""The README's Usage section runs as printed (its SQLite path), and its opening keeps the
two commands CI and new users run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
_BLOCK = re.compile(r"```(\w+)\n(.*?)```", re.S)


def usage_blocks(language: str) -> list[str]:
    """The code blocks in ``## Usage`` before its first subsection."""
    start = README.index("\n## Usage\n")
    end = README.index("\n### ", start)
    return [body for lang, body in _BLOCK.findall(README[start:end]) if lang == language]


def test_readme_opens_with_what_it_is_then_the_two_commands() -> None:
    head = README[: README.index("\n## Usage\n")]
    first_code = head.index("```")
    assert "shardsession is" in head[:first_code]
    commands = [body for lang, body in _BLOCK.findall(head) if lang == "sh"]
    assert commands[0].strip().endswith("shardsession demo")
    assert "pip install -q -e '.[test]'" in commands[1] and "pytest" in commands[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1].strip() in ci  # CI runs the README's test command verbatim


def test_usage_code_runs_as_printed(tmp_path: Path) -> None:
    blocks = usage_blocks("python")
    assert len(blocks) == 2, "Usage: a models.py block and a program block"
    models, program = blocks
    assert models.startswith("# models.py\n")
    (tmp_path / "models.py").write_text(models)
    (tmp_path / "program.py").write_text(program)
    proc = subprocess.run(
        [sys.executable, "program.py"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # the values the README's comments promise
    assert proc.stdout.splitlines() == ["user4", "[42, 35, 28]", "12"], proc.stdout
    assert sorted(p.name for p in (tmp_path / "shards").glob("?.db")) == ["a.db", "b.db", "c.db"]


def test_usage_config_is_a_valid_cluster_config(tmp_path: Path) -> None:
    from shardsession.config import Cluster

    (toml,) = usage_blocks("toml")
    (tmp_path / "cluster.toml").write_text(toml)
    cluster = Cluster.from_toml(
        tmp_path / "cluster.toml",
        env={"EU_DATABASE_URL": "postgresql+psycopg2://app:pw@db-eu/app"},
    )
    try:
        assert cluster.shard_ids == ["eu", "us", "dev"]
        assert cluster.decider == "eu"
        assert cluster.engines["dev"].url.database == str(tmp_path / "dev.db")
        assert cluster.engines["eu"].pool.size() == 10  # type: ignore[attr-defined]
    finally:
        cluster.dispose()
