"""Bulk operations over shards: each row stored on its shard, the shards in parallel, in the
session's atomic commit; unroutable rows send nothing; RETURNING objects carry their shard.

Runs on three SQLite files and on PostgreSQL + MariaDB + PostgreSQL shards. What was stored
is read back through engines of its own (not the session's), shard by shard.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import (
    Column,
    Engine,
    Integer,
    MetaData,
    Table,
    case,
    create_engine,
    delete,
    event,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext import horizontal_shard
from sqlalchemy.orm import make_transient, make_transient_to_detached, sessionmaker
from sqlalchemy.orm.exc import StaleDataError
from sqlalchemy.pool import NullPool

from shardsession import HashSharding, ShardedSession
from shardsession.exc import (
    CapabilityError,
    RoutingError,
    ShardKeyMissingError,
    UnknownShardError,
)

from ._models import (
    SHARDS,
    TENANTS,
    AuditLog,
    Cluster,
    Country,
    Event,
    Order,
    Tenant,
    User,
    build_cluster,
)


@pytest.fixture(params=["sqlite", "pg+mariadb"])
def cluster(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Cluster]:
    if request.param == "sqlite":
        urls = [f"sqlite:///{tmp_path}/{s}.db" for s in SHARDS]
    else:
        urls = _server_urls(request)
    yield from build_cluster(urls)


def _server_urls(request: pytest.FixtureRequest) -> list[str]:
    pg_a = request.getfixturevalue("pg_server_a")
    pg_b = request.getfixturevalue("pg_server_b")
    maria = request.getfixturevalue("mariadb_server")
    # s0 and s2 PostgreSQL (two servers), s1 MariaDB
    return [pg_a.create_database(), maria.create_database(), pg_b.create_database()]


def user_shard(user_id: int) -> str:
    return HashSharding("id", list(SHARDS)).shard_for(user_id)


def event_shard(day: int) -> str:
    return "s0" if day < 100 else "s1" if day < 200 else "s2"


def stored(cluster: Cluster, sql: str) -> dict[str, set[Any]]:
    """``sql`` run on every shard through a fresh engine of its own: the rows each holds
    (one value per row when one column is selected)."""
    out: dict[str, set[Any]] = {}
    for shard, engine in cluster.engines.items():
        fresh = create_engine(engine.url.render_as_string(hide_password=False),
                              poolclass=NullPool)
        try:
            with fresh.connect() as conn:
                rows = conn.execute(text(sql)).all()
        finally:
            fresh.dispose()
        out[shard] = {r[0] if len(r) == 1 else tuple(r) for r in rows}
    return out


def by_shard(values: dict[Any, str]) -> dict[str, set[Any]]:
    out: dict[str, set[Any]] = {s: set() for s in SHARDS}
    for value, shard in values.items():
        out[shard].add(value)
    return out


def pg_ids(cluster: Cluster, ids: range) -> list[int]:
    """The ids of ``ids`` whose users live on a shard whose dialect has UPDATE/DELETE ..
    RETURNING (every shard but MariaDB)."""
    return [i for i in ids
            if cluster.engines[user_shard(i)].dialect.name in ("sqlite", "postgresql")]


class _Threads:
    """The threads each shard's engine ran INSERT statements on."""

    def __init__(self, cluster: Cluster, table: str) -> None:
        self.seen: dict[str, set[int]] = defaultdict(set)
        self.statements: dict[str, int] = defaultdict(int)
        for shard, engine in cluster.engines.items():
            event.listen(engine, "before_cursor_execute", self._recorder(shard, table))

    def _recorder(self, shard: str, table: str) -> Any:
        def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            if statement.lstrip().upper().startswith(f"INSERT INTO {table.upper()}"):
                self.seen[shard].add(threading.get_ident())
                self.statements[shard] += 1
        return record


# --------------------------------------------------------------------------------------------
# rows on their shards


def test_bulk_insert_puts_each_row_on_its_shard_in_parallel(cluster: Cluster) -> None:
    Session = cluster.session_factory()
    users = [{"id": i, "name": f"u{i}"} for i in range(1, 61)]
    orders = [{"id": 1000 + i, "user_id": i, "amount": i} for i in range(1, 61)]
    days = [5, 150, 250, 99, 100, 300]
    events = [{"id": i, "day": d, "what": "e"} for i, d in enumerate(days)]
    tenants = [{"code": c, "title": c.upper()} for c in TENANTS]
    countries = [{"code": "SE", "name": "Sweden"}, {"code": "NO", "name": "Norway"}]
    logs = [{"id": i, "message": "m"} for i in range(3)]
    threads = _Threads(cluster, "users")
    with Session.begin() as s:
        for model, rows in ((User, users), (Order, orders), (Event, events),
                            (Tenant, tenants), (Country, countries), (AuditLog, logs)):
            s.execute(insert(model), rows)

    assert stored(cluster, "SELECT id FROM users") == by_shard(
        {i: user_shard(i) for i in range(1, 61)})
    assert stored(cluster, "SELECT id FROM orders") == by_shard(
        {1000 + i: user_shard(i) for i in range(1, 61)})
    assert stored(cluster, "SELECT day FROM events") == by_shard(
        {d: event_shard(d) for d in days})
    assert stored(cluster, "SELECT code FROM tenants") == by_shard(TENANTS)
    assert stored(cluster, "SELECT code FROM countries") == {s: {"SE", "NO"} for s in SHARDS}
    assert stored(cluster, "SELECT id FROM audit_log") == {"s0": set(), "s1": set(),
                                                           "s2": {0, 1, 2}}
    # one batch per shard (insertmanyvalues / executemany), the shards on several threads
    assert dict(threads.statements) == {s: 1 for s in SHARDS}
    assert len(set().union(*threads.seen.values())) > 1


