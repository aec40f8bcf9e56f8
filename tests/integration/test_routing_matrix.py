"""Routing matrix: each strategy x each backend x get/insert/update/delete/select.

Every placement is verified by reading each shard's tables directly with plain SQL, and
every routed statement by the statements each shard's engine actually received.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import aliased

from shardsession import HashSharding

from ._models import (
    TENANTS,
    AuditLog,
    Cluster,
    Country,
    Event,
    Order,
    Tenant,
    User,
    build_cluster,
    shard_urls,
)


@pytest.fixture(params=["sqlite", "postgresql", "mysql"])
def cluster(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Cluster]:
    yield from build_cluster(shard_urls(request, request.param, tmp_path))


def expected_user_shard(user_id: int) -> str:
    return HashSharding("id", ["s0", "s1", "s2"]).shard_for(user_id)


def test_hash_placement_insert_get_select_update_delete(cluster: Cluster) -> None:
    Session = cluster.session_factory()
    ids = list(range(1, 31))
    with Session.begin() as s:
        for i in ids:
            u = User(id=i, name=f"u{i}")
            u.orders.append(Order(id=1000 + i, amount=i))
            s.add(u)
    # placement: each user and its order exactly on the hashed shard, nowhere else
    for i in ids:
        want = expected_user_shard(i)
        assert set(cluster.where(f"SELECT id FROM users WHERE id = {i}")) == {want}
        assert set(cluster.where(f"SELECT user_id FROM orders WHERE id = {1000 + i}")) == {want}
    assert len({expected_user_shard(i) for i in ids}) == 3  # the data really is spread

    target = 7
    want = expected_user_shard(target)
    with Session() as s:
        cluster.reset_log()
        u = s.get(User, target)
        assert u is not None and u.name == "u7"
        assert cluster.touched("SELECT") == {want}

        cluster.reset_log()
        found = s.scalars(select(User).where(User.id == target)).all()
        assert [x.id for x in found] == [target]
        assert cluster.touched("SELECT") == {want}

        cluster.reset_log()
        some = sorted(x.id for x in s.scalars(select(User).where(User.id.in_([3, 4, 5]))))
        assert some == [3, 4, 5]
        assert cluster.touched("SELECT") == {expected_user_shard(i) for i in (3, 4, 5)}

        cluster.reset_log()
        orders = s.scalars(select(Order).where(Order.user_id == target)).all()
        assert [o.id for o in orders] == [1000 + target]
        assert cluster.touched("SELECT") == {want}

        cluster.reset_log()
        everyone = s.scalars(select(User)).all()
        assert sorted(x.id for x in everyone) == ids
        assert cluster.touched("SELECT") == {"s0", "s1", "s2"}

        cluster.reset_log()
        u.name = "seven"
        s.commit()
        assert cluster.touched("UPDATE") == {want}
    assert cluster.where(f"SELECT name FROM users WHERE id = {target}") == {want: [("seven",)]}

    with Session() as s:
        cluster.reset_log()
        s.execute(update(User).where(User.id == 8).values(name="eight"))
        s.commit()
        assert cluster.touched("UPDATE") == {expected_user_shard(8)}
        cluster.reset_log()
        s.execute(delete(Order).where(Order.user_id == 9))
        s.execute(delete(User).where(User.id == 9))
        s.commit()
        assert cluster.touched("DELETE") == {expected_user_shard(9)}
        cluster.reset_log()
        victim = s.get(User, 10)
        assert victim is not None
        for o in list(victim.orders):
            s.delete(o)
        s.delete(victim)
        s.commit()
        assert cluster.touched("DELETE") == {expected_user_shard(10)}
    assert cluster.where("SELECT name FROM users WHERE id = 8") == {
        expected_user_shard(8): [("eight",)]
    }
    assert cluster.where("SELECT id FROM users WHERE id IN (9, 10)") == {}
    assert cluster.where("SELECT id FROM orders WHERE user_id IN (9, 10)") == {}


def test_range_placement(cluster: Cluster) -> None:
    Session = cluster.session_factory()
    days = {1: "s0", 99: "s0", 100: "s1", 199: "s1", 200: "s2", 5000: "s2"}
    with Session.begin() as s:
        s.add_all(Event(id=d, day=d, what=f"e{d}") for d in days)
    for d, want in days.items():
        assert set(cluster.where(f"SELECT id FROM events WHERE day = {d}")) == {want}
    with Session() as s:
        cluster.reset_log()
        assert [e.id for e in s.scalars(select(Event).where(Event.day == 150))] == []
        assert cluster.touched("SELECT") == {"s1"}
        cluster.reset_log()
        s.execute(update(Event).where(Event.day == 199).values(what="late"))
        s.execute(delete(Event).where(Event.day.in_([1, 5000])))
        s.commit()
        assert cluster.touched("UPDATE") == {"s1"}
        assert cluster.touched("DELETE") == {"s0", "s2"}
    assert cluster.where("SELECT what FROM events WHERE id = 199") == {"s1": [("late",)]}
    assert cluster.where("SELECT id FROM events WHERE id IN (1, 5000)") == {}


def test_directory_placement(cluster: Cluster) -> None:
    Session = cluster.session_factory()
    with Session.begin() as s:
        s.add_all(Tenant(code=c, title=c.title()) for c in TENANTS)
    for code, want in TENANTS.items():
        assert set(cluster.where(f"SELECT code FROM tenants WHERE code = '{code}'")) == {want}
    with Session() as s:
        cluster.reset_log()
        t = s.get(Tenant, "globex")
        assert t is not None and t.title == "Globex"
        assert cluster.touched("SELECT") == {"s2"}
        t.title = "Globex Corp"
        s.delete(s.get(Tenant, "acme"))
        s.commit()
    assert cluster.where("SELECT title FROM tenants WHERE code = 'globex'") == {
        "s2": [("Globex Corp",)]
    }
    assert cluster.where("SELECT code FROM tenants WHERE code = 'acme'") == {}


def test_broadcast_and_pinned_placement(cluster: Cluster) -> None:
    Session = cluster.session_factory()
    with Session.begin() as s:
        s.add(Country(code="NO", name="Norway"))
        s.add(AuditLog(id=1, message="created"))
    # broadcast: on every shard; pinned: only on s2
    assert set(cluster.where("SELECT code FROM countries")) == {"s0", "s1", "s2"}
    assert set(cluster.where("SELECT id FROM audit_log")) == {"s2"}
    with Session() as s:
        cluster.reset_log()
        c = s.get(Country, "NO")
        assert c is not None and c.name == "Norway"
        assert len(cluster.touched("SELECT")) == 1  # read from one shard
        c.name = "Noreg"
        s.commit()
        assert cluster.touched("UPDATE") == {"s0", "s1", "s2"}
    assert cluster.where("SELECT name FROM countries") == {
        "s0": [("Noreg",)],
        "s1": [("Noreg",)],
        "s2": [("Noreg",)],
    }
    with Session() as s:
        cluster.reset_log()
        changed = s.execute(update(Country).values(name="Norge"))
        assert changed.rowcount == 1  # one row, however many copies
        core = s.execute(Country.__table__.update().values(name="Norge"))
        assert core.rowcount == 1
        s.delete(s.get(AuditLog, 1))
        s.commit()
        assert cluster.touched("UPDATE") == {"s0", "s1", "s2"}
        assert cluster.touched("DELETE") == {"s2"}
        s.delete(s.get(Country, "NO"))
        s.commit()
    assert cluster.where("SELECT code FROM countries") == {}
    assert cluster.where("SELECT id FROM audit_log") == {}


def test_children_follow_parent_through_collection(cluster: Cluster) -> None:
    Session = cluster.session_factory()
    with Session.begin() as s:
        u = User(id=41, name="parent")
        s.add(u)
    with Session.begin() as s:
        parent = s.get(User, 41)
        assert parent is not None
        parent.orders.append(Order(id=4100, amount=1))
    want = expected_user_shard(41)
    assert set(cluster.where("SELECT id FROM orders WHERE id = 4100")) == {want}


def _one_database_rowcount(cluster: Cluster, rows: list[dict[str, Any]]) -> int:
    """The ``rowcount`` one shard's database reports for a Core INSERT of ``rows`` (one
    parameter set, or an executemany) with this cluster's driver: ``len(rows)``, or -1
    where the driver does not keep it (psycopg 3 resets it when SQLAlchemy closes the
    cursor of an INSERT without RETURNING)."""
    from sqlalchemy import insert

    with next(iter(cluster.engines.values())).connect() as c:
        count = c.execute(insert(User.__table__), rows if len(rows) != 1 else rows[0]).rowcount
        c.rollback()
    assert count in (len(rows), -1), count
    return count


def test_bulk_insert_rows_routed_by_key(cluster: Cluster) -> None:
    from sqlalchemy import insert

    # as one database would answer with this driver (see _one_database_rowcount)
    many = _one_database_rowcount(cluster, [{"id": -1, "name": "x"}, {"id": -2, "name": "y"}])
    many = 10 if many > 0 else -1
    one = _one_database_rowcount(cluster, [{"id": -1, "name": "x"}])
    Session = cluster.session_factory()
    rows = [{"id": i, "name": f"bulk{i}"} for i in range(200, 230)]
    with Session.begin() as s:
        s.execute(insert(User), rows)
        s.execute(insert(Country), [{"code": "SE", "name": "Sweden"}])
        # a Core INSERT spread over the shards reports all its rows, as one database would
        core = s.execute(insert(User.__table__),
                         [{"id": i, "name": f"core{i}"} for i in range(230, 240)])
        assert core.rowcount == many and not core.returns_rows
        countries = s.execute(insert(Country.__table__), [{"code": "NO", "name": "Norway"}])
        assert countries.rowcount == one  # one row, replicated to every shard
    for i in range(200, 230):
        assert set(cluster.where(f"SELECT id FROM users WHERE id = {i}")) == {
            expected_user_shard(i)
        }
    assert set(cluster.where("SELECT code FROM countries WHERE code = 'SE'")) == {"s0", "s1", "s2"}


def test_core_table_statements_are_pruned(cluster: Cluster) -> None:
    users = User.__table__
    Session = cluster.session_factory()
    with Session.begin() as s:
        s.add_all(User(id=i, name=f"c{i}") for i in range(300, 310))
    with Session() as s:
        cluster.reset_log()
        rows = s.execute(select(users.c.name).where(users.c.id == 305)).all()
        assert [r.name for r in rows] == ["c305"]
        assert cluster.touched("SELECT") == {expected_user_shard(305)}
        cluster.reset_log()
        s.execute(users.update().where(users.c.id == 306).values(name="six"))
        s.commit()
        assert cluster.touched("UPDATE") == {expected_user_shard(306)}


@pytest.mark.parametrize("backend", ["sqlite"])
def test_joins_need_colocated_placement(tmp_path: Any, backend: str) -> None:
    from shardsession import UnsupportedQueryError

    gen = build_cluster([f"sqlite:///{tmp_path}/{s}.db" for s in ("s0", "s1", "s2")])
    cluster = next(gen)
    Session = cluster.session_factory()
    with Session.begin() as s:
        for i in range(1, 7):
            u = User(id=i, name=f"j{i}")
            u.orders.append(Order(id=600 + i, amount=i))
            s.add(u)
        s.add(Country(code="DK", name="Denmark"))
        s.add(Event(id=1, day=1, what="x"))
    with Session() as s:
        # children placed with their parent: the join is evaluated on each shard, exactly
        rows = s.execute(
            select(User.name, Order.amount).join(User.orders).order_by(Order.amount.desc())
        ).all()
        assert [r.amount for r in rows] == [6, 5, 4, 3, 2, 1]
        # a broadcast table joins with anything
        n = s.scalar(
            select(func.count()).select_from(User).join(Country, Country.code != User.name)
        )
        assert n == 6
        # tables placed independently, or a sharded table joined with itself: refused
        with pytest.raises(UnsupportedQueryError):
            s.execute(select(User.id, Event.id).join(Event, Event.day == User.id)).all()
        u2 = aliased(User)
        with pytest.raises(UnsupportedQueryError):
            s.execute(select(User.id).join(u2, u2.id == User.id + 1)).all()
    for _ in gen:
        pass


def test_single_shard_join_of_independent_tables_is_refused(tmp_path: Any) -> None:
    from shardsession import UnsupportedQueryError

    gen = build_cluster([f"sqlite:///{tmp_path}/{s}.db" for s in ("s0", "s1", "s2")])
    cluster = next(gen)
    Session = cluster.session_factory()
    with Session() as s:
        # both sides pinned to one shard each by the WHERE clause: intersecting the shards
        # would answer "no rows" without asking; the pair may well exist across shards
        stmt = (
            select(User.id, AuditLog.id)
            .join(AuditLog, AuditLog.id == User.id)
            .where(User.id == 5)
        )
        with pytest.raises(UnsupportedQueryError, match="placed independently"):
            s.execute(stmt).all()
    for _ in gen:
        pass
