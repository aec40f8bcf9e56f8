"""Property: a merged cross-shard query returns what one database holding all rows returns.

Random rows are spread over 2-4 shards; random statements from the supported grammar
(filters, ORDER BY on several keys ASC/DESC with NULLs, LIMIT/OFFSET, DISTINCT, COUNT /
SUM / MIN / MAX / AVG with and without GROUP BY and HAVING) run through
:class:`shardsession.ShardedSession` and on an oracle database holding every row.

Data is restricted so that the oracle is exact on every backend: strings are single
lower-case ASCII letters (every collation orders and groups them the same way), numbers
are small integers.  Helpers here are reused by ``test_query_backends.py``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import (
    Engine,
    ForeignKey,
    Integer,
    String,
    create_engine,
    delete,
    func,
    insert,
    select,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship
from sqlalchemy.sql import Select

from shardsession import ShardedSession


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "qitems"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    grp: Mapped[str | None] = mapped_column(String(8), nullable=True)
    a: Mapped[int | None] = mapped_column(Integer, nullable=True)
    b: Mapped[int | None] = mapped_column(Integer, nullable=True)
    tags: Mapped[list[Tag]] = relationship(back_populates="item", order_by="Tag.id")


class Tag(Base):
    __tablename__ = "qtags"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    item_id: Mapped[int] = mapped_column(ForeignKey("qitems.id"))
    label: Mapped[str] = mapped_column(String(8))
    item: Mapped[Item] = relationship(back_populates="tags")


ITEMS = Item.__table__
TAGS = Tag.__table__


@dataclass
class Cluster:
    """Shard engines, an oracle engine, and a session factory over the shards."""

    engines: dict[str, Engine]
    oracle: Engine
    placement: dict[int, str]

    def session(self, **kw: Any) -> ShardedSession:
        shards = sorted(self.engines)

        def shard_chooser(mapper: Any, instance: Any, **_: Any) -> str:
            key = instance.id if isinstance(instance, Item) else instance.item_id
            return self.placement.get(key, shards[0])

        return ShardedSession(
            shard_chooser=shard_chooser,
            identity_chooser=lambda *a, **k: shards,
            execute_chooser=lambda ctx: shards,
            shards=self.engines,
            **kw,
        )

    def load(self, rows: Sequence[dict[str, Any]], shard_of: Sequence[int]) -> None:
        """Replace every shard's rows (row i goes to shard ``shard_of[i]``) and the oracle's."""
        shards = sorted(self.engines)
        self.placement = {
            r["id"]: shards[s % len(shards)] for r, s in zip(rows, shard_of, strict=True)
        }
        tags = [
            {"id": r["id"] * 10 + j, "item_id": r["id"], "label": "t"}
            for r in rows
            for j in range(r["id"] % 3)
        ]
        for name, engine in [*self.engines.items(), ("oracle", self.oracle)]:
            mine = [r for r in rows if name == "oracle" or self.placement[r["id"]] == name]
            ids = {r["id"] for r in mine}
            with engine.begin() as conn:
                conn.execute(delete(TAGS))
                conn.execute(delete(ITEMS))
                if mine:
                    conn.execute(insert(ITEMS), list(mine))
                my_tags = [t for t in tags if t["item_id"] in ids]
                if my_tags:
                    conn.execute(insert(TAGS), my_tags)


def make_cluster(shard_urls: dict[str, str], oracle_url: str) -> Cluster:
    engines = {name: create_engine(url) for name, url in shard_urls.items()}
    oracle = create_engine(oracle_url)
    for e in [*engines.values(), oracle]:
        Base.metadata.create_all(e)
    return Cluster(engines, oracle, {})


def dispose(cluster: Cluster) -> None:
    for e in [*cluster.engines.values(), cluster.oracle]:
        e.dispose()


# ----------------------------------------------------------------------------------------
# the grammar


@st.composite
def datasets(draw: st.DrawFn, max_rows: int = 25) -> tuple[list[dict[str, Any]], list[int]]:
    n = draw(st.integers(0, max_rows))
    ids = draw(st.lists(st.integers(1, 500), min_size=n, max_size=n, unique=True))
    small = st.one_of(st.none(), st.integers(-3, 6))
    rows = [
        {
            "id": i,
            "grp": draw(st.sampled_from([None, "a", "b", "c"])),
            "a": draw(small),
            "b": draw(small),
        }
        for i in ids
    ]
    shard_of = draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
    return rows, shard_of


@dataclass(frozen=True)
class QuerySpec:
    """A generated statement and how strictly its result can be compared."""

    build: Callable[[], Select[Any]]
    #: "exact": same rows in the same order; "keys": same sort-key sequence (ORDER BY
    #: not total) and, without LIMIT, same multiset; "bag": same multiset; "count": LIMIT
    #: without ORDER BY -- same number of rows, all of them oracle rows
    compare: str
    key_positions: tuple[int, ...] = ()
    text: str = ""


COLS = {"id": ITEMS.c.id, "grp": ITEMS.c.grp, "a": ITEMS.c.a, "b": ITEMS.c.b}


def _filters(draw: st.DrawFn) -> list[Any]:
    out = []
    if draw(st.booleans()):
        out.append(ITEMS.c.a > draw(st.integers(-3, 5)))
    if draw(st.booleans()):
        out.append(ITEMS.c.grp.in_(draw(st.lists(st.sampled_from("abc"), min_size=1))))
    if draw(st.integers(0, 4)) == 0:
        out.append(ITEMS.c.b.is_(None))
    return out


def _order_element(col: Any, desc: bool, nulls: str | None) -> Any:
    el = col.desc() if desc else col.asc()
    if nulls == "first":
        el = el.nulls_first()
    elif nulls == "last":
        el = el.nulls_last()
    return el


@st.composite
def row_queries(draw: st.DrawFn, explicit_nulls: bool = True) -> QuerySpec:
    names = draw(st.lists(st.sampled_from(list(COLS)), min_size=1, max_size=4, unique=True))
    distinct = "id" not in names and draw(st.booleans())
    filters = _filters(draw)
    order_names = draw(st.lists(st.sampled_from(list(COLS)), max_size=3, unique=True))
    if distinct:
        order_names = [n for n in order_names if n in names]
    order = [
        (
            n,
            draw(st.booleans()),
            draw(st.sampled_from([None, "first", "last"])) if explicit_nulls else None,
        )
        for n in order_names
    ]
    total = any(n == "id" for n, _, _ in order) or (
        distinct and order and set(names) <= {n for n, _, _ in order}
    )
    limit = draw(st.one_of(st.none(), st.integers(0, 8)))
    offset = draw(st.one_of(st.none(), st.integers(0, 5)))

    def build() -> Select[Any]:
        stmt = select(*[COLS[n] for n in names]).where(*filters)
        if distinct:
            stmt = stmt.distinct()
        if order:
            stmt = stmt.order_by(*[_order_element(COLS[n], d, nl) for n, d, nl in order])
        if limit is not None:
            stmt = stmt.limit(limit)
        if offset is not None:
            stmt = stmt.offset(offset)
        return stmt

    if order and total:
        compare = "exact"
    elif order:
        compare = "keys"
    elif limit is None and not offset:
        compare = "bag"
    else:
        compare = "count"
    key_positions: tuple[int, ...] = ()
    if compare == "keys":
        # compare the ORDER BY values of the rows: select them too
        extra = [n for n, _, _ in order]

        def build_keys() -> Select[Any]:
            return build().add_columns(*[COLS[n].label(f"k_{n}") for n in extra])

        width = len(names)
        return QuerySpec(
            build_keys,
            compare,
            tuple(range(width, width + len(extra))),
            f"{build_keys()}",
        )
    return QuerySpec(build, compare, key_positions, f"{build()}")


AGGS: dict[str, Callable[[], Any]] = {
    "count": lambda: func.count(),
    "count_b": lambda: func.count(ITEMS.c.b),
    "sum": lambda: func.sum(ITEMS.c.b),
    "min": lambda: func.min(ITEMS.c.b),
    "max": lambda: func.max(ITEMS.c.b),
    "avg": lambda: func.avg(ITEMS.c.b),
}


@st.composite
def aggregate_queries(draw: st.DrawFn, explicit_nulls: bool = True) -> QuerySpec:
    groups = draw(st.lists(st.sampled_from(["grp", "a"]), max_size=2, unique=True))
    aggs = draw(st.lists(st.sampled_from(list(AGGS)), min_size=1, max_size=4, unique=True))
    filters = _filters(draw)
    having = draw(st.sampled_from([None, "count", "sum"]))
    having_k = draw(st.integers(0, 3))
    limit = draw(st.one_of(st.none(), st.integers(0, 4))) if groups else None
    offset = draw(st.one_of(st.none(), st.integers(0, 2))) if groups else None
    order_by_agg = bool(groups) and draw(st.booleans())
    descs = [draw(st.booleans()) for _ in groups]
    nulls = [
        draw(st.sampled_from([None, "first", "last"])) if explicit_nulls else None
        for _ in groups
    ]

    def build() -> Select[Any]:
        stmt = select(*[COLS[g] for g in groups], *[AGGS[a]().label(a) for a in aggs])
        stmt = stmt.select_from(ITEMS).where(*filters)
        if groups:
            stmt = stmt.group_by(*[COLS[g] for g in groups])
        if having == "count":
            stmt = stmt.having(func.count() > having_k)
        elif having == "sum":
            stmt = stmt.having(func.sum(ITEMS.c.a) >= having_k)
        order = []
        if order_by_agg:
            order.append(func.count().desc())
        triples = zip(groups, descs, nulls, strict=True)
        order += [_order_element(COLS[g], d, n) for g, d, n in triples]
        if order:
            stmt = stmt.order_by(*order)
        if limit is not None:
            stmt = stmt.limit(limit)
        if offset is not None:
            stmt = stmt.offset(offset)
        return stmt

    # ordered by every group key (total), or no GROUP BY (one row): exact either way
    return QuerySpec(build, "exact", (), f"{build()}")


# ----------------------------------------------------------------------------------------
# comparing


def _norm_value(v: Any, approx: bool) -> Any:
    if approx and isinstance(v, float | Decimal):
        return round(float(v), 6)
    if isinstance(v, Decimal) and v == v.to_integral_value():
        return int(v)
    return v


def _norm(rows: Sequence[Sequence[Any]], approx: bool) -> list[tuple[Any, ...]]:
    return [tuple(_norm_value(v, approx) for v in r) for r in rows]


def _bag(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    return sorted(rows, key=repr)


def check_against_oracle(cluster: Cluster, spec: QuerySpec, *, approx: bool = False) -> None:
    with cluster.session() as session:
        ours = _norm(session.execute(spec.build()).all(), approx)
    with Session(cluster.oracle) as oracle:
        want = _norm(oracle.execute(spec.build()).all(), approx)
    msg = f"\n{spec.text}\nours={ours}\nwant={want}"
    if spec.compare == "exact":
        assert ours == want, msg
    elif spec.compare == "keys":
        assert [tuple(r[i] for i in spec.key_positions) for r in ours] == [
            tuple(r[i] for i in spec.key_positions) for r in want
        ], msg
        if "LIMIT" not in spec.text and "OFFSET" not in spec.text:
            assert _bag(ours) == _bag(want), msg
    elif spec.compare == "bag":
        assert _bag(ours) == _bag(want), msg
    else:
        assert len(ours) == len(want), msg
        with Session(cluster.oracle) as oracle:
            everything = _norm(
                oracle.execute(spec.build().limit(None).offset(None)).all(), approx
            )
        for row in ours:
            assert row in everything, msg


queries = st.one_of(row_queries(), aggregate_queries())


# ----------------------------------------------------------------------------------------
# SQLite shards (always run)


@pytest.fixture
def sqlite_cluster(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Cluster]:
    n = getattr(request, "param", 3)
    urls = {f"s{i}": f"sqlite:///{tmp_path}/s{i}.db" for i in range(n)}
    cluster = make_cluster(urls, f"sqlite:///{tmp_path}/oracle.db")
    yield cluster
    dispose(cluster)


@pytest.mark.parametrize("sqlite_cluster", [2, 4], indirect=True)
@settings(
    derandomize=True,
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=datasets(), spec=queries)
def test_sqlite_shards_match_one_database(
    sqlite_cluster: Cluster,
    data: tuple[list[dict[str, Any]], list[int]],
    spec: QuerySpec,
) -> None:
    rows, shard_of = data
    sqlite_cluster.load(rows, shard_of)
    check_against_oracle(sqlite_cluster, spec)


def test_orm_entities_keep_their_order_and_limit(sqlite_cluster: Cluster) -> None:
    rng = random.Random(7)
    rows = [
        {"id": i, "grp": rng.choice("abc"), "a": rng.choice([None, 1, 2, 3]), "b": i % 4}
        for i in range(1, 41)
    ]
    sqlite_cluster.load(rows, [rng.randrange(3) for _ in rows])
    stmt = select(Item).order_by(Item.a.desc(), Item.id).offset(3).limit(9)
    with sqlite_cluster.session() as session:
        ours = [(i.id, i.a) for i in session.scalars(stmt)]
        legacy = [
            (i.id, i.a)
            for i in session.query(Item).order_by(Item.a.desc(), Item.id).offset(3).limit(9)
        ]
    with Session(sqlite_cluster.oracle) as oracle:
        want = [(i.id, i.a) for i in oracle.scalars(stmt)]
    assert ours == want == legacy
    assert not math.isnan(len(ours))