def test_explicit_shard_takes_every_row(cluster: Cluster) -> None:
    Session = cluster.session_factory()
    with Session.begin() as s:
        s.execute(insert(AuditLog), [{"id": i, "message": "x"} for i in range(5)],
                  bind_arguments={"shard_id": "s0"})
    assert stored(cluster, "SELECT id FROM audit_log")["s0"] == set(range(5))


def test_core_insert_rows_still_routed(cluster: Cluster) -> None:
    Session = cluster.session_factory()
    with Session.begin() as s:
        s.execute(insert(User.__table__), [{"id": i, "name": f"c{i}"} for i in range(1, 21)])
    assert stored(cluster, "SELECT id FROM users") == by_shard(
        {i: user_shard(i) for i in range(1, 21)})


# --------------------------------------------------------------------------------------------
# nothing sent when a row cannot be routed


@pytest.mark.parametrize(
    ("model", "rows", "error"),
    [
        (User, [{"id": 1, "name": "a"}, {"name": "no key"}], ShardKeyMissingError),
        (User, [{"id": 2, "name": "a"}, {"id": None, "name": "null"}], ShardKeyMissingError),
        (Order, [{"id": 1, "user_id": 1, "amount": 1}, {"id": 2, "amount": 1}],
         ShardKeyMissingError),
        (Tenant, [{"code": "acme", "title": "x"}, {"code": "nobody", "title": "x"}],
         RoutingError),
        (Country, [{"code": "SE", "name": "x"}, {"name": "no key"}], ShardKeyMissingError),
    ],
    ids=["missing", "null", "follower", "directory", "broadcast"],
)
def test_unroutable_row_sends_nothing(
    cluster: Cluster, model: Any, rows: list[dict[str, Any]], error: type[Exception]
) -> None:
    Session = cluster.session_factory()
    with Session() as s:
        for attempt in (
            lambda: s.execute(insert(model), rows),
            lambda: s.scalars(insert(model).returning(model), rows).all(),
            lambda: s.bulk_insert_mappings(model, rows),
        ):
            cluster.reset_log()
            with pytest.raises(error):
                attempt()
            assert cluster.touched("INSERT") == set()
            s.rollback()
    for table in ("users", "orders", "tenants", "countries"):
        assert all(not v for v in stored(cluster, f"SELECT * FROM {table}").values())


def test_bulk_update_row_without_shard_key_sends_nothing(cluster: Cluster) -> None:
    Session = cluster.session_factory()
    with Session.begin() as s:
        s.execute(insert(User), [{"id": 1, "name": "a"}])
        s.execute(insert(Order), [{"id": 7, "user_id": 1, "amount": 1}])
    with Session() as s:
        cluster.reset_log()
        with pytest.raises(ShardKeyMissingError):  # an order's shard key is its user_id
            s.execute(update(Order), [{"id": 7, "amount": 2}])
        with pytest.raises(ShardKeyMissingError):
            s.execute(update(User), [{"id": 1, "name": "b"}, {"name": "no key"}])
        assert cluster.touched("UPDATE") == set()


# --------------------------------------------------------------------------------------------
# atomicity


def test_failure_on_one_shard_rolls_back_every_shard(cluster: Cluster) -> None:
    Session = cluster.session_factory()
    with Session.begin() as s:
        s.execute(insert(User), [{"id": 7, "name": "first"}])
    rows = [{"id": i, "name": f"r{i}"} for i in range(100, 130)] + [{"id": 7, "name": "dup"}]
    assert len({user_shard(r["id"]) for r in rows}) == 3
    with pytest.raises(IntegrityError), Session.begin() as s:
        s.execute(insert(User), rows)
    with pytest.raises(IntegrityError), Session.begin() as s:
        s.bulk_save_objects([User(id=r["id"], name=str(r["name"])) for r in rows])
    with pytest.raises(StaleDataError), Session.begin() as s:
        # rows of every shard updated, one matches nothing: SQLAlchemy's error, and the
        # rest is rolled back with it
        s.execute(update(User), [{"id": 7, "name": "changed"}, {"id": 999, "name": "none"}])
    expected = by_shard({7: user_shard(7)})
    assert stored(cluster, "SELECT id FROM users") == expected
    assert stored(cluster, "SELECT name FROM users") == by_shard({"first": user_shard(7)})


@pytest.fixture(params=["sqlite", "sqlite+recipe", "pg+mariadb"])
def savepoint_cluster(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Cluster]:
    """Plain SQLite files (pysqlite's deferred BEGIN: see the next test), SQLite files
    with SQLAlchemy's pysqlite savepoint recipe, or the servers."""
    if request.param == "pg+mariadb":
        yield from build_cluster(_server_urls(request))
        return
    if request.param == "sqlite":
        yield from build_cluster([f"sqlite:///{tmp_path}/{s}.db" for s in SHARDS])
        return
    for cluster in build_cluster([f"sqlite:///{tmp_path}/{s}.db" for s in SHARDS]):
        for engine in cluster.engines.values():
            event.listen(engine, "connect",
                         lambda dbapi, record: setattr(dbapi, "isolation_level", None))
            event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN"))
            engine.dispose()  # (connections made from here on get the recipe)
        yield cluster


