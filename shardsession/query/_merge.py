"""Apply a plan to per-shard results and build the one Result the caller gets.

ORDER BY with LIMIT over ORM entities merges *before* the ORM builds objects: each
shard's rows are read from its cursor as plain values, k-way merged on the hidden sort
columns, and only the rows that survive OFFSET/LIMIT are handed back to the ORM, so
objects (and ``load`` events, identity-map entries, eager loads) exist only for rows one
database would have returned.  Other statements merge the ORM's rows as they come.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from sqlalchemy.engine import Result

from .. import _compat
from ..exc import UnsupportedQueryError
from ._aggregates import GroupMerger
from ._compound import CompoundPlan
from ._computed import Evaluator, compute
from ._dialect import ValueKey, nan_safe
from ._ordering import merge_sorted, merged_order, sort_rows
from ._plan import AggregatePlan, RowsPlan

__all__ = ["dedupe", "merge_aggregate", "merge_compound", "merge_rows", "slice_rows"]


def _rows_of(result: Result[Any], unique: bool) -> Iterator[tuple[Any, ...]]:
    # Iterating the public Result applies each shard's own type processors (a mixed
    # set of dialects each converts its own values).  For joined eager loading of
    # collections the ORM requires unique(): one row per parent object, which is also
    # what LIMIT counts.
    source = result.unique() if unique else result
    for row in source:
        yield tuple(row)


def dedupe(
    rows: Iterable[Sequence[Any]], visible: int, keys: Sequence[ValueKey] = ()
) -> Iterator[Sequence[Any]]:
    """Drop rows whose visible columns were seen before (SELECT DISTINCT after a merge).

    ``keys`` (one per visible column) say what a value is deduplicated as (a string
    collation); by default every NaN is one value, as in PostgreSQL.  Memory grows with
    the number of distinct rows.
    """
    seen: set[tuple[Any, ...]] = set()
    convert = tuple(keys) or (nan_safe,) * visible
    for row in rows:
        key = tuple(
            None if (v := row[i]) is None else k(v) for i, k in enumerate(convert)
        )
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
    plan: RowsPlan,
    results: Sequence[tuple[Any, Result[Any]]],
    distinct_keys: Sequence[ValueKey] = (),
) -> Result[Any]:
    """Merge row results: k-way merge when ordered, lazy concatenation otherwise.

    ``distinct_keys``: what DISTINCT compares each visible column as (see
    :func:`dedupe`)."""
    template = results[0][1]
    unique = _compat.requires_unique(template)
    unloaded = None if unique else _unloaded(plan, results)
    merged: Iterable[Sequence[Any]]
    if unloaded is not None and plan.limit is not None:
        stop = plan.offset + plan.limit
        merged = _close_when_done(_merge_unloaded(plan, stop, results, unloaded), results)
        return _compat.build_result(
            template, merged, visible=plan.visible, attributes=plan.attributes
        )
    streams = [(shard_id, _rows_of(r, unique)) for shard_id, r in results]
    if plan.sort_keys:
        merged = merge_sorted(streams, plan.sort_keys)
    else:
        merged = itertools.chain.from_iterable(rows for _, rows in streams)
    if plan.distinct:
        merged = dedupe(merged, plan.visible, distinct_keys)
    if plan.limit is not None or plan.offset:
        merged = _close_when_done(slice_rows(merged, plan.limit, plan.offset), results)
    return _compat.build_result(
        template,
        merged,
        visible=plan.visible,
        attributes=plan.attributes,
    )


def _unloaded(
    plan: RowsPlan, results: Sequence[tuple[Any, Result[Any]]]
) -> list[_compat.UnloadedRows] | None:
    """Each shard's unread cursor when the merge can run before the ORM builds objects:
    ORDER BY only on hidden columns, a LIMIT (so rows are dropped), no DISTINCT, and ORM
    results nobody has read (see :func:`shardsession._compat.unloaded_orm_rows`) with
    the sort columns at the same positions.  ``None`` otherwise; nothing is read here."""
    if plan.limit is None or plan.distinct or not plan.sort_keys:
        return None
    if any(k.index < plan.visible for k in plan.sort_keys):
        return None
    names = [plan.hidden_names[k.index - plan.visible] for k in plan.sort_keys]
    unloaded: list[_compat.UnloadedRows] = []
    for _, result in results:
        found = _compat.unloaded_orm_rows(result, names)
        if found is None or (unloaded and found.positions != unloaded[0].positions):
            return None
        unloaded.append(found)
    return unloaded


def _merge_unloaded(
    plan: RowsPlan,
    stop: int,
    results: Sequence[tuple[Any, Result[Any]]],
    unloaded: Sequence[_compat.UnloadedRows],
) -> Iterator[Sequence[Any]]:
    """The merged, sliced rows, objects built only for the rows that are returned.

    Runs when the caller first reads: each shard's raw rows are read and their sort
    values merged up to ``stop`` (verified per shard, as :func:`merge_sorted` does);
    each shard's ORM result is then given back only the rows it contributes (a
    contiguous run of its rows: a shard's rows leave the merge in their own order) and
    read in merged order.

    :raises UnsupportedQueryError: a shard's rows are not in Python's order, or values
        of different shards cannot be compared.
    """
    raws: list[list[Any]] = []
    streams: list[tuple[Any, Sequence[Sequence[Any]]]] = []
    for (shard_id, _), source in zip(results, unloaded, strict=True):
        raw, values = _compat.read_unloaded_rows(source)
        raws.append(raw)
        streams.append((shard_id, values))
    # The sort keys read the cursor's columns (positions of the hidden columns there).
    positions = unloaded[0].positions
    keys = [
        dataclasses.replace(k, index=p) for p, k in zip(positions, plan.sort_keys, strict=True)
    ]
    order = merged_order(streams, keys, stop)
    skipped = [0] * len(results)
    for index in order[: plan.offset]:
        skipped[index] += 1
    taken = list(skipped)
    for index in order[plan.offset :]:
        taken[index] += 1
    for source, raw, first, end in zip(unloaded, raws, skipped, taken, strict=True):
        _compat.reload_unloaded_rows(source, raw[first:end])
    rows = [_rows_of(r, False) for _, r in results]
    for index in order[plan.offset :]:
        yield next(rows[index])


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
    group_keys: Sequence[ValueKey] = (),
    distinct_keys: Sequence[ValueKey] = (),
    evaluate: Evaluator | None = None,
) -> Result[Any]:
    """Merge partial groups, compute the items that are functions of aggregates (with
    ``evaluate``, see :mod:`._computed`), then HAVING, DISTINCT, ORDER BY, OFFSET/LIMIT.

    ``group_keys`` (one per group position) and ``distinct_keys`` (one per visible
    column) say what values are grouped and deduplicated as (string collations)."""
    merger = GroupMerger(plan.slots, plan.group_positions, avg_dialect, group_keys)
    for _, result in results:
        merger.add_all(_rows_of(result, False))
    groups = merger.results(empty_group=not plan.has_group_by)
    if plan.computed:
        if evaluate is None:
            raise UnsupportedQueryError(
                "a function of aggregates needs a shard to evaluate it after the merge",
                construct="aggregate in expression",
            )
        groups = compute(plan.computed, groups, evaluate, avg_dialect)
    if plan.having is not None:
        having = plan.having
        groups = [g for g in groups if having(g) is True]
    rows: list[Sequence[Any]] = list(groups)
    if plan.distinct:
        rows = list(dedupe(rows, plan.visible, distinct_keys))
    if plan.sort_keys:
        sort_rows(rows, plan.sort_keys)
    if plan.limit is not None or plan.offset:
        rows = list(slice_rows(rows, plan.limit, plan.offset))
    visible_rows = [tuple(r[: plan.visible]) for r in rows]
    template = results[0][1]
    return _compat.build_result(
        template, visible_rows, visible=plan.visible, unique_state_from=template
    )


def merge_compound(
    plan: CompoundPlan, results: Sequence[tuple[Any, Result[Any]]]
) -> Result[Any]:
    """The shards' UNION / UNION ALL answers concatenated, deduplicated for UNION,
    sorted and sliced (memory: the shards' rows)."""
    try:
        rows: list[Sequence[Any]] = [r for _, result in results for r in _rows_of(result, False)]
    finally:
        for _, r in results:
            r.close()
    if plan.distinct:
        rows = list(dedupe(rows, plan.visible))
    if plan.sort_keys:
        sort_rows(rows, plan.sort_keys)
    if plan.limit is not None or plan.offset:
        rows = list(slice_rows(rows, plan.limit, plan.offset))
    return _compat.build_result(results[0][1], rows, visible=plan.visible)
