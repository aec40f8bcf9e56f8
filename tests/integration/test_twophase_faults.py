"""Lost replies through the fault proxy: the client gets the right exception class and the
state after recovery matches what it was told."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from shardsession.coordinator import TransactionCoordinator, in_doubt, recover
from shardsession.exc import CommitIncomplete, OutcomeUnknown, PrepareFailed

from ._2pc_child import tables

MD, T = tables(["alpha", "beta"])


@pytest.fixture(params=["pg+pg", "pg+mariadb"])
def proxied(request: pytest.FixtureRequest,
            fault_proxy: Callable[..., Any]) -> Iterator[tuple[dict[str, Engine], dict[str, Any]]]:
    a = request.getfixturevalue("pg_url_a")
    b = request.getfixturevalue("pg_url_b" if request.param == "pg+pg" else "mariadb_url")
    direct = {"alpha": create_engine(a), "beta": create_engine(b)}
    for n, e in direct.items():
        T[n].create(e)
    proxies = {"alpha": fault_proxy(a), "beta": fault_proxy(b)}
    via = {n: create_engine(proxies[n].url_for(u)) for n, u in (("alpha", a), ("beta", b))}
    yield via, {"proxies": proxies, "direct": direct}
    for e in [*via.values(), *direct.values()]:
        e.dispose()


def run(via: dict[str, Engine]) -> None:
    coord = TransactionCoordinator()
    s = Session()
    names = {e: n for n, e in via.items()}
    coord.install(s, names.__getitem__)
    for n in ("alpha", "beta"):  # alpha begins first: it holds the decision
        s.connection(bind_arguments={"bind": via[n]}).execute(T[n].insert().values(id=1, v="x"))
    s.commit()


def rows(direct: dict[str, Engine]) -> dict[str, int]:
    out = {}
    for n, e in direct.items():
        with e.connect() as c:
            out[n] = int(c.scalar(select(func.count()).select_from(T[n])) or 0)
    return out


# statement of each step per dialect ("COMMIT" alone would match pymysql's SET AUTOCOMMIT)
STEP = {
    ("prepare", "postgresql"): b"PREPARE TRANSACTION",
    ("prepare", "mysql"): b"XA PREPARE",
    ("decider_commit", "postgresql"): b"COMMIT",
    ("commit_prepared", "postgresql"): b"COMMIT PREPARED",
    ("commit_prepared", "mysql"): b"XA COMMIT",
}


@pytest.mark.parametrize("shard,step,exc,outcome", [
    ("beta", "prepare", PrepareFailed, 0),
    ("alpha", "decider_commit", OutcomeUnknown, 1),
    ("beta", "commit_prepared", CommitIncomplete, 1),
])
def test_lost_reply(proxied: Any, shard: str, step: str, exc: type, outcome: int) -> None:
    via, ctx = proxied
    ctx["proxies"][shard].drop_reply(STEP[step, via[shard].dialect.name])
    with pytest.raises(exc) as ei:
        run(via)
    assert ei.value.gtrid
    direct = ctx["direct"]
    report = recover(direct, grace_period=0)
    assert not report.errors, report.errors
    assert in_doubt(direct) == []
    assert rows(direct) == {"alpha": outcome, "beta": outcome}
    # pooled connections of the proxied engines work again
    ctx["proxies"][shard].clear()
    with via[shard].connect() as c:
        c.execute(select(1))


def test_lost_prepare_request(proxied: Any) -> None:
    via, ctx = proxied
    ctx["proxies"]["beta"].drop_request(STEP["prepare", via["beta"].dialect.name])
    with pytest.raises(PrepareFailed) as ei:
        run(via)
    assert ei.value.failed_shards == ["beta"]
    direct = ctx["direct"]
    assert recover(direct, grace_period=0).resolved
    assert rows(direct) == {"alpha": 0, "beta": 0}
