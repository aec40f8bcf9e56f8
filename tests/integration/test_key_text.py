"""An integer shard key given as text is placed as the integer the database stores."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import Integer, String, create_engine, insert, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from shardsession import HashSharding, Placement, ShardedSession
from shardsession.exc import RoutingError


class Base(DeclarativeBase):
    pass


class Member(Base):
    __tablename__ = "members"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))


def _session(engines: dict[str, object]) -> ShardedSession:
    return ShardedSession(shards=engines, placement=Placement({Member: HashSharding(Member.id)}),
                          atomic="best_effort")


@pytest.fixture
def engines(tmp_path: Path) -> dict[str, object]:
    out = {n: create_engine(f"sqlite:///{tmp_path / n}.db") for n in "abc"}
    for e in out.values():
        Base.metadata.create_all(e)
    return out  # type: ignore[return-value]


@pytest.mark.filterwarnings("ignore::shardsession.exc.NonAtomicCommitWarning")
def test_text_keys_of_an_integer_column_are_found_by_their_integer(
        engines: dict[str, object]) -> None:
    s = _session(engines)
    s.add_all([Member(id=str(1000 + i), name=f"orm{i}") for i in range(10)])  # type: ignore[arg-type]
    s.execute(insert(Member), [{"id": str(2000 + i), "name": f"bulk{i}"} for i in range(10)])
    s.execute(insert(Member), [{"id": " +3000 ", "name": "spaced"}])
    s.commit()
    s.close()
    s = _session(engines)
    ids = [1000 + i for i in range(10)] + [2000 + i for i in range(10)] + [3000]
    assert [i for i in ids if s.get(Member, i) is None] == []
    assert [i for i in ids
            if s.scalars(select(Member).where(Member.id == i)).first() is None] == []
    assert [i for i in ids
            if s.scalars(select(Member).where(Member.id == str(i))).first() is None] == []
    # each row is on the shard its integer key is placed on (no copy elsewhere)
    assert len(s.scalars(select(Member)).all()) == len(ids)


def test_text_that_is_no_integer_is_refused_and_nothing_written(
        engines: dict[str, object]) -> None:
    s = _session(engines)
    s.add(Member(id=5, name="five"))
    s.add(Member(id="5x", name="bad"))  # type: ignore[arg-type]
    with pytest.raises(RoutingError, match="not an integer"):
        s.commit()
    s.rollback()
    s.close()
    for e in engines.values():
        with e.connect() as c:  # type: ignore[attr-defined]
            assert c.exec_driver_sql("SELECT count(*) FROM members").scalar() == 0
