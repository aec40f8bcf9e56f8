"""Cross-shard queries on SQLite shards: ORM features, refusals, DML, options, threads."""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import (
    Engine,
    and_,
    delete,
    distinct,
    event,
    exists,
    func,
    literal,
    select,
    text,
    union,
    update,
)
from sqlalchemy.orm import Session, joinedload, selectinload

from shardsession.exc import ColocationWarning, FanoutTimeoutError, UnsupportedQueryError
from shardsession.query import paginate
from shardsession.query._token import PageTokenError

from . import test_query_property as qp

Item = qp.Item
Tag = qp.Tag
ITEMS = qp.ITEMS


def _rows(n: int, seed: int = 3) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [
        {
            "id": i,
            "grp": rng.choice([None, "a", "b", "c"]),
            "a": rng.choice([None, 0, 1, 2, 3, 4]),
            "b": rng.choice([None, 1, 2, 5]),
        }
        for i in range(1, n + 1)
    ]


def _add_sleep(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, record: Any) -> None:
        dbapi_conn.create_function("ss_sleep", 1, lambda s: time.sleep(s) or 0)


@pytest.fixture
def cluster(tmp_path: Any) -> Iterator[qp.Cluster]:
    urls = {f"s{i}": f"sqlite:///{tmp_path}/s{i}.db" for i in range(3)}
    c = qp.make_cluster(urls, f"sqlite:///{tmp_path}/oracle.db")
    for e in c.engines.values():
        _add_sleep(e)
        e.dispose()  # pooled connections predate the function
    rows = _rows(60)
    c.load(rows, [random.Random(r["id"]).randrange(3) for r in rows])
    yield c
    qp.dispose(c)


def _oracle(cluster: qp.Cluster, stmt: Any) -> list[Any]:
    with Session(cluster.oracle) as s:
        return [tuple(r) for r in s.execute(stmt).all()]


# ----------------------------------------------------------------------------------------
# what is merged


def test_counts(cluster: qp.Cluster) -> None:
    with cluster.session() as s:
        assert s.query(Item).count() == 60
        assert s.query(Item).filter(Item.a > 1).count() == _oracle(
            cluster, select(func.count()).select_from(ITEMS).where(ITEMS.c.a > 1)
        )[0][0]
        assert s.scalar(select(func.count()).select_from(Item)) == 60
        assert s.scalar(select(func.count(Item.id))) == 60
        assert s.query(func.count(Item.b)).scalar() == _oracle(
            cluster, select(func.count(ITEMS.c.b))
        )[0][0]


def test_core_table_select(cluster: qp.Cluster) -> None:
    stmt = select(ITEMS).order_by(ITEMS.c.b.desc(), ITEMS.c.id).limit(7)
    with cluster.session() as s:
        result = s.execute(stmt)
        assert list(result.keys()) == ["id", "grp", "a", "b"]
        assert [tuple(r) for r in result] == _oracle(cluster, stmt)


def test_orm_entity_order_limit_and_columns(cluster: qp.Cluster) -> None:
    stmt = select(Item, Item.b).order_by(Item.grp, Item.id.desc()).offset(2).limit(11)
    with cluster.session() as s:
        ours = [(i.id, b) for i, b in s.execute(stmt)]
    with Session(cluster.oracle) as o:
        want = [(i.id, b) for i, b in o.execute(stmt)]
    assert ours == want


def test_eager_loading(cluster: qp.Cluster) -> None:
    for option in (selectinload(Item.tags), joinedload(Item.tags)):
        stmt = select(Item).options(option).order_by(Item.a.desc(), Item.id).limit(8).offset(1)
        with cluster.session() as s:
            ours = [(i.id, [t.id for t in i.tags]) for i in s.scalars(stmt).unique()]
        with Session(cluster.oracle) as o:
            want = [(i.id, [t.id for t in i.tags]) for i in o.scalars(stmt).unique()]
        assert ours == want and len(ours) == 8