def test_failed_bulk_statement_leaves_nothing_on_any_shard(savepoint_cluster: Cluster) -> None:
    """A multi-shard bulk INSERT/UPDATE that fails on one shard is undone on every shard
    (a SAVEPOINT per shard around it): a caller that catches the error and commits
    commits nothing of it. Before, the other shards' rows were committed, those after the
    failing row in parameter order too (attack finding)."""
    cluster = savepoint_cluster
    Session = cluster.session_factory()
    first = {s: next(i for i in range(1, 99) if user_shard(i) == s) for s in SHARDS}
    with Session.begin() as s:
        s.execute(insert(User), [{"id": i, "name": "first"} for i in first.values()])
    with Session() as s:
        for shard, dup in first.items():  # each shard the failing one in turn
            # rows of every shard, several after the duplicate in parameter order
            rows = [{"id": i, "name": f"r{i}"} for i in range(100, 106)]
            rows += [{"id": dup, "name": "dup"}]
            rows += [{"id": i, "name": f"r{i}"} for i in range(106, 112)]
            assert len({user_shard(r["id"]) for r in rows}) == 3
            with pytest.raises(IntegrityError):
                s.execute(insert(User), rows)
            # (a row no shard has, on another shard: one shard alone is one database)
            missing = next(i for i in range(900, 999) if user_shard(i) != shard)
            with pytest.raises(StaleDataError):
                s.execute(update(User), [{"id": dup, "name": "changed"},
                                         {"id": missing, "name": "x"}])
        # the session goes on (a PostgreSQL shard's transaction is not left aborted)
        s.execute(insert(User), [{"id": 200, "name": "after"}, {"id": 201, "name": "after"}])
        s.commit()
    expected = {(i, "first"): s for s, i in first.items()}
    expected.update({(200, "after"): user_shard(200), (201, "after"): user_shard(201)})
    assert stored(cluster, "SELECT id, name FROM users") == by_shard(expected)


def _refuse_bad_names(cluster: Cluster, shard: str) -> None:
    with cluster.engines[shard].begin() as conn:
        if conn.dialect.name == "sqlite":
            conn.execute(text("CREATE TRIGGER no_bad BEFORE UPDATE ON users "
                              "WHEN NEW.name = 'bad' BEGIN SELECT RAISE(ABORT, 'bad'); END"))
        else:
            conn.execute(text("ALTER TABLE users ADD CONSTRAINT no_bad CHECK (name <> 'bad')"))


def test_failed_fanout_update_or_delete_leaves_nothing_on_any_shard(
    savepoint_cluster: Cluster,
) -> None:
    """A criteria UPDATE / DELETE sent to several shards that fails on one shard is
    undone on every shard (a SAVEPOINT per shard around it), and the transaction goes on,
    as on one database (SQLite, MariaDB: the statement is rolled back). Before, a caller
    that caught the error and committed committed the other shards' part (attack 12,
    break 3)."""
    cluster = savepoint_cluster
    Session = cluster.session_factory()
    ids = {s: [i for i in range(1, 60) if user_shard(i) == s][:2] for s in SHARDS}
    failing = "s1"  # (MariaDB in the server cluster)
    _refuse_bad_names(cluster, failing)
    with Session.begin() as s:
        s.execute(insert(User), [{"id": i, "name": "first"} for v in ids.values() for i in v])
    bad = ids[failing][0]
    with Session() as s:
        s.add(User(id=100, name="before"))
        s.flush()
        with pytest.raises(DBAPIError):
            s.execute(update(User).values(name=case((User.id == bad, "bad"), else_="changed")))
        with pytest.raises(DBAPIError):  # a WHERE the chooser cannot narrow to one shard
            s.execute(update(User).where(User.id.in_([ids["s0"][0], bad]))
                      .values(name=case((User.id == bad, "bad"), else_="changed")))
        # one that succeeds: its savepoints released, its count summed
        assert s.execute(update(User).where(User.id != 100).values(name="first")).rowcount == 6
        assert s.execute(delete(User).where(User.id == -1)).rowcount == 0
        s.commit()
    expected = {(i, "first"): sh for sh, v in ids.items() for i in v}
    expected[(100, "before")] = user_shard(100)
    assert stored(cluster, "SELECT id, name FROM users") == by_shard(expected)
    if cluster.engines[failing].dialect.name == "sqlite":
        return  # (no foreign keys enforced without PRAGMA foreign_keys)
    # a DELETE refused on one shard (a row there still referenced) leaves every row
    with Session.begin() as s:
        s.execute(insert(Order), [{"id": 1, "user_id": bad, "amount": 1}])
    with Session() as s:
        with pytest.raises(IntegrityError):
            s.execute(delete(User).where(User.id != 100))
        s.add(User(id=101, name="after"))
        s.commit()
    expected[(101, "after")] = user_shard(101)
    assert stored(cluster, "SELECT id, name FROM users") == by_shard(expected)


def test_autocommit_server_shard_refuses_a_multi_shard_statement(
    request: pytest.FixtureRequest,
) -> None:
    """A server shard with isolation_level="AUTOCOMMIT" (MariaDB, PostgreSQL) would
    commit its part of a multi-shard bulk or criteria statement at once, with no
    savepoint to undo it: refused with CapabilityError before anything is sent, as a
    SQLite shard in driver autocommit is (attack 12, break 6). One shard's part still
    goes."""
    urls = _server_urls(request)
    for cluster in build_cluster(urls):
        for name in ("s0", "s1"):  # PostgreSQL, then MariaDB in autocommit
            Session = sessionmaker(
                class_=ShardedSession, placement=cluster.session_factory().kw["placement"],
                shards={**cluster.engines,
                        name: cluster.engines[name].execution_options(
                            isolation_level="AUTOCOMMIT")})
            with Session() as s:
                cluster.reset_log()
                with pytest.raises(CapabilityError, match="autocommit"):
                    s.execute(insert(User), [{"id": i, "name": "n"} for i in range(1, 13)])
                with pytest.raises(CapabilityError, match="autocommit"):
                    s.execute(update(User).values(name="x"))
                assert cluster.touched("INSERT") == set()
                assert cluster.touched("UPDATE") == set()
                s.rollback()
        assert all(not v for v in stored(cluster, "SELECT id FROM users").values())


