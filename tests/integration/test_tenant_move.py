"""move_tenant: a tenant moves between PostgreSQL and MariaDB shards while writers of it
and of another tenant run; nothing is lost, nothing lands on the old shard."""

from __future__ import annotations

import itertools
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, delete, insert, select, text
from sqlalchemy.engine import make_url

from shardsession.exc import StaleTenantDirectoryError, TenantError
from shardsession.tenancy import move_tenant

from .test_tenant_isolation import SHARDS, Account, Comment, Env, Invoice, _seed, _urls

TENANT_TABLES = ("tn_account", "tn_invoice", "tn_comment")


@pytest.fixture(params=["postgresql", "pg+mariadb"])
def env(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Env]:
    urls, made = _urls(request, request.param, tmp_path)
    engines = {s: create_engine(u) for s, u in zip(SHARDS, urls, strict=True)}
    try:
        e = Env(engines)
        _seed(e)
        with engines["s0"].begin() as c:  # (the poison of the isolation tests: not here)
            c.execute(delete(Comment.__table__).where(Comment.__table__.c.id == 999))
        with e.Session(tenant="acme") as s:  # a bigger acme: several copy batches
            for i in range(1000, 1300):
                a = Account(id=i, name=f"a{i}", balance=i)
                a.invoices.append(Invoice(id=i, amount=i))
                s.add(a)
                s.add(Comment(id=i, account_id=i, body=f"c{i}"))
            s.commit()
        yield e
    finally:
        for engine in engines.values():
            engine.dispose()
        for server, url in made:
            server.drop_database(make_url(url).database)


def _rows(env: Env, shard: str, tenant: str) -> dict[str, set[tuple[Any, ...]]]:
    with env.engines[shard].connect() as c:
        return {t: {tuple(r) for r in c.exec_driver_sql(
            f"SELECT * FROM {t} WHERE tenant_id = '{tenant}'")} for t in TENANT_TABLES}


def test_move_under_load(env: Env) -> None:
    before = _rows(env, "s0", "acme")
    globex_before = _rows(env, "s1", "globex")
    assert sum(len(v) for v in before.values()) > 900
    stop = threading.Event()
    done: dict[str, list[int]] = {"acme": [], "globex": []}
    retries: list[str] = []
    errors: list[BaseException] = []
    ids = {"acme": itertools.count(5000), "globex": itertools.count(7000)}

    def writer(tenant: str, account: int) -> None:
        while not stop.is_set():
            cid = next(ids[tenant])  # (atomic under the GIL)
            try:
                with env.Session(tenant=tenant) as s:
                    a = s.get(Account, account)
                    assert a is not None
                    a.balance += 1
                    s.add(Comment(id=cid, account_id=account, body=f"w{cid}"))
                    s.commit()
                done[tenant].append(cid)
            except StaleTenantDirectoryError:
                retries.append(tenant)  # the move switched under it: run it again
            except BaseException as e:  # anything else fails the test
                errors.append(e)
                return
            time.sleep(0.005)

    threads = [threading.Thread(target=writer, args=("acme", 101)),
               threading.Thread(target=writer, args=("acme", 102)),
               threading.Thread(target=writer, args=("globex", 201))]
    for t in threads:
        t.start()
    time.sleep(0.5)
    seen: list[tuple[str, str, int]] = []
    report = move_tenant(env.Session, "acme", "s1", batch_size=70,
                         progress=lambda *a: seen.append(a))
    time.sleep(0.5)  # writers keep going on the new shard
    stop.set()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert report.source == "s0" and report.target == "s1" and report.version == 2
    assert report.copied["tn_account"] >= 302
    assert ("copy", "tn_account", 70) in seen
    assert env.directory.shard_of("acme") == "s1"
    assert env.directory.assignments()["acme"] == ("s1", 2)
    assert len(done["acme"]) > 0 and len(done["globex"]) > 0

    # nothing of acme is left on the old shard, and nothing was lost
    assert _rows(env, "s0", "acme") == {t: set() for t in TENANT_TABLES}
    after = _rows(env, "s1", "acme")
    comments = {r[0] for r in after["tn_comment"]}
    assert comments == {r[0] for r in before["tn_comment"]} | set(done["acme"])
    assert {r[0] for r in after["tn_account"]} == {r[0] for r in before["tn_account"]}
    assert after["tn_invoice"] == before["tn_invoice"]
    balance = {r[0]: r[3] for r in after["tn_account"]}
    start = {r[0]: r[3] for r in before["tn_account"]}
    wrote = len(done["acme"])
    assert balance[101] + balance[102] == start[101] + start[102] + wrote
    assert all(balance[i] == start[i] for i in start if i not in (101, 102))
    # globex (on the target shard all along) kept every write
    globex = _rows(env, "s1", "globex")
    assert {r[0] for r in globex["tn_comment"]} == (
        {r[0] for r in globex_before["tn_comment"]} | set(done["globex"]))
    with env.engines["s0"].connect() as c:
        owners = c.exec_driver_sql(
            "SELECT tenant FROM shardsession_tenant_owners ORDER BY tenant").scalars().all()
    assert owners == ["initech"]
    with env.Session(tenant="acme") as s:  # a fresh session reads acme from s1
        assert len(s.scalars(select(Account)).all()) == 302


