"""The commit path at its edges (issue 11): interrupted decider commits, branches the server
already aborted, writes hidden in SELECTs, the decider's order, a half-open decider.

Every test runs on real servers (PostgreSQL with 2PC, MariaDB, SQLite files)."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import Integer, create_engine, func, literal_column, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.sql.functions import GenericFunction

from shardsession.backends import DECISION_TABLE, adapter_for
from shardsession.coordinator import TransactionCoordinator, in_doubt, recover
from shardsession.exc import OutcomeUnknown, PrepareFailed

from ._2pc_child import tables
from ._2pc_mixes import mix_urls

MD, T = tables(["alpha", "beta", "gamma"])


class SoftTimeLimit(Exception):
    """What a signal-based task time limit raises (Celery's ``SoftTimeLimitExceeded``)."""


@pytest.fixture
def engines_for(request: pytest.FixtureRequest) -> Iterator[Callable[[str], dict[str, Engine]]]:
    made: list[Engine] = []

    def make(mix: str) -> dict[str, Engine]:
        urls = mix_urls(request, mix)
        engines = {n: create_engine(u) for n, u in urls.items()}
        for n, e in engines.items():
            T[n].drop(e, checkfirst=True)
            T[n].create(e)
        made.extend(engines.values())
        return engines

    yield make
    for e in made:
        e.dispose()


def session(engines: dict[str, Engine], coord: TransactionCoordinator) -> Session:
    s = Session()
    names = {e: n for n, e in engines.items()}
    coord.install(s, names.__getitem__)
    return s


def insert(s: Session, engines: dict[str, Engine], name: str, key: int) -> None:
    s.connection(bind_arguments={"bind": engines[name]}).execute(
        T[name].insert().values(id=key, v=name))


def count(engine: Engine, name: str) -> int:
    with engine.connect() as c:
        return int(c.scalar(select(func.count()).select_from(T[name])) or 0)


def decision_of(engine: Engine, gtrid: str) -> str | None:
    with engine.connect() as c:
        try:
            return c.execute(text(f"SELECT outcome FROM {DECISION_TABLE} WHERE gtrid = :g"),
                             {"g": gtrid}).scalar()
        except DBAPIError:
            return None


def ensure_decisions(engine: Engine) -> None:
    with engine.connect() as c:
        c = c.execution_options(isolation_level="AUTOCOMMIT")
        adapter_for(engine.dialect.name).ensure_decision_table(c.connection.dbapi_connection)


# --- item 2: an exception after the decider's COMMIT was sent is "outcome unknown" ---------


def _slow_commit_on(engine: Engine, seconds: float) -> None:
    """A deferred trigger on the decision table: the decider's COMMIT takes ``seconds``."""
    ensure_decisions(engine)
    with engine.begin() as c:
        c.exec_driver_sql(
            "CREATE OR REPLACE FUNCTION ss_slow() RETURNS trigger LANGUAGE plpgsql AS "
            f"$$ BEGIN PERFORM pg_sleep({seconds}); RETURN NULL; END $$")
        c.exec_driver_sql(
            f"CREATE CONSTRAINT TRIGGER ss_slow AFTER INSERT ON {DECISION_TABLE} "
            "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION ss_slow()")


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                    reason="signals need the main thread")
def test_signal_during_decider_commit_is_outcome_unknown(
    engines_for: Callable[[str], dict[str, Engine]],
) -> None:
    """A signal-based time limit fires while the server commits the decision (a deferred
    trigger makes that COMMIT take 0.6 s): the decision is committed, so the prepared
    branch must not be rolled back and the client must be told the outcome is unknown.
    (Before: PrepareFailed, and beta was rolled back while alpha committed.)"""
    engines = engines_for("pg+pg")
    _slow_commit_on(engines["alpha"], 0.6)

    def on_alarm(signum: int, frame: Any) -> None:
        raise SoftTimeLimit("soft time limit exceeded")

    def arm(point: str) -> None:
        if point == "before_decision_commit":
            signal.setitimer(signal.ITIMER_REAL, 0.2)

    old = signal.signal(signal.SIGALRM, on_alarm)
    try:
        s = session(engines, TransactionCoordinator(decider="alpha", crash_point=arm))
        insert(s, engines, "alpha", 1)
        insert(s, engines, "beta", 1)
        with pytest.raises(OutcomeUnknown) as ei:
            s.commit()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    gtrid = ei.value.gtrid
    assert gtrid and isinstance(ei.value.__cause__, SoftTimeLimit)
    assert ei.value.pending_shards == ["beta"]
    s.close()
    # psycopg2 waits for the server inside libpq, so the handler runs once COMMIT has
    # returned: committed. psycopg 3 waits in Python and cancels the query on an
    # exception: the deferred trigger is cancelled, nothing committed. Either way the
    # client could not know, and recovery must make both shards agree with the row.
    outcome = decision_of(engines["alpha"], gtrid)
    if engines["alpha"].dialect.driver == "psycopg2":
        assert outcome == "C"
    expected = 1 if outcome == "C" else 0
    assert count(engines["alpha"], "alpha") == expected
    assert [b.xid.gtrid for b in in_doubt(engines)] == [gtrid]  # beta still prepared
    report = recover(engines, grace_period=0)
    assert not report.errors, report.errors
    assert count(engines["beta"], "beta") == expected and in_doubt(engines) == []