def test_update_statement_changing_the_shard_key_is_refused(cluster: Cluster) -> None:
    """An UPDATE statement that sets the shard key (or a follower's foreign key that
    places it) to a value of another shard is refused with RoutingError before anything
    is sent, as changing a loaded object's key is at flush; the row stayed on its old
    shard, unreachable under its new key (attack 12, break 4). A value placed on the one
    shard the statement runs on is allowed."""
    Session = cluster.session_factory()
    x = next(i for i in range(1, 99) if user_shard(i) == "s0")
    elsewhere = next(i for i in range(100, 199) if user_shard(i) != "s0")
    same = next(i for i in range(100, 199) if user_shard(i) == "s0")
    with Session.begin() as s:
        s.execute(insert(User), [{"id": x, "name": "x"}, {"id": elsewhere, "name": "e"}])
        s.execute(insert(Order), [{"id": 1, "user_id": elsewhere, "amount": 1}])
    with Session() as s:
        cluster.reset_log()
        refused = [
            update(User).where(User.id == x).values(id=elsewhere + 1000),
            update(User).where(User.id == x).values({User.id: elsewhere + 1000}),
            update(User).values(id=User.id + 1000),  # (a value it does not show)
            update(User).where(User.id.in_([x, elsewhere])).values(id=same),
            update(Order).where(Order.user_id == elsewhere).values(user_id=x),
        ]
        for stmt in refused:
            with pytest.raises(RoutingError, match="shard key"):
                s.execute(stmt)
        assert cluster.touched("UPDATE") == set()
        # a new key on the row's own shard, and a change of anything else, still go
        s.execute(update(User).where(User.id == x).values(id=same))
        s.execute(update(User).values(name="n"))
        s.commit()
    assert stored(cluster, "SELECT id, name FROM users") == by_shard(
        {(same, "n"): "s0", (elsewhere, "n"): user_shard(elsewhere)})


def test_bulk_update_by_primary_key_changing_the_shard_key_is_refused(cluster: Cluster) -> None:
    """Bulk UPDATE rows by primary key (``execute(update(M), rows)``,
    ``bulk_update_mappings``) whose shard key is not the primary key, setting a key of
    another shard than the one holding the row: RoutingError, nothing written (it was a
    StaleDataError from the new shard, where the row is not: attack 12, break 4). A key
    of the row's own shard, or the same key, still goes."""
    Session = cluster.session_factory()
    with Session.begin() as s:
        s.execute(insert(Event), [{"id": 1, "day": 10, "what": "a"},
                                  {"id": 2, "day": 150, "what": "b"}])
    with Session() as s:
        cluster.reset_log()
        with pytest.raises(RoutingError, match="shard key"):
            s.execute(update(Event), [{"id": 1, "day": 250, "what": "moved"},
                                      {"id": 2, "day": 150, "what": "kept"}])
        s.rollback()
        with pytest.raises(RoutingError, match="shard key"):
            s.bulk_update_mappings(Event, [{"id": 2, "day": 20, "what": "moved"}])
        s.rollback()
        assert cluster.touched("UPDATE") == set()
        s.execute(update(Event), [{"id": 1, "day": 20, "what": "same shard"},
                                  {"id": 2, "day": 150, "what": "same key"}])
        s.commit()
    assert stored(cluster, "SELECT id, day, what FROM events") == by_shard(
        {(1, 20, "same shard"): "s0", (2, 150, "same key"): "s1"})


def test_plain_pysqlite_first_statement_begins_before_its_savepoint(tmp_path: Any) -> None:
    """A plain pysqlite engine begins its transaction only before a write: a SAVEPOINT
    sent first would open a transaction of its own, which RELEASE commits, outside the
    session's. So a bulk statement that is a plain SQLite shard's first write sends the
    driver's BEGIN first, then its SAVEPOINT (it took none before, and its rows stayed
    when another shard failed)."""
    for cluster in build_cluster([f"sqlite:///{tmp_path}/{s}.db" for s in SHARDS]):
        Session = cluster.session_factory()
        with Session() as s:
            s.execute(insert(User), [{"id": i, "name": "n"} for i in range(1, 13)])
            # nothing visible outside the session's transaction before its commit
            assert all(not v for v in stored(cluster, "SELECT id FROM users").values())
            for qs in cluster.statements.values():
                firsts = [q.split()[0] for q in qs if q.split()[0] in ("BEGIN", "SAVEPOINT")]
                assert firsts == ["BEGIN", "SAVEPOINT"]
            cluster.reset_log()
            # a later one: the transactions are open, SAVEPOINT only
            s.execute(insert(User), [{"id": i, "name": "n"} for i in range(13, 25)])
            assert all(any(q.startswith("SAVEPOINT") for q in qs)
                       and not any(q.startswith("BEGIN") for q in qs)
                       for qs in cluster.statements.values())
            s.rollback()
        assert all(not v for v in stored(cluster, "SELECT id FROM users").values())


def test_sqlite_driver_autocommit_refuses_a_multi_shard_bulk_statement(tmp_path: Any) -> None:
    """A SQLite shard whose driver autocommits (isolation_level=None, no BEGIN) would
    commit its part of a bulk statement at once, with no savepoint to undo it: refused
    before anything is sent; one shard's rows alone still go."""
    for cluster in build_cluster([f"sqlite:///{tmp_path}/{s}.db" for s in SHARDS]):
        event.listen(cluster.engines["s1"], "connect",
                     lambda dbapi, record: setattr(dbapi, "isolation_level", None))
        cluster.engines["s1"].dispose()
        Session = cluster.session_factory()
        with Session() as s:
            cluster.reset_log()
            with pytest.raises(CapabilityError, match="autocommit"):
                s.execute(insert(User), [{"id": i, "name": "n"} for i in range(1, 13)])
            assert cluster.touched("INSERT") == set()
            one = [i for i in range(1, 30) if user_shard(i) == "s0"]
            s.execute(insert(User), [{"id": i, "name": "n"} for i in one])
            s.commit()
        assert stored(cluster, "SELECT id FROM users") == by_shard({i: "s0" for i in one})


