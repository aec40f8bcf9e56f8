"""Value semantics of the merge on real servers (issue 10, classes 6, 7 and 8).

Each test spreads rows over shards of one kind (SQLite, PostgreSQL, MariaDB) or over a
mixed SQLite + PostgreSQL cluster, runs a statement through the sharded session and on
one database holding every row (the oracle), and compares the answers with the rules of
:mod:`shardsession.query._dialect` (NaN as one value, collation keys), or expects
:class:`~shardsession.exc.UnsupportedQueryError` where no exact merge exists.

* 6: REAL precision of AVG, NaN in ORDER BY / DISTINCT / GROUP BY / MIN / MAX / HAVING /
  paginate (PostgreSQL);
* 7: collations: SQLite NOCASE, MariaDB's default ``utf8mb4_general_ci`` (with PAD SPACE),
  a PostgreSQL ICU nondeterministic collation (refused), shards that collate differently
  (refused);
* 8: a correlated ``ORDER BY ... DESC LIMIT 1`` on a mixed cluster.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import (
    REAL,
    Double,
    Engine,
    ForeignKey,
    Integer,
    String,
    create_engine,
    func,
    insert,
    select,
    text,
)
from sqlalchemy import Enum as SAEnum
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, aliased, mapped_column

from shardsession import ShardedSession
from shardsession.exc import UnsupportedQueryError
from shardsession.query import paginate
from shardsession.query._dialect import ascii_nocase_key, nan_safe

from .conftest import _Databases


class Base(DeclarativeBase):
    pass


class Rec(Base):
    __tablename__ = "sem_recs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str | None] = mapped_column(String(20), nullable=True)
    score: Mapped[float | None] = mapped_column(Double, nullable=True)
    realv: Mapped[float | None] = mapped_column(REAL, nullable=True)
    amount: Mapped[int | None] = mapped_column(Integer, nullable=True)


class Kid(Base):
    __tablename__ = "sem_kids"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    rec_id: Mapped[int] = mapped_column(ForeignKey("sem_recs.id"))
    amount: Mapped[int | None] = mapped_column(Integer, nullable=True)


# DDL per backend: the name column's collation is the server's (or a declared one), not
# the model's, so the library must find it out from the catalog.
_DDL = {
    "sqlite": (
        "CREATE TABLE sem_recs (id INTEGER PRIMARY KEY, name VARCHAR(20){coll}, "
        "score FLOAT, realv REAL, amount INTEGER)"
    ),
    "postgresql": (
        "CREATE TABLE sem_recs (id INTEGER PRIMARY KEY, name VARCHAR(20){coll}, "
        "score DOUBLE PRECISION, realv REAL, amount INTEGER)"
    ),
    "mysql": (
        "CREATE TABLE sem_recs (id INTEGER PRIMARY KEY, name VARCHAR(20){coll}, "
        "score DOUBLE, realv FLOAT, amount INTEGER)"
    ),
}
_KIDS_DDL = (
    "CREATE TABLE sem_kids (id INTEGER PRIMARY KEY, rec_id INTEGER REFERENCES sem_recs(id), "
    "amount INTEGER)"
)


@dataclass
class Cluster:
    engines: dict[str, Engine]
    oracle: Engine
    where: dict[int, str]

    def session(self) -> ShardedSession:
        shards = sorted(self.engines)

        def chooser(mapper: Any, instance: Any, **_: Any) -> str:
            key = instance.id if isinstance(instance, Rec) else instance.rec_id
            return self.where.get(key, shards[0])

        return ShardedSession(
            shard_chooser=chooser,
            identity_chooser=lambda *a, **k: shards,
            execute_chooser=lambda ctx: shards,
            shards=self.engines,
        )

    def load(self, rows: Sequence[dict[str, Any]], kids: Sequence[dict[str, Any]] = ()) -> None:
        shards = sorted(self.engines)
        self.where = {r["id"]: shards[i % len(shards)] for i, r in enumerate(rows)}
        for name, engine in [*self.engines.items(), ("oracle", self.oracle)]:
            mine = [r for r in rows if name == "oracle" or self.where[r["id"]] == name]
            ids = {r["id"] for r in mine}
            my_kids = [k for k in kids if k["rec_id"] in ids]
            with engine.begin() as conn:
                if mine:
                    conn.execute(insert(Rec.__table__), [_full(r) for r in mine])
                if my_kids:
                    conn.execute(insert(Kid.__table__), my_kids)

    def dispose(self) -> None:
        for e in [*self.engines.values(), self.oracle]:
            e.dispose()


def _full(row: dict[str, Any]) -> dict[str, Any]:
    return {"name": None, "score": None, "realv": None, "amount": None, **row}


def _make(urls: dict[str, str], oracle_url: str, collations: dict[str, str]) -> Cluster:
    engines = {n: create_engine(u) for n, u in urls.items()}
    oracle = create_engine(oracle_url)
    for e in [*engines.values(), oracle]:
        kind = "mysql" if e.dialect.name in ("mysql", "mariadb") else e.dialect.name
        coll = collations.get(kind, "")
        with e.begin() as conn:
            if kind == "postgresql" and "ci_icu" in coll:
                conn.exec_driver_sql(
                    "CREATE COLLATION IF NOT EXISTS ci_icu (provider = icu, "
                    "locale = 'und-u-ks-level2', deterministic = false)"
                )
            conn.exec_driver_sql(_DDL[kind].format(coll=coll))
            conn.exec_driver_sql(_KIDS_DDL)
    return Cluster(engines, oracle, {})


@pytest.fixture
def sqlite_nocase(tmp_path: Any) -> Iterator[Cluster]:
    urls = {f"s{i}": f"sqlite:///{tmp_path}/s{i}.db" for i in range(3)}
    c = _make(urls, f"sqlite:///{tmp_path}/o.db", {"sqlite": " COLLATE NOCASE"})
    yield c
    c.dispose()


@pytest.fixture
def sqlite_plain(tmp_path: Any) -> Iterator[Cluster]:
    urls = {f"s{i}": f"sqlite:///{tmp_path}/s{i}.db" for i in range(3)}
    c = _make(urls, f"sqlite:///{tmp_path}/o.db", {})
    yield c
    c.dispose()


@pytest.fixture
def pg_plain(pg_server_a: Any, pg_server_b: Any, databases: _Databases) -> Iterator[Cluster]:
    urls = {"p0": databases.new(pg_server_a), "p1": databases.new(pg_server_b),
            "p2": databases.new(pg_server_a)}
    c = _make(urls, databases.new(pg_server_b), {})
    yield c
    c.dispose()


@pytest.fixture
def pg_icu(pg_server_a: Any, databases: _Databases) -> Iterator[Cluster]:
    urls = {"p0": databases.new(pg_server_a), "p1": databases.new(pg_server_a)}
    c = _make(urls, databases.new(pg_server_a), {"postgresql": ' COLLATE "ci_icu"'})
    yield c
    c.dispose()


@pytest.fixture
def maria(mariadb_server: Any, databases: _Databases) -> Iterator[Cluster]:
    urls = {"m0": databases.new(mariadb_server), "m1": databases.new(mariadb_server),
            "m2": databases.new(mariadb_server)}
    c = _make(urls, databases.new(mariadb_server), {})
    yield c
    c.dispose()


@pytest.fixture
def mixed(pg_server_a: Any, databases: _Databases, tmp_path: Any) -> Iterator[Cluster]:
    urls = {"a_pg": databases.new(pg_server_a), "b_sqlite": f"sqlite:///{tmp_path}/m.db"}
    c = _make(urls, f"sqlite:///{tmp_path}/o.db", {})
    yield c
    c.dispose()


@pytest.fixture
def mixed_nocase(pg_server_a: Any, databases: _Databases, tmp_path: Any) -> Iterator[Cluster]:
    urls = {"a_pg": databases.new(pg_server_a), "b_sqlite": f"sqlite:///{tmp_path}/m.db"}
    c = _make(urls, f"sqlite:///{tmp_path}/o.db", {"sqlite": " COLLATE NOCASE"})
    yield c
    c.dispose()


# -- comparing with the oracle -------------------------------------------------------------


def _same(value: Any, key: Callable[[Any], Any]) -> Any:
    return None if value is None else key(value)


def both(cluster: Cluster, stmt: Any) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    with cluster.session() as s:
        ours = [tuple(r) for r in s.execute(stmt).all()]
    with Session(cluster.oracle) as o:
        want = [tuple(r) for r in o.execute(stmt).all()]
    return ours, want


def assert_same(
    cluster: Cluster,
    stmt: Any,
    keys: Sequence[Callable[[Any], Any]] | None = None,
    *,
    bag: bool = False,
) -> list[tuple[Any, ...]]:
    """Our rows equal the oracle's, each value compared as ``keys`` say (what the
    backend compares it as: NaN as one value, a string by its collation key)."""
    ours, want = both(cluster, stmt)

    def norm(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        ks = keys or [nan_safe] * (len(rows[0]) if rows else 0)
        out = [tuple(_same(v, k) for v, k in zip(r, ks, strict=True)) for r in rows]
        return sorted(out, key=repr) if bag else out

    assert norm(ours) == norm(want), f"\n{stmt}\nours={ours}\nwant={want}"
    return ours


# -- class 6: REAL precision and NaN (PostgreSQL) ------------------------------------------


def test_pg_avg_over_real_keeps_double_precision(pg_plain: Cluster) -> None:
    # float4 partial sums lose the small values next to 2**24; PostgreSQL's avg(real)
    # accumulates in float8.
    values = [16777216.0, 1.0, 1.0, 1.0, 16777216.0, 1.0]
    pg_plain.load([{"id": i, "realv": v, "name": "g"} for i, v in enumerate(values, 1)])
    ours, want = both(pg_plain, select(func.avg(Rec.realv)))
    assert ours == want
    ours, want = both(
        pg_plain, select(Rec.name, func.avg(Rec.realv)).group_by(Rec.name)
    )
    assert ours == want
    # a float expression over the REAL column is single precision on PostgreSQL too
    ours, want = both(pg_plain, select(func.avg(func.coalesce(func.abs(Rec.realv), -2.0))))
    assert ours == want


NAN = float("nan")
NAN_ROWS = [
    {"id": 1, "score": NAN, "name": "a", "amount": 1},
    {"id": 2, "score": 1.5, "name": "a", "amount": 2},
    {"id": 3, "score": NAN, "name": "b", "amount": 3},
    {"id": 4, "score": None, "name": "b", "amount": 4},
    {"id": 5, "score": -2.0, "name": "c", "amount": 5},
    {"id": 6, "score": NAN, "name": "c", "amount": 6},
    {"id": 7, "score": 7.0, "name": "d", "amount": 7},
    {"id": 8, "score": float("inf"), "name": "d", "amount": 8},
    {"id": 9, "score": NAN, "name": "e", "amount": 9},
]


@pytest.mark.parametrize(
    "build",
    [
        lambda: select(Rec.id, Rec.score).order_by(Rec.score, Rec.id),
        lambda: select(Rec.id, Rec.score).order_by(Rec.score.desc(), Rec.id.desc()),
        lambda: select(Rec.id, Rec.score).order_by(Rec.score.desc(), Rec.id).limit(3),
        lambda: select(Rec.score).order_by(Rec.score.nulls_first()),
        lambda: select(Rec.score).distinct().order_by(Rec.score),
        lambda: select(Rec.score, func.count()).group_by(Rec.score).order_by(Rec.score),
        lambda: select(func.min(Rec.score), func.max(Rec.score)),
        lambda: select(Rec.name, func.max(Rec.score)).group_by(Rec.name).order_by(Rec.name),
        lambda: select(Rec.name, func.min(Rec.score)).group_by(Rec.name).order_by(Rec.name),
        lambda: select(Rec.name)
        .group_by(Rec.name)
        .having(func.max(Rec.score) > 100)
        .order_by(Rec.name),
        lambda: select(Rec.name, func.max(Rec.score).label("m"))
        .group_by(Rec.name)
        .order_by(func.max(Rec.score).desc(), Rec.name),
    ],
    ids=[
        "order-asc", "order-desc", "order-desc-limit", "nulls-first", "distinct",
        "group-by", "min-max", "max-per-group", "min-per-group", "having", "order-by-max",
    ],
)
def test_pg_nan_follows_postgresql(pg_plain: Cluster, build: Callable[[], Any]) -> None:
    pg_plain.load(NAN_ROWS)
    rows = assert_same(pg_plain, build())
    assert rows  # the statement returned something to compare


def test_pg_paginate_over_nan_loses_no_row(pg_plain: Cluster) -> None:
    pg_plain.load(NAN_ROWS)
    stmt = select(Rec.id, Rec.score).order_by(Rec.score)
    seen: list[int] = []
    token = None
    with pg_plain.session() as s:
        for _ in range(20):
            page = paginate(s, stmt, page_size=2, token=token)
            seen.extend(r[0] for r in page.rows)
            token = page.next_token
            if token is None:
                break
    with Session(pg_plain.oracle) as o:
        want = [r[0] for r in o.execute(stmt.order_by(Rec.id)).all()]
    assert sorted(seen) == sorted(want)
    assert len(seen) == len(set(seen))


# -- class 7: collations --------------------------------------------------------------------

CASE_ROWS = [
    {"id": 1, "name": "bob", "amount": 1},
    {"id": 2, "name": "Bob", "amount": 2},
    {"id": 3, "name": "alice", "amount": 3},
    {"id": 4, "name": "BOB", "amount": 4},
    {"id": 5, "name": "Alice", "amount": 5},
    {"id": 6, "name": "carol", "amount": 6},
    {"id": 7, "name": "Zed", "amount": 7},
    {"id": 8, "name": None, "amount": 8},
    {"id": 9, "name": "ålice", "amount": 9},
    {"id": 10, "name": "a", "amount": 10},
    {"id": 11, "name": "B", "amount": 11},
]


def _collated_statements() -> list[tuple[str, Callable[[], Any], str]]:
    # (id, statement, which columns are strings compared under the collation)
    return [
        ("order", lambda: select(Rec.name, Rec.id).order_by(Rec.name, Rec.id), "kp"),
        ("order-desc-limit",
         lambda: select(Rec.name, Rec.id).order_by(Rec.name.desc(), Rec.id).limit(4), "kp"),
        ("distinct", lambda: select(Rec.name).distinct(), "k"),
        ("group", lambda: select(Rec.name, func.count(), func.sum(Rec.amount))
         .group_by(Rec.name), "kpp"),
        ("group-order", lambda: select(Rec.name, func.count()).group_by(Rec.name)
         .order_by(Rec.name), "kp"),
        ("min-max", lambda: select(func.min(Rec.name), func.max(Rec.name)), "kk"),
        ("distinct-fn", lambda: select(func.lower(Rec.name), Rec.name).distinct(), "kk"),
        ("distinct-length", lambda: select(func.length(Rec.name)).distinct(), "p"),
        ("alias-order", _alias_order, "kp"),
        ("subquery-order", _subquery_order, "kp"),
    ]


def _alias_order() -> Any:
    other = aliased(Rec)
    return select(other.name, other.id).order_by(other.name, other.id)


def _subquery_order() -> Any:
    sq = select(Rec.name.label("n"), Rec.id.label("i")).where(Rec.id > 0).subquery()
    return select(sq.c.n, sq.c.i).order_by(sq.c.n, sq.c.i)


STATEMENTS = _collated_statements()


def _bag(case_id: str) -> bool:
    # statements without ORDER BY: compare as multisets
    return case_id.startswith("distinct") or case_id == "group"


def _keys(spec: str, key: Callable[[Any], Any]) -> list[Callable[[Any], Any]]:
    return [key if c == "k" else nan_safe for c in spec]


@pytest.mark.parametrize("case", STATEMENTS, ids=[c[0] for c in STATEMENTS])
def test_sqlite_nocase_column_merges_as_nocase(
    sqlite_nocase: Cluster, case: tuple[str, Callable[[], Any], str]
) -> None:
    sqlite_nocase.load(CASE_ROWS)
    _, build, spec = case
    assert_same(sqlite_nocase, build(), _keys(spec, ascii_nocase_key), bag=_bag(case[0]))


def _mariadb_key(cluster: Cluster) -> Callable[[Any], Any]:
    # The oracle's own comparison: the server's weight of the value, PAD SPACE.
    engine = cluster.oracle

    def key(value: str) -> Any:
        with engine.connect() as c:
            weight = c.execute(
                text("SELECT WEIGHT_STRING(CAST(:v AS CHAR(20)) COLLATE utf8mb4_general_ci)"),
                {"v": value},
            ).scalar()
        return weight

    return key


MARIA_ROWS = [*CASE_ROWS, {"id": 12, "name": "bob  ", "amount": 12},
              {"id": 13, "name": "a\t", "amount": 13}, {"id": 14, "name": "éclair", "amount": 14},
              {"id": 15, "name": "Eclair", "amount": 15}]


@pytest.mark.parametrize("case", STATEMENTS, ids=[c[0] for c in STATEMENTS])
def test_mariadb_default_collation_merges_as_general_ci(
    maria: Cluster, case: tuple[str, Callable[[], Any], str]
) -> None:
    maria.load(MARIA_ROWS)
    _, build, spec = case
    assert_same(maria, build(), _keys(spec, _mariadb_key(maria)), bag=_bag(case[0]))


@pytest.mark.parametrize("case", STATEMENTS, ids=[c[0] for c in STATEMENTS])
def test_pg_nondeterministic_collation_is_refused(
    pg_icu: Cluster, case: tuple[str, Callable[[], Any], str]
) -> None:
    pg_icu.load(CASE_ROWS)
    if case[0] == "distinct-length":
        # a number computed from the column compares as a number: merged
        assert_same(pg_icu, case[1](), bag=True)
        return
    with pg_icu.session() as s, pytest.raises(UnsupportedQueryError) as info:
        s.execute(case[1]()).all()
    assert "collation" in str(info.value)


def test_shards_that_collate_differently_are_refused(mixed_nocase: Cluster) -> None:
    mixed_nocase.load(CASE_ROWS)
    with mixed_nocase.session() as s, pytest.raises(UnsupportedQueryError):
        s.execute(select(Rec.name, Rec.id).order_by(Rec.name, Rec.id)).all()
    with mixed_nocase.session() as s:
        # a column both collate alike (integers) still merges
        ids = s.scalars(select(Rec.id).order_by(Rec.amount.desc())).all()
    assert ids == sorted((r["id"] for r in CASE_ROWS), reverse=True)


def test_binary_collations_still_merge_on_mixed_and_pg(mixed: Cluster, pg_plain: Cluster) -> None:
    for cluster in (mixed, pg_plain):
        cluster.load(CASE_ROWS)
        assert_same(cluster, select(Rec.name, Rec.id).order_by(Rec.name.nulls_first(), Rec.id))
        assert_same(cluster, select(func.min(Rec.name), func.max(Rec.name)))


def test_having_on_a_case_insensitive_string_is_refused(sqlite_nocase: Cluster) -> None:
    sqlite_nocase.load(CASE_ROWS)
    stmt = select(Rec.name).group_by(Rec.name).having(func.max(Rec.name) > "b")
    with sqlite_nocase.session() as s:
        # SQLite compares an aggregate's result by BINARY: exact, merged
        ours = sorted(s.scalars(stmt).all(), key=ascii_nocase_key)
    with Session(sqlite_nocase.oracle) as o:
        want = sorted(o.scalars(stmt).all(), key=ascii_nocase_key)
    assert [ascii_nocase_key(v) for v in ours] == [ascii_nocase_key(v) for v in want]
    with sqlite_nocase.session() as s, pytest.raises(UnsupportedQueryError):
        s.execute(
            select(Rec.name).group_by(Rec.name).having(Rec.name > "b")
        ).all()


# -- class 8: NULL order inside subqueries on a mixed cluster ------------------------------


def test_mixed_cluster_correlated_order_by_desc_limit(mixed: Cluster) -> None:
    rows = [{"id": i, "name": f"r{i}"} for i in range(1, 9)]
    kids = [
        {"id": 100 + i * 10 + j, "rec_id": i, "amount": amount}
        for i in range(1, 9)
        for j, amount in enumerate([None, i, i * 2])
    ]
    mixed.load(rows, kids)
    top = (
        select(Kid.amount)
        .where(Kid.rec_id == Rec.id)
        .order_by(Kid.amount.desc())
        .limit(1)
        .correlate(Rec)
        .scalar_subquery()
    )
    stmt = select(Rec.id, top.label("top")).order_by(Rec.id)
    ours, want = both(mixed, stmt)
    assert ours == want
    assert all(r[1] is not None for r in ours)  # NULL is the smallest, never the top


def test_nan_key_is_one_value_above_numbers() -> None:
    assert nan_safe(NAN) == nan_safe(float("nan"))
    assert nan_safe(1e308) < nan_safe(NAN)
    assert not nan_safe(NAN) < nan_safe(math.inf)
    assert len({nan_safe(NAN), nan_safe(float("nan"))}) == 1


# -- class 7: a shard key on a case-insensitive column -------------------------------------


class KeyBase(DeclarativeBase):
    pass


class Acct(KeyBase):
    __tablename__ = "sem_accts"
    email: Mapped[str] = mapped_column(String(40, collation="NOCASE"), primary_key=True)
    balance: Mapped[int] = mapped_column(Integer)


def _acct_shards(tmp_path: Any) -> dict[str, Engine]:
    engines = {f"k{i}": create_engine(f"sqlite:///{tmp_path}/k{i}.db") for i in range(4)}
    for e in engines.values():
        KeyBase.metadata.create_all(e)
    return engines


def test_case_insensitive_key_without_normaliser_is_refused(tmp_path: Any) -> None:
    from shardsession.exc import ConfigurationError
    from shardsession.routing import HashSharding, Placement

    engines = _acct_shards(tmp_path)
    placement = Placement({Acct: HashSharding(Acct.email)})
    with ShardedSession(shards=engines, placement=placement) as s, pytest.raises(
        ConfigurationError, match="normalize"
    ):
        s.add(Acct(email="Bob@X.com", balance=1))
        s.flush()
    for e in engines.values():
        e.dispose()


def test_case_insensitive_key_is_found_the_way_the_database_compares(tmp_path: Any) -> None:
    from shardsession.routing import HashSharding, Placement, nocase

    engines = _acct_shards(tmp_path)
    oracle = create_engine(f"sqlite:///{tmp_path}/oracle.db")
    KeyBase.metadata.create_all(oracle)
    emails = ["Bob@X.com", "alice@Y.org", "CAROL@z.net", "dave@w.io", "Eve@V.com", "fred@u.de"]
    placement = Placement({Acct: HashSharding(Acct.email, normalize=nocase)})
    with ShardedSession(shards=engines, placement=placement, atomic="best_effort") as s:
        s.add_all([Acct(email=e, balance=i) for i, e in enumerate(emails)])
        s.commit()
    with Session(oracle) as o:
        o.add_all([Acct(email=e, balance=i) for i, e in enumerate(emails)])
        o.commit()
    for probe in ["bob@x.com", "ALICE@y.ORG", "carol@Z.NET", "DAVE@W.IO"]:
        with Session(oracle) as o:
            want = o.get(Acct, probe)
            assert want is not None
            want_row = (want.email, want.balance)
            by_where = o.execute(
                select(Acct.email, Acct.balance).where(Acct.email == probe)
            ).all()
        with ShardedSession(shards=engines, placement=placement) as s:
            got = s.get(Acct, probe)
            assert got is not None and (got.email, got.balance) == want_row
            rows = s.execute(
                select(Acct.email, Acct.balance).where(Acct.email == probe)
            ).all()
            assert [tuple(r) for r in rows] == [tuple(r) for r in by_where]
    # the normaliser does not move keys that are already normal: same shard as without
    plain = HashSharding(Acct.email)
    plain.bind(sorted(engines))
    normal = HashSharding(Acct.email, normalize=nocase)
    normal.bind(sorted(engines))
    assert all(plain.shard_for(nocase(e)) == normal.shard_for(e) for e in emails)
    for e in [*engines.values(), oracle]:
        e.dispose()


# -- native ENUMs order by declaration (PostgreSQL, MariaDB) -------------------------------


class EnumBase(DeclarativeBase):
    pass


class Mood(EnumBase):
    __tablename__ = "sem_moods"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    mood: Mapped[str | None] = mapped_column(
        SAEnum("sad", "ok", "happy", name="sem_mood"), nullable=True
    )


MOODS = ["happy", "sad", "ok", None, "ok", "happy", "sad", "happy"]


def _mood_cluster(urls: dict[str, str], oracle_url: str) -> Cluster:
    engines = {n: create_engine(u) for n, u in urls.items()}
    oracle = create_engine(oracle_url)
    shards = sorted(engines)
    for i, e in enumerate([*engines.values(), oracle]):
        EnumBase.metadata.create_all(e)
        with e.begin() as conn:
            rows = [
                {"id": j, "mood": m}
                for j, m in enumerate(MOODS, 1)
                if e is oracle or shards[j % len(shards)] == list(engines)[i]
            ]
            if rows:
                conn.execute(insert(Mood.__table__), rows)
    return Cluster(engines, oracle, {})


@pytest.mark.parametrize("kind", ["postgresql", "mariadb", "sqlite"])
def test_enum_orders_as_its_backend(
    kind: str, request: pytest.FixtureRequest, databases: _Databases, tmp_path: Any
) -> None:
    if kind == "sqlite":
        urls = {f"s{i}": f"sqlite:///{tmp_path}/e{i}.db" for i in range(3)}
        oracle_url = f"sqlite:///{tmp_path}/eo.db"
    else:
        fixture = "pg_server_a" if kind == "postgresql" else "mariadb_server"
        server = request.getfixturevalue(fixture)
        urls = {f"e{i}": databases.new(server) for i in range(3)}
        oracle_url = databases.new(server)
    cluster = _mood_cluster(urls, oracle_url)
    try:
        assert_same(cluster, select(Mood.mood, Mood.id).order_by(Mood.mood, Mood.id))
        assert_same(
            cluster, select(Mood.mood, Mood.id).order_by(Mood.mood.desc(), Mood.id).limit(3)
        )
        assert_same(
            cluster,
            select(Mood.mood, func.count()).group_by(Mood.mood).order_by(Mood.mood),
        )
        minmax = select(func.min(Mood.mood), func.max(Mood.mood))
        if kind == "mariadb":
            with cluster.session() as s, pytest.raises(UnsupportedQueryError):
                s.execute(minmax).all()
        else:
            assert_same(cluster, minmax)
    finally:
        cluster.dispose()


def test_mixed_cluster_update_through_ordered_subquery(mixed: Cluster) -> None:
    """UPDATE ... WHERE id = (SELECT ... ORDER BY amount DESC LIMIT 1), correlated: every
    shard picks the row one database would (NULL is the smallest value)."""
    rows = [{"id": i, "name": f"r{i}", "amount": 0} for i in range(1, 7)]
    kids = [
        {"id": 100 + i * 10 + j, "rec_id": i, "amount": amount}
        for i in range(1, 7)
        for j, amount in enumerate([None, i, i + 1])
    ]
    mixed.load(rows, kids)
    from sqlalchemy import update

    top = (
        select(Kid.amount)
        .where(Kid.rec_id == Rec.id)
        .order_by(Kid.amount.desc())
        .limit(1)
        .correlate(Rec)
        .scalar_subquery()
    )
    stmt = update(Rec).values(amount=top)
    with mixed.session() as s:
        s.execute(stmt, execution_options={"synchronize_session": False})
        s.commit()
    with Session(mixed.oracle) as o:
        o.execute(stmt)
        o.commit()
    assert_same(mixed, select(Rec.id, Rec.amount).order_by(Rec.id))


@pytest.mark.parametrize("kind", ["postgresql", "mariadb"])
def test_paginate_over_real_with_ties_loses_no_row(
    kind: str, request: pytest.FixtureRequest, databases: _Databases
) -> None:
    """REAL values come back as the shortest decimal (-1.7), which the server compares
    as double precision unless cast back: rows tied with a page's last row were lost."""
    fixture = "pg_server_a" if kind == "postgresql" else "mariadb_server"
    server = request.getfixturevalue(fixture)
    cluster = _make(
        {"x0": databases.new(server), "x1": databases.new(server)}, databases.new(server), {}
    )
    try:
        reals = [-1.7, -1.7, -1.7, 0.1, 0.1, 0.1, 0.25, 3.3, 3.3, None, -1.7, 0.1, -0.0, 0.0]
        cluster.load([{"id": i, "realv": v} for i, v in enumerate(reals, 1)])
        # the model says REAL; the server's column is single precision, then double
        # (MariaDB's REAL is DOUBLE): the page condition must be exact for both
        widen = (
            "ALTER TABLE sem_recs ALTER COLUMN realv TYPE DOUBLE PRECISION"
            if kind == "postgresql"
            else "ALTER TABLE sem_recs MODIFY realv REAL"
        )
        statements = [
            select(Rec.id, Rec.realv).order_by(Rec.realv),
            select(Rec.id, Rec.realv).order_by(Rec.realv.desc()),
            None,
            select(Rec.id, Rec.realv).order_by(Rec.realv),
        ]
        for stmt in statements:
            if stmt is None:
                for e in [*cluster.engines.values(), cluster.oracle]:
                    with e.begin() as conn:
                        conn.exec_driver_sql(widen)
                continue
            seen: list[int] = []
            token = None
            with cluster.session() as s:
                for _ in range(30):
                    page = paginate(s, stmt, page_size=2, token=token)
                    seen.extend(r[0] for r in page.rows)
                    token = page.next_token
                    if token is None:
                        break
            assert sorted(seen) == list(range(1, len(reals) + 1)), (stmt, seen)
    finally:
        cluster.dispose()