def test_joinedload_requires_unique_as_in_sqlalchemy(cluster: qp.Cluster) -> None:
    from sqlalchemy.exc import InvalidRequestError

    with cluster.session() as s, pytest.raises(InvalidRequestError, match="unique"):
        s.scalars(select(Item).options(joinedload(Item.tags)).order_by(Item.id)).all()


def test_group_by_having_order_limit(cluster: qp.Cluster) -> None:
    stmt = (
        select(Item.grp, func.count().label("n"), func.avg(Item.a), func.max(Item.b))
        .group_by(Item.grp)
        .having(func.sum(Item.a) > 5)
        .order_by(func.count().desc(), Item.grp)
        .limit(2)
    )
    with cluster.session() as s:
        result = s.execute(stmt)
        assert list(result.keys()) == ["grp", "n", "avg", "max"]
        ours = [tuple(r) for r in result]
    assert ours == _oracle(cluster, stmt)


def test_group_by_expression_not_selected(cluster: qp.Cluster) -> None:
    stmt = select(func.count()).select_from(Item).group_by(Item.grp).order_by(func.count())
    with cluster.session() as s:
        assert [tuple(r) for r in s.execute(stmt)] == _oracle(cluster, stmt)


def test_join_evaluated_per_shard(cluster: qp.Cluster) -> None:
    stmt = (
        select(Item.id, func.count(Tag.id))
        .join(Item.tags)
        .group_by(Item.id)
        .order_by(func.count(Tag.id).desc(), Item.id)
        .limit(5)
    )
    # The drop-in session has no placement: SQLAlchemy's semantics, with a warning.
    with cluster.session() as s, pytest.warns(ColocationWarning, match="JOIN over"):
        assert [tuple(r) for r in s.execute(stmt)] == _oracle(cluster, stmt)
    stmt2 = select(Item.id).where(Item.tags.any()).order_by(Item.id)
    with cluster.session() as s, pytest.warns(ColocationWarning, match="subquery over"):
        assert [tuple(r) for r in s.execute(stmt2)] == _oracle(cluster, stmt2)


def test_statement_without_sharded_tables_asks_one_shard(cluster: qp.Cluster) -> None:
    with cluster.session() as s:
        assert s.execute(select(literal(1))).all() == [(1,)]


def test_yield_per_streams_in_order(cluster: qp.Cluster) -> None:
    stmt = select(Item).order_by(Item.b, Item.id).execution_options(yield_per=4)
    with cluster.session() as s:
        result = s.execute(stmt)
        sizes = []
        ids = []
        for part in result.scalars().partitions():
            sizes.append(len(part))
            ids.extend(i.id for i in part)
    want = _oracle(cluster, select(ITEMS.c.id).order_by(ITEMS.c.b, ITEMS.c.id))
    assert ids == [r[0] for r in want]
    assert max(sizes) <= 4


# ----------------------------------------------------------------------------------------
# what is refused