def test_bulk_rows_of_several_shards_commit_together(cluster: Cluster) -> None:
    Session = cluster.session_factory()
    with Session() as s:
        s.execute(insert(User), [{"id": i, "name": "n"} for i in range(1, 31)])
        s.execute(insert(Order), [{"id": i, "user_id": i, "amount": 1} for i in range(1, 31)])
        # nothing visible from outside before the commit
        assert all(not v for v in stored(cluster, "SELECT id FROM users").values())
        s.commit()
    assert set().union(*stored(cluster, "SELECT id FROM orders").values()) == set(range(1, 31))


# --------------------------------------------------------------------------------------------
# identity


def test_insert_returning_objects_carry_their_shard(cluster: Cluster) -> None:
    Session = cluster.session_factory()
    with Session() as s:
        rows = [{"id": i, "name": f"n{i}"} for i in range(1, 13)]
        objs = s.scalars(insert(User).returning(User), rows).all()
        assert sorted(o.id for o in objs) == list(range(1, 13))
        assert {inspect(o).key[2] for o in objs if True} == {user_shard(i) for i in range(1, 13)}
        for o in objs:
            assert inspect(o).key[2] == user_shard(o.id)
        cluster.reset_log()
        for o in objs:
            assert s.get(User, o.id) is o  # the same object, found without a query
        assert cluster.touched("SELECT") == set()
        columns = s.execute(insert(User).returning(User.id, User.name),
                            [{"id": i, "name": f"c{i}"} for i in range(20, 26)]).all()
        assert sorted(columns) == [(i, f"c{i}") for i in range(20, 26)]
        # a replicated row is returned once, not once per copy
        countries = s.scalars(insert(Country).returning(Country),
                              [{"code": "SE", "name": "Sweden"},
                               {"code": "NO", "name": "Norway"}]).all()
        assert sorted(c.code for c in countries) == ["NO", "SE"]
        s.commit()
    assert stored(cluster, "SELECT id FROM users") == by_shard(
        {i: user_shard(i) for i in [*range(1, 13), *range(20, 26)]})


def test_insert_returning_sorted_by_parameter_order(cluster: Cluster) -> None:
    """``returning(..., sort_by_parameter_order=True)`` returns the rows in the order of
    the parameter sets, as SQLAlchemy promises on one database, although each shard
    returns only its own (they came back grouped by shard: attack finding)."""
    Session = cluster.session_factory()
    ids = [7, 1, 12, 3, 8, 2, 11, 4]
    assert len({user_shard(i) for i in ids}) == 3
    # grouped by shard the order would differ: the test can tell the two apart
    assert sorted(ids, key=lambda i: SHARDS.index(user_shard(i))) != ids

    def rows(offset: int) -> list[dict[str, Any]]:
        return [{"id": i + offset, "name": f"n{i + offset}"} for i in ids]

    with Session() as s:
        objs = s.scalars(insert(User).returning(User, sort_by_parameter_order=True),
                         rows(0)).all()
        assert [o.id for o in objs] == ids
        for o in objs:  # still keyed with their shard
            assert inspect(o).key[2] == user_shard(o.id)
            assert s.get(User, o.id) is o
        columns = s.execute(
            insert(User).returning(User.id, User.name, sort_by_parameter_order=True),
            rows(100)).all()
        assert [tuple(c) for c in columns] == [(i + 100, f"n{i + 100}") for i in ids]
        mixed = s.execute(
            insert(User).returning(User, User.name, sort_by_parameter_order=True),
            rows(200)).all()
        assert [(u.id, n) for u, n in mixed] == [(i + 200, f"n{i + 200}") for i in ids]
        table = User.__table__
        core = s.execute(table.insert().returning(table.c.id, sort_by_parameter_order=True),
                         rows(300)).scalars().all()
        assert core == [i + 300 for i in ids]
        s.commit()
    assert set().union(*stored(cluster, "SELECT id FROM users").values()) == {
        i + offset for i in ids for offset in (0, 100, 200, 300)}


def test_update_and_delete_returning_objects_carry_their_shard(cluster: Cluster) -> None:
    Session = cluster.session_factory()
    ids = pg_ids(cluster, range(1, 40))[:6]
    assert len({user_shard(i) for i in ids}) >= 2
    with Session() as s:
        s.execute(insert(User), [{"id": i, "name": "n"} for i in ids])
        s.commit()
        loaded = {i: s.get(User, i) for i in ids}
        # several shards
        changed = s.scalars(update(User).where(User.id.in_(ids[:4])).values(name="u")
                            .returning(User)).all()
        assert sorted(o.id for o in changed) == sorted(ids[:4])
        assert all(o is loaded[o.id] for o in changed)
        # one shard
        one = s.scalars(update(User).where(User.id == ids[4]).values(name="v")
                        .returning(User)).all()
        assert [o.id for o in one] == [ids[4]] and one[0] is loaded[ids[4]]
        assert inspect(one[0]).key[2] == user_shard(ids[4])
        gone = s.scalars(delete(User).where(User.id.in_(ids[4:])).returning(User)).all()
        assert sorted(o.id for o in gone) == sorted(ids[4:])
        # (a plain Session returns new objects for deleted rows too: the deleted ones
        # left the identity map first; they are keyed by shard here all the same)
        assert all(inspect(o).key[2] == user_shard(o.id) for o in gone)
        s.commit()
    names = stored(cluster, "SELECT id, name FROM users")
    assert set().union(*names.values()) == {(i, "u") for i in ids[:4]}