def test_mixed_cluster_distinct_subquery_ordered_without_nulls(mixed: Cluster) -> None:
    """A DISTINCT subquery ordered on a nullable column: the NULL order is made explicit
    without changing its select list (PostgreSQL wants ORDER BY terms selected)."""
    rows = [{"id": i, "name": f"r{i}"} for i in range(1, 7)]
    kids = [
        {"id": 100 + i * 10 + j, "rec_id": i, "amount": amount}
        for i in range(1, 7)
        for j, amount in enumerate([None, i, i, None])
    ]
    mixed.load(rows, kids)
    low = (
        select(Kid.amount)
        .distinct()
        .where(Kid.rec_id == Rec.id)
        .order_by(Kid.amount)
        .limit(1)
        .correlate(Rec)
        .scalar_subquery()
    )
    stmt = select(Rec.id, low.label("low")).order_by(Rec.id)
    ours, want = both(mixed, stmt)
    assert ours == want
    assert all(r[1] is None for r in ours)  # NULL is the smallest value


def test_mixed_cluster_one_shard_statement_orders_nulls_as_the_cluster(mixed: Cluster) -> None:
    """A statement sent to one shard of a mixed cluster (a broadcast read's copy, a key
    lookup) orders NULL as the smallest value too: the answer does not depend on which
    backend holds the rows."""
    rows = [{"id": i, "amount": a} for i, a in enumerate([None, 3, 1, None, 2, 5, None], 1)]
    mixed.load(rows)
    stmts = [
        select(Rec.id, Rec.amount).order_by(Rec.amount, Rec.id),
        select(Rec.id, Rec.amount).order_by(Rec.amount.desc(), Rec.id).limit(3),
        select(Rec.amount).distinct().order_by(Rec.amount),
        select(Rec.id, Rec.amount).order_by(Rec.amount.nulls_last(), Rec.id),
    ]
    for shard in sorted(mixed.engines):
        for stmt in stmts:
            with mixed.session() as s:
                ours = [
                    tuple(r)
                    for r in s.execute(stmt, bind_arguments={"shard_id": shard}).all()
                ]
                # a statement deadline takes another path to the one shard
                timed = s.execute(
                    stmt,
                    bind_arguments={"shard_id": shard},
                    execution_options={"shardsession_timeout": 30},
                ).all()
                assert [tuple(r) for r in timed] == ours
            with Session(mixed.engines[shard]) as raw, Session(mixed.oracle) as o:
                mine = {r[0] for r in raw.execute(select(Rec.id)).all()}
                want = [
                    tuple(r)
                    for r in o.execute(stmt.where(Rec.id.in_(mine)) if mine else stmt).all()
                ]
            if mine:
                assert ours == want, (shard, str(stmt))


def test_mixed_cluster_numbers_typed_differently_per_backend(mixed: Cluster) -> None:
    """SQLite's abs() of a NUMERIC is a float, PostgreSQL's a Decimal: SUM adds them (it
    raised TypeError), DISTINCT treats 1.1 and Decimal('1.10') as one value.  (GROUP BY
    a function is the planner's: issue 10 class 9.)"""
    from sqlalchemy import Numeric, cast

    rows = [{"id": i, "score": v} for i, v in enumerate([1.1, -1.1, 2.5, 1.1, -2.5, 0.3], 1)]
    mixed.load(rows)
    value = func.abs(cast(Rec.score, Numeric(10, 2)))
    with mixed.session() as s:
        total = s.scalar(select(func.sum(value)))
        distinct = s.execute(select(value).distinct()).all()
    assert total is not None and abs(float(total) - 8.6) < 1e-9
    assert sorted(float(r[0]) for r in distinct) == [0.3, 1.1, 2.5]
