"""The embedded atomic SQLite cluster: one branch, atomic commit, savepoints, rollback."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from shardsession.coordinator import TransactionCoordinator
from shardsession.coordinator.local import local_sqlite_engines

from ._2pc_child import tables


def test_local_cluster_is_atomic_and_supports_savepoints(sqlite_dir: Path) -> None:
    engines = local_sqlite_engines(sqlite_dir, ["alpha", "beta"])
    _md, t = tables(["alpha", "beta"])
    for n, e in engines.items():
        t[n].create(e)
    coord = TransactionCoordinator(atomic="require")
    names = {e: n for n, e in engines.items()}

    def session() -> Session:
        s = Session()
        coord.install(s, names.__getitem__)
        return s

    def count(n: str) -> int:
        with engines[n].connect() as c:
            return int(c.scalar(select(func.count()).select_from(t[n])) or 0)

    s = session()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with s.begin():
            for n in ("alpha", "beta"):
                s.connection(bind_arguments={"bind": engines[n]}).execute(
                    t[n].insert().values(id=1, v=n))
            sp = s.begin_nested()
            s.connection(bind_arguments={"bind": engines["beta"]}).execute(
                t["beta"].insert().values(id=2, v="sp"))
            sp.rollback()
    assert count("alpha") == count("beta") == 1
    assert (sqlite_dir / "alpha.db").exists() and (sqlite_dir / "beta.db").exists()
    s = session()
    for n in ("alpha", "beta"):
        s.connection(bind_arguments={"bind": engines[n]}).execute(t[n].insert().values(id=3, v=n))
    s.rollback()
    assert count("alpha") == count("beta") == 1
    engines["alpha"].dispose()


def test_an_autocommit_first_connection_leaves_the_writes_after_it_counted(
    sqlite_dir: Path,
) -> None:
    """An AUTOCOMMIT connection is never a branch: the next shard's connection becomes the
    transaction's first, and its writes must count when a third shard joins. Two SQLite
    writers cannot commit atomically, so ``require`` refuses and nothing is committed
    (before: the second engine's listener was not installed, its write went unseen, and
    the commit went through as if only the third shard wrote)."""
    from sqlalchemy import create_engine, text

    from shardsession import ShardedSession
    from shardsession.exc import AtomicityUnavailableError

    names = ("a", "b", "c")
    engines = {n: create_engine(f"sqlite:///{sqlite_dir / f'ac_{n}.db'}") for n in names}
    _md, t = tables(list(names))
    for n, e in engines.items():
        t[n].create(e)
    with ShardedSession(shard_chooser=lambda *a, **k: "a", identity_chooser=lambda *a, **k: ["a"],
                        execute_chooser=lambda ctx: ["a"], shards=engines,
                        atomic="require") as s:
        s.connection(bind_arguments={"shard_id": "a"},
                     execution_options={"isolation_level": "AUTOCOMMIT"}).execute(text("SELECT 1"))
        for n in ("b", "c"):
            s.connection(bind_arguments={"shard_id": n}).execute(t[n].insert().values(id=1, v=n))
        with pytest.raises(AtomicityUnavailableError):
            s.commit()
    for n in ("b", "c"):
        with engines[n].connect() as c:
            assert c.scalar(select(func.count()).select_from(t[n])) == 0
    for e in engines.values():
        e.dispose()
