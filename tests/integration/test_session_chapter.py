"""The parity table of ``docs/session.md``, row by row: one test per row, each run on the
atomic local SQLite cluster and on PostgreSQL + MariaDB shards.

Every row of the table names its test here (``test_row_...``), and a test checks that the
table and this module match one to one. The thorough tests of each behaviour (more
cluster mixes, both routings, more cases) are in ``test_savepoints.py``,
``test_isolation_levels.py`` and ``test_external_transaction.py``; these check the claim
each row makes, as written, on both cluster types. Stored rows are read back through
engines of their own.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shardsession import ShardedSession
from shardsession.coordinator.local import local_sqlite_engines

from .test_external_transaction import IDS, MODES, Shards, by_shard, scenario, sharded
from .test_external_transaction import session as recipe_fixture
from .test_savepoints import Base, Cluster, Owner

DOCS = Path(__file__).resolve().parents[2] / "docs" / "session.md"
CLUSTERS = ["sqlite_local", "pg+mariadb"]


def _build(request: pytest.FixtureRequest, mix: str, sqlite_dir: Path,
           **engine_kw: Any) -> Cluster:
    if mix == "sqlite_local":
        shards = local_sqlite_engines(sqlite_dir / "local", ["a", "b"], **engine_kw)
        readers = {n: (lambda n=n: create_engine(f"sqlite:///{sqlite_dir / 'local' / n}.db"))
                   for n in shards}
    else:  # shard a PostgreSQL, shard b MariaDB
        urls = {"a": request.getfixturevalue("pg_url_a"),
                "b": request.getfixturevalue("mariadb_url")}
        shards = {n: create_engine(u, **engine_kw) for n, u in urls.items()}
        readers = {n: (lambda u=u: create_engine(u)) for n, u in urls.items()}
    for e in shards.values():
        Base.metadata.drop_all(e)
        Base.metadata.create_all(e)
    return Cluster(mix, shards, readers, atomic=True)


@pytest.fixture(params=CLUSTERS)
def cluster(request: pytest.FixtureRequest, sqlite_dir: Path) -> Iterator[Cluster]:
    built = _build(request, request.param, sqlite_dir)
    yield built
    for e in built.shards.values():
        e.dispose()


def _owners(*ids: int) -> list[Owner]:
    return [Owner(id=i, name=f"o{i}") for i in ids]


# --- the table and this module ----------------------------------------------------------


def _table_rows() -> list[tuple[str, list[str]]]:
    """(behaviour, the ``test_session_chapter.py`` tests it names) per row of the table."""
    section = DOCS.read_text().split("## Session parity", 1)[1].split("\n### ", 1)[0]
    rows = []
    for line in section.splitlines():
        if line.startswith("| ") and not line.startswith("| behaviour") and "---" not in line:
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            rows.append((cells[0], re.findall(r"test_session_chapter\.py::(\w+)", cells[-1])))
    return rows


def test_every_row_of_the_table_has_its_test_here() -> None:
    rows = _table_rows()
    assert len(rows) >= 11
    named = [names for _, names in rows]
    assert all(len(n) == 1 for n in named), [r for r in rows if len(r[1]) != 1]
    here = sorted(n for n in globals() if n.startswith("test_row_"))
    assert sorted(n[0] for n in named) == here


# --- savepoints -------------------------------------------------------------------------


def test_row_begin_nested(cluster: Cluster) -> None:
    """As a method and as a context manager: a SAVEPOINT on every shard it touches; rolled
    back, its rows are gone from all of them; released, they commit on all of them."""
    s = cluster.session()
    s.add_all(_owners(1, 101))
    sp = s.begin_nested()
    s.add_all(_owners(2, 102))
    s.flush()
    sp.rollback()
    with s.begin_nested():
        s.add_all(_owners(3, 103))
    cluster.commit(s, writers=2)
    s.close()
    assert cluster.stored() == {"a": {1, 3}, "b": {101, 103}}


def test_row_shard_first_touched_inside_a_savepoint(cluster: Cluster) -> None:
    s = cluster.session()
    s.add(Owner(id=1, name="o1"))
    s.flush()  # shard a only
    sp = s.begin_nested()
    s.add(Owner(id=101, name="o101"))  # shard b's first statement is inside the savepoint
    s.flush()
    sp.rollback()
    s.add(Owner(id=102, name="o102"))  # its transaction goes on
    cluster.commit(s, writers=2)
    s.close()
    assert cluster.stored() == {"a": {1}, "b": {102}}


def test_row_nested_levels(cluster: Cluster) -> None:
    s = cluster.session()
    outer = s.begin_nested()
    s.add_all(_owners(1, 101))
    with s.begin_nested():  # released into the outer level
        s.add_all(_owners(2, 102))
    outer.rollback()  # undoes the released inner level too
    s.add_all(_owners(3, 103))
    cluster.commit(s, writers=2)
    s.close()
    assert cluster.stored() == {"a": {3}, "b": {103}}


def test_row_rollback_to_a_savepoint_after_a_flush_error(cluster: Cluster) -> None:
    """The chapter's "skip the duplicates" loop: an IntegrityError inside the savepoint,
    on either shard, does not abort the transaction; the savepoint is undone on all."""
    with cluster.session() as s:
        s.add_all(_owners(1, 101))
        s.commit()
    s = cluster.session()
    batches = [
        [Owner(id=2, name="o2"), Owner(id=102, name="o101")],  # a name taken on shard b
        [Owner(id=103, name="o103"), Owner(id=3, name="o1")],  # a name taken on shard a
        [Owner(id=4, name="o4"), Owner(id=104, name="o104")],
    ]
    kept = []
    for batch in batches:
        try:
            with s.begin_nested():
                s.add_all(batch)
        except IntegrityError:
            continue
        kept += [o.id for o in batch]
    cluster.commit(s, writers=2)
    s.close()
    assert kept == [4, 104]
    assert cluster.stored() == {"a": {1, 4}, "b": {101, 104}}


def test_row_commit_with_a_savepoint_still_open(cluster: Cluster) -> None:
    s = cluster.session()
    s.begin_nested()
    s.add_all(_owners(1, 101))
    cluster.commit(s, writers=2)
    s.close()
    assert cluster.stored() == {"a": {1}, "b": {101}}


def test_row_session_rollback_with_savepoints(cluster: Cluster) -> None:
    s = cluster.session()
    s.add_all(_owners(1, 101))
    with s.begin_nested():
        s.add_all(_owners(2, 102))
    s.begin_nested()
    s.add_all(_owners(3, 103))
    s.flush()
    s.rollback()
    s.close()
    assert cluster.stored() == {"a": set(), "b": set()}
    cluster.no_branch_in_doubt()


def test_row_atomic_commit_after_savepoints(cluster: Cluster) -> None:
    """Two written shards: one atomic commit (the local cluster's one SQLite commit;
    two-phase commit with one decision row on the servers), no warning. A shard whose only
    writes were rolled back to a savepoint then commits as a reader (prepared anyway on
    PostgreSQL, whose server says it wrote: see ``Cluster.commit``)."""
    s = cluster.session()
    s.add_all(_owners(1, 101))
    with s.begin_nested():
        s.add(Owner(id=2, name="o2"))
    cluster.commit(s, writers=2)  # (asserts the decision rows and the warnings)
    s.add(Owner(id=3, name="o3"))
    sp = s.begin_nested()
    s.add(Owner(id=102, name="o102"))
    s.flush()
    sp.rollback()
    cluster.commit(s, writers=1, rolled_back=("b",))
    s.close()
    assert cluster.stored() == {"a": {1, 2, 3}, "b": {101}}
    cluster.no_branch_in_doubt()


# --- isolation levels -------------------------------------------------------------------


def _level(conn: Any) -> str:
    name = conn.dialect.name
    if name == "postgresql":
        return str(conn.exec_driver_sql("SHOW transaction_isolation").scalar()).upper()
    if name == "sqlite":  # SQLite has two: SERIALIZABLE, and READ UNCOMMITTED
        uncommitted = conn.exec_driver_sql("PRAGMA read_uncommitted").scalar()
        return "READ UNCOMMITTED" if uncommitted else "SERIALIZABLE"
    return str(conn.exec_driver_sql("SELECT @@tx_isolation").scalar()).replace("-", " ")


@pytest.mark.parametrize("mix", CLUSTERS)
def test_row_isolation_level_per_shard(
    request: pytest.FixtureRequest, sqlite_dir: Path, mix: str
) -> None:
    """Each shard's server runs the transaction at the level its engine was given, as a
    plain Session on that engine does. The local SQLite cluster's shards share one SQLite
    connection: it takes one level for all of them (``local_sqlite_engines(...,
    isolation_level=...)``)."""
    if mix == "sqlite_local":
        wanted = {"a": "READ UNCOMMITTED", "b": "READ UNCOMMITTED"}
        cluster = _build(request, mix, sqlite_dir, isolation_level="READ UNCOMMITTED")
        engines = cluster.shards
    else:
        wanted = {"a": "REPEATABLE READ", "b": "SERIALIZABLE"}
        cluster = _build(request, mix, sqlite_dir)
        engines = {n: e.execution_options(isolation_level=wanted[n])
                   for n, e in cluster.shards.items()}
    for n, e in engines.items():
        with Session(e) as plain:
            assert _level(plain.connection()) == wanted[n]
    s = ShardedSession(
        shard_chooser=lambda mapper, instance, **k: "a" if instance.id < 100 else "b",
        identity_chooser=lambda mapper, pk, **k: ["a" if pk[0] < 100 else "b"],
        execute_chooser=lambda ctx: list(engines), shards=engines, atomic="require")
    for n in engines:
        assert _level(s.connection(bind_arguments={"shard_id": n})) == wanted[n], n
    s.add_all(_owners(1, 101))
    cluster.commit(s, writers=2)
    s.close()
    assert cluster.stored() == {"a": {1}, "b": {101}}
    for e in cluster.shards.values():
        e.dispose()


@pytest.mark.parametrize("mix", CLUSTERS)
def test_row_level_where_two_phase_commit_cannot_run(
    request: pytest.FixtureRequest, sqlite_dir: Path, mix: str
) -> None:
    """MariaDB below REPEATABLE READ runs without XA: with a PostgreSQL shard that can
    prepare, it holds the decision and the commit is atomic even under ``"require"``. The
    local SQLite cluster needs no two-phase commit at any level: at READ UNCOMMITTED it
    commits atomically as one SQLite commit."""
    if mix == "sqlite_local":
        cluster = _build(request, mix, sqlite_dir, isolation_level="READ UNCOMMITTED")
        engines = cluster.shards
    else:
        cluster = _build(request, mix, sqlite_dir)
        engines = {"a": cluster.shards["a"],
                   "b": cluster.shards["b"].execution_options(isolation_level="READ COMMITTED")}
    s = ShardedSession(
        shard_chooser=lambda mapper, instance, **k: "a" if instance.id < 100 else "b",
        identity_chooser=lambda mapper, pk, **k: ["a" if pk[0] < 100 else "b"],
        execute_chooser=lambda ctx: list(engines), shards=engines, atomic="require")
    s.add(Owner(id=1, name="o1"))
    s.flush()  # PostgreSQL first: the MariaDB shard joins later, without XA
    s.add(Owner(id=101, name="o101"))
    cluster.commit(s, writers=2)
    s.close()
    assert cluster.stored() == {"a": {1}, "b": {101}}
    cluster.no_branch_in_doubt()
    for e in cluster.shards.values():
        e.dispose()


# --- external transactions --------------------------------------------------------------


@pytest.fixture
def shards(cluster: Cluster) -> Shards:
    return Shards(cluster.mix, cluster.shards, cluster.readers)


@pytest.mark.parametrize("mode", MODES)
def test_row_external_transactions(shards: Shards, mode: str) -> None:
    """Joined into outer transactions on every shard: what a plain Session leaves on its
    one connection, on each shard; with the recipe's modes nothing left after the outer
    rollback, and no transaction prepared or committed that the session does not own."""
    plain = scenario(
        lambda connections, m: Session(bind=connections["a"], join_transaction_mode=m),  # type: ignore[arg-type]
        shards.engines, {"a": IDS["a"]}, mode, lambda: {"a": shards.stored()["a"]})
    for e in shards.engines.values():
        with e.begin() as c:
            c.execute(Owner.__table__.delete())
    ours = scenario(sharded, shards.engines, IDS, mode, shards.stored)
    for shard in IDS:
        assert by_shard(ours, shard) == by_shard(plain, "a"), shard
    if mode != "control_fully":
        assert ours["stored after commit"] == {"a": set(), "b": set()}
    shards.no_branch_in_doubt()


def test_row_test_suite_recipe(shards: Shards) -> None:
    """The documented fixture (``test_external_transaction.py`` holds it verbatim and
    checks it against the docs), driven as pytest drives it, around a test that commits
    on both shards: afterwards no shard holds a row."""
    gen = recipe_fixture.__wrapped__(shards.engines)  # type: ignore[attr-defined]
    s = next(gen)
    s.add_all(_owners(*range(1, 9)))
    s.commit()
    assert len(s.query(Owner).all()) == 8
    with pytest.raises(StopIteration):
        next(gen)
    assert shards.stored() == {"a": set(), "b": set()}
    shards.no_branch_in_doubt()