@pytest.mark.parametrize("mix,interrupt", [
    ("pg+pg", KeyboardInterrupt),
    ("pg+mariadb", SoftTimeLimit),
])
def test_exception_right_after_decider_commit_is_outcome_unknown(
    engines_for: Callable[[str], dict[str, Engine]], monkeypatch: pytest.MonkeyPatch,
    mix: str, interrupt: type[BaseException],
) -> None:
    """The decider's driver returns from COMMIT and an exception (KeyboardInterrupt, a time
    limit) is raised before the coordinator sees the result: unknown, never rollback.
    With pg+mariadb the MariaDB shard begins first (no XA) and holds the decision."""
    engines = engines_for(mix)
    decider = "alpha" if mix == "pg+pg" else "beta"
    other = "beta" if decider == "alpha" else "alpha"
    adapter = type(adapter_for(engines[decider].dialect.name))
    real = adapter.commit_one_phase
    armed = [True]

    def commit_then_raise(self: Any, dbapi_conn: Any, xid: Any) -> None:
        real(self, dbapi_conn, xid)
        if armed[0]:
            armed[0] = False
            raise interrupt("interrupted right after COMMIT")

    monkeypatch.setattr(adapter, "commit_one_phase", commit_then_raise)
    s = session(engines, TransactionCoordinator())
    insert(s, engines, decider, 1)
    insert(s, engines, other, 1)
    with pytest.raises(OutcomeUnknown) as ei:
        s.commit()
    assert isinstance(ei.value.__cause__, interrupt)
    gtrid = ei.value.gtrid
    assert gtrid is not None
    s.close()
    monkeypatch.undo()
    assert decision_of(engines[decider], gtrid) == "C"
    assert [b.shard for b in in_doubt(engines)] == [other]
    report = recover(engines, grace_period=0)
    assert not report.errors, report.errors
    assert count(engines["alpha"], "alpha") == count(engines["beta"], "beta") == 1
    assert in_doubt(engines) == []


# --- item 3: a branch the server already aborted is never prepared or the decider ---------


@pytest.mark.parametrize("failing", ["beta", "alpha"])
def test_postgresql_caught_error_fails_the_commit_before_any_decision(
    engines_for: Callable[[str], dict[str, Engine]], failing: str,
) -> None:
    """The application catches an IntegrityError on a PostgreSQL shard and commits: that
    transaction is aborted server-side (PREPARE would be answered ROLLBACK, no error).
    The commit fails before any decision, names the shard, and nothing is committed.
    (Before, for the prepared branch beta: CommitIncomplete saying beta was still
    prepared, alpha committed, beta's row lost, recovery found nothing.)"""
    engines = engines_for("pg+pg")
    coord = TransactionCoordinator(decider="alpha")
    s = session(engines, coord)  # a first commit: capabilities known, decision table made
    insert(s, engines, "alpha", 100)
    insert(s, engines, "beta", 100)
    s.commit()
    s = session(engines, coord)
    insert(s, engines, "alpha", 1)
    insert(s, engines, "beta", 1)
    with pytest.raises(IntegrityError):
        insert(s, engines, failing, 1)  # duplicate key: the server aborts the transaction
    with pytest.raises(PrepareFailed) as ei:
        s.commit()
    assert ei.value.failed_shards == [failing]
    assert "aborted" in str(ei.value)
    s.close()
    assert count(engines["alpha"], "alpha") == count(engines["beta"], "beta") == 1  # id 100
    assert in_doubt(engines) == []
    assert decision_count(engines["alpha"]) == 1  # the first commit's only


