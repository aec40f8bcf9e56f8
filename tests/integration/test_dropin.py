"""Programs written for SQLAlchemy's horizontal_shard keep working when only the import changes.

Each test runs the same program against SQLAlchemy's class and ours and compares what the
program observes, except where results are merged on purpose (ordering, aggregates).
"""

from __future__ import annotations

import datetime
import itertools
import warnings
from typing import Any

import pytest
from sqlalchemy import (
    Column,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    create_engine,
    delete,
    func,
    inspect,
    select,
    update,
)
from sqlalchemy.ext import horizontal_shard
from sqlalchemy.orm import declarative_base, relationship, sessionmaker
from sqlalchemy.sql import operators, visitors

import shardsession
from shardsession.exc import NonAtomicCommitWarning, UnknownShardError

REGIONS = {"Americas": "amer", "Asia": "apac", "Europe": "emea", "Africa": "afr"}


def _build(session_cls: type, tmp_path: Any) -> dict[str, Any]:
    Base = declarative_base()
    counter = itertools.count(1)

    class Station(Base):  # type: ignore[valid-type,misc]
        __tablename__ = "stations"
        id = Column(Integer, primary_key=True, default=lambda ctx: next(counter))
        region = Column(String(30), nullable=False)
        name = Column(String(50), nullable=False)
        readings = relationship("Reading", backref="station")

    class Reading(Base):  # type: ignore[valid-type,misc]
        __tablename__ = "readings"
        id = Column(Integer, primary_key=True)
        station_id = Column(Integer, ForeignKey("stations.id"))
        value = Column(Float)
        taken = Column(DateTime, default=datetime.datetime(2024, 1, 1))

    engines = {
        shard: create_engine(f"sqlite:///{tmp_path}/{session_cls.__module__}-{shard}.db")
        for shard in REGIONS.values()
    }
    for e in engines.values():
        Base.metadata.create_all(e)

    def shard_chooser(mapper: Any, instance: Any, clause: Any = None) -> str:
        if isinstance(instance, Station):
            return REGIONS[instance.region]
        return shard_chooser(mapper, instance.station)

    def identity_chooser(mapper: Any, primary_key: Any, *, lazy_loaded_from: Any, **kw: Any) -> Any:
        if lazy_loaded_from:
            return [lazy_loaded_from.identity_token]
        return list(engines)

    def execute_chooser(context: Any) -> list[str]:
        found: list[str] = []
        binds: dict[Any, Any] = {}
        cols: set[Any] = set()

        def visit_bindparam(b: Any) -> None:
            binds[b] = b.effective_value

        def visit_column(c: Any) -> None:
            cols.add(c)

        def visit_binary(b: Any) -> None:
            if (
                b.left in cols
                and b.right in binds
                and b.left.shares_lineage(Station.__table__.c.region)
            ):
                v = binds[b.right]
                if b.operator == operators.eq:
                    found.append(REGIONS[v])
                elif b.operator == operators.in_op:
                    found.extend(REGIONS[x] for x in v)

        where = getattr(context.statement, "whereclause", None)
        if where is not None:
            visitors.traverse(
                where,
                {},
                {"bindparam": visit_bindparam, "column": visit_column, "binary": visit_binary},
            )
        return found or list(engines)

    maker = sessionmaker(
        class_=session_cls,
        shards=engines,
        shard_chooser=shard_chooser,
        identity_chooser=identity_chooser,
        execute_chooser=execute_chooser,
    )
    return {"Session": maker, "Station": Station, "Reading": Reading, "engines": engines}