def test_make_transient_forgets_the_shard(cluster: Cluster) -> None:
    Session = cluster.session_factory()
    old, new_detached, new_attached = 1, 2, 3
    while user_shard(new_detached) == user_shard(old):
        new_detached += 3
    while user_shard(new_attached) in (user_shard(old), user_shard(new_detached)):
        new_attached += 1
    with Session.begin() as s:
        s.execute(insert(User), [{"id": old, "name": "original"}])
    with Session.begin() as s:
        u = s.get(User, old)
        assert u is not None
        s.expunge(u)
        make_transient(u)  # detached first: no session event sees this
        u.id = new_detached
        s.add(u)
    with Session.begin() as s:
        u = s.get(User, old)
        assert u is not None
        make_transient(u)  # still in the session
        u.id = new_attached
        s.add(u)
    assert stored(cluster, "SELECT id FROM users") == by_shard(
        {old: user_shard(old), new_detached: user_shard(new_detached),
         new_attached: user_shard(new_attached)})


def test_merge_of_a_transient_copy_finds_the_row_of_its_new_key(cluster: Cluster) -> None:
    """``merge()`` of a ``make_transient`` copy given the key of a row stored on another
    shard updates that row: its identity lookup does not use the shard of the old key
    (it did, found nothing there, and inserted a second row with that key)."""
    Session = cluster.session_factory()
    old, other = 1, 2
    while user_shard(other) == user_shard(old):
        other += 1
    with Session.begin() as s:
        s.execute(insert(User), [{"id": old, "name": "old"}, {"id": other, "name": "other"}])
    with Session.begin() as s:
        u = s.get(User, old)
        assert u is not None
        s.expunge(u)
        make_transient(u)
        u.id, u.name = other, "merged"
        merged = s.merge(u)
        assert inspect(merged).key == (User, (other,), user_shard(other))
        assert merged in s and not inspect(merged).pending
    assert stored(cluster, "SELECT id, name FROM users") == by_shard(
        {(old, "old"): user_shard(old), (other, "merged"): user_shard(other)})


def test_merge_without_load_keys_a_detached_object_with_its_shard(cluster: Cluster) -> None:
    """``merge(obj, load=False)`` of a detached object keyed without a shard
    (``make_transient_to_detached``) is keyed with its shard's token: ``get()`` then
    returns the same object, one UPDATE is sent. It was keyed ``(User, (id,), None)``
    and ``get()`` loaded a second copy (attack 12, break 5)."""
    Session = cluster.session_factory()
    uid = next(i for i in range(1, 99) if user_shard(i) != "s0")
    with Session.begin() as s:
        s.execute(insert(User), [{"id": uid, "name": "stored"}])
    with Session() as s:
        d = User(id=uid, name="stored")
        make_transient_to_detached(d)
        merged = s.merge(d, load=False)
        assert inspect(merged).key == (User, (uid,), user_shard(uid))
        assert inspect(d).key == (User, (uid,), None)  # (the given object is left as it was)
        assert s.get(User, uid) is merged
        assert len(s.identity_map) == 1
        merged.name = "merged"
        s.commit()
    assert stored(cluster, "SELECT id, name FROM users") == by_shard(
        {(uid, "merged"): user_shard(uid)})


# --------------------------------------------------------------------------------------------
# UPDATE by primary key, the Session's bulk methods, upserts


def test_bulk_update_by_primary_key(cluster: Cluster) -> None:
    Session = cluster.session_factory()
    with Session() as s:
        s.execute(insert(User), [{"id": i, "name": "n"} for i in range(1, 31)])
        s.commit()
        loaded = s.get(User, 5)
        assert loaded is not None and loaded.name == "n"
        cluster.reset_log()
        s.execute(update(User), [{"id": i, "name": f"x{i}"} for i in range(1, 31)])
        assert cluster.touched("UPDATE") == set(SHARDS)
        assert loaded.name == "x5"  # synchronized in the identity map, as SQLAlchemy does
        s.commit()
    assert set().union(*stored(cluster, "SELECT id, name FROM users").values()) == {
        (i, f"x{i}") for i in range(1, 31)}


def test_session_bulk_methods(cluster: Cluster) -> None:
    Session = cluster.session_factory()
    with Session.begin() as s:
        s.bulk_save_objects([User(id=i, name="b") for i in range(1, 21)])
        s.bulk_insert_mappings(Order, [{"id": 500 + i, "user_id": i, "amount": 1}
                                       for i in range(1, 21)])
    assert stored(cluster, "SELECT id FROM users") == by_shard(
        {i: user_shard(i) for i in range(1, 21)})
    assert stored(cluster, "SELECT id FROM orders") == by_shard(
        {500 + i: user_shard(i) for i in range(1, 21)})
    with Session.begin() as s:
        objs = s.scalars(select(User).where(User.id.in_(range(1, 11)))).all()
        for o in objs:
            o.name = "saved"
        s.bulk_save_objects(objs)  # persistent: UPDATE on each object's shard
        s.bulk_update_mappings(User, [{"id": i, "name": "mapped"} for i in range(11, 21)])
        s.bulk_update_mappings(Order, [{"id": 500 + i, "user_id": i, "amount": 9}
                                       for i in range(1, 21)])
    names = set().union(*stored(cluster, "SELECT id, name FROM users").values())
    assert names == {(i, "saved" if i < 11 else "mapped") for i in range(1, 21)}
    assert set().union(*stored(cluster, "SELECT amount FROM orders").values()) == {9}
    with Session() as s:
        new = [User(id=i, name="rd") for i in range(40, 46)]
        s.bulk_save_objects(new, return_defaults=True)
        for o in new:
            assert inspect(o).key[2] == user_shard(o.id)
            assert s.get(User, o.id) is not None
        s.commit()
    assert stored(cluster, "SELECT id FROM users WHERE id >= 40") == by_shard(
        {i: user_shard(i) for i in range(40, 46)})