def test_mariadb_decider_that_lost_its_transaction_to_a_deadlock(
    engines_for: Callable[[str], dict[str, Engine]],
) -> None:
    """MariaDB begins first (no XA: it holds the decision). A deadlock (1213) rolls its
    whole transaction back; the application catches it and commits. The decision must
    not be committed in a fresh implicit transaction: the commit fails, nothing is
    committed. (Before: commit() returned normally, alpha committed, beta's first row lost.)"""
    engines = engines_for("pg+mariadb")
    beta = engines["beta"]
    with beta.begin() as c:
        c.execute(T["beta"].insert(), [{"id": 1, "v": "one"}, {"id": 2, "v": "two"}])
        c.exec_driver_sql("CREATE TABLE ss_heavy (id INT PRIMARY KEY) ENGINE=InnoDB")
    s = session(engines, TransactionCoordinator())
    insert(s, engines, "beta", 10)  # lost with the transaction
    conn = s.connection(bind_arguments={"bind": beta})
    conn.execute(T["beta"].update().where(T["beta"].c.id == 1).values(v="s"))
    other = beta.connect()
    # the other transaction is heavier: InnoDB picks the session's as the victim
    other.execute(text("INSERT INTO ss_heavy (id) VALUES " +
                       ",".join(f"({i})" for i in range(50))))
    other.execute(T["beta"].update().where(T["beta"].c.id == 2).values(v="o"))
    caught: list[BaseException] = []

    def blocked() -> None:
        try:
            conn.execute(T["beta"].update().where(T["beta"].c.id == 2).values(v="s"))
        except DBAPIError as e:
            caught.append(e)

    t = threading.Thread(target=blocked)
    t.start()
    time.sleep(0.5)
    other.execute(T["beta"].update().where(T["beta"].c.id == 1).values(v="o"))
    t.join(30)
    other.commit()
    other.close()
    assert caught and "1213" in str(caught[0]), caught
    insert(s, engines, "alpha", 1)
    with pytest.raises(PrepareFailed) as ei:
        s.commit()
    assert ei.value.failed_shards == ["beta"] and "1213" in str(ei.value)
    s.close()
    assert count(engines["alpha"], "alpha") == 0
    with beta.connect() as c:
        assert c.scalar(select(func.count()).select_from(T["beta"])
                        .where(T["beta"].c.id == 10)) == 0
    assert in_doubt(engines) == []


# --- item 7: whether a branch wrote is asked of the server ----------------------------------


def _function_that_inserts(engine: Engine) -> None:
    with engine.begin() as c:
        if engine.dialect.name == "postgresql":
            c.exec_driver_sql(
                "CREATE OR REPLACE FUNCTION ss_ins(k int) RETURNS int LANGUAGE sql AS "
                "$$ INSERT INTO ss_rows_beta (id, v) VALUES (k, 'f') RETURNING id $$")
        else:
            c.exec_driver_sql("DROP FUNCTION IF EXISTS ss_ins")
            c.exec_driver_sql(
                "CREATE FUNCTION ss_ins(k INT) RETURNS INT MODIFIES SQL DATA "
                "BEGIN INSERT INTO ss_rows_beta (id, v) VALUES (k, 'f'); RETURN k; END")


def _view_calling_it(engine: Engine) -> Any:
    """A view whose column calls ``ss_ins(7)``: nothing in the statement text says so."""
    from sqlalchemy import Column, Integer, MetaData, Table

    with engine.begin() as c:
        c.exec_driver_sql("DROP VIEW IF EXISTS ss_ins_view")
        c.exec_driver_sql("CREATE VIEW ss_ins_view AS SELECT ss_ins(7) AS k")
    return Table("ss_ins_view", MetaData(), Column("k", Integer)).c.k


class _TypedInsert(GenericFunction[int]):
    """``ss_ins`` declared as a user GenericFunction (SQLAlchemy's way to type a user
    function): not one of SQLAlchemy's known SQL functions."""
    type = Integer()
    name = "ss_ins"
    identifier = "ss_ins_typed"
    inherit_cache = True