REFUSED = {
    "window function": lambda: select(Item.id, func.row_number().over(order_by=Item.id)),
    # (UNION / UNION ALL of row SELECTs are merged: test_query_allowlist.py)
    "union": lambda: union(select(Item.id), select(func.max(Tag.id))),
    # (one DISTINCT argument is merged: test_query_allowlist.py)
    "count distinct": lambda: select(func.count(distinct(Item.grp)), func.count(Item.a.distinct())),
    "sum distinct": lambda: select(func.sum(Item.a.distinct()), func.sum(Item.b.distinct())),
    # (sum(a) / count(b) alone is computed after the merge: test_query_allowlist.py)
    "aggregate in expression": lambda: select(Item.grp, func.sum(Item.a) / Item.b)
    .group_by(Item.grp, Item.b),
    "other aggregate": lambda: select(func.group_concat(Item.grp)),
    # (an uncorrelated scalar subquery and an IN list that needs every shard are computed
    # first: test_query_allowlist.py, test_query_exactness.py)
    # (count(*) over such a subquery is merged: test_query_allowlist.py)
    "FROM subquery with LIMIT": lambda: select(func.sum(Item.a)).select_from(Item).join(
        select(Item.id).limit(3).subquery(), literal(True)
    ),
    "FROM subquery with DISTINCT": lambda: select(func.max(Item.a)).select_from(
        select(Item.grp).distinct().subquery()
    ),
    "FOR UPDATE with LIMIT": lambda: select(Item).with_for_update().limit(2),
    "bare column": lambda: select(Item.grp, func.count()),
    "HAVING not evaluable": lambda: select(Item.grp, func.count())
    .group_by(Item.grp)
    .having(func.lower(Item.grp) == "a"),
    "HAVING arithmetic": lambda: select(Item.grp)
    .group_by(Item.grp)
    .having(func.count() % 2 == 0),
    "ORDER BY not grouped": lambda: select(Item.grp, func.count())
    .group_by(Item.grp)
    .order_by(Item.a),
    "DISTINCT with ORDER BY not selected": lambda: select(Item.grp).distinct().order_by(Item.a),
    "textual statement with ORDER BY": lambda: text("SELECT id FROM qitems ORDER BY id"),
    "from_statement": lambda: select(Item).from_statement(text("SELECT * FROM qitems")),
    "textual subquery in WHERE": lambda: select(Item.id).where(
        text("a > (SELECT avg(a) FROM qitems)")
    ),
    # (plain FETCH FIRST n is merged as LIMIT n: test_query_allowlist.py)
    "FETCH": lambda: select(Item.id).order_by(Item.id).fetch(3, with_ties=True),
    "rollup": lambda: select(Item.grp, func.count()).group_by(func.rollup(Item.grp)),
    "recursive CTE": lambda: select(func.count()).select_from(
        select(Item.id).cte(recursive=True)
    ),
    "LATERAL": lambda: select(Item.id).join(
        select(Tag.id).where(Tag.item_id == Item.id).lateral(), literal(True)
    ),
    "LIMIT expression": lambda: select(Item.id).order_by(Item.id).limit(func.abs(-2)),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_unsupported_constructs_raise(cluster: qp.Cluster, name: str) -> None:
    with cluster.session() as s, pytest.raises(UnsupportedQueryError) as info:
        s.execute(REFUSED[name]()).all()
    assert info.value.construct


def test_insert_to_several_shards_is_refused(cluster: qp.Cluster) -> None:
    from sqlalchemy import insert

    with cluster.session() as s, pytest.raises(UnsupportedQueryError):
        s.execute(insert(ITEMS).values(id=999, grp="a"))


@pytest.mark.filterwarnings("ignore::shardsession.exc.ColocationWarning")
def test_joins_refused_when_placement_says_not_colocated(cluster: qp.Cluster) -> None:
    from shardsession.query import FanoutOptions, execute_on_shards

    class NotColocated:
        def is_replicated(self, table: Any) -> bool:
            return False

        def colocated(self, tables: Any) -> bool:
            return False

    with cluster.session() as s:
        ctx_holder: list[Any] = []

        @event.listens_for(s, "do_orm_execute", retval=True)
        def grab(ctx: Any) -> Any:
            ctx_holder.append(ctx)
            return execute_on_shards(ctx, ["s0", "s1"], FanoutOptions(placement=NotColocated()))

        with pytest.raises(UnsupportedQueryError, match="different shards"):
            s.execute(select(Item.id).join(Item.tags)).all()
        # a single table is fine
        assert len(s.execute(select(Item.id)).all()) > 0


# ----------------------------------------------------------------------------------------
# writes, options


def test_update_delete_rowcounts_are_summed(cluster: qp.Cluster) -> None:
    n_a2 = _oracle(cluster, select(func.count()).select_from(ITEMS).where(ITEMS.c.a == 2))[0][0]
    n_b5 = _oracle(cluster, select(func.count()).select_from(ITEMS).where(ITEMS.c.b == 5))[0][0]
    with cluster.session() as s:
        loaded = s.scalars(select(Item).where(Item.a == 2)).all()
        assert s.execute(update(Item).where(Item.a == 2).values(a=20)).rowcount == n_a2
        assert all(i.a == 20 for i in loaded)  # synchronize_session in the calling thread
        stmt = update(ITEMS).where(ITEMS.c.a == 20).values(a=21)
        assert s.execute(stmt).rowcount == n_a2
        assert s.scalar(select(func.count()).select_from(Item).where(Item.a == 21)) == n_a2
        res = s.execute(
            delete(Item).where(Item.b == 5), execution_options={"synchronize_session": False}
        )
        assert res.rowcount == n_b5
        s.commit()
    with cluster.session() as s:
        assert s.scalar(select(func.count()).select_from(Item).where(Item.b == 5)) == 0


def test_unmerged_option_gives_sqlalchemy_concatenation(cluster: qp.Cluster) -> None:
    with cluster.session() as s:
        counts = s.execute(
            select(func.count()).select_from(Item),
            execution_options={"shardsession_merge": False},
        ).all()
        assert len(counts) == 3 and sum(c for (c,) in counts) == 60
        rows = s.execute(
            select(Item.id).order_by(Item.id).limit(2).execution_options(shardsession_merge=False)
        ).all()
        assert len(rows) == 6


def test_autoflush_runs_once_before_the_fanout(cluster: qp.Cluster) -> None:
    with cluster.session() as s:
        flushes: list[int] = []
        event.listen(s, "after_flush", lambda *a: flushes.append(1))
        item = s.get(Item, 1, identity_token=cluster.placement[1])
        assert item is not None
        item.b = 1000
        assert s.scalar(select(func.max(Item.b))) == 1000
        assert len(flushes) == 1


def _record_statements(cluster: qp.Cluster) -> list[tuple[str, str, float]]:
    """``(shard, "start"|"end"|"error", time)`` for every statement the shards run."""
    log: list[tuple[str, str, float]] = []
    for name, engine in cluster.engines.items():

        def start(*a: Any, _n: str = name) -> None:
            log.append((_n, "start", time.monotonic()))

        def end(*a: Any, _n: str = name) -> None:
            log.append((_n, "end", time.monotonic()))

        def error(ctx: Any, _n: str = name) -> None:
            log.append((_n, "error", time.monotonic()))

        event.listen(engine, "before_cursor_execute", start)
        event.listen(engine, "after_cursor_execute", end)
        event.listen(engine, "handle_error", error)
    return log


def _intervals(log: list[tuple[str, str, float]]) -> dict[str, tuple[float, float]]:
    starts = {s: t for s, what, t in log if what == "start"}
    ends = {s: t for s, what, t in log if what != "start"}
    return {s: (starts[s], ends[s]) for s in starts}


def test_shards_run_in_parallel(cluster: qp.Cluster) -> None:
    # Proved by overlap, not by wall-clock thresholds: every shard's statement starts
    # before any of them ends (each sleeps 0.3 s inside the database).
    stmt = select(Item.id).where(func.ss_sleep(0.3) == 0).limit(1)
    with cluster.session() as s:
        s.execute(select(Item.id).limit(1)).all()  # connections begun
        log = _record_statements(cluster)
        assert len(s.execute(stmt).all()) == 1
    spans = _intervals(log)
    assert sorted(spans) == ["s0", "s1", "s2"]
    assert max(a for a, _ in spans.values()) < min(b for _, b in spans.values()), spans


def test_deadline_raises_and_names_the_pending_shards(cluster: qp.Cluster) -> None:
    stmt = select(Item.id).where(func.ss_sleep(0.2) == 0)
    with cluster.session() as s:
        started = time.monotonic()
        with pytest.raises(FanoutTimeoutError) as info:
            s.execute(stmt, execution_options={"shardsession_timeout": 0.1}).all()
        assert time.monotonic() - started < 3
        assert sorted(info.value.pending_shards) == ["s0", "s1", "s2"]
        assert info.value.timeout == 0.1
        s.rollback()
        assert s.scalar(select(func.count()).select_from(Item)) == 60


def test_no_worker_outlives_a_deadline(
    cluster: qp.Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A statement that ignores its cancel (a Python function sleeping inside SQLite is
    not interrupted) keeps the fan-out waiting: when FanoutTimeoutError is raised, every
    worker has returned, and nothing touches the shards' connections afterwards."""
    from shardsession.query import _fanout

    monkeypatch.setattr(_fanout, "CANCEL_GRACE_SECONDS", 0.05)
    stmt = select(Item.id).where(func.ss_sleep(0.6) == 0)
    with cluster.session() as s:
        s.execute(select(Item.id).limit(1)).all()
        log = _record_statements(cluster)
        with pytest.raises(FanoutTimeoutError):
            s.execute(stmt, execution_options={"shardsession_timeout": 0.1}).all()
        raised = time.monotonic()
        ended = [t for _, what, t in log if what != "start"]
        assert len(ended) == 3 and max(ended) <= raised, log
        time.sleep(0.8)  # a worker left behind would run (and log) now
        assert [e for e in log if e[2] > raised] == []
        s.rollback()
        assert s.scalar(select(func.count()).select_from(Item)) == 60


def test_max_workers_bounds_concurrency(cluster: qp.Cluster) -> None:
    # One at a time: no two shards' statements overlap.
    stmt = select(Item.id).where(func.ss_sleep(0.05) == 0).limit(1)
    with cluster.session() as s:
        s.execute(select(Item.id).limit(1)).all()
        log = _record_statements(cluster)
        s.execute(stmt, execution_options={"shardsession_max_workers": 1}).all()
    spans = sorted(_intervals(log).values())
    assert len(spans) == 3
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end <= start, spans


def test_yield_per_buffers_at_most_one_batch_per_shard(tmp_path: Any) -> None:
    """Streaming an ordered fan-out with yield_per: the ORM never holds more than one
    batch per shard beyond the rows already handed to the caller, whatever the row
    count (counted with the ``load`` event: one per object built from a shard's row)."""
    urls = {f"s{i}": f"sqlite:///{tmp_path}/y{i}.db" for i in range(4)}
    c = qp.make_cluster(urls, "sqlite://")
    batch = 25
    try:
        for n in (200, 2000):
            rows = _rows(4 * n, seed=n)
            c.load(rows, [r["id"] % 4 for r in rows])
            built = 0

            def on_load(target: Any, context: Any) -> None:
                nonlocal built
                built += 1

            event.listen(Item, "load", on_load)
            try:
                with c.session() as s:
                    stmt = select(Item).order_by(Item.a, Item.id)
                    result = s.scalars(stmt.execution_options(yield_per=batch))
                    consumed = 0
                    worst = 0
                    previous: tuple[Any, int] | None = None
                    for item in result:
                        consumed += 1
                        worst = max(worst, built - consumed)
                        key = (item.a is not None, item.a or 0, item.id)
                        assert previous is None or previous <= key
                        previous = key
                        del item
                    assert consumed == 4 * n
            finally:
                event.remove(Item, "load", on_load)
            assert worst <= 4 * batch, (n, worst)
            assert worst >= batch  # the bound is what is measured, not an empty stream
    finally:
        qp.dispose(c)


def test_orm_work_stays_in_the_calling_thread(cluster: qp.Cluster) -> None:
    """Many fan-outs with eager loading: every object load and every eager-load query
    happens in the calling thread; the identity map stays consistent."""
    loads: set[str] = set()
    executes: set[str] = set()

    def on_load(target: Any, context: Any) -> None:
        loads.add(threading.current_thread().name)

    event.listen(Item, "load", on_load)
    event.listen(Tag, "load", on_load)
    try:
        with cluster.session() as s:
            event.listen(
                s, "do_orm_execute", lambda ctx: executes.add(threading.current_thread().name)
            )
            want = _oracle(cluster, select(ITEMS.c.id).order_by(ITEMS.c.a, ITEMS.c.id))
            for i in range(60):
                option = selectinload(Item.tags) if i % 2 else joinedload(Item.tags)
                stmt = select(Item).options(option).order_by(Item.a, Item.id)
                if i % 3 == 0:
                    stmt = stmt.execution_options(populate_existing=True)
                items = s.scalars(stmt).unique().all()
                assert [(x.id,) for x in items] == want
                for x in items:
                    assert all(t.item_id == x.id for t in x.tags)
                    assert len(x.tags) == x.id % 3
                if i % 10 == 0:
                    s.expire_all()
    finally:
        event.remove(Item, "load", on_load)
        event.remove(Tag, "load", on_load)
    assert loads == {threading.current_thread().name}
    assert executes <= {threading.current_thread().name}


# ----------------------------------------------------------------------------------------
# keyset pagination


def test_paginate_walks_the_whole_order(cluster: qp.Cluster) -> None:
    stmt = select(Item).order_by(Item.b.desc(), Item.grp)
    with cluster.session() as s:
        seen: list[int] = []
        token = None
        pages = 0
        while True:
            page = paginate(s, stmt, page_size=7, token=token)
            seen.extend(i.id for i in page.items)
            pages += 1
            token = page.next_token
            if token is None:
                break
            assert len(page.items) == 7
    want = [
        r[0]
        for r in _oracle(
            cluster, select(ITEMS.c.id).order_by(ITEMS.c.b.desc(), ITEMS.c.grp, ITEMS.c.id)
        )
    ]
    assert seen == want and pages == 9


def test_paginate_with_the_same_key_on_several_shards(tmp_path: Any) -> None:
    urls = {f"s{i}": f"sqlite:///{tmp_path}/p{i}.db" for i in range(3)}
    c = qp.make_cluster(urls, "sqlite://")
    try:
        for name, engine in c.engines.items():
            with engine.begin() as conn:  # ids 1..5 on every shard
                conn.execute(ITEMS.insert(), [{"id": i, "grp": name, "a": 1} for i in range(1, 6)])
        stmt = select(ITEMS.c.id, ITEMS.c.grp).order_by(ITEMS.c.a)
        got: list[tuple[int, str]] = []
        with c.session() as s:
            token = None
            while True:
                page = paginate(s, stmt, page_size=4, token=token, secret=b"k")
                got.extend((r.id, r.grp) for r in page.rows)
                token = page.next_token
                if token is None:
                    break
        assert sorted(got) == sorted((i, n) for n in urls for i in range(1, 6))
        assert len(got) == 15
    finally:
        qp.dispose(c)


def test_bad_page_tokens_are_refused(cluster: qp.Cluster) -> None:
    stmt = select(Item.id).order_by(Item.a)
    with cluster.session() as s:
        token = paginate(s, stmt, page_size=5, secret=b"k").next_token
        assert token is not None
        body, mac = token.split(".")
        for bad in [
            "garbage",
            body + "." + mac[:-2] + ("AA" if mac[-2:] != "AA" else "BB"),
            body[:-3] + "." + mac,
        ]:
            with pytest.raises(PageTokenError):
                paginate(s, stmt, page_size=5, token=bad, secret=b"k")
        with pytest.raises(PageTokenError):  # another key
            paginate(s, stmt, page_size=5, token=token, secret=b"other")
        with pytest.raises(PageTokenError, match="different query"):
            paginate(s, stmt.where(and_(Item.b > 0)), page_size=5, token=token, secret=b"k")
        exists_ = paginate(s, stmt, page_size=5, token=token, secret=b"k")
        assert len(exists_.items) == 5
    assert exists is not None
