"""Joins of co-located tables: exact along the placement relationship, refused otherwise.

Orders follow their user (foreign key ``orders.user_id``), items follow their order. A
join along those keys finds both rows on one shard, so the merged answer equals one
database's (checked against an oracle holding every row). Joined on other columns, or not
joined at all, rows one database would pair live on different shards: the session refuses
with ``UnsupportedQueryError`` before asking any shard.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import (
    ForeignKey,
    Integer,
    String,
    create_engine,
    delete,
    exists,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.exc import SAWarning
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    aliased,
    joinedload,
    mapped_column,
    relationship,
)

from shardsession import Broadcast, Follows, HashSharding, Pinned, Placement, ShardedSession
from shardsession.exc import UnsupportedQueryError


class _Base(DeclarativeBase):
    pass


class User(_Base):
    __tablename__ = "jp_users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(20))
    region: Mapped[int] = mapped_column(Integer)
    orders: Mapped[list[Order]] = relationship(back_populates="user", order_by="Order.id")


class Order(_Base):
    __tablename__ = "jp_orders"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    user_id: Mapped[int] = mapped_column(ForeignKey("jp_users.id"))
    amount: Mapped[int] = mapped_column(Integer)
    user: Mapped[User] = relationship(back_populates="orders")
    items: Mapped[list[Item]] = relationship(back_populates="order")


class Item(_Base):
    __tablename__ = "jp_items"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    order_id: Mapped[int] = mapped_column(ForeignKey("jp_orders.id"))
    qty: Mapped[int] = mapped_column(Integer)
    order: Mapped[Order] = relationship(back_populates="items")


class Note(_Base):
    __tablename__ = "jp_notes"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    text: Mapped[str] = mapped_column(String(20))


class Region(_Base):
    __tablename__ = "jp_regions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(20))


class Tag(_Base):
    __tablename__ = "jp_tags"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    label: Mapped[str] = mapped_column(String(20))


def _data() -> list[Any]:
    out: list[Any] = []
    for u in range(1, 13):
        user = User(id=u, name=f"u{u}", region=u % 4)
        for k in range(3):
            oid = u * 10 + k
            order = Order(id=oid, amount=(u * 7 + k * 5) % 23, user=user)
            order.items = [Item(id=oid * 10 + j, qty=j + 1) for j in range(2)]
        out.append(user)
    out += [Note(id=1, text="n1"), Note(id=2, text="n2"), Tag(id=1, label="t1")]
    out += [Region(id=r, name=f"r{r}") for r in range(5)]
    return out


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[tuple[Session, Session]]:
    shards = {f"s{i}": create_engine(f"sqlite:///{tmp_path / f's{i}.db'}") for i in range(3)}
    oracle = create_engine(f"sqlite:///{tmp_path / 'oracle.db'}")
    for e in (*shards.values(), oracle):
        _Base.metadata.create_all(e)
    placement = Placement({User: HashSharding(User.id), Order: Follows(), Item: Follows(),
                           Note: Pinned("s1"), Tag: Pinned("s1"), Region: Broadcast()})
    with ShardedSession(shards=shards, placement=placement, atomic="best_effort") as s:
        s.add_all(_data())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SQLite files: not atomic, said and accepted
            s.commit()
    with Session(oracle) as o:
        o.add_all(_data())
        o.commit()
    with ShardedSession(shards=shards, placement=placement) as s, Session(oracle) as o:
        yield s, o
    for e in (*shards.values(), oracle):
        e.dispose()


ALONG = {
    "relationship join": lambda: select(User.name, Order.amount).join(User.orders)
    .order_by(Order.amount, Order.id),
    "explicit ON with the foreign key": lambda: select(Order.id, User.name)
    .join(User, Order.user_id == User.id).order_by(Order.id),
    "foreign key equality in WHERE": lambda: select(User.id, Order.id)
    .where(User.id == Order.user_id, Order.amount > 5).order_by(Order.id),
    "two levels": lambda: select(Item.id, User.name).join(Item.order).join(Order.user)
    .where(Item.qty == 2).order_by(Item.id),
    "join with an extra condition": lambda: select(User.id, Order.id)
    .join(Order, (Order.user_id == User.id) & (Order.amount > 10)).order_by(Order.id),
    "pinned tables, any join": lambda: select(Note.text, Tag.label)
    .join(Tag, Tag.id <= Note.id).order_by(Note.id),
}

APART = {
    "cross product": lambda: select(User.id, Order.id),
    "other columns": lambda: select(User.id, Order.id).where(Order.amount == User.id),
    "ON other columns": lambda: select(Order.id).join(User, Order.amount == User.id),
    "foreign key only under OR": lambda: select(User.id, Order.id)
    .where(or_(User.id == Order.user_id, Order.amount == 1)),
    "grandchild not joined": lambda: select(Item.id, User.id).join(Order.user)
    .select_from(Order).join(Item, Item.qty == Order.amount),
}


@pytest.mark.parametrize("name", list(ALONG))
def test_join_along_placement_equals_one_database(sessions: Any, name: str) -> None:
    s, oracle = sessions
    stmt = ALONG[name]()
    assert s.execute(stmt).all() == oracle.execute(stmt).all()


@pytest.mark.parametrize("name", list(APART))
def test_join_not_along_placement_is_refused(sessions: Any, name: str) -> None:
    s, oracle = sessions
    stmt = APART[name]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SAWarning)  # "cartesian product", for the oracle
        assert oracle.execute(stmt).all()  # one database would answer with rows
    for _ in range(2):  # the second time from the cached verdict
        with pytest.raises(UnsupportedQueryError, match="placement relationship"):
            s.execute(stmt).all()


def test_eager_joined_children_equal_one_database(sessions: Any) -> None:
    s, oracle = sessions
    stmt = select(User).options(joinedload(User.orders)).order_by(User.id)
    ours = [(u.id, [o.id for o in u.orders]) for u in s.scalars(stmt).unique()]
    want = [(u.id, [o.id for o in u.orders]) for u in oracle.scalars(stmt).unique()]
    assert ours == want


SUBQUERY_ALONG = {
    "any() over the children": lambda: select(User.id).where(User.orders.any(Order.amount > 15))
    .order_by(User.id),
    "has() on the parent": lambda: select(Order.id).where(Order.user.has(User.name == "u3"))
    .order_by(Order.id),
    "IN on the foreign key": lambda: select(User.name)
    .where(User.id.in_(select(Order.user_id).where(Order.amount > 18))).order_by(User.name),
    "NOT IN on the key": lambda: select(Order.id)
    .where(Order.user_id.not_in(select(User.id).where(User.name == "u5"))).order_by(Order.id),
}

SUBQUERY_APART = {
    "IN on another column": lambda: select(User.id)
    .where(User.id.in_(select(Order.amount))),
    "EXISTS correlated on another column": lambda: select(User.id)
    .where(exists().where(Order.amount == User.id)),
}


@pytest.mark.parametrize("name", list(SUBQUERY_ALONG))
def test_subquery_along_placement_equals_one_database(sessions: Any, name: str) -> None:
    s, oracle = sessions
    stmt = SUBQUERY_ALONG[name]()
    want = oracle.execute(stmt).all()
    assert want and s.execute(stmt).all() == want


@pytest.mark.parametrize("name", list(SUBQUERY_APART))
def test_subquery_not_along_placement_is_refused(sessions: Any, name: str) -> None:
    s, oracle = sessions
    stmt = SUBQUERY_APART[name]()
    assert oracle.execute(stmt).all()  # one database pairs rows across users
    with pytest.raises(UnsupportedQueryError, match="placement relationship"):
        s.execute(stmt).all()


def test_replicated_table_joined_to_sharded_one_fans_out(sessions: Any) -> None:
    """Selecting only a broadcast table's columns, with a sharded table joined in: every
    shard's pairs are needed (before, one shard was asked and most pairs were lost)."""
    s, oracle = sessions
    stmt = select(Region.name).join(User, User.region == Region.id)
    assert sorted(s.scalars(stmt).all()) == sorted(oracle.scalars(stmt).all())
    assert len(s.scalars(stmt).all()) == 12


