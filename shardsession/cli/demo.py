"""``shardsession demo``: a tour on local SQLite shard files, no server needed."""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path
from typing import Any

from sqlalchemy import ForeignKey, Integer, String, event, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from ..config import Cluster
from ..coordinator.local import local_sqlite_cluster
from ..routing import Broadcast, Follows, HashSharding, Placement

__all__ = ["add_arguments", "run_demo"]

SHARDS = ("north", "south", "west")


class _Base(DeclarativeBase):
    pass


class Customer(_Base):
    __tablename__ = "customers"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))
    balance: Mapped[int] = mapped_column(Integer, default=0)
    orders: Mapped[list[Order]] = relationship(back_populates="customer")


class Order(_Base):
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id"))
    currency: Mapped[str] = mapped_column(ForeignKey("currencies.code"))
    amount: Mapped[int] = mapped_column(Integer)
    customer: Mapped[Customer] = relationship(back_populates="orders")


class Currency(_Base):
    __tablename__ = "currencies"
    code: Mapped[str] = mapped_column(String(3), primary_key=True)
    name: Mapped[str] = mapped_column(String(30))


def add_arguments(sub: Any) -> None:
    p = sub.add_parser("demo", help="run a short tour on local SQLite shard files")
    p.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="folder for the shard files (default: a temporary folder, removed afterwards)",
    )
    p.set_defaults(func=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
        return run_demo(args.dir)
    folder = Path(tempfile.mkdtemp(prefix="shardsession-demo-"))
    try:
        return run_demo(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _local_cluster(folder: Path) -> Cluster:
    # The embedded default: SQLite files attached to one connection, so a commit over
    # several shards is one atomic SQLite commit (see shardsession.coordinator.local).
    cluster: Cluster = local_sqlite_cluster(folder, SHARDS)
    return cluster


def run_demo(folder: Path, out: Any = print) -> int:
    """Run the tour in ``folder``; returns 0 when every check held."""
    cluster = _local_cluster(folder)
    out(f"shardsession demo: {len(SHARDS)} SQLite shards in {folder}")
    for name in SHARDS:
        _Base.metadata.drop_all(cluster.engines[name])
    cluster.create_all(_Base.metadata)
    placement = Placement(
        {Customer: HashSharding(Customer.id), Order: Follows(Order.customer), Currency: Broadcast()}
    )
    Session = cluster.sessionmaker(placement)

    statements: dict[str, int] = dict.fromkeys(SHARDS, 0)
    for name, engine in cluster.engines.items():

        def count(*_a: Any, _n: str = name) -> None:
            statements[_n] += 1

        event.listen(engine, "before_cursor_execute", count)

    ok = True
    with Session.begin() as s:
        s.add_all([Currency(code="EUR", name="Euro"), Currency(code="USD", name="US dollar")])
        for i in range(1, 31):
            c = Customer(id=i, name=f"customer-{i:02d}", balance=100)
            for j in range(i % 4):
                c.orders.append(
                    Order(id=i * 10 + j, currency="EUR" if j % 2 else "USD", amount=i * 7 + j)
                )
            s.add(c)

    out("\nrows per shard (customers / orders / currencies):")
    for name, engine in cluster.engines.items():
        with engine.connect() as conn:
            counts = [
                conn.scalar(select(func.count()).select_from(t))
                for t in (Customer.__table__, Order.__table__, Currency.__table__)
            ]
        out(f"  {name:6} {counts[0]:3} / {counts[1]:3} / {counts[2]:3}")

    with Session() as s:
        top = s.execute(
            select(Order.id, Order.amount).order_by(Order.amount.desc(), Order.id).limit(5)
        ).all()
        out("\ntop 5 orders over all shards (ORDER BY amount DESC LIMIT 5):")
        for row in top:
            out(f"  order {row.id:4}  amount {row.amount}")
        total = s.scalar(select(func.count()).select_from(Order))
        out(f"orders in all shards: {total}")
        per_currency = s.execute(
            select(Order.currency, func.sum(Order.amount), func.count())
            .group_by(Order.currency)
            .order_by(Order.currency)
        ).all()
        out("sum and count per currency (GROUP BY, merged across shards):")
        for cur, amount, n in per_currency:
            out(f"  {cur}: {amount} over {n} orders")
        everything = sorted((o.amount for o in s.scalars(select(Order))), reverse=True)[:5]
        ok &= [r.amount for r in top] == everything and total == sum(i % 4 for i in range(1, 31))

        before = dict(statements)
        c7 = s.get(Customer, 7)
        asked = [n for n in SHARDS if statements[n] != before[n]]
        out(f"\nsession.get(Customer, 7) asked only shard {asked}")
        ok &= c7 is not None and len(asked) == 1

    a, b = _two_on_different_shards(placement)
    with Session.begin() as s:
        ca, cb = s.get(Customer, a), s.get(Customer, b)
        assert ca is not None and cb is not None
        ca.balance -= 25
        cb.balance += 25
    with Session() as s:
        total_balance = s.scalar(select(func.sum(Customer.balance)))
    shard_a = placement.shards_for_identity(Customer.__mapper__, (a,))[0]
    shard_b = placement.shards_for_identity(Customer.__mapper__, (b,))[0]
    out(
        f"\ntransfer of 25 from customer {a} ({shard_a}) to {b} ({shard_b}) "
        f"committed in one transaction; total balance {total_balance}"
    )
    ok &= total_balance == 30 * 100
    cluster.dispose()
    out("\ndemo " + ("passed" if ok else "FAILED: a result was not what one database gives"))
    return 0 if ok else 1


def _two_on_different_shards(placement: Placement) -> tuple[int, int]:
    mapper = Customer.__mapper__
    first = placement.shards_for_identity(mapper, (1,))[0]
    for i in range(2, 31):
        if placement.shards_for_identity(mapper, (i,))[0] != first:
            return 1, i
    raise AssertionError("all customers on one shard")
