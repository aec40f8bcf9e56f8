"""Pure value semantics of the merge: NaN, PAD SPACE keys, NOCASE, declared collations."""

from __future__ import annotations

import decimal
import functools
import itertools
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from shardsession.query._aggregates import GroupMerger, Slot
from shardsession.query._catalog import sqlite_declared_collations
from shardsession.query._dialect import (
    ascii_nocase_key,
    code_point_pad_key,
    nan_safe,
    pad_space_key,
)
from shardsession.query._merge import dedupe
from shardsession.query._ordering import SortKey, merge_sorted, merged_order
from shardsession.routing import nocase
from shardsession.routing._keys import compares_bytewise

NAN = float("nan")


def _padded_cmp(a: str, b: str) -> int:
    # SQL PAD SPACE: the shorter string is padded with spaces.
    width = max(len(a), len(b))
    x, y = a.ljust(width), b.ljust(width)
    return (x > y) - (x < y)


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=" \tab", max_size=6), st.text(alphabet=" \tab", max_size=6))
def test_pad_space_key_compares_like_padding(a: str, b: str) -> None:
    ka, kb = code_point_pad_key(a), code_point_pad_key(b)
    assert ((ka > kb) - (ka < kb)) == _padded_cmp(a, b)
    assert (ka == kb) == (_padded_cmp(a, b) == 0)
    if ka == kb:
        assert hash(ka) == hash(kb)


def test_pad_space_examples() -> None:
    assert code_point_pad_key("a") == code_point_pad_key("a  ")
    assert code_point_pad_key("a\t") < code_point_pad_key("a")
    assert code_point_pad_key("a") < code_point_pad_key("a b")
    assert pad_space_key([65, 32, 32], 32) == pad_space_key([65], 32)


def test_nocase_folds_ascii_only() -> None:
    assert ascii_nocase_key("Bob@X.com") == "bob@x.com"
    assert ascii_nocase_key("ÅLICE") == "Ålice"  # SQLite NOCASE folds A-Z only
    assert nocase(("Bob", 3)) == ("bob", 3)


def test_nan_is_one_value_above_every_number() -> None:
    key = functools.cmp_to_key(lambda a, b: (a > b) - (a < b))
    values = [3.0, NAN, -math.inf, decimal.Decimal("NaN"), math.inf, 0.0]
    ordered = sorted(values, key=lambda v: key(nan_safe(v)))
    assert ordered[:4] == [-math.inf, 0.0, 3.0, math.inf]
    assert all(v != v for v in ordered[4:])
    assert nan_safe(NAN) == nan_safe(decimal.Decimal("NaN"))


def test_merge_orders_nan_like_postgresql() -> None:
    a = [(1.0,), (NAN,), (None,)]
    b = [(0.5,), (2.0,), (NAN,)]
    keys = [SortKey(0, False, False)]
    merged = list(merge_sorted([("a", a), ("b", b)], keys))
    assert [r[0] for r in merged[:3]] == [0.5, 1.0, 2.0]
    assert all(r[0] != r[0] for r in merged[3:5]) and merged[5] == (None,)
    order = merged_order([("a", a), ("b", b)], keys, 6)
    assert order == [1, 0, 1, 0, 1, 0]


def test_groups_and_distinct_fold_nan_and_collation() -> None:
    merger = GroupMerger(
        [Slot("key", (0,)), Slot("count", (1,)), Slot("max", (2,)), Slot("min", (3,))],
        [0],
        "postgresql",
    )
    merger.add_all([(NAN, 1, 1.0, "b"), (float("nan"), 2, NAN, "a"), (1.0, 1, 2.0, None)])
    groups = {repr(g[0]): g for g in merger.results(empty_group=False)}
    assert groups["nan"][1] == 3 and math.isnan(groups["nan"][2]) and groups["nan"][3] == "a"
    ci = GroupMerger(
        [Slot("key", (0,)), Slot("count", (1,)), Slot("min", (0,), ascii_nocase_key)],
        [0],
        "sqlite",
        (ascii_nocase_key,),
    )
    ci.add_all([("Bob", 1), ("bob", 2), ("BOB", 1), ("al", 1)])
    assert sorted((g[1], g[2].lower()) for g in ci.results(empty_group=False)) == [
        (1, "al"),
        (4, "bob"),
    ]
    rows = [("a", NAN), ("A", float("nan")), ("b", 1.0)]
    assert len(list(dedupe(rows, 2, (ascii_nocase_key, nan_safe)))) == 2


def test_sqlite_declared_collations() -> None:
    sql = (
        'CREATE TABLE "t" (id INTEGER PRIMARY KEY, "a b" VARCHAR(3) COLLATE "NOCASE", '
        "c TEXT collate rtrim, d NUMERIC(10, 2), [e] TEXT COLLATE `binary`, "
        "CONSTRAINT x UNIQUE (c COLLATE NOCASE))"
    )
    assert sqlite_declared_collations(sql) == {
        "id": "BINARY",
        "a b": "NOCASE",
        "c": "rtrim",
        "d": "BINARY",
        "e": "binary",
    }


def test_key_collations_that_find_keys_by_their_exact_value() -> None:
    exact = [None, "C", "POSIX", "binary", "BINARY", "utf8mb4_nopad_bin", '"C"']
    loose = ["NOCASE", "RTRIM", "utf8mb4_general_ci", "utf8mb4_bin", "en_US", "und-x-icu"]
    assert all(compares_bytewise(c) for c in exact)
    assert not any(compares_bytewise(c) for c in loose)


def test_pad_key_total_order_is_consistent() -> None:
    words = ["", " ", "a", "a ", "a\t", "a b", "ab", "b", " a"]
    for x, y, z in itertools.product(words, repeat=3):
        kx, ky, kz = (code_point_pad_key(w) for w in (x, y, z))
        if kx <= ky <= kz:
            assert kx <= kz


def test_numbers_typed_differently_by_two_drivers() -> None:
    from shardsession.query._dialect import add_numbers, mixed_number_key

    assert add_numbers(decimal.Decimal("1.10"), 1.1) == decimal.Decimal("2.20")
    assert add_numbers(1.1, decimal.Decimal("1.10")) == decimal.Decimal("2.20")
    assert mixed_number_key(1.1) == mixed_number_key(decimal.Decimal("1.10"))
    assert hash(mixed_number_key(1.1)) == hash(mixed_number_key(decimal.Decimal("1.10")))
    assert mixed_number_key(NAN) == mixed_number_key(decimal.Decimal("NaN"))
    assert mixed_number_key(2) == mixed_number_key(2.0) == mixed_number_key(decimal.Decimal(2))
