"""Lost replies through the fault proxy: the client gets the right exception class and the
state after recovery matches what it was told."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine, func, inspect, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Session

from shardsession import Pinned, Placement, ShardedSession
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


class _Base(DeclarativeBase):
    pass


class RowA(_Base):
    __table__ = T["alpha"]


class RowB(_Base):
    __table__ = T["beta"]


def test_commit_incomplete_leaves_session_committed(proxied: Any) -> None:
    """The data is committed: the session ends as after a successful commit (objects
    persistent and expired, no transaction), then CommitIncomplete tells the caller."""
    via, ctx = proxied
    ctx["proxies"]["beta"].drop_reply(STEP["commit_prepared", via["beta"].dialect.name])
    s = ShardedSession(shards=via, placement=Placement({RowA: Pinned("alpha"),
                                                        RowB: Pinned("beta")}),
                       coordinator=TransactionCoordinator(decider="alpha"))
    a, b = RowA(id=1, v="a"), RowB(id=1, v="b")
    s.add_all([a, b])
    with pytest.raises(CommitIncomplete) as ei:
        s.commit()
    assert ei.value.pending_shards == ["beta"]
    assert not s.in_transaction()
    for obj in (a, b):
        state = inspect(obj)
        assert state.persistent and "v" in state.expired_attributes
    direct = ctx["direct"]
    assert rows(direct)["alpha"] == 1
    assert recover(direct, grace_period=0).resolved
    assert rows(direct) == {"alpha": 1, "beta": 1}
    ctx["proxies"]["beta"].clear()
    assert a.v == "a" and b.v == "b"  # reloaded from both shards by the same session
    s.add(RowA(id=2, v="c"))
    s.commit()
    s.close()
    assert rows(direct)["alpha"] == 2


def test_commit_incomplete_with_begin_block(proxied: Any) -> None:
    via, ctx = proxied
    ctx["proxies"]["beta"].drop_reply(STEP["commit_prepared", via["beta"].dialect.name])
    s = ShardedSession(shards=via, placement=Placement({RowA: Pinned("alpha"),
                                                        RowB: Pinned("beta")}),
                       coordinator=TransactionCoordinator(decider="alpha"))
    a = RowA(id=3, v="a")
    with pytest.raises(CommitIncomplete), s.begin():
        s.add_all([a, RowB(id=3, v="b")])
    assert inspect(a).persistent and not s.in_transaction()
    assert recover(ctx["direct"], grace_period=0).resolved
    assert rows(ctx["direct"]) == {"alpha": 1, "beta": 1}
    s.close()
