"""ORDER BY ... LIMIT over ORM entities: rows are merged before the ORM builds objects.

Only the rows one database would return become objects (counted with the ``load``
event); the results are those of one database, on SQLite and PostgreSQL shards, with
eager loaders, with the fallbacks (``unique()``, ``yield_per``) and with the refusal of
an ORDER BY the database collates differently from Python.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import event, select
from sqlalchemy.orm import Session, joinedload, selectinload
from sqlalchemy.sql import Select

from shardsession.exc import UnsupportedQueryError

from . import test_query_property as qp
from .conftest import _Databases

Item = qp.Item
Tag = qp.Tag

SETTINGS = settings(
    derandomize=True,
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
ATTRS = {"grp": Item.grp, "a": Item.a, "b": Item.b}


@pytest.fixture
def sqlite_cluster(tmp_path: Any) -> Iterator[qp.Cluster]:
    urls = {f"s{i}": f"sqlite:///{tmp_path}/s{i}.db" for i in range(3)}
    cluster = qp.make_cluster(urls, f"sqlite:///{tmp_path}/oracle.db")
    yield cluster
    qp.dispose(cluster)


@st.composite
def entity_queries(draw: st.DrawFn, explicit_nulls: bool = True) -> Select[Any]:
    """``select(Item)`` ordered by columns that are not selected, then by id."""
    names = draw(st.lists(st.sampled_from(list(ATTRS)), max_size=3, unique=True))
    order = []
    for name in names:
        el = ATTRS[name].desc() if draw(st.booleans()) else ATTRS[name].asc()
        nulls = draw(st.sampled_from([None, "first", "last"])) if explicit_nulls else None
        order.append(el.nulls_first() if nulls == "first" else el.nulls_last() if nulls else el)
    order.append(Item.id.desc() if draw(st.booleans()) else Item.id.asc())
    stmt = select(Item).where(*qp._filters(draw)).order_by(*order)
    stmt = stmt.limit(draw(st.integers(0, 8)))
    offset = draw(st.one_of(st.none(), st.integers(0, 5)))
    return stmt if offset is None else stmt.offset(offset)


def _count_loads() -> tuple[list[int], Any]:
    loads: list[int] = []

    def on_load(target: Any, context: Any) -> None:
        loads.append(target.id)

    event.listen(Item, "load", on_load)
    return loads, on_load


def _check(cluster: qp.Cluster, stmt: Select[Any]) -> None:
    with Session(cluster.oracle) as oracle:
        want = [i.id for i in oracle.scalars(stmt)]
    loads, on_load = _count_loads()
    try:
        with cluster.session() as s:
            got = [i.id for i in s.scalars(stmt)]
    finally:
        event.remove(Item, "load", on_load)
    assert got == want, str(stmt)
    assert sorted(loads) == sorted(got), "objects built for rows the LIMIT dropped"


@SETTINGS
@given(data=qp.datasets(), stmt=entity_queries())
def test_sqlite_entities_match_one_database(
    sqlite_cluster: qp.Cluster, data: Any, stmt: Select[Any]
) -> None:
    sqlite_cluster.load(*data)
    _check(sqlite_cluster, stmt)


@pytest.fixture
def mixed_cluster(pg_server_a: Any, tmp_path: Any,
                  databases: _Databases) -> Iterator[qp.Cluster]:
    urls = {"a_pg": databases.new(pg_server_a), "b_sqlite": f"sqlite:///{tmp_path}/m.db"}
    cluster = qp.make_cluster(urls, f"sqlite:///{tmp_path}/oracle.db")
    yield cluster
    qp.dispose(cluster)


@SETTINGS
@given(data=qp.datasets(), stmt=entity_queries(explicit_nulls=False))
def test_mixed_backends_entities_match_one_database(
    mixed_cluster: qp.Cluster, data: Any, stmt: Select[Any]
) -> None:
    """PostgreSQL and SQLite shards: NULLs placed by the documented mixed rule."""
    mixed_cluster.load(*data)
    _check(mixed_cluster, stmt)


@SETTINGS
@given(data=qp.datasets(), stmt=entity_queries())
def test_postgresql_entities_match_one_database(
    pg_cluster: qp.Cluster, data: Any, stmt: Select[Any]
) -> None:
    pg_cluster.load(*data)
    _check(pg_cluster, stmt)


def _rows(n: int) -> list[dict[str, Any]]:
    return [
        {"id": i, "grp": "abc"[i % 3], "a": i % 5 or None, "b": (i * 7) % 11} for i in range(1, n)
    ]


def test_eager_loaders_and_fallbacks(sqlite_cluster: qp.Cluster) -> None:
    rows = _rows(40)
    sqlite_cluster.load(rows, [r["id"] % 3 for r in rows])
    stmt = select(Item).order_by(Item.b.desc(), Item.id).offset(3).limit(6)
    with Session(sqlite_cluster.oracle) as oracle:
        want = [(i.id, [t.id for t in i.tags]) for i in oracle.scalars(stmt)]
    for option, unique in ((selectinload(Item.tags), False), (joinedload(Item.tags), True)):
        loads, on_load = _count_loads()
        try:
            with sqlite_cluster.session() as s:
                result = s.scalars(stmt.options(option))
                items = (result.unique() if unique else result).all()
                assert [(i.id, [t.id for t in i.tags]) for i in items] == want
        finally:
            event.remove(Item, "load", on_load)
        if not unique:
            assert sorted(loads) == sorted(i for i, _ in want)
    with sqlite_cluster.session() as s:
        streamed = [i.id for i in s.scalars(stmt.execution_options(yield_per=2))]
    assert streamed == [i for i, _ in want]


def test_collated_order_is_merged_or_refused(sqlite_cluster: qp.Cluster) -> None:
    """ORDER BY under SQLite's NOCASE is merged under NOCASE (it used to be refused when a
    shard's rows came out of code point order); a collation the merge cannot reproduce
    (user-defined) is refused before any row is read."""
    rows = [{"id": i, "grp": g, "a": 1, "b": 1} for i, g in enumerate("aBcD", start=1)]
    sqlite_cluster.load(rows, [0, 0, 1, 1])
    stmt = select(Item).order_by(Item.grp.collate("NOCASE"), Item.id).limit(3)
    with sqlite_cluster.session() as s:
        ours = [i.id for i in s.scalars(stmt)]
    with Session(sqlite_cluster.oracle) as o:
        want = [i.id for i in o.scalars(stmt)]
    assert ours == want == [1, 2, 3]

    def reverse(a: str, b: str) -> int:
        return (a < b) - (a > b)

    for engine in sqlite_cluster.engines.values():
        engine.dispose()
        event.listen(
            engine, "connect", lambda dbapi, _: dbapi.create_collation("REVERSE", reverse)
        )
    odd = select(Item).order_by(Item.grp.collate("REVERSE"), Item.id).limit(3)
    with sqlite_cluster.session() as s, pytest.raises(UnsupportedQueryError) as info:
        s.scalars(odd).all()
    assert info.value.construct == "collation in ORDER BY"
