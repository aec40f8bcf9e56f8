"""Apply a plan to per-shard results and build the one Result the caller gets."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from sqlalchemy.engine import Result

from .. import _compat
from ..exc import UnsupportedQueryError
from ._aggregates import GroupMerger
from ._ordering import merge_sorted, sort_rows
from ._plan import AggregatePlan, RowsPlan

__all__ = ["dedupe", "merge_aggregate", "merge_rows", "slice_rows"]


def _rows_of(result: Result[Any], unique: bool) -> Iterator[tuple[Any, ...]]:
    # Iterating the public Result applies each shard's own type processors (a mixed
    # set of dialects each converts its own values).  For joined eager loading of
    # collections the ORM requires unique(): one row per parent object, which is also
    # what LIMIT counts.
    source = result.unique() if unique else result
    for row in source:
        yield tuple(row)


def dedupe(rows: Iterable[Sequence[Any]], visible: int) -> Iterator[Sequence[Any]]:
    """Drop rows whose visible columns were seen before (SELECT DISTINCT after a merge).

    Memory grows with the number of distinct rows.
    """
    seen: set[tuple[Any, ...]] = set()
    for row in rows:
        key = tuple(row[:visible])
        try:
            if key in seen:
                continue
            seen.add(key)
        except TypeError as err:
            raise UnsupportedQueryError(
                "DISTINCT over unhashable values cannot be merged", construct="DISTINCT"
            ) from err
        yield row


def slice_rows(
    rows: Iterable[Sequence[Any]], limit: int | None, offset: int
) -> Iterator[Sequence[Any]]:
    """Global OFFSET/LIMIT over the merged stream."""
    stop = None if limit is None else offset + limit
    return itertools.islice(rows, offset, stop)


def merge_rows(
    plan: RowsPlan, results: Sequence[tuple[Any, Result[Any]]]
) -> Result[Any]:
    """Merge row results: k-way merge when ordered, lazy concatenation otherwise."""
    template = results[0][1]
    unique = _compat.requires_unique(template)
    streams = [(shard_id, _rows_of(r, unique)) for shard_id, r in results]
    merged: Iterable[Sequence[Any]]
    if plan.sort_keys:
        merged = merge_sorted(streams, plan.sort_keys)
    else:
        merged = itertools.chain.from_iterable(rows for _, rows in streams)
    if plan.distinct:
        merged = dedupe(merged, plan.visible)
    if plan.limit is not None or plan.offset:
        merged = _close_when_done(slice_rows(merged, plan.limit, plan.offset), results)
    return _compat.build_result(
        template,
        merged,
        visible=plan.visible,
        attributes=plan.attributes,
    )


def _close_when_done(
    rows: Iterator[Sequence[Any]], results: Sequence[tuple[Any, Result[Any]]]
) -> Iterator[Sequence[Any]]:
    # After LIMIT the shards' remaining rows are never read: release their cursors.
    try:
        yield from rows
    finally:
        for _, r in results:
            r.close()


def merge_aggregate(
    plan: AggregatePlan,
    results: Sequence[tuple[Any, Result[Any]]],
    avg_dialect: str,
) -> Result[Any]:
    """Merge partial groups, then HAVING, DISTINCT, ORDER BY, OFFSET/LIMIT."""
    merger = GroupMerger(plan.slots, plan.group_positions, avg_dialect)
    for _, result in results:
        merger.add_all(_rows_of(result, False))
    groups = merger.results(empty_group=not plan.has_group_by)
    if plan.having is not None:
        having = plan.having
        groups = [g for g in groups if having(g) is True]
    rows: list[Sequence[Any]] = list(groups)
    if plan.distinct:
        rows = list(dedupe(rows, plan.visible))
    if plan.sort_keys:
        sort_rows(rows, plan.sort_keys)
    if plan.limit is not None or plan.offset:
        rows = list(slice_rows(rows, plan.limit, plan.offset))
    visible_rows = [tuple(r[: plan.visible]) for r in rows]
    template = results[0][1]
    return _compat.build_result(
        template, visible_rows, visible=plan.visible, unique_state_from=template
    )
