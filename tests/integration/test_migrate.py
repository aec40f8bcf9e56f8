"""``shardsession migrate`` over three shards of mixed backends (PostgreSQL, MariaDB,
SQLite): two revisions, an injected failure on one shard reported and resumed, downgrade,
and autogenerate proposing no change after ``create-all`` (shardsession's own tables are
kept out by the ``include_object`` filter)."""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy import create_engine, inspect

from .test_cli import write_config
from .test_cli_config import run

ENV_PY = """
from alembic import context
from ss_mig_models import metadata
from shardsession.migrations import run_migrations

run_migrations(context, metadata)
"""

MODELS = """
from sqlalchemy import Column, Integer, MetaData, String, Table

metadata = MetaData()
Table("mig_items", metadata, Column("id", Integer, primary_key=True, autoincrement=False),
      Column("name", String(20)), Column("qty", Integer))
"""

REV1 = '''
"""items"""
import sqlalchemy as sa
from alembic import op

revision = "r1"
down_revision = None
branch_labels = None
depends_on = None


def upgrade():
    op.create_table("mig_items", sa.Column("id", sa.Integer, primary_key=True,
                                           autoincrement=False),
                    sa.Column("name", sa.String(20)))


def downgrade():
    op.drop_table("mig_items")
'''

REV2 = '''
"""qty"""
import os

import sqlalchemy as sa
from alembic import context, op

from shardsession.migrations import current_shard

revision = "r2"
down_revision = "r1"
branch_labels = None
depends_on = None


def upgrade():
    op.add_column("mig_items", sa.Column("qty", sa.Integer))
    if os.environ.get("SS_MIG_FAIL") == current_shard(context):
        raise RuntimeError("injected failure on " + current_shard(context))


def downgrade():
    op.drop_column("mig_items", "qty")
'''


def _project(tmp_path: Path) -> Path:
    scripts = tmp_path / "migrations"
    (scripts / "versions").mkdir(parents=True)
    (scripts / "env.py").write_text(ENV_PY)
    (scripts / "script.py.mako").write_text("")
    (scripts / "versions" / "r1_items.py").write_text(REV1)
    (scripts / "versions" / "r2_qty.py").write_text(REV2)
    (tmp_path / "ss_mig_models.py").write_text(MODELS)
    (tmp_path / "alembic.ini").write_text("[alembic]\nscript_location = migrations\n")
    return tmp_path


def _columns(url: str) -> set[str]:
    e = create_engine(url)
    try:
        insp = inspect(e)
        if "mig_items" not in insp.get_table_names():
            return set()
        return {c["name"] for c in insp.get_columns("mig_items")}
    finally:
        e.dispose()


def migrate(project: Path, config: Path, *args: str, env: dict[str, str] | None = None,
            ) -> tuple[int, dict[str, object]]:
    proc = run("migrate", *args, "--config", str(config), "--json", cwd=project,
               env={"PYTHONPATH": f"{Path(__file__).resolve().parents[2]}:{project}",
                    **(env or {})})
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout + proc.stderr  # one JSON document, nothing else
    return proc.returncode, json.loads(lines[0])


def _where(doc: dict[str, object]) -> dict[str, list[str]]:
    shards = doc["shards"]
    assert isinstance(shards, list)
    return {s["shard"]: s["after"] for s in shards}


def test_two_revisions_over_mixed_shards_with_a_failure_resumed(
    pg_url_a: str, mariadb_url: str, tmp_path: Path
) -> None:
    project = _project(tmp_path)
    urls = {"pg": pg_url_a, "maria": mariadb_url, "lite": f"sqlite:///{tmp_path / 'lite.db'}"}
    config = write_config(tmp_path / "cluster.toml", urls)

    code, doc = migrate(project, config, "current")
    assert code == 1 and _where(doc) == {"pg": [], "maria": [], "lite": []}
    assert doc["script_heads"] == ["r2"]

    code, doc = migrate(project, config, "upgrade", "r1")
    assert code == 0, doc
    assert _where(doc) == {"pg": ["r1"], "maria": ["r1"], "lite": ["r1"]}

    # r2 fails on MariaDB (after its ALTER: MariaDB DDL is not transactional): the command
    # stops there, reports where each shard is, and exits 1
    code, doc = migrate(project, config, "upgrade", env={"SS_MIG_FAIL": "maria"})
    assert code == 1
    by_shard = {s["shard"]: s for s in doc["shards"]}  # type: ignore[union-attr]
    assert by_shard["pg"]["status"] == "done" and by_shard["pg"]["after"] == ["r2"]
    assert by_shard["maria"]["status"] == "failed" and by_shard["maria"]["after"] == ["r1"]
    assert "injected failure on maria" in by_shard["maria"]["error"]
    assert by_shard["lite"]["status"] == "not attempted" and by_shard["lite"]["after"] == ["r1"]
    code, doc = migrate(project, config, "current")
    assert code == 1 and _where(doc) == {"pg": ["r2"], "maria": ["r1"], "lite": ["r1"]}
    text = run("migrate", "current", "--config", str(config), cwd=project)
    assert "shards are on different revisions" in text.stdout, text.stdout
    assert "maria at r1" in text.stdout and "pg at r2" in text.stdout

    # the half-done ALTER on MariaDB is the operator's to undo; then the same command resumes
    admin = create_engine(mariadb_url)
    with admin.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE mig_items DROP COLUMN qty")
    admin.dispose()
    code, doc = migrate(project, config, "upgrade")
    assert code == 0, doc
    assert _where(doc) == {"pg": ["r2"], "maria": ["r2"], "lite": ["r2"]}
    for url in urls.values():
        assert _columns(url) == {"id", "name", "qty"}
    assert migrate(project, config, "current")[0] == 0

    # autogenerate against every shard proposes nothing, after create-all added
    # shardsession's own tables to each
    created = run("create-all", "--config", str(config))
    assert created.returncode == 0, created.stdout + created.stderr
    code, doc = migrate(project, config, "check")
    assert code == 0, doc
    assert all(s["changes"] == "" for s in doc["shards"])  # type: ignore[union-attr]

    code, doc = migrate(project, config, "downgrade", "r1")
    assert code == 0, doc
    assert _where(doc) == {"pg": ["r1"], "maria": ["r1"], "lite": ["r1"]}
    for url in urls.values():
        assert _columns(url) == {"id", "name"}


