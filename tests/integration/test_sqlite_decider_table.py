"""A SQLite decider's decision table, created inside a commit that then failed (and so
rolled back with it), is created again by the next commit."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Integer, String, create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from shardsession import HashSharding, Placement, PrepareFailed, ShardedSession


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "dt_accounts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))


def test_sqlite_decider_after_failed_commit(pg_url_a: str, tmp_path: Any) -> None:
    engines = {"s0": create_engine(f"sqlite:///{tmp_path}/s0.db"), "s1": create_engine(pg_url_a)}
    for e in engines.values():
        Base.metadata.create_all(e)
    with engines["s1"].begin() as c:
        c.exec_driver_sql(
            "CREATE FUNCTION dt_boom() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "IF NEW.name = 'boom' THEN RAISE EXCEPTION 'boom refused'; END IF; "
            "RETURN NEW; END $$")
        c.exec_driver_sql(
            "CREATE CONSTRAINT TRIGGER dt_boom AFTER INSERT ON dt_accounts "
            "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION dt_boom()")
    p2 = Placement({Account: HashSharding(Account.id)})
    p2.bind(["s0", "s1"])
    ids: dict[str, int] = {}
    i = 0
    while len(ids) < 2:
        i += 1
        ids.setdefault(p2.shards_for_identity(Account.__mapper__, (i,))[0], i)
    maker = sessionmaker(class_=ShardedSession, shards=engines, atomic="require",
                         placement=Placement({Account: HashSharding(Account.id)}))
    with maker() as s:
        s.add_all([Account(id=ids["s0"], name="ok"), Account(id=ids["s1"], name="boom")])
        with pytest.raises(PrepareFailed, match="boom refused"):
            s.commit()  # the CREATE TABLE of the decision table is rolled back too
        s.rollback()
    with maker() as s:
        s.add_all([Account(id=ids["s0"], name="ok"), Account(id=ids["s1"], name="ok")])
        s.commit()
    for e in engines.values():
        with e.connect() as c:
            assert c.exec_driver_sql("SELECT count(*) FROM dt_accounts").scalar() == 1
        e.dispose()