def _upsert(engine: Engine, rows: list[dict[str, Any]]) -> Any:
    dialect = engine.dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        stmt = pg_insert(User)
        return stmt.on_conflict_do_update(index_elements=[User.id],
                                          set_={"name": stmt.excluded.name})
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        lite = sqlite_insert(User)
        return lite.on_conflict_do_update(index_elements=[User.id],
                                          set_={"name": lite.excluded.name})
    from sqlalchemy.dialects.mysql import insert as mysql_insert

    my = mysql_insert(User)
    return my.on_duplicate_key_update(name=my.inserted.name)


def test_upsert_changing_the_shard_key_is_refused(cluster: Cluster) -> None:
    """An upsert of a class whose shard key is not its primary key, for a row another
    shard holds under a key of its own: RoutingError before anything is written (it
    inserted a second row with that primary key on the new key's shard: attack 12,
    break 4). New rows, and rows on their own shard, are upserted as before."""
    from sqlalchemy.dialects.postgresql import insert as pg_insert
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    # (days >= 200 are on s2: PostgreSQL in the server cluster, SQLite in the other)
    make = pg_insert if cluster.engines["s2"].dialect.name == "postgresql" else sqlite_insert
    stmt = make(Event)
    stmt = stmt.on_conflict_do_update(index_elements=[Event.id],
                                      set_={"day": stmt.excluded.day, "what": "upserted"})
    Session = cluster.session_factory()
    with Session.begin() as s:
        s.execute(insert(Event), [{"id": 1, "day": 10, "what": "a"},
                                  {"id": 2, "day": 250, "what": "b"}])
    with Session() as s:
        cluster.reset_log()
        with pytest.raises(RoutingError, match="shard key"):
            s.execute(stmt, [{"id": 1, "day": 250, "what": "x"}])
        assert cluster.touched("INSERT") == set()
        s.rollback()
        s.execute(stmt, [{"id": 2, "day": 260, "what": "x"}, {"id": 3, "day": 270, "what": "x"}])
        s.commit()
    assert stored(cluster, "SELECT id, day, what FROM events") == by_shard(
        {(1, 10, "a"): "s0", (2, 260, "upserted"): "s2", (3, 270, "x"): "s2"})


def test_upserts_routed_by_key(cluster: Cluster) -> None:
    Session = cluster.session_factory()
    with Session.begin() as s:
        s.execute(insert(User), [{"id": i, "name": "old"} for i in range(1, 11)])
    # each dialect's upsert with rows whose shards have that dialect (one new, one old
    # key at least per shard)
    by_dialect: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for i in range(5, 31):
        by_dialect[cluster.engines[user_shard(i)].dialect.name].append(
            {"id": i, "name": "new"})
    with Session.begin() as s:
        for dialect, rows in by_dialect.items():
            engine = next(e for e in cluster.engines.values() if e.dialect.name == dialect)
            s.execute(_upsert(engine, rows), rows)
    names = set().union(*stored(cluster, "SELECT id, name FROM users").values())
    assert names == {(i, "old" if i < 5 else "new") for i in range(1, 31)}
    assert stored(cluster, "SELECT id FROM users") == by_shard(
        {i: user_shard(i) for i in range(1, 31)})


def test_upsert_skipping_rows_sorted_by_parameter_order(cluster: Cluster) -> None:
    """``ON CONFLICT DO NOTHING`` with ``sort_by_parameter_order=True``: a shard returns
    fewer rows than it was sent, so positions across shards are unknown; the inserted
    rows still all come back, each shard's in parameter order (no error after the rows
    were written)."""
    from sqlalchemy.dialects.postgresql import insert as pg_insert
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    dialect = "sqlite" if cluster.engines[SHARDS[0]].dialect.name == "sqlite" else "postgresql"
    shards = [n for n, e in cluster.engines.items() if e.dialect.name == dialect]
    ids = [i for i in range(1, 60) if user_shard(i) in shards][:12]
    assert len({user_shard(i) for i in ids}) >= 2
    existing = ids[1::3]
    Session = cluster.session_factory()
    with Session.begin() as s:
        s.execute(insert(User), [{"id": i, "name": "old"} for i in existing])
    make = sqlite_insert if dialect == "sqlite" else pg_insert
    stmt = make(User).on_conflict_do_nothing().returning(User.id, sort_by_parameter_order=True)
    with Session.begin() as s:
        got = s.scalars(stmt, [{"id": i, "name": "new"} for i in ids]).all()
    new = [i for i in ids if i not in existing]
    assert sorted(got) == sorted(new)
    for shard in shards:
        assert [i for i in got if user_shard(i) == shard] == [
            i for i in new if user_shard(i) == shard]


# --------------------------------------------------------------------------------------------
# the drop-in constructor: rows routed by the shard chooser


def _dropin(cluster: Cluster, chooser: Any, cls: type[Any] = ShardedSession) -> Any:
    def identity_chooser(mapper: Any, primary_key: Any, **kw: Any) -> list[str]:
        return list(SHARDS)

    def execute_chooser(context: Any) -> list[str]:
        return list(SHARDS)

    kw = {"atomic": "best_effort"} if cls is ShardedSession else {}
    return sessionmaker(class_=cls, shards=cluster.engines, shard_chooser=chooser,
                        identity_chooser=identity_chooser, execute_chooser=execute_chooser,
                        **kw)


def _by_id(mapper: Any, instance: Any, clause: Any = None) -> str:
    return SHARDS[instance.id % 3]