@pytest.mark.parametrize("where", ["in", "exists", "pinned"])
def test_subquery_over_other_shards_is_refused(sessions: Any, where: str) -> None:
    """The statement is routed by its own FROM list; a subquery reading sharded tables
    it is not routed by would see one shard's rows (before: a silently short answer)."""
    s, oracle = sessions
    if where == "in":
        stmt = select(Region.name).where(Region.id.in_(select(User.region)))
    elif where == "exists":
        stmt = select(Region.name).where(exists().where(User.region == Region.id))
    else:  # a table pinned to s1 read from a statement routed by users
        stmt = select(User.id).where(User.id.in_(select(Note.id)))
    assert oracle.execute(stmt).all()
    with pytest.raises(UnsupportedQueryError, match="subquery reads"):
        s.execute(stmt).all()


PRUNED_APART = {
    "IN on another column": lambda: select(User.id)
    .where(User.id == 5, User.id.in_(select(Order.amount))),
    "IN on another column of the same table": lambda: select(User.id)
    .where(User.id == 5, User.region.in_(select(User.region).where(User.id == 9))),
}

#: uncorrelated scalar and EXISTS subqueries of a statement pruned to one shard: computed
#: first through the session, as in a fan-out (they were refused before session 6)
PRUNED_COMPUTED_FIRST = {
    "uncorrelated EXISTS": lambda: select(User.id)
    .where(User.id == 7, exists(select(Order.id).where(Order.user_id == 3))),
    "global aggregate": lambda: select(User.id)
    .where(User.id == 5, User.id < select(func.max(Order.amount)).scalar_subquery()),
    # A one-FROM subquery over the statement's own table is not correlated by SQLAlchemy:
    # it reads the whole table, which one shard does not hold.
    "global aggregate of the same table": lambda: select(User.id)
    .where(User.id == 5, User.id < select(func.max(User.id)).scalar_subquery()),
    "same table, placed by its parent": lambda: select(Order.id)
    .where(Order.user_id == 5, Order.amount <= select(func.max(Order.amount)).scalar_subquery()),
}


