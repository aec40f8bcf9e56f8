"""The embedded atomic SQLite cluster: one branch, atomic commit, savepoints, rollback."""

from __future__ import annotations

import warnings
from pathlib import Path

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
