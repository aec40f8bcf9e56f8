"""Pure ordering logic of the cross-shard merge: keys, NULL placement, verification."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardsession.exc import UnsupportedQueryError
from shardsession.query._ordering import (
    SortKey,
    compare_rows,
    default_nulls_first,
    merge_sorted,
    sort_rows,
)

values = st.one_of(st.none(), st.integers(-5, 5))
rows3 = st.tuples(values, values, st.integers(0, 10_000))


def test_default_null_placement_follows_the_dialects() -> None:
    assert default_nulls_first(False, ["postgresql", "postgresql"]) == (False, False)
    assert default_nulls_first(True, ["postgresql"]) == (True, False)
    assert default_nulls_first(False, ["sqlite", "mysql"]) == (True, False)
    assert default_nulls_first(True, ["mariadb"]) == (False, False)
    # mixed families: the documented rule is "NULL is the smallest value"
    assert default_nulls_first(False, ["postgresql", "sqlite"]) == (True, True)
    assert default_nulls_first(True, ["postgresql", "mysql"]) == (False, True)


def test_compare_directions_and_nulls() -> None:
    asc_last = [SortKey(0, False, False)]
    assert compare_rows(asc_last, (1,), (2,)) < 0
    assert compare_rows(asc_last, (None,), (2,)) > 0
    desc_first = [SortKey(0, True, True)]
    assert compare_rows(desc_first, (1,), (2,)) > 0
    assert compare_rows(desc_first, (None,), (2,)) < 0
    assert compare_rows(desc_first, (None,), (None,)) == 0
    two = [SortKey(0, False, True), SortKey(1, True, False)]
    assert compare_rows(two, (1, 5), (1, 3)) < 0


@settings(derandomize=True, max_examples=150)
@given(
    st.lists(rows3, max_size=40),
    st.integers(1, 4),
    st.lists(st.tuples(st.integers(0, 1), st.booleans(), st.booleans()), min_size=1, max_size=2),
)
def test_kway_merge_equals_a_global_sort(
    rows: list[tuple[int | None, int | None, int]],
    n_shards: int,
    spec: list[tuple[int, bool, bool]],
) -> None:
    keys = [SortKey(i, d, nf) for i, d, nf in spec] + [SortKey(2)]
    rng = random.Random(len(rows))
    shards: list[list[tuple[int | None, int | None, int]]] = [[] for _ in range(n_shards)]
    for r in rows:
        shards[rng.randrange(n_shards)].append(r)
    for s in shards:
        sort_rows(s, keys)  # type: ignore[arg-type]
    merged = list(merge_sorted(list(enumerate(shards)), keys))
    expected = list(rows)
    sort_rows(expected, keys)  # type: ignore[arg-type]
    assert [r[2] for r in merged] == [r[2] for r in expected] or [
        tuple(r[i] for i, _, _ in spec) for r in merged
    ] == [tuple(r[i] for i, _, _ in spec) for r in expected]


def test_merge_is_lazy() -> None:
    def endless(start: int):  # type: ignore[no-untyped-def]
        n = start
        while True:
            yield (n,)
            n += 2

    merged = merge_sorted([("a", endless(0)), ("b", endless(1))], [SortKey(0)])
    assert [next(merged)[0] for _ in range(5)] == [0, 1, 2, 3, 4]


def test_ties_come_out_in_shard_order() -> None:
    merged = list(merge_sorted([("a", [(1, "a")]), ("b", [(1, "b")])], [SortKey(0)]))
    assert [r[1] for r in merged] == ["a", "b"]


def test_a_shard_that_orders_differently_is_refused() -> None:
    # e.g. a case-insensitive collation: 'a' before 'B' on the server, not in Python
    streams = [("s1", [("a",), ("B",)]), ("s2", [("c",)])]
    with pytest.raises(UnsupportedQueryError) as info:
        list(merge_sorted(streams, [SortKey(0)]))
    assert info.value.construct == "ORDER BY"
    assert info.value.shard_id == "s1"


def test_incomparable_types_are_refused() -> None:
    with pytest.raises(UnsupportedQueryError):
        list(merge_sorted([("a", [(1,)]), ("b", [("x",)])], [SortKey(0)]))
