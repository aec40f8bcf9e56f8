"""PostgreSQL roles as the README documents them, with real non-superuser roles: an
application role and a recovery worker granted only SELECT/INSERT/DELETE on the decision
table and SELECT on the cluster table (PostgreSQL 15: no CREATE on schema public).

The application commits across shards and never sends DDL for tables that exist; the
worker can claim an abort but cannot finish branches another role prepared (PostgreSQL:
only the preparing role or a superuser), which ``status`` and ``recover`` say; recovery as
the application's role then finishes them."""

from __future__ import annotations

import secrets
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from shardsession.coordinator import prepare_shards

from .test_cli import count, write_config
from .test_cli_config import run
from .test_crash_matrix import _create, run_child


def _as(url: str, role: str) -> str:
    return make_url(url).set(username=role, password=None).render_as_string(hide_password=False)


def _admin(url: str, *statements: str) -> None:
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            for sql in statements:
                conn.execute(text(sql))
    finally:
        engine.dispose()


@pytest.fixture
def roles(pg_url_a: str, pg_url_b: str) -> Iterator[tuple[dict[str, str], str, str, str]]:
    tag = secrets.token_hex(4)
    app, worker, nobody = f"ss_app_{tag}", f"ss_worker_{tag}", f"ss_nobody_{tag}"
    urls = {"alpha": pg_url_a, "beta": pg_url_b}
    for url in urls.values():
        _admin(url, *(f"CREATE ROLE {r} LOGIN" for r in (app, worker, nobody)))
    try:
        yield urls, app, worker, nobody
    finally:
        for url in urls.values():
            _admin(url, *(f"DROP OWNED BY {r}" for r in (app, worker, nobody)),
                   *(f"DROP ROLE {r}" for r in (app, worker, nobody)))


def test_worker_and_application_roles(
    roles: tuple[dict[str, str], str, str, str], tmp_path: Path,
    twophase_cleanup: Callable[..., None],
) -> None:
    urls, app, worker, nobody = roles
    for url in urls.values():
        twophase_cleanup(url)
    _create(urls)  # application tables, as their owner
    engines = {n: create_engine(u) for n, u in urls.items()}
    assert all(not s.failed for s in prepare_shards(engines))  # create-all, as the owner
    for e in engines.values():
        e.dispose()
    for name, url in urls.items():
        _admin(
            url,
            f"GRANT SELECT, INSERT, DELETE ON shardsession_decisions TO {app}, {worker}",
            f"GRANT SELECT ON shardsession_cluster TO {app}, {worker}",
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON ss_rows_{name} TO {app}",
        )
    app_urls = {n: _as(u, app) for n, u in urls.items()}
    worker_urls = {n: _as(u, worker) for n, u in urls.items()}
    grace = "[cluster]\nrecovery_grace = 0\n\n"

    # the application role commits across shards (no DDL: it may not create in public)
    committed = run_child({"urls": app_urls, "crash": "none", "key": 1})
    assert committed.returncode == 0 and "committed" in committed.stdout, committed.stderr
    assert count(urls, 1) == {"alpha": 1, "beta": 1}

    # ... and crashes with every branch prepared, no decision
    crashed = run_child({"urls": app_urls, "crash": "after_all_prepared", "key": 2})
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr

    worker_cfg = write_config(tmp_path / "worker.toml", worker_urls, grace)
    status = run("status", "--config", str(worker_cfg))
    assert status.returncode == 1, status.stdout + status.stderr
    assert "CANNOT FINISH" in status.stdout and f"prepared by role '{app}'" in status.stdout
    assert "cannot SELECT" not in status.stdout and "cannot INSERT" not in status.stdout
    assert f"role '{worker}' is not a superuser" in status.stdout

    by_worker = run("recover", "--config", str(worker_cfg))
    out = by_worker.stdout + by_worker.stderr
    assert by_worker.returncode == 1, out
    assert "permission denied for schema" not in out
    assert "left in doubt" in out and "committed=0 rolled_back=0" in out
    assert count(urls, 2) == {"alpha": 0, "beta": 0}  # still prepared: invisible

    app_cfg = write_config(tmp_path / "app.toml", app_urls, grace)
    by_app = run("recover", "--config", str(app_cfg))
    assert by_app.returncode == 0, by_app.stdout + by_app.stderr
    assert "rolled_back=1" in by_app.stdout  # the prepared one (alpha decides): follows
    # the abort the worker claimed
    assert count(urls, 2) == {"alpha": 0, "beta": 0}
    assert run("status", "--config", str(worker_cfg)).returncode == 0

    nobody_cfg = write_config(tmp_path / "nobody.toml",
                              {n: _as(u, nobody) for n, u in urls.items()})
    lacking = run("status", "--config", str(nobody_cfg))
    assert "cannot SELECT on shardsession_decisions" in lacking.stdout, lacking.stdout
    assert "cannot DELETE on shardsession_decisions" in lacking.stdout