@pytest.mark.parametrize("call", ["func", "literal_column", "view", "generic_function"])
@pytest.mark.parametrize("mix", ["pg+pg", "pg+mariadb"])
def test_write_inside_select_is_committed_atomically(
    engines_for: Callable[[str], dict[str, Engine]], mix: str, call: str,
) -> None:
    """``select(func.ss_ins(k))`` inserts on beta, which ran no write statement: the server
    says it wrote, so it is prepared and committed with the decision. (Before: MariaDB's
    XA branch was released with XA ROLLBACK, the row lost and commit() returned normally;
    PostgreSQL committed it outside the protocol, with no decision row.)"""
    engines = engines_for(mix)
    _function_that_inserts(engines["beta"])
    s = session(engines, TransactionCoordinator(decider="alpha"))
    insert(s, engines, "alpha", 1)
    # (literal_column: opaque SQL, which on MariaDB cannot be asked, counts as a write)
    # (view: on MariaDB, the session's counters of rows written say so)
    # (generic_function: a user GenericFunction subclass, seen by MariaDB's counters;
    # attack 12 break 1 reproduced against the tree without them)
    calling = (func.ss_ins(7) if call == "func" else literal_column("ss_ins(7)")
               if call == "literal_column" else func.ss_ins_typed(7)
               if call == "generic_function" else _view_calling_it(engines["beta"]))
    got = s.connection(bind_arguments={"bind": engines["beta"]}).execute(
        select(calling)).scalar()
    assert got == 7
    s.commit()
    assert count(engines["beta"], "beta") == 1 and count(engines["alpha"], "alpha") == 1
    assert decision_count(engines["alpha"]) == 1  # the two-phase protocol ran
    assert in_doubt(engines) == []
    # a plain reader is still released without PREPARE (no decision row)
    s = session(engines, TransactionCoordinator(decider="alpha"))
    insert(s, engines, "alpha", 2)
    s.connection(bind_arguments={"bind": engines["beta"]}).execute(select(T["beta"].c.id))
    s.connection(bind_arguments={"bind": engines["beta"]}).execute(
        select(func.count()).select_from(T["beta"]))  # count(*)'s "*" is no routine call
    s.commit()
    assert decision_count(engines["alpha"]) == 1


@pytest.mark.parametrize("mix", ["pg+pg", "pg+mariadb"])
def test_write_through_the_dbapi_cursor_is_committed_atomically(
    engines_for: Callable[[str], dict[str, Engine]], mix: str,
) -> None:
    """A write through the DBAPI cursor of the session's connection to beta, the only
    write there, joined after alpha wrote: committed with the decision, as a plain
    Session commits what its connection wrote (attack 12 break 2: MariaDB's branch was
    released with XA ROLLBACK before the counters of rows written were read)."""
    engines = engines_for(mix)
    s = session(engines, TransactionCoordinator(decider="alpha"))
    insert(s, engines, "alpha", 1)
    cur = s.connection(bind_arguments={"bind": engines["beta"]}).connection.cursor()
    cur.execute("INSERT INTO ss_rows_beta (id, v) VALUES (8, 'raw')")
    cur.close()
    s.commit()
    assert count(engines["beta"], "beta") == 1 and count(engines["alpha"], "alpha") == 1
    assert decision_count(engines["alpha"]) == 1  # the two-phase protocol ran
    assert in_doubt(engines) == []