def _program(env: dict[str, Any]) -> dict[str, Any]:
    """A typical program for SQLAlchemy's sharded session; returns what it observed."""
    Session, Station, Reading = env["Session"], env["Station"], env["Reading"]
    seen: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonAtomicCommitWarning)
        with Session() as sess:
            objs = [
                Station(region="Asia", name="Tokyo"),
                Station(region="Americas", name="Lima"),
                Station(region="Americas", name="Quebec"),
                Station(region="Europe", name="Oslo"),
                Station(region="Europe", name="Rome"),
                Station(region="Africa", name="Accra"),
            ]
            objs[0].readings.append(Reading(value=30.5))
            objs[1].readings.append(Reading(value=18.0))
            objs[5].readings.append(Reading(value=33.0))
            sess.add_all(objs)
            sess.commit()

            tokyo = sess.get(Station, objs[0].id)
            seen["get"] = (tokyo.name, tokyo.readings[0].value)
            seen["eq"] = sorted(
                s.name
                for s in sess.execute(select(Station).where(Station.region == "Americas")).scalars()
            )
            seen["in"] = sorted(
                s.name
                for s in sess.scalars(select(Station).where(Station.region.in_(["Europe", "Asia"])))
            )
            seen["all"] = sorted(s.name for s in sess.scalars(select(Station)))
            seen["keys"] = sorted(
                (inspect(r).identity_key[1], inspect(r).identity_token)
                for r in sess.scalars(select(Reading))
            )
            seen["set_shard_id"] = sorted(
                s.name
                for s in sess.scalars(select(Station).options(shardsession.set_shard_id("emea")))
            )
            seen["bind_args"] = sorted(
                s.name for s in sess.scalars(select(Station), bind_arguments={"shard_id": "amer"})
            )
            seen["legacy_query_set_shard"] = sorted(
                s.name for s in sess.query(Station).set_shard("apac")
            )
            lima = sess.scalars(select(Station).where(Station.name == "Lima")).one()
            lima.name = "Lima Norte"
            sess.commit()
            seen["update_orm"] = sess.scalars(
                select(Station.name).where(Station.region == "Americas").order_by(Station.name)
            ).all()
            res = sess.execute(
                update(Station).where(Station.region == "Europe").values(name=Station.name + "!")
            )
            seen["bulk_update_rowcount"] = res.rowcount
            sess.execute(delete(Reading).where(Reading.value > 32))
            sess.commit()
            seen["after_bulk"] = sorted(
                (s.name, len(s.readings)) for s in sess.scalars(select(Station))
            )
            seen["identity_map_tokens"] = sorted(
                {inspect(o).identity_token for o in sess.identity_map.values()}
            )
    return seen


def test_same_observations_as_sqlalchemy(tmp_path: Any) -> None:
    theirs = _program(_build(horizontal_shard.ShardedSession, tmp_path))
    ours = _program(_build(shardsession.ShardedSession, tmp_path))
    assert ours == theirs
    assert theirs["get"] == ("Tokyo", 30.5)
    assert theirs["bulk_update_rowcount"] in (1, 2)  # SQLAlchemy: last shard's count


def test_isinstance_and_query_class(tmp_path: Any) -> None:
    env = _build(shardsession.ShardedSession, tmp_path)
    with env["Session"]() as sess:
        assert isinstance(sess, horizontal_shard.ShardedSession)
        assert isinstance(sess.query(env["Station"]), horizontal_shard.ShardedQuery)


def test_unknown_shard_id_is_a_clear_error(tmp_path: Any) -> None:
    env = _build(shardsession.ShardedSession, tmp_path)
    with env["Session"]() as sess, pytest.raises(UnknownShardError) as ei:
        sess.execute(select(env["Station"]), bind_arguments={"shard_id": "mars"})
    assert ei.value.shard_id == "mars"


def test_ordered_limit_and_count_are_merged(tmp_path: Any) -> None:
    env = _build(shardsession.ShardedSession, tmp_path)
    _program(env)
    Station = env["Station"]
    with env["Session"]() as sess:
        names = sess.scalars(select(Station.name).order_by(Station.name.desc()).limit(3)).all()
        everything = sorted(sess.scalars(select(Station.name)).all(), reverse=True)
        assert names == everything[:3]
        assert sess.scalar(select(func.count()).select_from(Station)) == len(everything)
        assert sess.query(Station).count() == len(everything)


def test_integer_shard_ids_work_as_in_sqlalchemy(tmp_path: Any) -> None:
    Base = declarative_base()

    class Thing(Base):  # type: ignore[valid-type,misc]
        __tablename__ = "things"
        id = Column(Integer, primary_key=True, autoincrement=False)

    engines = {n: create_engine(f"sqlite:///{tmp_path}/int{n}.db") for n in (1, 2)}
    for e in engines.values():
        Base.metadata.create_all(e)
    for cls in (horizontal_shard.ShardedSession, shardsession.ShardedSession):
        maker = sessionmaker(
            class_=cls,
            shards=engines,
            shard_chooser=lambda m, inst, clause=None: 1 + inst.id % 2,
            identity_chooser=lambda *a, **k: [1, 2],
            execute_chooser=lambda ctx: [1, 2],
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NonAtomicCommitWarning)
            with maker() as s:
                s.add_all(
                    Thing(id=i + (100 if cls is shardsession.ShardedSession else 0))
                    for i in range(4)
                )
                s.commit()
                tokens = sorted({inspect(t).identity_token for t in s.scalars(select(Thing))})
        assert tokens == [1, 2]
