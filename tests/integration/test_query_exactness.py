"""Cross-shard reads, exact or refused: the cases left open by session 5 (issue 10).

Each test fails on the code before its fix: the long fuzz run's findings, a placement
UPDATE correlated through an alias, global subqueries of a statement sent to one shard,
``Query.union`` and ``IN (SELECT aggregate)``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Numeric, cast, distinct, func, select
from sqlalchemy.orm import Session, aliased

from shardsession.exc import ColocationWarning, UnsupportedQueryError

from . import test_join_placement as jp
from . import test_query_property as qp
from .test_join_placement import sessions  # noqa: F401  (the placement fixture)
from .test_query_allowlist import _assert_exact, _load

Item = qp.Item
Tag = qp.Tag

Stmt = Callable[[], Any]


@pytest.fixture
def cluster(tmp_path: Path) -> Any:
    urls = {f"s{i}": f"sqlite:///{tmp_path}/s{i}.db" for i in range(3)}
    c = qp.make_cluster(urls, f"sqlite:///{tmp_path}/oracle.db")
    yield _load(c)
    qp.dispose(c)


def _count_over_alias_correlated(item: Any) -> Any:
    twin = aliased(item, name="twin")
    sq = (
        select(item.id)
        .where(
            select(func.count()).select_from(twin).where(twin.grp == item.grp)
            .scalar_subquery() > 1
        )
        .subquery("sq")
    )
    return select(func.count()).select_from(sq)


def test_dropin_count_over_derived_table_correlated_through_alias_warns(
    cluster: qp.Cluster,
) -> None:
    # (fuzz 99700:9970000162: answered per shard, which the drop-in API documents, with
    # the warning that says so)
    with cluster.session() as s, pytest.warns(ColocationWarning, match="subquery over"):
        s.execute(_count_over_alias_correlated(Item)).scalar()


def test_placement_count_over_derived_table_correlated_through_alias_refused(
    sessions: tuple[Session, Session],  # noqa: F811
) -> None:
    s, _ = sessions
    twin = aliased(jp.User, name="twin")
    sq = (
        select(jp.User.id)
        .where(
            select(func.count()).select_from(twin).where(twin.region == jp.User.region)
            .scalar_subquery() > 1
        )
        .subquery("sq")
    )
    with pytest.raises(UnsupportedQueryError):
        s.execute(select(func.count()).select_from(sq)).scalar()


@pytest.mark.parametrize("numeric", [Numeric(10, 2), Numeric()])
def test_function_of_min_of_numeric_keeps_sqlite_storage_class(
    cluster: qp.Cluster, numeric: Any
) -> None:
    # (fuzz 99702:9970200387: SQLite's NUMERIC affinity stores an integral value as an
    # INTEGER; the merged value was bound as a float and came back 4.0)
    for make in (
        lambda: select(func.nullif(func.min(distinct(cast(Item.id, numeric))), 0)),
        lambda: select(func.coalesce(func.max(cast(Item.a, numeric)), 0)),
        lambda: select(Item.grp, func.nullif(func.min(cast(Item.b, numeric)), 0))
        .group_by(Item.grp),
    ):
        with Session(cluster.oracle) as o:
            want = [tuple(r) for r in o.execute(make()).all()]
        with cluster.session() as s:
            got = [tuple(r) for r in s.execute(make()).all()]
        assert sorted(got, key=repr) == sorted(want, key=repr)  # (repr: types too)
    _assert_exact(cluster, lambda: select(func.min(cast(Item.id, numeric))))

