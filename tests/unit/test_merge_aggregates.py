"""Pure aggregate merging: partial groups, AVG precision per backend, HAVING logic."""

from __future__ import annotations

import decimal
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardsession.exc import UnsupportedQueryError
from shardsession.query._aggregates import GroupMerger, Slot, finalize_avg, pg_numeric_div
from shardsession.query._having import _and, _or


def test_group_merger_combines_partials() -> None:
    # row: (grp, count, sum, min, max, sum_for_avg, count_for_avg)
    slots = [
        Slot("key", (0,)),
        Slot("count", (1,)),
        Slot("sum", (2,)),
        Slot("min", (3,)),
        Slot("max", (4,)),
        Slot("avg", (5, 6)),
    ]
    m = GroupMerger(slots, [0], "sqlite")
    m.add_all(
        [
            ("x", 2, 10, 1, 9, 10, 2),
            ("y", 1, None, None, None, None, 0),
            ("x", 3, 5, 0, 4, 5, 3),
        ]
    )
    out = sorted(m.results(empty_group=False), key=lambda r: r[0])
    assert out == [("x", 5, 15, 0, 9, 3.0), ("y", 1, None, None, None, None)]


def test_no_group_by_yields_one_row_even_without_rows() -> None:
    m = GroupMerger([Slot("count", (0,)), Slot("sum", (1,))], [], "postgresql")
    assert m.results(empty_group=True) == [(0, None)]
    assert GroupMerger([Slot("count", (0,))], [0], "sqlite").results(empty_group=False) == []


def test_integer_sums_stay_integers() -> None:
    m = GroupMerger([Slot("sum", (0,))], [], "sqlite")
    m.add_all([(2,), (3,)])
    (value,) = m.results(empty_group=True)[0]
    assert value == 5 and isinstance(value, int)


@pytest.mark.parametrize(
    ("total", "count", "expected"),
    [
        (3, 2, "1.5000000000000000"),
        (5, 3, "1.6666666666666667"),
        (0, 4, "0E-20"),
        (-5, 3, "-1.6666666666666667"),
        (Decimal("10.50"), 4, "2.6250000000000000"),
        (1, 3, "0.33333333333333333333"),
        (200000, 3, "66666.666666666667"),
        (123456789012, 7, "17636684144.57142857"),  # values checked on PostgreSQL 15
    ],
)
def test_pg_avg_matches_numeric_div(total: object, count: int, expected: str) -> None:
    got = finalize_avg(total, count, "postgresql")
    assert isinstance(got, Decimal)
    assert got == Decimal(expected)
    assert got.as_tuple().exponent == Decimal(expected).as_tuple().exponent


def test_mysql_avg_has_four_more_decimals() -> None:
    assert str(finalize_avg(Decimal(5), 3, "mysql")) == "1.6667"
    assert str(finalize_avg(Decimal("10.50"), 4, "mariadb")) == "2.625000"


def test_avg_of_floats_and_sqlite() -> None:
    assert finalize_avg(5, 2, "sqlite") == 2.5
    assert finalize_avg(1.0, 3, "postgresql") == 1.0 / 3
    assert finalize_avg(None, 0, "sqlite") is None


def test_avg_on_an_unmodelled_dialect_is_refused() -> None:
    with pytest.raises(UnsupportedQueryError):
        finalize_avg(5, 2, "mssql")


@settings(derandomize=True, max_examples=200)
@given(st.integers(-(10**15), 10**15), st.integers(1, 10**6))
def test_pg_numeric_div_rounds_half_away_from_zero(num: int, den: int) -> None:
    got = pg_numeric_div(Decimal(num), Decimal(den))
    exponent = got.as_tuple().exponent
    assert isinstance(exponent, int)
    exact = decimal.Context(prec=200).divide(Decimal(num), Decimal(den))
    assert abs(got - exact) <= Decimal(1).scaleb(exponent) / 2


def test_three_valued_logic() -> None:
    assert _and([True, None]) is None
    assert _and([False, None]) is False
    assert _or([True, None]) is True
    assert _or([False, None]) is None