@pytest.mark.parametrize("name", list(PRUNED_COMPUTED_FIRST))
def test_uncorrelated_subquery_of_a_one_shard_statement_computed_first(
    sessions: Any, name: str
) -> None:
    s, oracle = sessions
    stmt = PRUNED_COMPUTED_FIRST[name]()
    want = oracle.execute(stmt).all()
    assert want and sorted(s.execute(stmt).all()) == sorted(want)


@pytest.mark.parametrize("name", list(PRUNED_APART))
def test_subquery_of_a_one_shard_statement_is_checked_too(sessions: Any, name: str) -> None:
    """The WHERE clause pins one shard, so the statement runs there only; its subquery
    would see that shard's rows only (before: a silently wrong answer)."""
    s, oracle = sessions
    stmt = PRUNED_APART[name]()
    assert oracle.execute(stmt).all()
    with pytest.raises(UnsupportedQueryError, match="subquery"):
        s.execute(stmt).all()


PRUNED_ALONG = {
    "correlated child": lambda: select(User.id)
    .where(User.id == 5, User.orders.any(Order.amount > 1)),
    "IN on the placement key of the same table": lambda: select(User.id)
    .where(User.id == 5, User.id.in_(select(User.id).where(User.region == 1))),
    "same table correlated through an alias": lambda: _correlated_alias(),
}


def _correlated_alias() -> Any:
    other = aliased(User)
    return select(User.id).where(
        User.id == 5, exists(select(other.id).where(other.id == User.id, other.region == 1)))


@pytest.mark.parametrize("name", list(PRUNED_ALONG))
def test_subquery_of_a_one_shard_statement_along_placement(sessions: Any, name: str) -> None:
    s, oracle = sessions
    stmt = PRUNED_ALONG[name]()
    want = oracle.execute(stmt).all()
    assert want and s.execute(stmt).all() == want


WRITES_APART = {
    "UPDATE to a global aggregate of the same table": lambda: update(User)
    .values(region=select(func.max(User.region)).scalar_subquery()),
    "UPDATE of one user to a global aggregate": lambda: update(User).where(User.id == 5)
    .values(region=select(func.max(User.region)).scalar_subquery()),
    "DELETE by IN on another column of the same table": lambda: delete(Order)
    .where(Order.amount.in_(select(Order.amount).where(Order.id == 31))),
    "DELETE by an uncorrelated EXISTS over children": lambda: delete(User)
    .where(User.id == 5, exists(select(Order.id).where(Order.amount > 20))),
}


@pytest.mark.parametrize("name", list(WRITES_APART))
def test_write_with_a_subquery_apart_from_the_placement_is_refused(
    sessions: Any, name: str
) -> None:
    """On one shard or on each, such a subquery sees only that shard's rows: each shard
    would write its own answer (before: silently different data than one database)."""
    s, oracle = sessions
    before = _rows(s)
    with pytest.raises(UnsupportedQueryError, match="subquery"):
        s.execute(WRITES_APART[name]())
    assert _rows(s) == before  # nothing was sent
    oracle.execute(WRITES_APART[name]())  # (one database runs it)


WRITES_ALONG = {
    "UPDATE to a correlated aggregate of the children": lambda: update(User)
    .values(region=select(func.count(Order.id)).where(Order.user_id == User.id)
            .scalar_subquery()),
    "DELETE children by IN on their parent's key": lambda: delete(Order)
    .where(Order.user_id.in_(select(User.id).where(User.region == 1))),
    "UPDATE by IN on the placement key of the same table": lambda: update(User)
    .where(User.id.in_(select(User.id).where(User.region == 2))).values(name="r2"),
}


@pytest.mark.parametrize("name", list(WRITES_ALONG))
def test_write_with_a_subquery_along_the_placement_equals_one_database(
    sessions: Any, name: str
) -> None:
    s, oracle = sessions
    before = _rows(oracle)
    s.execute(WRITES_ALONG[name](), execution_options={"synchronize_session": False})
    oracle.execute(WRITES_ALONG[name](), execution_options={"synchronize_session": False})
    assert _rows(s) == _rows(oracle) != before
    s.rollback()


def _rows(session: Session) -> list[Any]:
    return [
        *session.execute(select(User.id, User.name, User.region).order_by(User.id)).all(),
        *session.execute(select(Order.id, Order.user_id, Order.amount).order_by(Order.id)).all(),
    ]
