"""Distributed deadlocks on real servers with their default lock settings (PostgreSQL waits
forever, InnoDB 50 s): the in-process detector breaks each lock cycle that spans shards
within seconds, with exactly one victim (``DistributedDeadlock``, retryable), whose writes
are all absent, while the other transactions commit; a plain (acyclic) wait of 10 s has no
victim. Also ``run_transaction`` retrying a victim, and a cycle between two processes.

Each cycle: N threads, thread i first updates row 1 on shard i, then (once every thread
holds its first lock) row 1 on shard i+1 (mod N). Thread i adds ``1 << i``, so the final
values tell exactly which transactions committed on which shard.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, create_engine, select, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from shardsession import (
    DistributedDeadlock,
    Pinned,
    Placement,
    ShardedSession,
    is_retryable,
    run_transaction,
)
from shardsession.coordinator import TransactionCoordinator
from shardsession.coordinator import deadlock as dl

md = MetaData()
t = Table("dl_rows", md,
          Column("id", Integer, primary_key=True, autoincrement=False),
          Column("v", Integer, nullable=False))

#: the issue asks for "within 5 s"; asserted generously (a loaded machine), measured times
#: are printed
BOUND = 15.0


def _engines(request: pytest.FixtureRequest, fixtures: list[str]) -> list[Engine]:
    engines = []
    for name in fixtures:
        e = create_engine(request.getfixturevalue(name), pool_size=6)
        md.create_all(e)
        with e.begin() as c:
            c.execute(t.insert(), [{"id": 1, "v": 0}, {"id": 2, "v": 0}])
        engines.append(e)
    return engines


@pytest.fixture
def dispose() -> Iterator[list[Engine]]:
    made: list[Engine] = []
    yield made
    for e in made:
        e.dispose()


def _session(coord: TransactionCoordinator, names: dict[Engine, str]) -> Session:
    s = Session()
    coord.install(s, names.__getitem__)
    return s


def _add(s: Session, engine: Engine, bit: int, row: int = 1) -> None:
    s.connection(bind_arguments={"bind": engine}).execute(
        t.update().where(t.c.id == row).values(v=t.c.v + bit))


def _value(engine: Engine, row: int = 1) -> int:
    with engine.connect() as c:
        return int(c.scalar(select(t.c.v).where(t.c.id == row)) or 0)


def _cycle(engines: list[Engine],
           coord: TransactionCoordinator | None = None) -> dict[str, Any]:
    n = len(engines)
    coord = coord or TransactionCoordinator()
    names = {e: f"s{i}" for i, e in enumerate(engines)}
    barrier = threading.Barrier(n)
    outcome: dict[int, str] = {}
    errors: dict[int, BaseException] = {}
    t0: list[float] = []
    took: dict[int, float] = {}

    def worker(i: int) -> None:
        s = _session(coord, names)
        try:
            _add(s, engines[i], 1 << i)
            barrier.wait(30)
            if not t0:
                t0.append(time.monotonic())
            _add(s, engines[(i + 1) % n], 1 << i)
            s.commit()
            outcome[i] = "committed"
        except DistributedDeadlock as e:
            took[i] = time.monotonic() - t0[0]
            errors[i] = e
            outcome[i] = "victim"
            s.rollback()
        except BaseException as e:
            errors[i] = e
            outcome[i] = f"error {type(e).__name__}: {e}"
            s.rollback()
        finally:
            s.close()

    broken = dl.deadlocks_broken()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(BOUND + 30)
    stuck = [i for i, th in enumerate(threads) if th.is_alive()]
    coord.close()
    return {"outcome": outcome, "errors": errors, "took": took, "stuck": stuck,
            "broken": dl.deadlocks_broken() - broken, "values": [_value(e) for e in engines]}


def _check_cycle(engines: list[Engine], res: dict[str, Any]) -> None:
    n = len(engines)
    assert not res["stuck"], f"threads {res['stuck']} still blocked: cycle not broken"
    victims = [i for i, o in res["outcome"].items() if o == "victim"]
    assert len(victims) == 1, res["outcome"]
    assert all(o in ("victim", "committed") for o in res["outcome"].values()), res["outcome"]
    assert res["broken"] == 1
    (victim,) = victims
    err = res["errors"][victim]
    assert isinstance(err, DistributedDeadlock) and err.retryable and is_retryable(err)
    assert res["took"][victim] < BOUND, res["took"]
    # the victim's writes are absent from both of its shards, the others' present
    committed = [i for i in range(n) if i != victim]
    for k in range(n):
        expected = sum(1 << i for i in committed if k in (i, (i + 1) % n))
        assert res["values"][k] == expected, (k, res["values"], victim)
    print(f"\n{n}-shard cycle broken in {res['took'][victim]:.2f} s, victim thread {victim}")


@pytest.mark.postgresql
def test_two_thread_cycle_pg_pg(request: pytest.FixtureRequest,
                                dispose: list[Engine]) -> None:
    engines = _engines(request, ["pg_url_a", "pg_url_b"])
    dispose.extend(engines)
    _check_cycle(engines, _cycle(engines))


@pytest.mark.postgresql
@pytest.mark.mysql
def test_two_thread_cycle_pg_mariadb(request: pytest.FixtureRequest,
                                     dispose: list[Engine]) -> None:
    engines = _engines(request, ["pg_url_a", "mariadb_url"])
    dispose.extend(engines)
    _check_cycle(engines, _cycle(engines))


@pytest.mark.postgresql
@pytest.mark.mysql
def test_two_thread_cycle_mariadb_first(request: pytest.FixtureRequest,
                                        dispose: list[Engine]) -> None:
    engines = _engines(request, ["mariadb_url", "pg_url_a"])
    dispose.extend(engines)
    _check_cycle(engines, _cycle(engines))


@pytest.mark.postgresql
@pytest.mark.mysql
def test_three_shard_cycle(request: pytest.FixtureRequest, dispose: list[Engine]) -> None:
    engines = _engines(request, ["pg_url_a", "pg_url_b", "mariadb_url"])
    dispose.extend(engines)
    _check_cycle(engines, _cycle(engines))


@pytest.mark.postgresql
def test_acyclic_wait_of_ten_seconds_has_no_victim(request: pytest.FixtureRequest,
                                                   dispose: list[Engine]) -> None:
    """A holds rows on both shards for 10 s; B waits for it (no cycle): no victim, both
    commit."""
    a_eng, b_eng = engines = _engines(request, ["pg_url_a", "pg_url_b"])
    dispose.extend(engines)
    coord = TransactionCoordinator()
    names = {a_eng: "a", b_eng: "b"}
    broken = dl.deadlocks_broken()
    holding = threading.Event()
    outcome: dict[str, str] = {}

    def holder() -> None:
        s = _session(coord, names)
        try:
            _add(s, a_eng, 1)
            _add(s, b_eng, 1)
            holding.set()
            time.sleep(10)
            s.commit()
            outcome["a"] = "committed"
        except BaseException as e:
            outcome["a"] = repr(e)
        finally:
            s.close()

    def waiter() -> None:
        holding.wait(30)
        s = _session(coord, names)
        try:
            _add(s, b_eng, 2, row=2)  # a row nobody holds: a global transaction from here
            _add(s, a_eng, 2, row=2)
            _add(s, b_eng, 2)  # waits for the holder
            s.commit()
            outcome["b"] = "committed"
        except BaseException as e:
            outcome["b"] = repr(e)
        finally:
            s.close()

    threads = [threading.Thread(target=holder), threading.Thread(target=waiter)]
    t0 = time.monotonic()
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    waited = time.monotonic() - t0
    coord.close()
    assert outcome == {"a": "committed", "b": "committed"}, outcome
    assert dl.deadlocks_broken() == broken
    assert waited >= 10
    assert _value(b_eng) == 3 and _value(a_eng) == 1


@pytest.mark.postgresql
def test_run_transaction_retries_the_victim(request: pytest.FixtureRequest,
                                            dispose: list[Engine]) -> None:
    """Both sides of a cycle through run_transaction: the victim's unit of work runs
    again and commits; both transfers are applied exactly once."""
    engines = _engines(request, ["pg_url_a", "pg_url_b"])
    dispose.extend(engines)
    coord = TransactionCoordinator()
    names = {e: f"s{i}" for i, e in enumerate(engines)}
    barrier = threading.Barrier(2)
    calls = [0, 0]
    results: dict[int, Any] = {}

    def worker(i: int) -> None:
        def unit(s: Session) -> str:
            calls[i] += 1
            _add(s, engines[i], 1 << i)
            if calls[i] == 1:
                barrier.wait(30)
            _add(s, engines[1 - i], 1 << i)
            return "done"

        try:
            results[i] = run_transaction(lambda: _session(coord, names), unit, retries=3)
        except BaseException as e:
            results[i] = e

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(BOUND + 30)
    coord.close()
    assert results == {0: "done", 1: "done"}, results
    assert sorted(calls) == [1, 2]  # one victim, run once more
    assert [_value(e) for e in engines] == [3, 3]


_CHILD = textwrap.dedent("""
    import sys, time
    from sqlalchemy import create_engine, text
    from sqlalchemy.orm import Session
    from shardsession.coordinator import TransactionCoordinator
    from shardsession.exc import DistributedDeadlock
    first, second = create_engine(sys.argv[1]), create_engine(sys.argv[2])
    coord = TransactionCoordinator()
    s = Session()
    coord.install(s, {first: "a", second: "b"}.__getitem__)
    stmt = text("UPDATE dl_rows SET v = v + 1 WHERE id = 1")
    try:
        s.connection(bind_arguments={"bind": first}).execute(stmt)
        print("locked", flush=True)
        sys.stdin.readline()
        s.connection(bind_arguments={"bind": second}).execute(stmt)
        s.commit()
        print("committed", flush=True)
    except DistributedDeadlock:
        s.rollback()
        print("victim", flush=True)
