"""Merging before the ORM builds objects: the key-tuple merge, and the plan-shape cache."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import Column, Integer, MetaData, String, Table, bindparam, func, select
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import DeclarativeBase, Mapped, aliased, mapped_column

from shardsession.exc import UnsupportedQueryError
from shardsession.query import _compat
from shardsession.query._ordering import SortKey, merge_sorted, merged_order, sort_rows
from shardsession.query._plan import PLAN_CACHE, RowsPlan, plan_select

values = st.one_of(st.none(), st.integers(-3, 3))
rows3 = st.tuples(values, values, st.integers(0, 10_000))


def _reference(
    streams: list[tuple[str, list[tuple[Any, ...]]]], keys: list[SortKey], stop: int
) -> list[int]:
    tagged = [(s, [(*r, i) for r in rows]) for i, (s, rows) in enumerate(streams)]
    merged = merge_sorted(tagged, keys)
    return [row[-1] for _, row in zip(range(stop), merged, strict=False)]


@settings(derandomize=True, max_examples=200)
@given(
    st.lists(rows3, max_size=40),
    st.integers(1, 4),
    st.lists(st.tuples(st.integers(0, 1), st.booleans(), st.booleans()), min_size=1, max_size=2),
    st.booleans(),
    st.integers(0, 45),
)
def test_merged_order_is_merge_sorted(
    rows: list[tuple[Any, ...]],
    n_streams: int,
    spec: list[tuple[int, bool, bool]],
    same_direction: bool,
    stop: int,
) -> None:
    """Key tuples (one direction) and compare_rows (mixed directions) give the same
    streams, ties included, as merge_sorted."""
    if same_direction:
        spec = [(i, spec[0][1], nf) for i, _, nf in spec]
    keys = [SortKey(i, d, nf) for i, d, nf in spec]
    rng = random.Random(len(rows))
    streams: list[tuple[str, list[tuple[Any, ...]]]] = [(f"s{i}", []) for i in range(n_streams)]
    for r in rows:
        streams[rng.randrange(n_streams)][1].append(r)
    for _, shard_rows in streams:
        sort_rows(shard_rows, keys)  # type: ignore[arg-type]
    assert merged_order(streams, keys, stop) == _reference(streams, keys, stop)


def test_merged_order_refuses_a_stream_out_of_order() -> None:
    keys = [SortKey(0, False, False)]
    streams: list[tuple[str, list[tuple[Any, ...]]]] = [("a", [(1,), (3,)]), ("b", [(4,), (2,)])]
    with pytest.raises(UnsupportedQueryError) as info:
        merged_order(streams, keys, 4)
    assert info.value.construct == "ORDER BY" and info.value.shard_id == "b"
    # rows after the LIMIT are not read, as with merge_sorted
    assert merged_order(streams, keys, 1) == [0]


def test_merged_order_refuses_values_that_do_not_compare() -> None:
    streams: list[tuple[str, list[tuple[Any, ...]]]] = [("a", [(1,)]), ("b", [("x",)])]
    with pytest.raises(UnsupportedQueryError) as info:
        merged_order(streams, [SortKey(0, True, False)], 2)
    assert info.value.construct == "ORDER BY"


# ----------------------------------------------------------------------------------------
# plan shapes


class _Base(DeclarativeBase):
    pass


class Thing(_Base):
    __tablename__ = "things"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(10))
    x: Mapped[int] = mapped_column(Integer)


meta = MetaData()
t = Table("t", meta, Column("id", Integer, primary_key=True), Column("x", Integer))


def _plan(stmt: Any) -> RowsPlan:
    plan = plan_select(
        stmt,
        dialects=["postgresql", "postgresql"],
        is_orm=True,
        cache_key=_compat.statement_cache_key(stmt),
    )
    assert isinstance(plan, RowsPlan)
    return plan


def _sql(plan: RowsPlan) -> str:
    compiled = plan.statement.compile(
        dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}
    )
    return str(compiled)


def _fresh(stmt: Any) -> RowsPlan:
    """The plan made without the cache, for comparison."""
    plan = plan_select(stmt, dialects=["postgresql", "postgresql"], is_orm=True)
    assert isinstance(plan, RowsPlan)
    return plan


def test_a_cached_shape_gives_the_plan_of_the_statement_with_its_own_values() -> None:
    PLAN_CACHE.clear()
    first = select(Thing).where(Thing.x < 5).order_by(Thing.x.desc(), Thing.name).limit(3)
    _plan(first)
    for stmt in (
        select(Thing).where(Thing.x < 9).order_by(Thing.x.desc(), Thing.name).limit(7),
        select(Thing).where(Thing.x < 9).order_by(Thing.x.desc(), Thing.name).limit(4).offset(2),
    ):
        got, want = _plan(stmt), _fresh(stmt)
        assert _sql(got) == _sql(want)
        assert (got.sort_keys, got.limit, got.offset, got.hidden_names, got.attributes) == (
            want.sort_keys, want.limit, want.offset, want.hidden_names, want.attributes
        )
    assert PLAN_CACHE.hits >= 1
    assert "LIMIT 6" in _sql(_plan(first.limit(4).offset(2)))


def test_aliased_entities_get_their_own_hidden_columns() -> None:
    PLAN_CACHE.clear()
    for _ in range(3):
        alias = aliased(Thing)
        stmt = select(alias).order_by(alias.x).limit(2)
        got = _sql(_plan(stmt))
        assert got == _sql(_fresh(stmt))
        assert got.count("things AS") == 1, got
    assert PLAN_CACHE.hits == 2


def test_order_by_with_bound_values_is_planned_every_time() -> None:
    PLAN_CACHE.clear()
    for k in (1, 2, 1):
        stmt = select(t.c.id, (t.c.x + k).label("y")).order_by(t.c.x + k).limit(2)
        plan = _plan(stmt)
        assert plan.sort_keys == _fresh(stmt).sort_keys
    assert len(PLAN_CACHE) == 0
    stmt = select(t.c.id).order_by(func.abs(t.c.x - bindparam("p", 3))).limit(2)
    _plan(stmt)
    assert len(PLAN_CACHE) == 0
