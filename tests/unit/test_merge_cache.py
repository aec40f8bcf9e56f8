"""The per-statement verdict cache of the query engine (no database)."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, func, select

from shardsession.exc import UnsupportedQueryError
from shardsession.query import CHECK_CACHE, _reads_sharded_tables
from shardsession.query._cache import LRUCache

meta = MetaData()
t = Table("t", meta, Column("id", Integer, primary_key=True), Column("x", Integer))


def test_lru_drops_the_least_recently_used() -> None:
    cache: LRUCache[int] = LRUCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "b" is now the oldest
    cache.put("c", 3)
    assert cache.get("b") is None and cache.get("a") == 1 and cache.get("c") == 3
    assert len(cache) == 2


def test_verdict_is_shared_by_statements_differing_in_bound_values() -> None:
    CHECK_CACHE.clear()
    assert _reads_sharded_tables(select(t).where(t.c.x < 5).limit(3), None)
    assert _reads_sharded_tables(select(t).where(t.c.x < 9).limit(7), None)
    assert CHECK_CACHE.hits == 1


def test_verdict_is_per_placement_and_refusals_are_not_cached() -> None:
    class Replicated:
        def is_replicated(self, table: Any) -> bool:
            return True

        def colocated(self, tables: Any) -> bool:
            return True

    CHECK_CACHE.clear()
    stmt = select(t.c.id)
    assert _reads_sharded_tables(stmt, None)
    assert not _reads_sharded_tables(stmt, Replicated())
    window = select(t.c.id, func.row_number().over(order_by=t.c.id))
    for _ in range(2):
        with pytest.raises(UnsupportedQueryError):
            _reads_sharded_tables(window, None)
    assert len(CHECK_CACHE) == 2
