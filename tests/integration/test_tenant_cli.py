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


MODELS = '''
from sqlalchemy import Integer, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from shardsession import Placement
from shardsession.tenancy import TenantDirectory, TenantSharding


class Base(DeclarativeBase):
    pass


class Doc(Base):
    __tablename__ = "cli_doc"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    tenant_id: Mapped[str] = mapped_column(String(40))
    title: Mapped[str] = mapped_column(String(40))


directory = TenantDirectory("main")
placement = Placement({Doc: TenantSharding(Doc.tenant_id, directory)})
'''


def test_move_tenant_command(tmp_path: Path, pg_url_a: str, mariadb_url: str,
                             monkeypatch: Any) -> None:
    (tmp_path / "ss_tenant_models.py").write_text(MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    import ss_tenant_models as m  # type: ignore[import-not-found]

    from shardsession.config import Cluster

    urls = {"main": pg_url_a, "maria": mariadb_url}
    config = _config(tmp_path, urls, '[cluster]\ntenant_directory = "main"\n\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join((ROOT, str(tmp_path)))}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "shardsession", *args],
                              capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)

    done = run("create-all", "--config", str(config), "--metadata", "ss_tenant_models:Base")
    assert done.returncode == 0, done.stdout + done.stderr
    cluster = Cluster(urls, tenant_directory="main")
    try:
        Session = cluster.sessionmaker(m.placement)
        Session().close()
        m.directory.add("acme", "main")
        with Session(tenant="acme") as s:
            s.add_all([m.Doc(id=i, title=f"d{i}") for i in range(25)])
            s.commit()
        done = run("move-tenant", "--config", str(config), "--placement",
                   "ss_tenant_models:placement", "--batch-size", "10", "acme", "maria")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "copy: cli_doc: 10 rows" in done.stdout
        assert done.stdout.splitlines()[-1].startswith(
            "moved tenant acme from main to maria (directory version 2); copied 25 rows")
        m.directory.refresh()
        assert m.directory.shard_of("acme") == "maria"
        with Session(tenant="acme") as s:  # a tenant session now reads from maria
            assert sorted(d.id for d in s.query(m.Doc)) == list(range(25))
        for name, want in (("main", 0), ("maria", 25)):
            with cluster.engines[name].connect() as c:
                assert c.exec_driver_sql("SELECT count(*) FROM cli_doc").scalar() == want
        done = run("move-tenant", "--config", str(config), "--placement",
                   "ss_tenant_models:placement", "acme", "maria")
        assert done.returncode == 1 and "already on shard" in done.stderr
        done = run("move-tenant", "--config", str(config), "--placement", "nope:x", "acme", "main")
        assert done.returncode == 2
    finally:
        cluster.dispose()
