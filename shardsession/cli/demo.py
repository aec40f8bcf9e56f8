"""``shardsession demo``: the story in under a minute, on local SQLite shard files (no
server needed) or on the shards of a ``--config`` cluster.

1. the same data queried through SQLAlchemy's own ``horizontal_shard.ShardedSession`` and
   through shardsession, side by side (its concatenated answers next to ours);
2. a transfer committed across two shards in one transaction;
3. a process killed in the middle of such a commit, and what is left: on the embedded
   cluster nothing (one SQLite commit), on servers that can prepare a transaction left
   in doubt, shown by ``status``, and ``recover`` finishing it.

The demo's tables are named ``ssdemo_*``; it drops and recreates them on every shard.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from sqlalchemy import ForeignKey, Integer, String, event, func, select
from sqlalchemy.ext.horizontal_shard import ShardedSession as SAShardedSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from ..config import Cluster
from ..coordinator.local import local_sqlite_cluster
from ..coordinator.recovery import in_doubt, recover
from ..exc import ConfigurationError
from ..routing import Broadcast, Follows, HashSharding, Placement
from ._common import config_path, load_cluster, say

__all__ = ["add_arguments", "placement", "run_demo"]

SHARDS = ("north", "south", "west")
CUSTOMERS = 30
BALANCE = 100


class _Base(DeclarativeBase):
    pass


class Customer(_Base):
    __tablename__ = "ssdemo_customers"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))
    balance: Mapped[int] = mapped_column(Integer, default=0)
    orders: Mapped[list[Order]] = relationship(back_populates="customer")


class Order(_Base):
    __tablename__ = "ssdemo_orders"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    customer_id: Mapped[int] = mapped_column(ForeignKey("ssdemo_customers.id"))
    currency: Mapped[str] = mapped_column(ForeignKey("ssdemo_currencies.code"))
    amount: Mapped[int] = mapped_column(Integer)
    customer: Mapped[Customer] = relationship(back_populates="orders")


class Currency(_Base):
    __tablename__ = "ssdemo_currencies"
    code: Mapped[str] = mapped_column(String(3), primary_key=True)
    name: Mapped[str] = mapped_column(String(30))


def placement() -> Placement:
    """Customers by a stable hash of their id, orders with their customer, currencies on
    every shard."""
    return Placement(
        {Customer: HashSharding(Customer.id), Order: Follows(Order.customer),
         Currency: Broadcast()}
    )


def add_arguments(sub: Any) -> None:
    p = sub.add_parser("demo", help="the story in under a minute, on local SQLite files")
    p.add_argument(
        "--dir", type=Path, default=None,
        help="folder for the SQLite shard files (default: a new temporary folder, kept and "
        "named at the end)",
    )
    p.add_argument(
        "--config", metavar="FILE", default=None,
        help="run on this cluster's shards instead (drops and recreates the ssdemo_* tables; "
        "servers that can prepare show a crash left in doubt and recovered)",
    )
    p.set_defaults(func=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    if args.config is not None:
        try:
            cluster = load_cluster(config_path(args))
        except ConfigurationError as e:
            say(f"shardsession demo: {e}", err=True)
            return 2
        if len(cluster.shard_ids) < 2:
            cluster.dispose()
            say("shardsession demo: --config needs a cluster of at least two shards "
                f"(this one has {len(cluster.shard_ids)})", err=True)
            return 2
        try:
            return run_demo(None, cluster=cluster, config=args.config)
        except Exception as e:  # a shard unreachable, or shards that cannot commit atomically
            say(f"shardsession demo: stopped: {type(e).__name__}: {e}", err=True)
            return 1
    folder = args.dir if args.dir is not None else Path(
        tempfile.mkdtemp(prefix="shardsession-demo-"))
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        say(f"shardsession demo: --dir {folder}: {e.strerror or e}", err=True)
        return 2
    return run_demo(folder)


def run_demo(folder: Path | None, out: Any = print, *, cluster: Cluster | None = None,
             config: str | None = None) -> int:
    """Run the story in ``folder`` (or on ``cluster``); returns 0 when every check held."""
    if cluster is None:
        assert folder is not None
        # The embedded default: SQLite files attached to one connection, so a commit over
        # several shards is one atomic SQLite commit (see shardsession.coordinator.local).
        cluster = local_sqlite_cluster(folder, SHARDS)
        where = f"{len(SHARDS)} SQLite shard files in {folder}"
    else:
        where = f"the {len(cluster.shard_ids)} shards of {config}"
    names = cluster.shard_ids
    out(f"shardsession demo: {where}")
    try:
        return _story(cluster, names, folder, config, out)
    finally:
        cluster.dispose()


def _story(cluster: Cluster, names: list[str], folder: Path | None, config: str | None,
           out: Any) -> int:
    for name in names:
        _Base.metadata.drop_all(cluster.engines[name])
    cluster.create_all(_Base.metadata)
    rules = placement()
    Session = cluster.sessionmaker(rules)
    ok = True

    with Session.begin() as s:  # (first: the orders' foreign key needs them on servers)
        s.add_all([Currency(code="EUR", name="Euro"), Currency(code="USD", name="US dollar")])
    with Session.begin() as s:
        for i in range(1, CUSTOMERS + 1):
            c = Customer(id=i, name=f"customer-{i:02d}", balance=BALANCE)
            for j in range(i % 4):
                c.orders.append(
                    Order(id=i * 10 + j, currency="EUR" if j % 2 else "USD", amount=i * 7 + j))
            s.add(c)
    out(f"\n{CUSTOMERS} customers with their orders, spread by a hash of the customer id; "
        "currencies copied to every shard:")
    for name, engine in cluster.engines.items():
        with engine.connect() as conn:
            counts = [conn.scalar(select(func.count()).select_from(t))
                      for t in (Customer.__table__, Order.__table__, Currency.__table__)]
        out(f"  {name:8} {counts[0]:3} customers {counts[1]:3} orders {counts[2]:3} currencies")

    ok &= _side_by_side(cluster, Session, out)
    ok &= _routing(Session, names, cluster, out)
    ok &= _transfer(Session, rules, out)
    ok &= _crash_story(cluster, rules, Session, folder, config, out)
    out("\ndemo " + ("passed" if ok else "FAILED: a result was not what one database gives"))
    if folder is not None:
        out(f"(the shard files are kept in {folder}; delete the folder when done)")
    return 0 if ok else 1


def _side_by_side(cluster: Cluster, Session: Any, out: Any) -> bool:
    shards = cluster.shard_ids

    def shard_chooser(mapper: Any, instance: Any, clause: Any = None) -> Any:
        return shards[0]  # (the demo only reads through it)

    def identity_chooser(mapper: Any, primary_key: Any, **kw: Any) -> Any:
        return shards

    theirs = SAShardedSession(
        shards=cluster.engines, shard_chooser=shard_chooser,
        identity_chooser=identity_chooser, execute_chooser=lambda context: shards,
    )
    top = select(Order.id, Order.amount).order_by(Order.amount.desc(), Order.id).limit(5)
    count = select(func.count()).select_from(Order)
    try:
        their_top = [(r.id, r.amount) for r in theirs.execute(top)]
        their_count = list(theirs.scalars(count))
    finally:
        theirs.close()
    with Session() as s:
        our_top = [(r.id, r.amount) for r in s.execute(top)]
        our_count = s.scalar(count)
        everything = sorted(((o.id, o.amount) for o in s.scalars(select(Order))),
                            key=lambda r: (-r[1], r[0]))
    expected_count = sum(i % 4 for i in range(1, CUSTOMERS + 1))
    out("\nThe same queries through SQLAlchemy's horizontal_shard.ShardedSession and "
        "through shardsession:")
    out("  ORDER BY amount DESC LIMIT 5")
    out(f"    SQLAlchemy:   {len(their_top)} rows, each shard's top 5 one after another: "
        f"{[a for _i, a in their_top]}")
    out(f"    shardsession: {len(our_top)} rows, the global top 5: {[a for _i, a in our_top]}")
    out("  SELECT count(*) FROM orders")
    out(f"    SQLAlchemy:   {their_count} (one count per shard)")
    out(f"    shardsession: {our_count} (one number, what one database would answer)")
    return our_top == everything[:5] and our_count == expected_count and len(their_top) > 5


def _routing(Session: Any, names: list[str], cluster: Cluster, out: Any) -> bool:
    statements = dict.fromkeys(names, 0)
    listeners = []
    for name, engine in cluster.engines.items():
        def count(*_a: Any, _n: str = name) -> None:
            statements[_n] += 1
        event.listen(engine, "before_cursor_execute", count)
        listeners.append((engine, count))
    try:
        with Session() as s:
            before = dict(statements)
            c7 = s.get(Customer, 7)
            asked = [n for n in names if statements[n] != before[n]]
    finally:
        for engine, fn in listeners:
            event.remove(engine, "before_cursor_execute", fn)
    out(f"\nsession.get(Customer, 7) asked one shard only: {asked}")
    return c7 is not None and len(asked) == 1


def _two_on_different_shards(rules: Placement) -> tuple[int, int, str, str]:
    mapper = Customer.__mapper__
    first = rules.shards_for_identity(mapper, (1,))[0]
    for i in range(2, CUSTOMERS + 1):
        other = rules.shards_for_identity(mapper, (i,))[0]
        if other != first:
            return 1, i, str(first), str(other)
    raise AssertionError("all customers on one shard")


def _total(Session: Any) -> int:
    with Session() as s:
        return int(s.scalar(select(func.sum(Customer.balance))) or 0)


def _transfer(Session: Any, rules: Placement, out: Any) -> bool:
    a, b, shard_a, shard_b = _two_on_different_shards(rules)
    with Session.begin() as s:
        ca, cb = s.get(Customer, a), s.get(Customer, b)
        assert ca is not None and cb is not None
        ca.balance -= 25
        cb.balance += 25
    total = _total(Session)
    out(f"\nA transfer of 25 from customer {a} (shard {shard_a}) to customer {b} "
        f"(shard {shard_b}), committed in one transaction; total balance {total}")
    return total == CUSTOMERS * BALANCE


def _child(spec: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shardsession.cli._demo_child", json.dumps(spec)],
        capture_output=True, text=True, timeout=120,
    )


def _crash_story(cluster: Cluster, rules: Placement, Session: Any, folder: Path | None,
                 config: str | None, out: Any) -> bool:
    a, b, shard_a, shard_b = _two_on_different_shards(rules)
    can_prepare = all(e.dialect.name in ("postgresql", "mysql")
                      for e in (cluster.engines[shard_a], cluster.engines[shard_b]))
    where = {"folder": str(folder)} if config is None else {"config": str(Path(config).resolve())}
    if not can_prepare:
        proc = _child({**where, "a": a, "b": b, "crash": "before_commit"})
        total = _total(Session)
        out(f"\nA process moving 25 from customer {a} to {b} was killed after writing both "
            f"shards, before its commit (exit {proc.returncode}). SQLite cannot prepare a "
            "transaction; "
            "these shards are attached to one SQLite connection and commit in one SQLite "
            f"commit, so the crash left all or nothing: total balance {total}.")
        out("(On servers that can prepare, PostgreSQL or MySQL/MariaDB, run "
            "`shardsession demo --config cluster.toml` to see a two-phase commit cut between "
            "PREPARE and its decision, and `shardsession recover` finishing it.)")
        return proc.returncode == -signal.SIGKILL and total == CUSTOMERS * BALANCE
    ok = True
    engines = cluster.engines
    for point, words, why in (
        ("after_all_prepared", "after PREPARE on one shard, before the decision",
         "no decision was recorded, so recovery claimed an abort and rolled the branch back"),
        ("after_decision_commit", "after the decision was committed, before COMMIT PREPARED",
         "the decider's decision row says commit, so recovery committed the branch"),
    ):
        proc = _child({**where, "a": a, "b": b, "crash": point})
        left = in_doubt(engines)
        total = _total(Session)
        out(f"\nA process moving 25 from customer {a} ({shard_a}) to {b} ({shard_b}) was "
            f"killed {words} (exit {proc.returncode}).")
        out(f"  status: {len(left)} branch(es) in doubt: "
            + ", ".join(f"{r.shard} decider={r.decider}" for r in left))
        out(f"  a reader now sees a total balance of {total}"
            + ("" if total == CUSTOMERS * BALANCE else " (half of the transfer is visible)"))
        report = recover(engines, grace_period=0)
        total_after = _total(Session)
        out(f"  recover: committed={len(report.committed)} "
            f"rolled_back={len(report.rolled_back)}; total balance now {total_after}")
        out(f"  ({why})")
        ok &= proc.returncode == -signal.SIGKILL and len(left) >= 1 and report.resolved
        ok &= total_after == CUSTOMERS * BALANCE
    return ok