def test_dropin_routes_rows_by_the_shard_chooser(cluster: Cluster) -> None:
    Session = _dropin(cluster, _by_id)
    with Session.begin() as s:
        s.execute(insert(User), [{"id": i, "name": "d"} for i in range(1, 16)])
        s.bulk_insert_mappings(User, [{"id": i, "name": "m"} for i in range(16, 22)])
        objs = s.scalars(insert(User).returning(User),
                         [{"id": i, "name": "r"} for i in range(22, 28)]).all()
        for o in objs:
            assert inspect(o).key[2] == SHARDS[o.id % 3]
        s.execute(update(User), [{"id": i, "name": "u"} for i in range(1, 4)])
    assert stored(cluster, "SELECT id FROM users") == by_shard(
        {i: SHARDS[i % 3] for i in range(1, 28)})
    names = set().union(*stored(cluster, "SELECT id, name FROM users WHERE id < 4").values())
    assert names == {(1, "u"), (2, "u"), (3, "u")}
    # SQLAlchemy's own sharded session refuses these statements outright
    theirs = _dropin(cluster, _by_id, horizontal_shard.ShardedSession)
    with theirs() as s, pytest.raises(NotImplementedError):
        s.execute(insert(User), [{"id": 100, "name": "x"}])


def test_dropin_core_insert_rows_routed_by_the_shard_chooser(cluster: Cluster) -> None:
    """A Core ``insert(table)`` with rows that the drop-in execute chooser sends to every
    shard: each row stored once, on the shard the shard chooser names for it (it was
    refused; SQLAlchemy's sharded session stores every row on every shard)."""
    Session = _dropin(cluster, _by_id)
    with Session.begin() as s:
        result = s.execute(insert(User.__table__), [{"id": i, "name": "c"} for i in range(1, 13)])
        assert result.rowcount in (12, -1)
        s.execute(insert(User.__table__), {"id": 13, "name": "one"})  # one parameter dict
    assert stored(cluster, "SELECT id FROM users") == by_shard(
        {i: SHARDS[i % 3] for i in range(1, 14)})


def test_dropin_core_insert_unroutable_rows_send_nothing(cluster: Cluster) -> None:
    unmapped = Table("unmapped_rows", MetaData(), Column("id", Integer, primary_key=True))

    def two_shards(context: Any) -> list[str]:
        return ["s0", "s1"]

    narrow = sessionmaker(class_=ShardedSession, shards=cluster.engines, shard_chooser=_by_id,
                          identity_chooser=lambda *a, **k: list(SHARDS),
                          execute_chooser=two_shards, atomic="best_effort")
    with _dropin(cluster, _by_id)() as s, narrow() as n:
        cluster.reset_log()
        with pytest.raises(RoutingError, match="no mapped class maps the table"):
            s.execute(insert(unmapped), [{"id": 1}, {"id": 2}])
        with pytest.raises(RoutingError, match="did not name"):  # id 2 belongs on s2
            n.execute(insert(User.__table__), [{"id": i, "name": "x"} for i in range(3)])
        assert cluster.touched("INSERT") == set()


def test_dropin_unroutable_row_sends_nothing(cluster: Cluster) -> None:
    def unknown(mapper: Any, instance: Any, clause: Any = None) -> str:
        return "nowhere" if instance.id == 5 else SHARDS[instance.id % 3]

    def failing(mapper: Any, instance: Any, clause: Any = None) -> str:
        return SHARDS[instance.region]  # no such attribute

    rows = [{"id": i, "name": "d"} for i in range(1, 8)]
    calls: list[Callable[[Any], object]] = [
        lambda s: s.execute(insert(User), rows),
        lambda s: s.bulk_insert_mappings(User, rows),
        # (bulk_save_objects raised the chooser's own AttributeError: attack finding)
        lambda s: s.bulk_save_objects([User(**r) for r in rows]),
    ]
    for chooser, error in ((unknown, UnknownShardError), (failing, RoutingError)):
        for call in calls:
            with _dropin(cluster, chooser)() as s:
                cluster.reset_log()
                with pytest.raises(error) as raised:
                    call(s)
                assert cluster.touched("INSERT") == set()
                if chooser is failing:  # the library's error, chained from the chooser's
                    assert isinstance(raised.value.__cause__, AttributeError)


def test_upsert_returning_populate_existing(cluster: Cluster) -> None:
    Session = cluster.session_factory()
    ids = pg_ids(cluster, range(1, 30))[:6]
    dialect_ids = [i for i in ids if cluster.engines[user_shard(i)].dialect.name
                   == cluster.engines[user_shard(ids[0])].dialect.name]
    with Session() as s:
        s.execute(insert(User), [{"id": i, "name": "old"} for i in dialect_ids[:2]])
        s.commit()
        loaded = s.get(User, dialect_ids[0])
        assert loaded is not None and loaded.name == "old"
        rows = [{"id": i, "name": "new"} for i in dialect_ids]
        stmt = _upsert(cluster.engines[user_shard(dialect_ids[0])], rows).returning(User)
        objs = s.scalars(stmt, rows, execution_options={"populate_existing": True}).all()
        assert sorted(o.id for o in objs) == sorted(dialect_ids)
        assert loaded in objs and loaded.name == "new"  # refreshed in place
        s.commit()


def test_replicated_and_pinned_rows_updated_by_key(cluster: Cluster) -> None:
    Session = cluster.session_factory()
    with Session.begin() as s:
        s.execute(insert(Country), [{"code": "SE", "name": "Sweden"},
                                    {"code": "NO", "name": "Norway"}])
        s.execute(insert(AuditLog), [{"id": 1, "message": "a"}, {"id": 2, "message": "b"}])
    with Session.begin() as s:
        s.execute(update(Country), [{"code": "SE", "name": "Sverige"},
                                    {"code": "NO", "name": "Norge"}])
        s.bulk_update_mappings(AuditLog, [{"id": 1, "message": "z"}, {"id": 2, "message": "z"}])
    assert stored(cluster, "SELECT name FROM countries") == {
        s: {"Sverige", "Norge"} for s in SHARDS}
    assert stored(cluster, "SELECT message FROM audit_log") == {"s0": set(), "s1": set(),
                                                                "s2": {"z"}}