def test_mariadb_counters_are_read_only_in_multi_shard_transactions(
    engines_for: Callable[[str], dict[str, Engine]], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The session's write counters cost one statement when a MariaDB branch joins a
    transaction begun elsewhere and one at commit if it looks read-only; a single-shard
    MariaDB transaction sends none of them. A routine's write before a savepoint, unseen
    by the statements, survives a rollback to that savepoint."""
    import pymysql.cursors

    engines = engines_for("pg+mariadb")
    beta = engines["beta"]
    _function_that_inserts(beta)
    view = _view_calling_it(beta)
    sent: list[str] = []
    execute = pymysql.cursors.Cursor.execute

    def spy(self: Any, query: str, args: Any = None) -> Any:
        sent.append(query)
        return execute(self, query, args)

    monkeypatch.setattr(pymysql.cursors.Cursor, "execute", spy)
    s = session(engines, TransactionCoordinator(decider="alpha"))
    insert(s, engines, "beta", 1)
    s.commit()
    assert sent and not any("Handler_" in q for q in sent), sent
    # alpha first, then beta joins: its counters are read at XA START and at commit
    s = session(engines, TransactionCoordinator(decider="alpha"))
    insert(s, engines, "alpha", 1)
    conn = s.connection(bind_arguments={"bind": beta})
    assert conn.execute(select(view)).scalar() == 7  # a hidden write
    nested = conn.begin_nested()
    conn.execute(T["beta"].insert().values(id=8, v="x"))
    nested.rollback()
    s.commit()
    assert sum("Handler_" in q for q in sent) == 2, sent
    monkeypatch.undo()
    with beta.connect() as c:
        assert sorted(c.execute(select(T["beta"].c.id)).scalars()) == [1, 7]
    assert count(engines["alpha"], "alpha") == 1
    assert in_doubt(engines) == []


def decision_count(engine: Engine) -> int:
    with engine.connect() as c:
        try:
            return int(c.exec_driver_sql(f"SELECT count(*) FROM {DECISION_TABLE}").scalar() or 0)
        except DBAPIError:
            return 0


# --- item 9: the decider does not depend on the order of the writes ------------------------


@pytest.mark.parametrize("order", [("alpha", "beta", "gamma"), ("alpha", "gamma", "beta"),
                                   ("gamma", "alpha", "beta"), ("gamma", "beta", "alpha")])
def test_sqlite_decides_whatever_the_order(
    engines_for: Callable[[str], dict[str, Engine]], order: tuple[str, ...],
) -> None:
    """PostgreSQL alpha, MariaDB beta, SQLite gamma written in any order commit atomically,
    SQLite holding the decision (it cannot prepare). (Before: alpha, beta, gamma raised
    AtomicityUnavailableError: beta's XA START had fixed alpha as the decider.)

    Not covered: MariaDB written first begins without XA (a single-shard transaction
    costs what plain SQLAlchemy's does), so it cannot prepare, and a SQLite write after
    it makes two shards that cannot prepare."""
    from shardsession import ShardedSession

    engines = engines_for("sqlite+pg+mariadb")
    s = ShardedSession(shards=engines, shard_chooser=lambda *a, **k: "alpha",
                       identity_chooser=lambda *a, **k: ["alpha"],
                       execute_chooser=lambda ctx: ["alpha"], atomic="require")
    for n in order:
        s.connection(bind_arguments={"shard_id": n}).execute(T[n].insert().values(id=1, v=n))
    s.commit()
    s.close()
    assert {n: count(e, n) for n, e in engines.items()} == dict.fromkeys(engines, 1)
    assert decision_count(engines["gamma"]) == 1
    assert decision_count(engines["alpha"]) == decision_count(engines["beta"]) == 0
    assert in_doubt(engines) == []


def test_absent_sqlite_decider_holds_the_decision_in_its_own_transaction(
    engines_for: Callable[[str], dict[str, Engine]], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """PostgreSQL then MariaDB written, SQLite not touched: the gtrid fixed at MariaDB's XA
    START names SQLite (a later SQLite write would have to decide), so the decision is
    written on a connection of the coordinator's own; with the PREPAREs failing it is
    never committed, and a crash after it is recovered from the SQLite table."""
    engines = engines_for("sqlite+pg+mariadb")
    coord = TransactionCoordinator()
    s = Session()
    names = {e: n for n, e in engines.items()}
    coord.install(s, names.__getitem__, shards=engines)
    insert(s, engines, "alpha", 1)
    insert(s, engines, "beta", 1)
    s.commit()
    assert count(engines["alpha"], "alpha") == count(engines["beta"], "beta") == 1
    assert decision_count(engines["gamma"]) == 1
    assert count(engines["gamma"], "gamma") == 0
    # a failed PREPARE: nothing committed, no decision row, SQLite not locked afterwards
    from shardsession.backends.mysql import MySQLAdapter

    def refuse(self: Any, dbapi_conn: Any, xid: Any) -> None:
        raise RuntimeError("refused to prepare")

    monkeypatch.setattr(MySQLAdapter, "prepare", refuse)
    s = Session()
    coord.install(s, names.__getitem__, shards=engines)
    insert(s, engines, "alpha", 2)
    insert(s, engines, "beta", 2)
    with pytest.raises(PrepareFailed):
        s.commit()
    s.close()
    monkeypatch.undo()
    assert count(engines["alpha"], "alpha") == count(engines["beta"], "beta") == 1
    assert decision_count(engines["gamma"]) == 1
    assert in_doubt(engines) == []
    assert recover(engines, grace_period=0).decisions_deleted == 1
    with engines["gamma"].begin() as c:  # the file is not left locked
        c.execute(T["gamma"].insert().values(id=5, v="g"))


def test_absent_sqlite_decider_sharing_its_connection_commits_nothing_else(
    engines_for: Callable[[str], dict[str, Engine]],
) -> None:
    """A SQLite decider on a SingletonThreadPool (the thread's one connection) that no
    branch holds, named when MariaDB's XA START fixes the gtrid: its identity must not be
    stored by switching that connection to autocommit, which committed the pending write
    of another unit of work of the thread (before: the rolled-back row stayed). The
    identity is chosen then and stored with the first decision."""
    from sqlalchemy.pool import SingletonThreadPool

    from shardsession.coordinator.identity import read_identity
    from shardsession.coordinator.xid import gtrid_cluster

    engines = engines_for("sqlite+pg+mariadb")
    engines["gamma"] = create_engine(engines["gamma"].url, poolclass=SingletonThreadPool)
    names = {e: n for n, e in engines.items()}
    coord = TransactionCoordinator()
    try:
        other = engines["gamma"].connect()
        other.begin()
        other.execute(T["gamma"].insert().values(id=9, v="pending"))
        s = Session()
        coord.install(s, names.__getitem__, shards=engines)
        s.connection(bind_arguments={"bind": engines["alpha"]}).execute(select(T["alpha"].c.id))
        insert(s, engines, "beta", 1)  # XA START: the gtrid names gamma, absent
        s.commit()  # one writer: no decision
        other.rollback()
        other.close()
        assert count(engines["gamma"], "gamma") == 0
        assert count(engines["beta"], "beta") == 1
        # two writers: the decision (and the identity chosen) commit on gamma together
        s = Session()
        coord.install(s, names.__getitem__, shards=engines)
        insert(s, engines, "alpha", 2)
        insert(s, engines, "beta", 2)
        s.commit()
        s.close()
        assert decision_count(engines["gamma"]) == 1 and count(engines["gamma"], "gamma") == 0
        with engines["gamma"].connect() as c:
            (decided,) = c.exec_driver_sql(f"SELECT gtrid FROM {DECISION_TABLE}").scalars()
        assert gtrid_cluster(decided) == read_identity(adapter_for("sqlite"), engines["gamma"])
        assert in_doubt(engines) == []
    finally:
        engines["gamma"].dispose()


# --- the participants column's limit ---------------------------------------------------


@pytest.mark.parametrize("mix", ["pg+mariadb", "pg+sqlite"])
def test_the_participants_column_holds_the_most_branches_a_commit_may_prepare(
    engines_for: Callable[[str], dict[str, Engine]], mix: str,
) -> None:
    """A decision row naming MAX_PREPARED_BRANCHES branches is stored and read back
    whole on every dialect; one more does not fit (a server error on PostgreSQL and
    strict MariaDB, which is why the commit refuses it before anything is prepared)."""
    from shardsession.backends import DecisionRow
    from shardsession.coordinator.decisions import admin_connection
    from shardsession.coordinator.xid import (
        MAX_PREPARED_BRANCHES,
        PARTICIPANTS_MAX_CHARS,
        Xid,
        new_cluster_id,
        new_gtrid,
        parse_participants,
        participants_text,
    )

    for name, engine in engines_for(mix).items():
        adapter = adapter_for(engine.dialect.name)
        ensure_decisions(engine)
        gtrid = new_gtrid(name, cluster=new_cluster_id())
        most = [(Xid.branch(gtrid, i), f"shard{i}") for i in range(MAX_PREPARED_BRANCHES)]
        # every participant with its location mark, as a commit records them
        where = {s: f"server/db{s}" for _x, s in [*most, (None, "one more")]}
        text_ = participants_text(most, where)
        assert len(text_) <= PARTICIPANTS_MAX_CHARS
        assert len(participants_text([*most, (Xid.branch(gtrid, 998), "one more")], where)) \
            > PARTICIPANTS_MAX_CHARS
        with admin_connection(engine) as dbapi:
            adapter.insert_decision(dbapi, DecisionRow(gtrid, "C", time.time(), text_))
            row = adapter.read_decision(dbapi, gtrid)
        assert row is not None and row.participants == text_
        assert len(parse_participants(row.participants) or []) == MAX_PREPARED_BRANCHES
        if engine.dialect.name != "sqlite":  # (SQLite does not enforce VARCHAR sizes)
            over = participants_text([*most, (Xid.branch(gtrid, 998), "one more")], where)
            with pytest.raises(Exception, match=r"(?i)too long"), \
                    admin_connection(engine) as dbapi:
                adapter.insert_decision(dbapi, DecisionRow(
                    new_gtrid(name, cluster=new_cluster_id()), "C", time.time(), over))


def test_more_prepared_branches_than_a_decision_row_can_name_are_refused_first(
    engines_for: Callable[[str], dict[str, Engine]], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the limit lowered to 1 (148 branches need 148 servers' connections), two
    branches to prepare are refused before any PREPARE: nothing committed, nothing in
    doubt, no decision row."""
    from shardsession.coordinator import phases
    from shardsession.exc import TransactionError

    engines = engines_for("sqlite+pg+mariadb")
    monkeypatch.setattr(phases, "MAX_PREPARED_BRANCHES", 1)
    coord = TransactionCoordinator()
    s = Session()
    coord.install(s, {e: n for n, e in engines.items()}.__getitem__, shards=engines)
    for n in ("gamma", "alpha", "beta"):
        insert(s, engines, n, 1)
    with pytest.raises(TransactionError, match="at most 1 prepared branches"):
        s.commit()
    s.rollback()
    s.close()
    assert {n: count(e, n) for n, e in engines.items()} == dict.fromkeys(engines, 0)
    assert decision_count(engines["gamma"]) == 0
    assert in_doubt(engines) == []


# --- item 10: a half-open decider connection does not block abort claims for long ----------


class _FreezingProxy:
    """A TCP proxy that, on a client chunk containing ``pattern``, drops it and closes
    only the client's side: the server keeps a live session that never hears from its
    client again (a half-open connection, as after a network partition)."""

    def __init__(self, host: str, port: int, pattern: bytes) -> None:
        import socket

        self.target = (host, port)
        self.pattern = pattern
        self.armed = False
        self.frozen: list[Any] = []  # server sockets kept open
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket

        while not self.closed:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            threading.Thread(target=self._up, args=(client, server), daemon=True).start()
            threading.Thread(target=self._down, args=(client, server), daemon=True).start()

    def _up(self, client: Any, server: Any) -> None:
        while True:
            try:
                data = client.recv(65536)
            except OSError:
                return
            if not data:
                server.close()
                return
            if self.armed and self.pattern in data:
                self.armed = False
                self.frozen.append(server)  # never closed until the test ends
                client.close()
                return
            server.sendall(data)

    def _down(self, client: Any, server: Any) -> None:
        while True:
            try:
                data = server.recv(65536)
                if not data:
                    break
                client.sendall(data)
            except OSError:
                break
        if server not in self.frozen:
            client.close()

    def close(self) -> None:
        self.closed = True
        self.sock.close()
        for s in self.frozen:
            s.close()


@pytest.mark.parametrize("mix,bound", [
    ("pg+pg", "end_session"),
    ("pg+pg", "server_timeout"),
    ("pg+mariadb", "end_session"),
])
def test_half_open_decider_does_not_block_the_abort_claim(
    engines_for: Callable[[str], dict[str, Engine]], monkeypatch: pytest.MonkeyPatch,
    mix: str, bound: str,
) -> None:
    """The decider's COMMIT never reaches the server and the client loses the connection,
    while the server keeps the session (idle in its transaction, holding the uncommitted
    decision row). The client gets OutcomeUnknown; recovery's ABORT claim must get
    through within seconds: the coordinator ends that server session from a new
    connection, or (PostgreSQL, when it cannot) the server ends it after
    DECIDER_IDLE_TIMEOUT. (Before: the claim waited on the row lock on every pass, the
    transaction stayed in doubt for as long as the server kept the session.)"""
    from shardsession.backends import postgresql as pg_backend

    engines = engines_for(mix)
    decider = "alpha" if mix == "pg+pg" else "beta"
    other = "beta" if decider == "alpha" else "alpha"
    url = engines[decider].url
    # the COMMIT statement itself (pymysql's COM_QUERY byte before it, not the SET
    # AUTOCOMMIT of a new connection; PostgreSQL's Query message ends with a NUL)
    pattern = b"\x03COMMIT" if mix == "pg+mariadb" else b"COMMIT\x00"
    proxy = _FreezingProxy(url.host or "127.0.0.1", int(url.port or 0), pattern)
    try:
        via = dict(engines)
        via[decider] = create_engine(url.set(host="127.0.0.1", port=proxy.port))
        ensure_decisions(engines[decider])
        if bound == "server_timeout":
            monkeypatch.setattr(pg_backend, "DECIDER_IDLE_TIMEOUT", 1.0)
            monkeypatch.setattr(pg_backend.PostgreSQLAdapter, "end_session",
                                lambda self, c, sid: None)
        coord = TransactionCoordinator(decider=decider)
        s = session(via, coord)  # a first commit creates the decision table
        insert(s, via, decider, 100)
        insert(s, via, other, 100)
        s.commit()
        s = session(via, coord)
        insert(s, via, decider, 1)
        insert(s, via, other, 1)
        proxy.armed = True
        with pytest.raises(OutcomeUnknown) as ei:
            s.commit()
        s.close()
        assert ei.value.pending_shards == [other]
        deadline = time.monotonic() + 10
        while True:
            report = recover(engines, grace_period=0, claim_timeout=0.5)
            if not in_doubt(engines) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert in_doubt(engines) == [], report
        assert decision_of(engines[decider], ei.value.gtrid or "") == "A"
        assert count(engines["alpha"], "alpha") == count(engines["beta"], "beta") == 1  # 100
        via[decider].dispose()
    finally:
        proxy.close()


def test_interrupt_before_the_decision_rolls_everything_back(
    engines_for: Callable[[str], dict[str, Engine]], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """KeyboardInterrupt while the decision row is inserted (phase one, in the calling
    thread), after a worker prepared beta: the prepared branch is rolled back before the
    interrupt goes on, and nothing is left in doubt. (Before: the interrupt left at once
    and the session's rollback skipped the prepared branch: beta stayed prepared, holding
    its locks, until a recovery pass claimed the abort.)"""
    from shardsession.backends.postgresql import PostgreSQLAdapter

    engines = engines_for("pg+pg")

    def interrupted(self: Any, dbapi_conn: Any, row: Any, **kw: Any) -> None:
        time.sleep(0.5)  # beta's PREPARE (in a worker) is done by then
        raise KeyboardInterrupt("interrupted while inserting the decision")

    monkeypatch.setattr(PostgreSQLAdapter, "insert_decision", interrupted)
    s = session(engines, TransactionCoordinator(decider="alpha"))
    insert(s, engines, "alpha", 1)
    insert(s, engines, "beta", 1)
    with pytest.raises(KeyboardInterrupt):
        s.commit()
    s.close()
    monkeypatch.undo()
    assert in_doubt(engines) == []
    assert count(engines["alpha"], "alpha") == count(engines["beta"], "beta") == 0


def test_sqlite_reader_is_released_without_a_decision(
    engines_for: Callable[[str], dict[str, Engine]],
) -> None:
    """A SQLite branch that only read is asked through its driver (total_changes since the
    branch began, in the session's thread): it is no writer, so a PostgreSQL writer
    commits one phase, with no decision row."""
    engines = engines_for("pg+sqlite")
    with engines["beta"].begin() as c:
        c.execute(T["beta"].insert().values(id=9, v="old"))  # changes before the branch
    s = session(engines, TransactionCoordinator())
    s.connection(bind_arguments={"bind": engines["beta"]}).execute(select(T["beta"].c.id))
    insert(s, engines, "alpha", 1)
    s.commit()
    assert count(engines["alpha"], "alpha") == 1
    assert decision_count(engines["alpha"]) == decision_count(engines["beta"]) == 0


# --- attack 11b D2: an implicit commit on the first (non-XA) MariaDB shard -----------------


def test_ddl_on_the_plain_mariadb_shard_is_never_reported_as_nothing_committed(
    mariadb_url: str, pg_url_a: str,
) -> None:
    """The transaction's first shard (MariaDB, no XA) runs DDL, which MariaDB commits
    implicitly with the writes before it; then a PostgreSQL shard writes. The commit must
    not answer PrepareFailed ("nothing was committed"): it refuses before any PREPARE
    with an error saying what is committed, and rolls the PostgreSQL shard back."""
    from shardsession import Placement, ShardedSession
    from shardsession.exc import TransactionError

    my, pg = create_engine(mariadb_url), create_engine(pg_url_a)
    try:
        for e in (my, pg):
            with e.begin() as c:
                c.exec_driver_sql("DROP TABLE IF EXISTS ce_ddl_acct")
                c.exec_driver_sql("CREATE TABLE ce_ddl_acct (id INTEGER PRIMARY KEY, "
                                  "bal INTEGER NOT NULL)")
                c.exec_driver_sql("INSERT INTO ce_ddl_acct VALUES (1, 100)")
        with my.begin() as c:
            c.exec_driver_sql("DROP TABLE IF EXISTS ce_ddl_side")
        s = ShardedSession(shards={"a": my, "b": pg}, placement=Placement({}),
                           atomic="require")
        ca = s.connection(bind_arguments={"shard_id": "a"})
        ca.execute(text("UPDATE ce_ddl_acct SET bal = bal - 10 WHERE id = 1"))
        ca.execute(text("CREATE TABLE ce_ddl_side (i INT)"))  # implicit commit
        cb = s.connection(bind_arguments={"shard_id": "b"})
        cb.execute(text("UPDATE ce_ddl_acct SET bal = bal + 10 WHERE id = 1"))
        with pytest.raises(TransactionError, match="COMMITTED") as info:
            s.commit()
        assert not isinstance(info.value, PrepareFailed)
        s.close()
        balances = {}
        for n, e in (("a", my), ("b", pg)):
            with e.connect() as c:
                balances[n] = c.exec_driver_sql("SELECT bal FROM ce_ddl_acct").scalar()
        assert balances == {"a": 90, "b": 100}  # what the error says
        with pg.connect() as c:
            assert c.exec_driver_sql("SELECT count(*) FROM pg_prepared_xacts WHERE "
                                     "database = current_database()").scalar() == 0
    finally:
        for e in (my, pg):
            with e.begin() as c:
                c.exec_driver_sql("DROP TABLE IF EXISTS ce_ddl_acct")
                c.exec_driver_sql("DROP TABLE IF EXISTS ce_ddl_side")
            e.dispose()