def test_move_refuses_and_leaves_the_tenant_where_it_was(env: Env) -> None:
    with pytest.raises(TenantError):
        move_tenant(env.Session, "acme", "s0")  # already there
    with pytest.raises(TenantError):
        move_tenant(env.Session, "nobody", "s1")
    # an owner row on the target that the directory does not name: refused, nothing moved
    with env.engines["s2"].begin() as c:
        c.execute(insert(env.directory_owner_table()).values(tenant="acme", version=7))
    with pytest.raises(TenantError, match="inconsistent"):
        move_tenant(env.Session, "acme", "s2")
    assert env.directory.shard_of("acme") == "s0"
    with env.Session(tenant="acme") as s:
        assert len(s.scalars(select(Account)).all()) == 302


_CHILD = r"""
import os, sys
sys.path.insert(0, sys.argv[1])
from sqlalchemy import create_engine
from tests.integration.test_tenant_isolation import SHARDS, Env
from shardsession.tenancy import move_tenant

urls, mode = sys.argv[2].split(","), sys.argv[3]
env = Env({s: create_engine(u) for s, u in zip(SHARDS, urls)})
batches = []

def progress(phase, table, rows):
    batches.append(phase)
    if mode == "copy" and len(batches) == 3:
        os._exit(3)  # killed in the middle of the copy

move_tenant(env.Session, "acme", "s1", batch_size=20, progress=progress)
print("moved")
"""


def _child(env: Env, mode: str) -> subprocess.Popen[str]:
    urls = ",".join(str(e.url.render_as_string(hide_password=False))
                    for e in env.engines.values())
    root = str(Path(__file__).resolve().parents[2])
    return subprocess.Popen([sys.executable, "-c", _CHILD, root, urls, mode],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _complete_on(env: Env, shard: str, before: dict[str, set[tuple[Any, ...]]]) -> None:
    assert _rows(env, shard, "acme") == before
    env.directory.refresh()
    assert env.directory.shard_of("acme") == shard
    with env.Session(tenant="acme") as s:
        assert len(s.scalars(select(Account)).all()) == 302


def test_a_crash_in_the_copy_or_the_switch_leaves_the_tenant_on_the_source(env: Env) -> None:
    """(s0, the source and the directory's shard, is PostgreSQL in both variants: the
    switch's wait is seen in its pg_stat_activity.)"""
    before = _rows(env, "s0", "acme")

    child = _child(env, "copy")  # 1. killed after three copy batches
    out, err = child.communicate(timeout=300)
    assert child.returncode == 3, out + err
    assert 0 < len(_rows(env, "s1", "acme")["tn_account"]) < 302  # ownerless leftovers
    _complete_on(env, "s0", before)

    # 2. killed inside the switch: it waits for the owner row a tenant session holds
    with env.Session(tenant="acme") as holder:
        holder.scalars(select(Account).limit(1)).all()  # holds the owner row FOR SHARE
        child = _child(env, "switch")
        deadline = time.monotonic() + 120
        with env.engines["s0"].connect() as c:
            while True:
                waiting = c.execute(text(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND query LIKE :q"), {"q": "%shardsession_tenant_owners%FOR UPDATE%"}
                ).scalar()
                c.rollback()  # (pg_stat_activity is a snapshot per transaction)
                if waiting:
                    break
                assert child.poll() is None, child.communicate()
                assert time.monotonic() < deadline, "the switch never reached its lock"
                time.sleep(0.1)
        child.kill()
        child.communicate(timeout=60)
        holder.rollback()
    _complete_on(env, "s0", before)
    with env.engines["s1"].connect() as c:
        assert c.exec_driver_sql("SELECT count(*) FROM shardsession_tenant_owners "
                                 "WHERE tenant = 'acme'").scalar() == 0
        if env.engines["s1"].dialect.name == "postgresql":
            assert c.exec_driver_sql("SELECT count(*) FROM pg_prepared_xacts "
                                     "WHERE database = current_database()").scalar() == 0
        else:  # MariaDB: no XA branch left prepared
            assert c.exec_driver_sql("XA RECOVER").all() == []

    report = move_tenant(env.Session, "acme", "s1", batch_size=50)  # 3. run again
    assert report.version == 2
    _complete_on(env, "s1", before)
    assert _rows(env, "s0", "acme") == {t: set() for t in TENANT_TABLES}
