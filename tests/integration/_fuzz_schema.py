"""Schema and data of the query fuzzer (``test_query_fuzz.py``).

Four mapped tables, placed the four ways a cluster places tables:

* ``Parent`` (``fz_parent``): sharded by a hash of ``id``;
* ``Child`` (``fz_child``): lives with its parent (``Follows``);
* ``Country`` (``fz_country``): a broadcast reference table (a copy on every shard);
* ``Apart`` (``fz_apart``): pinned to one shard, joined by a non-key column.

The data is built to trip a merge up: NULLs, NaN (where the backend stores it), ties,
case variants (``'bob'``/``'Bob'``), trailing spaces, unicode, negative numbers, REAL and
NUMERIC columns, and (in some data sets) a shard that holds no row at all.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from sqlalchemy import REAL, Boolean, ForeignKey, Integer, Numeric, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class FBase(DeclarativeBase):
    pass


#: PostgreSQL's nondeterministic ICU collation, created by the fuzzer on every PostgreSQL
#: database before the tables
PG_CI_COLLATION = "fz_ci"
CI_STRING = (String(12)
             .with_variant(String(12, collation="NOCASE"), "sqlite")
             .with_variant(String(12, collation=PG_CI_COLLATION), "postgresql"))
NICKS = ["bob", "Bob", "BOB", "bob ", "alice", "Alice", "ALICE", "carl", None]


class Parent(FBase):
    __tablename__ = "fz_parent"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str | None] = mapped_column(String(24), nullable=True)
    grp: Mapped[str | None] = mapped_column(String(8), nullable=True)
    score: Mapped[int | None] = mapped_column(Integer, nullable=True)
    ratio: Mapped[float | None] = mapped_column(REAL, nullable=True)
    amount: Mapped[Decimal | None] = mapped_column(Numeric(10, 2), nullable=True)
    flag: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    ccode: Mapped[str | None] = mapped_column(String(4), nullable=True)
    #: case-insensitive where the backend can say so (MariaDB's default collation already is)
    nick: Mapped[str | None] = mapped_column(CI_STRING, nullable=True)
    children: Mapped[list[Child]] = relationship(back_populates="parent", order_by="Child.id")


class Child(FBase):
    __tablename__ = "fz_child"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    parent_id: Mapped[int] = mapped_column(ForeignKey("fz_parent.id"))
    qty: Mapped[int | None] = mapped_column(Integer, nullable=True)
    amount: Mapped[Decimal | None] = mapped_column(Numeric(10, 2), nullable=True)
    label: Mapped[str | None] = mapped_column(String(16), nullable=True)
    parent: Mapped[Parent] = relationship(back_populates="children")


class Country(FBase):
    __tablename__ = "fz_country"
    code: Mapped[str] = mapped_column(String(4), primary_key=True)
    name: Mapped[str] = mapped_column(String(24))
    rate: Mapped[int | None] = mapped_column(Integer, nullable=True)


class Apart(FBase):
    __tablename__ = "fz_apart"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    ref: Mapped[int | None] = mapped_column(Integer, nullable=True)
    val: Mapped[int | None] = mapped_column(Integer, nullable=True)
    tag: Mapped[str | None] = mapped_column(String(8), nullable=True)


#: parents before children
TABLES = FBase.metadata.sorted_tables

NAMES = ["bob", "Bob", "BOB", "bob ", "alice", "Alice", "ålice", "Émile", "émile", "zoë",
         "日本", "", "a b", "x", None]
GROUPS = ["a", "A", "b", "b ", "c", "ä", None, None]
LABELS = ["x", "X", "y", "y ", "ü", None]
AMOUNTS = [Decimal("1.10"), Decimal("-3.25"), Decimal("0.00"), Decimal("2.50"),
           Decimal("99999.99"), Decimal("-0.01"), None]
#: exactly representable in single precision: a mixed cluster compares REAL (float4 on
#: PostgreSQL) against SQLite's double, which agree only on such values
EXACT_REALS = [0.5, -2.5, 0.25, 7.0, 1048576.5, -0.0, 3.0, None]
INEXACT_REALS = [0.1, 3.3, -1.7, 123456.789]


def hash_shard(key: int, shards: Sequence[str]) -> str:
    """The drop-in programs' own placement of a parent: crc32 of its key."""
    return shards[zlib.crc32(str(key).encode()) % len(shards)]


def make_rows(
    rng: random.Random, *, nan: bool, exact_reals: bool, allowed_ids: Any = None
) -> dict[str, list[dict[str, Any]]]:
    """Rows of every table; ``allowed_ids(id) -> bool`` filters the parents' keys."""
    reals: list[Any] = list(EXACT_REALS) + ([] if exact_reals else INEXACT_REALS)
    if nan:
        reals += [float("nan")]
    n_parents = rng.randint(0, 40) if rng.random() < 0.1 else rng.randint(12, 45)
    ids = [i for i in range(1, 200) if allowed_ids is None or allowed_ids(i)]
    rng.shuffle(ids)
    parents = []
    for pid in sorted(ids[:n_parents]):
        parents.append({
            "id": pid,
            "name": rng.choice(NAMES),
            "grp": rng.choice(GROUPS),
            "score": rng.choice([None, -5, -1, 0, 0, 1, 2, 2, 3, 7, 10, -5]),
            "ratio": rng.choice(reals),
            "amount": rng.choice(AMOUNTS),
            "flag": rng.choice([True, False, None]),
            "ccode": rng.choice(["c1", "c2", "c3", "zz", None]),
            "nick": rng.choice(NICKS),
        })
    children = []
    cid = 1
    for p in parents:
        for _ in range(rng.choice([0, 0, 1, 2, 3])):
            children.append({
                "id": cid,
                "parent_id": p["id"],
                "qty": rng.choice([None, -2, 0, 1, 1, 4, 10]),
                "amount": rng.choice(AMOUNTS),
                "label": rng.choice(LABELS),
            })
            cid += 1
    countries: list[dict[str, Any]] = [
        {"code": "c1", "name": "Ürland", "rate": 3},
        {"code": "c2", "name": "bobland", "rate": None},
        {"code": "c3", "name": "Bobland", "rate": -1},
        {"code": "c4", "name": "empty", "rate": 3},
    ]
    aparts: list[dict[str, Any]] = [
        {"id": i, "ref": rng.choice([None, -5, 0, 1, 2, 3, 7, 10, 11, 25, 40]),
         "val": rng.choice([None, -1, 0, 5, 5, 9]), "tag": rng.choice(["p", "P", "q", None])}
        for i in range(1, rng.randint(2, 12))
    ]
    return {"fz_parent": parents, "fz_child": children, "fz_country": countries,
            "fz_apart": aparts}