""")


@pytest.mark.postgresql
def test_cycle_between_two_processes(request: pytest.FixtureRequest,
                                     dispose: list[Engine]) -> None:
    """Two processes, each with its own detector, lock PostgreSQL rows in opposite
    order: the labels (``application_name``) let them agree on one victim."""
    urls = [request.getfixturevalue("pg_url_a"), request.getfixturevalue("pg_url_b")]
    engines = _engines(request, ["pg_url_a", "pg_url_b"])
    dispose.extend(engines)
    procs = []
    for first, second in (urls, urls[::-1]):
        p = subprocess.Popen([sys.executable, "-c", _CHILD, first, second],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(p)
        assert p.stdout is not None and p.stdout.readline().strip() == "locked"
    t0 = time.monotonic()
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    outs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=BOUND + 30)
            outs.append(out.strip())
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    took = time.monotonic() - t0
    assert sorted(outs) == ["committed", "victim"], outs
    assert took < BOUND
    victim = outs.index("victim")
    # the committed process added 1 to row 1 on both shards; the victim nothing
    assert [_value(e) for e in engines] == [1, 1], victim
    print(f"\ncross-process cycle broken in {took:.2f} s")


class _Base(DeclarativeBase):
    pass


class Left(_Base):
    __tablename__ = "dl_left"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    v: Mapped[int] = mapped_column(Integer, default=0)


class Right(_Base):
    __tablename__ = "dl_right"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    v: Mapped[int] = mapped_column(Integer, default=0)


def _labels(engine: Engine) -> set[str]:
    with engine.connect() as c:
        return set(c.exec_driver_sql(
            "SELECT application_name FROM pg_stat_activity "
            "WHERE application_name LIKE 'shardsession:%%'").scalars())


@pytest.mark.postgresql
def test_branches_are_labelled_and_single_shard_ones_are_not(
        request: pytest.FixtureRequest, dispose: list[Engine]) -> None:
    """Every PostgreSQL branch of a multi-shard transaction carries its label while it
    runs (a flush's early BEGIN path, and statements one shard after another), none
    after it ended; a single-shard transaction never gets one."""
    engines = {"l": create_engine(request.getfixturevalue("pg_url_a")),
               "r": create_engine(request.getfixturevalue("pg_url_b"))}
    dispose.extend(engines.values())
    for e in engines.values():
        _Base.metadata.create_all(e)
    maker = sessionmaker(class_=ShardedSession, shards=engines,
                         placement=Placement({Left: Pinned("l"), Right: Pinned("r")}))
    with maker() as s:
        s.add(Left(id=1))
        s.flush()
        assert _labels(engines["l"]) == set() and _labels(engines["r"]) == set()
        s.add_all([Left(id=2), Right(id=2)])
        s.flush()  # second shard: a global transaction, both branches labelled
        la, lb = _labels(engines["l"]), _labels(engines["r"])
        assert len(la) == 1 and la == lb, (la, lb)
        s.commit()
    assert _labels(engines["l"]) == set() and _labels(engines["r"]) == set()
    with maker() as s:  # one flush writing both shards: the early BEGIN path
        s.add_all([Left(id=3), Right(id=3)])
        s.flush()
        la, lb = _labels(engines["l"]), _labels(engines["r"])
        assert len(la) == 1 and la == lb, (la, lb)
        s.rollback()
    assert _labels(engines["l"]) == set() and _labels(engines["r"]) == set()
    with maker() as s:
        assert s.get(Left, 1) is not None and s.get(Left, 3) is None


@pytest.mark.postgresql
@pytest.mark.mysql
def test_bounded_wait_where_lock_waits_cannot_be_read(
        request: pytest.FixtureRequest, dispose: list[Engine]) -> None:
    """The MariaDB shard's role lacks PROCESS (INNODB_LOCK_WAITS is refused): the cycle
    cannot be seen, so the transaction waiting on that shard is cancelled after
    ``deadlock_fallback`` seconds, with the same error; the other commits."""
    pg_url = request.getfixturevalue("pg_url_a")
    my_url = make_url(request.getfixturevalue("mariadb_url"))
    admin = create_engine(my_url)
    dispose.append(admin)
    user = "ss_noprocess"
    with admin.begin() as c:
        for host in ("%%", "localhost", "127.0.0.1"):  # (%% : the driver's paramstyle)
            c.exec_driver_sql(f"CREATE USER IF NOT EXISTS '{user}'@'{host}' IDENTIFIED BY 'pw'")
            c.exec_driver_sql(f"GRANT ALL ON `{my_url.database}`.* TO '{user}'@'{host}'")
    try:
        limited = my_url.set(username=user, password="pw")
        with create_engine(limited).connect() as c, pytest.raises(DBAPIError):
            c.exec_driver_sql("SELECT * FROM information_schema.INNODB_LOCK_WAITS")
        engines = [create_engine(pg_url, pool_size=6), create_engine(limited, pool_size=6)]
        dispose.extend(engines)
        for e in engines:
            md.create_all(e)
            with e.begin() as c:
                c.execute(t.insert(), [{"id": 1, "v": 0}, {"id": 2, "v": 0}])
        res = _cycle(engines, TransactionCoordinator(deadlock_fallback=4.0))
        _check_cycle(engines, res)
        victim = next(i for i, o in res["outcome"].items() if o == "victim")
        assert victim == 0  # thread 0 waits on the MariaDB shard
        assert res["took"][victim] >= 3.5
        assert "cannot be read" in str(res["errors"][victim])
    finally:
        with admin.begin() as c:
            for host in ("%%", "localhost", "127.0.0.1"):
                c.exec_driver_sql(f"DROP USER IF EXISTS '{user}'@'{host}'")


@pytest.mark.postgresql
@pytest.mark.mysql
def test_orm_cycle_through_sharded_session(request: pytest.FixtureRequest,
                                           dispose: list[Engine]) -> None:
    """The cycle as an ORM user writes it: ShardedSession, rows read FOR UPDATE on a
    PostgreSQL and a MariaDB shard in opposite order, changed, committed with
    ``sessionmaker.begin()``. One victim, whose changes are absent; the other commits."""
    engines = {"l": create_engine(request.getfixturevalue("pg_url_a")),
               "r": create_engine(request.getfixturevalue("mariadb_url"))}
    dispose.extend(engines.values())
    for e in engines.values():
        _Base.metadata.create_all(e)
    maker = sessionmaker(class_=ShardedSession, shards=engines,
                         placement=Placement({Left: Pinned("l"), Right: Pinned("r")}))
    with maker.begin() as s:
        s.add_all([Left(id=1, v=0), Right(id=1, v=0)])
    barrier = threading.Barrier(2)
    outcome: dict[int, str] = {}
    t0: list[float] = []
    took: list[float] = []

    def worker(i: int) -> None:
        order = [Left, Right] if i == 0 else [Right, Left]
        try:
            with maker.begin() as s:
                first = s.get(order[0], 1, with_for_update=True)
                assert first is not None
                first.v += 1 << i
                s.flush()
                barrier.wait(30)
                if not t0:
                    t0.append(time.monotonic())
                second = s.get(order[1], 1, with_for_update=True)
                assert second is not None
                second.v += 1 << i
            outcome[i] = "committed"
        except DistributedDeadlock:
            took.append(time.monotonic() - t0[0])
            outcome[i] = "victim"
        except BaseException as e:
            outcome[i] = repr(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(BOUND + 30)
    assert sorted(outcome.values()) == ["committed", "victim"], outcome
    assert took and took[0] < BOUND
    winner = next(i for i, o in outcome.items() if o == "committed")
    with maker() as s:
        left, right = s.get(Left, 1), s.get(Right, 1)
        assert left is not None and right is not None
        assert (left.v, right.v) == (1 << winner, 1 << winner)
    print(f"\nORM cycle broken in {took[0]:.2f} s")


@pytest.mark.postgresql
def test_label_survives_a_rolled_back_savepoint(request: pytest.FixtureRequest,
                                                dispose: list[Engine]) -> None:
    """Branches labelled inside a savepoint (``set_config(..., true)`` is local to it) are
    labelled again after ROLLBACK TO SAVEPOINT: other processes' detectors still see
    them (issue 18, B3)."""
    engines = {"l": create_engine(request.getfixturevalue("pg_url_a")),
               "r": create_engine(request.getfixturevalue("pg_url_b"))}
    dispose.extend(engines.values())
    for e in engines.values():
        _Base.metadata.create_all(e)
    maker = sessionmaker(class_=ShardedSession, shards=engines,
                         placement=Placement({Left: Pinned("l"), Right: Pinned("r")}))
    with maker() as s:
        with pytest.raises(RuntimeError), s.begin_nested():
            s.add_all([Left(id=1), Right(id=1)])
            s.flush()
            la = _labels(engines["l"])
            assert len(la) == 1 and la == _labels(engines["r"])
            raise RuntimeError("undo the savepoint")
        # the savepoint's rollback reverted the labels; they are set again
        assert _labels(engines["l"]) == la and _labels(engines["r"]) == la
        s.add_all([Left(id=2), Right(id=2)])
        s.flush()
        assert _labels(engines["l"]) == la and _labels(engines["r"]) == la
        s.commit()
    assert _labels(engines["l"]) == set() and _labels(engines["r"]) == set()
    with maker() as s:
        assert s.get(Left, 1) is None and s.get(Left, 2) is not None


@pytest.mark.postgresql
def test_prepare_waiting_in_a_cycle_is_broken(request: pytest.FixtureRequest,
                                              dispose: list[Engine]) -> None:
    """T1 (the youngest) waits at commit: its PREPARE or its decider's COMMIT rechecks a
    deferred unique constraint against T2's uncommitted row, while T2 waits on T1's row.
    A waiting PREPARE is cancelled (T1 fails, nothing of it kept); a waiting decider's
    COMMIT is never cancelled, T2 is chosen instead (issue 18, B2)."""
    engines = _engines(request, ["pg_url_a", "pg_url_b"])
    dispose.extend(engines)
    with engines[0].begin() as c:
        c.exec_driver_sql("CREATE TABLE dl_u (k integer, "
                          "CONSTRAINT dl_uk UNIQUE (k) DEFERRABLE INITIALLY DEFERRED)")
    coord = TransactionCoordinator()
    names = {engines[0]: "s0", engines[1]: "s1"}
    ins = text("INSERT INTO dl_u VALUES (1)")
    t2_global, t1_inserted = threading.Event(), threading.Event()
    outcome: dict[str, BaseException | str] = {}

    def t2() -> None:
        s = _session(coord, names)
        try:
            s.connection(bind_arguments={"bind": engines[0]}).execute(ins)
            _add(s, engines[1], 2, row=2)  # a global transaction now: the older
            t2_global.set()
            t1_inserted.wait(30)
            time.sleep(0.3)
            _add(s, engines[1], 2)  # waits on T1's row
            s.commit()
            outcome["t2"] = "committed"
        except BaseException as e:
            outcome["t2"] = e
            s.rollback()
        finally:
            s.close()

    def t1() -> None:
        t2_global.wait(30)
        time.sleep(0.2)
        s = _session(coord, names)
        try:
            _add(s, engines[1], 1)
            s.connection(bind_arguments={"bind": engines[0]}).execute(ins)
            t1_inserted.set()
            time.sleep(1.0)
            s.commit()  # the unique recheck waits on T2
            outcome["t1"] = "committed"
        except BaseException as e:
            outcome["t1"] = e
            s.rollback()
        finally:
            s.close()

    t0 = time.monotonic()
    threads = [threading.Thread(target=f) for f in (t1, t2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(BOUND + 30)
    took = time.monotonic() - t0
    stuck = [th for th in threads if th.is_alive()]
    coord.close()
    assert not stuck, outcome
    assert sorted(k for k, v in outcome.items() if v == "committed") in (["t1"], ["t2"]), \
        outcome
    loser = "t1" if outcome["t2"] == "committed" else "t2"
    err = outcome[loser]
    assert isinstance(err, BaseException) and is_retryable(err), outcome
    assert isinstance(err, DistributedDeadlock) or isinstance(err.__cause__, DistributedDeadlock), \
        repr(err)
    assert took < BOUND + 3, took
    winner_bit = 1 if loser == "t2" else 2
    assert _value(engines[1]) == winner_bit
    assert _value(engines[1], row=2) == (2 if loser == "t1" else 0)
    with engines[0].connect() as c:
        assert c.exec_driver_sql("SELECT count(*) FROM dl_u").scalar() == 1
    print(f"\ncommit-phase cycle broken in {took:.2f} s, victim {loser}")


_CHILD3 = textwrap.dedent("""
    import sys, threading, time, json
    from sqlalchemy import create_engine, text
    from sqlalchemy.orm import Session
    from shardsession.coordinator import TransactionCoordinator
    urls, plan, t0 = json.loads(sys.argv[1]), json.loads(sys.argv[2]), float(sys.argv[3])
    engines = [create_engine(u) for u in urls]
    names = {e: f"s{i}" for i, e in enumerate(engines)}
    coord = TransactionCoordinator()
    stmt = text("UPDATE dl_rows SET v = v + :bit WHERE id = :row")
    def run(name, bit, start, hold, filler, want):
        time.sleep(max(0.0, t0 + start - time.time()))
        s = Session()
        coord.install(s, names.__getitem__)
        def up(shard, row):
            s.connection(bind_arguments={"bind": engines[shard]}).execute(
                stmt, {"bit": bit, "row": row})
        try:
            up(hold, 1)
            up(filler, 2)
            time.sleep(max(0.0, t0 + 3.0 - time.time()))
            up(want, 1)
            s.commit()
            print(name, "committed", flush=True)
        except Exception as e:
            s.rollback()
            print(name, "failed", type(e).__name__, flush=True)
        finally:
            s.close()
    ths = [threading.Thread(target=run, args=tuple(p)) for p in plan]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
""")


@pytest.mark.postgresql
def test_three_transaction_cycle_over_two_processes(request: pytest.FixtureRequest,
                                                    dispose: list[Engine]) -> None:
    """X (youngest, process 1) holds s0 and wants s1; Y (process 2) holds s1, wants s2; Z
    (process 2) holds s2, wants s0. The edge Y -> Z lies on s2, where process 1 has no
    branch and which its detector never reads; process 2 sees the whole cycle and cancels
    X (another process's transaction) by its label (issue 18, B1)."""
    from tests.harness.servers import start_postgres

    third = start_postgres("dl_third")
    try:
        urls = [request.getfixturevalue("pg_url_a"), request.getfixturevalue("pg_url_b"),
                third.create_database()]
        engines = [create_engine(u) for u in urls]
        dispose.extend(engines)
        for e in engines:
            md.create_all(e)
            with e.begin() as c:
                c.execute(t.insert(), [{"id": 1, "v": 0}, {"id": 2, "v": 0}])
        t0 = time.time() + 3
        plans = [[["X", 1, 1.5, 0, 1, 1]],
                 [["Y", 2, 0.0, 1, 2, 2], ["Z", 4, 0.5, 2, 0, 0]]]
        import json
        procs = [subprocess.Popen([sys.executable, "-c", _CHILD3, json.dumps(urls),
                                   json.dumps(p), str(t0)], stdout=subprocess.PIPE, text=True)
                 for p in plans]
        outs = []
        try:
            for p in procs:
                out, _ = p.communicate(timeout=BOUND + 30)
                outs.extend(out.split("\n"))
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        took = time.time() - t0 - 3.0
        lines = sorted(line.strip() for line in outs if line.strip())
        assert lines[1:] == ["Y committed", "Z committed"], lines
        assert lines[0].startswith("X failed"), lines
        assert took < BOUND, took
        assert [_value(e) for e in engines] == [4, 2, 6]
        assert [_value(e, row=2) for e in engines] == [4, 0, 2]
        print(f"\n3-cycle over 2 processes broken in {took:.2f} s")
    finally:
        for e in dispose:
            e.dispose()
        dispose.clear()
        third.teardown()
