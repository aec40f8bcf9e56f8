"""Pure ordering logic: sort keys, NULL placement per dialect, the verified k-way merge.

Nothing here touches SQLAlchemy; rows are plain tuples of already-processed values.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import operator
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ..exc import UnsupportedQueryError
from ._dialect import DIALECTS, ValueKey, nan_safe, rules_for

__all__ = [
    "NULLS_HIGH_DIALECTS",
    "SortKey",
    "compare_rows",
    "default_nulls_first",
    "merge_sorted",
    "merged_order",
    "nulls_high",
    "sort_rows",
]

#: Dialects that treat NULL as larger than every value (NULLS LAST for ASC, FIRST for DESC),
#: from the per-dialect table.  Every other dialect SQLAlchemy ships (SQLite,
#: MySQL/MariaDB, SQL Server) sorts NULL as the smallest value.
NULLS_HIGH_DIALECTS = frozenset(name for name, rules in DIALECTS.items() if rules.nulls_high)


def nulls_high(dialect_name: str) -> bool:
    """Whether ``dialect_name`` sorts NULL above every value by default."""
    return rules_for(dialect_name).nulls_high


def default_nulls_first(descending: bool, dialect_names: Sequence[str]) -> tuple[bool, bool]:
    """Where NULLs go for a key without NULLS FIRST/LAST, and whether shards disagree.

    Returns ``(nulls_first, mixed)``. When every shard's dialect agrees, that dialect's
    placement is used (so the merge reproduces what one such database returns). When
    they disagree (``mixed``), the documented rule is *NULL sorts as the smallest value*
    (SQLite, MySQL/MariaDB and SQL Server behaviour) and the caller must make each shard
    order that way explicitly.
    """
    highs = {nulls_high(d) for d in dialect_names}
    mixed = len(highs) > 1
    high = (not mixed) and highs == {True}
    # NULL high: ASC puts it last, DESC first.  NULL low: the reverse.
    return (descending if high else not descending), mixed


@dataclass(frozen=True)
class SortKey:
    """One ORDER BY key: which column of the row, its direction, where NULLs go.

    ``nulls_first`` is the absolute position of NULLs in the output, already resolved
    from NULLS FIRST/LAST or the dialect default.  ``key`` maps a non-NULL value to what
    it compares as (a string collation, see :mod:`._collation`); without one values
    compare as themselves, every NaN as one value above all numbers.
    """

    index: int
    descending: bool = False
    nulls_first: bool = False
    key: ValueKey | None = None

    def value_key(self) -> ValueKey:
        """What a non-NULL value of this key compares as."""
        return nan_safe if self.key is None else self.key


def compare_rows(keys: Sequence[SortKey], a: Sequence[Any], b: Sequence[Any]) -> int:
    """Three-way comparison of two rows under ``keys`` (negative: ``a`` sorts first).

    Values are compared with Python's operators after each key's ``key`` function:
    numbers numerically (NaN above every number), strings by code point (the
    "C"/binary collation) unless a collation key is set, dates chronologically.
    """
    for key in keys:
        x = a[key.index]
        y = b[key.index]
        if x is None or y is None:
            if x is None and y is None:
                continue
            # x is NULL and y not: x first iff NULLs go first.
            if x is None:
                return -1 if key.nulls_first else 1
            return 1 if key.nulls_first else -1
        convert = key.value_key()
        x = convert(x)
        y = convert(y)
        if x == y:
            continue
        try:
            less = x < y
        except TypeError as err:
            raise UnsupportedQueryError(
                f"cannot order values of types {type(x).__name__} and {type(y).__name__} "
                "returned by different shards",
                construct="ORDER BY",
            ) from err
        if key.descending:
            less = not less
        return -1 if less else 1
    return 0


def _verified(
    rows: Iterable[Sequence[Any]],
    compare: Callable[[Sequence[Any], Sequence[Any]], int],
    shard_id: Any,
) -> Iterator[Sequence[Any]]:
    # A shard's rows must already be in the merge order.  If they are not, the database
    # orders differently from Python (a collation that is not code point order, NULL
    # placement) and a merge would be silently wrong: refuse instead.
    previous: Sequence[Any] | None = None
    for row in rows:
        if previous is not None and compare(previous, row) > 0:
            raise _out_of_order(shard_id)
        previous = row
        yield row


def merge_sorted(
    streams: Sequence[tuple[Any, Iterable[Sequence[Any]]]],
    keys: Sequence[SortKey],
) -> Iterator[Sequence[Any]]:
    """Lazily k-way merge per-shard sorted row streams into one sorted stream.

    ``streams`` is ``[(shard_id, rows), ...]`` in a stable shard order; rows with equal
    keys come out in that shard order (``heapq.merge`` is stable), which keyset
    pagination relies on. Memory: one row per stream plus what each stream buffers.

    :raises UnsupportedQueryError: a stream is not sorted under ``keys`` (detected when
        the offending row is reached).
    """
    compare = functools.partial(compare_rows, keys)
    sort_key = functools.cmp_to_key(compare)
    verified = [_verified(rows, compare, shard_id) for shard_id, rows in streams]
    if len(verified) == 1:
        return verified[0]
    return heapq.merge(*verified, key=sort_key)


def merged_order(
    streams: Sequence[tuple[Any, Sequence[Sequence[Any]]]],
    keys: Sequence[SortKey],
    stop: int,
) -> list[int]:
    """Which stream each of the first ``stop`` rows of the merge of ``streams`` comes
    from (an index into ``streams``).

    The same order as :func:`merge_sorted` (ties in stream order) and the same check
    (rows the merge reads must be in order), for rows already in memory.  When every key
    has the same direction, rows are compared through key tuples in C instead of
    :func:`compare_rows` calls.

    :raises UnsupportedQueryError: a stream is not sorted under ``keys``, or values of
        different streams cannot be compared.
    """
    by_key = _key_function(keys)
    if by_key is None:
        tagged = [
            (shard_id, [(*row, index) for row in rows])
            for index, (shard_id, rows) in enumerate(streams)
        ]
        return [row[-1] for row in itertools.islice(merge_sorted(tagged, keys), stop)]
    key, reverse = by_key
    verified = [
        _verified_keys([(key(row), index) for row in rows], reverse, shard_id)
        for index, (shard_id, rows) in enumerate(streams)
    ]
    merged = heapq.merge(*verified, key=operator.itemgetter(0), reverse=reverse)
    try:
        # Iterating in-memory rows runs no other code: a TypeError is a comparison's.
        return [index for _, index in itertools.islice(merged, stop)]
    except TypeError as err:
        raise UnsupportedQueryError(
            f"cannot order the values returned by different shards ({err})",
            construct="ORDER BY",
        ) from err


def _key_function(
    keys: Sequence[SortKey],
) -> tuple[Callable[[Sequence[Any]], Any], bool] | None:
    """A key function ordering rows as :func:`compare_rows` does, and whether the order
    is descending; ``None`` when the keys mix ASC and DESC.

    Each value becomes ``(flag, value)``, NULL ``(flag, None)``, the flags placing NULLs
    first or last: tuples compare element by element with ``==`` then ``<``, exactly as
    :func:`compare_rows` does, and never compare NULL with a value.
    """
    if not keys or len({k.descending for k in keys}) != 1:
        return None
    reverse = keys[0].descending
    # With reverse=True the largest key comes first: NULLs first means the larger flag.
    flags = [(0, 1) if k.nulls_first != reverse else (1, 0) for k in keys]
    if len(keys) == 1:
        index = keys[0].index
        null_flag, value_flag = flags[0]
        convert = keys[0].value_key()

        def one(row: Sequence[Any]) -> tuple[int, Any]:
            value = row[index]
            return (null_flag, None) if value is None else (value_flag, convert(value))

        return one, reverse
    spec = [(k.index, *f, k.value_key()) for k, f in zip(keys, flags, strict=True)]

    def many(row: Sequence[Any]) -> tuple[tuple[int, Any], ...]:
        return tuple(
            (null_flag, None) if row[i] is None else (value_flag, convert(row[i]))
            for i, null_flag, value_flag, convert in spec
        )

    return many, reverse


def _verified_keys(
    rows: Sequence[tuple[Any, int]], reverse: bool, shard_id: Any
) -> Iterator[tuple[Any, int]]:
    # _verified() for (key, stream index) rows.
    previous: Any = None
    for row in rows:
        if previous is not None and (row[0] > previous if reverse else row[0] < previous):
            raise _out_of_order(shard_id)
        previous = row[0]
        yield row


def _out_of_order(shard_id: Any) -> UnsupportedQueryError:
    return UnsupportedQueryError(
        f"shard {shard_id!r} returned rows in an order the merge cannot reproduce "
        "(a string collation other than binary/code point order, or a NULL "
        "placement that differs from the documented rule)",
        construct="ORDER BY",
        shard_id=shard_id,
    )


def sort_rows(rows: list[Sequence[Any]], keys: Sequence[SortKey]) -> None:
    """Sort ``rows`` in place under ``keys`` (stable)."""
    rows.sort(key=functools.cmp_to_key(functools.partial(compare_rows, keys)))
