"""The query planner's cost per statement: check (the statement model) and plan.

Usage::

    PYTHONPATH=<checkout> python benchmarks/plan_cost.py [--n 2000]

No database: it times what :func:`shardsession.query.execute_on_shards` does before
asking any shard, for a few typical fan-out statements, *cold* (check and plan caches
cleared before each statement: the cost of a new statement shape) and *warm* (caches
kept: the cost of every later execution of the same shape).  Prints microseconds per
statement (median of 5 runs).  Works on checkouts before the statement model too.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import func, select

from shardsession import query
from shardsession.query import _plan
from tests.integration.test_query_property import Item, Tag

STATEMENTS: dict[str, Callable[[], Any]] = {
    "rows ORDER BY LIMIT": lambda: select(Item).where(Item.a > 1).order_by(Item.b.desc())
    .limit(10),
    "columns DISTINCT": lambda: select(Item.grp, Item.b).distinct(),
    "COUNT(*)": lambda: select(func.count()).select_from(Item).where(Item.a > 2),
    "GROUP BY HAVING ORDER BY": lambda: select(Item.grp, func.sum(Item.a), func.avg(Item.b))
    .group_by(Item.grp).having(func.count() > 2).order_by(func.sum(Item.a).desc()),
    "JOIN + correlated EXISTS": lambda: select(Item.id, Tag.label).join(Item.tags)
    .where(Item.tags.any(Tag.label == "t")).order_by(Item.id),
}


def _once(make: Callable[[], Any], cold: bool) -> None:
    stmt = make()
    if cold:
        query.CHECK_CACHE.clear()
        _plan.PLAN_CACHE.clear()
    verdict = query._reads_sharded_tables(stmt, None)
    kwargs: dict[str, Any] = {}
    if verdict is not None and not isinstance(verdict, bool):
        kwargs["model"] = verdict
    _plan.plan_select(
        stmt,
        dialects=["postgresql"] * 4,
        is_orm=True,
        cache_key=query._compat.statement_cache_key(stmt),
        **kwargs,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2000)
    args = parser.parse_args()
    import warnings

    warnings.simplefilter("ignore")  # (a drop-in join's ColocationWarning)
    for name, make in STATEMENTS.items():
        out = []
        for cold in (True, False):
            runs = []
            for _ in range(5):
                start = time.perf_counter()
                for _ in range(args.n):
                    _once(make, cold)
                runs.append((time.perf_counter() - start) / args.n * 1e6)
            out.append(statistics.median(runs))
        print(f"{name:28} cold {out[0]:8.1f} us   warm {out[1]:8.1f} us")


if __name__ == "__main__":
    main()