def test_check_reports_a_difference_and_the_filter_matters(tmp_path: Path) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import MetaData

    from shardsession.migrations import include_object

    project = _project(tmp_path)
    urls = {"a": f"sqlite:///{tmp_path / 'a.db'}", "b": f"sqlite:///{tmp_path / 'b.db'}"}
    config = write_config(tmp_path / "cluster.toml", urls)
    assert run("create-all", "--config", str(config)).returncode == 0
    code, doc = migrate(project, config, "upgrade", "r1")
    assert code == 0, doc
    code, doc = migrate(project, config, "check")  # the models have qty, r1 has not
    assert code == 1
    assert all(s["status"] == "failed" or s["changes"] for s in doc["shards"])  # type: ignore[union-attr]

    engine = create_engine(urls["a"])
    try:
        with engine.connect() as conn:
            plain = compare_metadata(MigrationContext.configure(conn), MetaData())
            filtered = compare_metadata(
                MigrationContext.configure(conn, opts={"include_object": include_object}),
                MetaData())
    finally:
        engine.dispose()
    dropped = {d[1].name for d in plain if d[0] == "remove_table"}
    assert {"shardsession_decisions", "shardsession_cluster"} <= dropped
    assert {d[1].name for d in filtered if d[0] == "remove_table"} == {"mig_items"}


def test_missing_project_is_a_configuration_error(tmp_path: Path) -> None:
    config = write_config(tmp_path / "cluster.toml", {"a": f"sqlite:///{tmp_path / 'a.db'}"})
    proc = run("migrate", "current", "--config", str(config), cwd=tmp_path)
    assert proc.returncode == 2 and "no Alembic project" in proc.stderr


def test_a_failed_revision_on_sqlite_keeps_none_of_its_ddl_and_resumes(tmp_path: Path) -> None:
    """pysqlite commits before DDL unless told otherwise: the failed r2's ADD COLUMN must
    be rolled back with it, so that the same command run again resumes at r1."""
    project = _project(tmp_path)
    config = tmp_path / "cluster.toml"
    config.write_text('[shards.a]\nurl = "sqlite:///a.db"\n[shards.b]\nurl = "sqlite:///b.db"\n')
    code, doc = migrate(project, config, "upgrade", env={"SS_MIG_FAIL": "b"})
    assert code == 1 and _where(doc) == {"a": ["r2"], "b": ["r1"]}, doc
    assert _columns(f"sqlite:///{tmp_path / 'b.db'}") == {"id", "name"}
    code, doc = migrate(project, config, "upgrade")
    assert code == 0 and _where(doc) == {"a": ["r2"], "b": ["r2"]}, doc
    assert _columns(f"sqlite:///{tmp_path / 'b.db'}") == {"id", "name", "qty"}


def test_stamp_after_create_all_metadata(tmp_path: Path) -> None:
    """Tables made by ``create-all --metadata`` (not by Alembic): ``migrate stamp`` marks
    every shard as at head, after which ``current`` and ``check`` pass."""
    project = _project(tmp_path)
    config = tmp_path / "cluster.toml"
    config.write_text('[shards.a]\nurl = "sqlite:///a.db"\n[shards.b]\nurl = "sqlite:///b.db"\n')
    proc = run("create-all", "--config", str(config), "--metadata", "ss_mig_models:metadata",
               cwd=project, env={"PYTHONPATH": f"{Path(__file__).resolve().parents[2]}:{project}"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    code, doc = migrate(project, config, "current")
    assert code == 1 and _where(doc) == {"a": [], "b": []}, doc
    code, doc = migrate(project, config, "stamp")
    assert code == 0 and _where(doc) == {"a": ["r2"], "b": ["r2"]}, doc
    code, doc = migrate(project, config, "stamp")  # again: nothing changes
    assert code == 0 and _where(doc) == {"a": ["r2"], "b": ["r2"]}, doc
    assert migrate(project, config, "current")[0] == 0
    assert migrate(project, config, "check")[0] == 0
