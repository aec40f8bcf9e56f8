"""``shardsession create-all`` with a tenant directory, and ``shardsession tenants``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, inspect

from shardsession.tenancy import TenantDirectory

ROOT = str(Path(__file__).resolve().parents[2])


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shardsession", *args], capture_output=True, text=True,
        timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
    )


def _config(tmp_path: Path, urls: dict[str, str], cluster: str) -> Path:
    text = cluster + "".join(f'[shards.{n}]\nurl = "{u}"\n\n' for n, u in urls.items())
    path = tmp_path / "cluster.toml"
    path.write_text(text)
    return path


def test_create_all_and_tenants(tmp_path: Path, pg_url_a: str, mariadb_url: str) -> None:
    urls = {"main": f"sqlite:///{tmp_path / 'main.db'}", "pg": pg_url_a, "maria": mariadb_url}
    config = _config(tmp_path, urls, '[cluster]\ntenant_directory = "main"\n\n')
    done = cli("create-all", "--config", str(config))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "pg: decision table ready, tenant tables ready; can prepare" in done.stdout
    engines = {n: create_engine(u) for n, u in urls.items()}
    try:
        for e in engines.values():
            assert {"shardsession_tenants", "shardsession_tenant_owners"} <= set(
                inspect(e).get_table_names())
        directory = TenantDirectory("main", shards=engines)
        directory.add("acme", "pg")
        directory.add("globex", "maria")
        directory.add("initech", "pg")
        directory.add("hooli")  # fewest tenants: main
    finally:
        for e in engines.values():
            e.dispose()
    done = cli("tenants", "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "main: 1 tenant", "  hooli (version 1)",
        "maria: 1 tenant", "  globex (version 1)",
        "pg: 2 tenants", "  acme (version 1)", "  initech (version 1)",
    ]
    done = cli("tenants", "--config", str(config), "--json")
    assert done.returncode == 0, done.stderr
    got: dict[str, Any] = json.loads(done.stdout)
    assert got["directory"] == "main"
    assert got["shards"]["pg"] == [{"tenant": "acme", "version": 1},
                                   {"tenant": "initech", "version": 1}]


def test_tenants_without_a_directory_is_a_config_error(tmp_path: Path) -> None:
    config = _config(tmp_path, {"a": f"sqlite:///{tmp_path / 'a.db'}"}, "")
    done = cli("tenants", "--config", str(config))
    assert done.returncode == 2
    assert "no tenant directory" in done.stderr
    config = _config(tmp_path, {"a": f"sqlite:///{tmp_path / 'a.db'}"},
                     '[cluster]\ntenant_directory = "nope"\n\n')
    done = cli("tenants", "--config", str(config))
    assert done.returncode == 2 and "not one of the shards" in done.stderr
    config = _config(tmp_path, {"a": f"sqlite:///{tmp_path / 'a.db'}"},
                     '[cluster]\ntenant_directory = "a"\n\n')
    done = cli("tenants", "--config", str(config))  # no create-all: no table
    assert done.returncode == 1 and "cannot read the tenant directory" in done.stderr
