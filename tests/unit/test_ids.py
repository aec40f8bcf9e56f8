"""Global ids: Snowflake and UUIDv7 (shardsession.ids)."""

from __future__ import annotations

import itertools
import multiprocessing
import threading
import time
import uuid
from typing import Any

import pytest
from sqlalchemy import BigInteger, String, Uuid, create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from shardsession.exc import ConfigurationError
from shardsession.ids import EPOCH_MS, Snowflake, uuid7


def test_snowflake_layout_and_range() -> None:
    gen = Snowflake(node_id=1023)
    before = time.time_ns() // 1_000_000
    value = gen()
    after = time.time_ns() // 1_000_000
    assert 0 < value < 2**63
    ms, node, seq = Snowflake.parts(value)
    assert before <= ms <= after + 1 and node == 1023 and seq >= 0
    assert ms > EPOCH_MS
    for bad in (-1, 1024, "1", True, 1.0):
        with pytest.raises(ConfigurationError):
            Snowflake(node_id=bad)  # type: ignore[arg-type]


def test_snowflake_strictly_increasing_and_survives_sequence_exhaustion() -> None:
    gen = Snowflake(node_id=5)
    ids = [gen() for _ in range(50_000)]  # > 4096 per ms on any machine: borrows ahead
    assert all(a < b for a, b in itertools.pairwise(ids))


def test_snowflake_clock_stepping_back_never_repeats(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = Snowflake(node_id=2)
    now = [EPOCH_MS * 1_000_000 + 10_000_000_000]
    monkeypatch.setattr(time, "time_ns", lambda: now[0])
    first = [gen() for _ in range(10)]
    now[0] -= 5_000_000_000  # five seconds back
    second = [gen() for _ in range(10)]
    both = first + second
    assert all(a < b for a, b in itertools.pairwise(both))


def test_snowflake_unique_across_threads() -> None:
    gen = Snowflake(node_id=9)
    out: list[list[int]] = [[] for _ in range(4)]

    def run(i: int) -> None:
        out[i] = [gen() for _ in range(20_000)]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    flat = [x for part in out for x in part]
    assert len(set(flat)) == len(flat) == 80_000
    for part in out:  # each thread sees increasing ids
        assert part == sorted(part)


def _child(node_id: int, queue: Any) -> None:
    gen = Snowflake(node_id=node_id)
    queue.put([gen() for _ in range(20_000)])


def test_snowflake_unique_across_processes() -> None:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_child, args=(n, queue)) for n in range(3)]
    for p in procs:
        p.start()
    parts = [queue.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=300)
    flat = [x for part in parts for x in part]
    assert len(set(flat)) == len(flat) == 60_000
    assert {Snowflake.parts(part[0])[1] for part in parts} == {0, 1, 2}


def _forked(gen: Snowflake, queue: Any) -> None:
    try:
        gen()
        queue.put("ran")
    except ConfigurationError:
        queue.put("refused")


def test_snowflake_refuses_a_forked_child() -> None:
    ctx = multiprocessing.get_context("fork")
    gen = Snowflake(node_id=1)
    gen()
    queue = ctx.Queue()
    p = ctx.Process(target=_forked, args=(gen, queue))
    p.start()
    assert queue.get(timeout=300) == "refused"
    p.join(timeout=300)


def test_uuid7_fields_and_monotonic() -> None:
    before = time.time_ns() // 1_000_000
    values = [uuid7() for _ in range(20_000)]
    u = values[0]
    assert u.version == 7 and u.variant == uuid.RFC_4122
    assert before <= u.int >> 80 <= time.time_ns() // 1_000_000 + 1
    assert all(a.int < b.int for a, b in itertools.pairwise(values))
    assert all(v.version == 7 and v.variant == uuid.RFC_4122 for v in values)


def test_uuid7_unique_across_threads() -> None:
    out: list[list[uuid.UUID]] = [[] for _ in range(4)]

    def run(i: int) -> None:
        out[i] = [uuid7() for _ in range(10_000)]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    flat = [x for part in out for x in part]
    assert len(set(flat)) == len(flat)
    for part in out:
        assert part == sorted(part)


class _Base(DeclarativeBase):
    pass


_gen = Snowflake(node_id=3)


class _Row(_Base):
    __tablename__ = "ids_row"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, default=_gen)
    key: Mapped[uuid.UUID] = mapped_column(Uuid, default=uuid7)
    name: Mapped[str] = mapped_column(String(10))


def test_both_are_column_defaults() -> None:
    engine = create_engine("sqlite://")
    _Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all([_Row(name=f"r{i}") for i in range(5)])
        s.commit()
        rows = s.scalars(select(_Row).order_by(_Row.id)).all()
        assert len({r.id for r in rows}) == 5 and len({r.key for r in rows}) == 5
        assert all(Snowflake.parts(r.id)[1] == 3 for r in rows)
        assert [r.key for r in rows] == sorted(r.key for r in rows)
