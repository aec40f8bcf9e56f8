"""Whose is a prepared branch: the pure ownership rules of recovery (no database)."""

from __future__ import annotations

import secrets

import pytest
from sqlalchemy import create_engine

from shardsession.coordinator._listing import Owners
from shardsession.coordinator.xid import Xid, legacy_decider_token, new_cluster_id, new_gtrid
from shardsession.exc import ConfigurationError

OURS, OTHER = new_cluster_id(), new_cluster_id()
SHARDS = {"a": create_engine("postgresql+psycopg2://u@h/a"),
          "b": create_engine("mysql+pymysql://u@h/b"),
          "s": create_engine("sqlite:///s.db")}


def owners(identities: dict[str, str | None], unreadable: set[str] = frozenset()) -> Owners:
    return Owners(SHARDS, identities, set(unreadable))


def xid(decider: str, cluster: str) -> Xid:
    return Xid.branch(new_gtrid(decider, cluster=cluster), 1)


def test_ours_only_when_the_named_decider_stores_the_identity() -> None:
    o = owners({"a": OURS, "b": OURS, "s": OURS})
    assert o.classify(xid("a", OURS)) == ("ours", "a")
    assert o.classify(xid("s", OURS)) == ("ours", "s")
    # another cluster with the same shard names: foreign, whatever the name
    assert o.classify(xid("a", OTHER)) == ("foreign", None)
    # ours, decider not in this configuration: never guessed, never called foreign
    assert o.classify(xid("gone", OURS)) == ("unchecked", None)
    assert o.classify(xid("gone", OTHER)) == ("foreign", None)


def test_identities_per_decider_database() -> None:
    # shards that kept different identities: the decider's own must match
    o = owners({"a": OURS, "b": OTHER, "s": None})
    assert o.classify(xid("b", OTHER)) == ("ours", "b")
    assert o.classify(xid("b", OURS)) == ("unchecked", None)  # our id, wrong decider
    # no identity stored on a PostgreSQL/MariaDB decider: nothing can be ours there
    assert owners({"a": None, "b": None, "s": None}).classify(xid("a", OTHER)) == (
        "foreign", None)


def test_unreadable_identity_and_unset_sqlite_decider() -> None:
    o = owners({"b": OURS, "s": None}, unreadable={"a"})
    assert o.classify(xid("a", OTHER)) == ("unchecked", "a")
    assert o.classify(xid("s", OTHER)) == ("unattributed", "s")


def test_legacy_xids() -> None:
    o = owners({"a": OURS, "b": OURS, "s": OURS})
    legacy = f"ss1.6553f100.{legacy_decider_token('a')}.{secrets.token_hex(16)}"
    assert o.classify(Xid.branch(legacy, 1)) == ("legacy", "a")
    unknown = f"ss1.6553f100.{legacy_decider_token('zz')}.{secrets.token_hex(16)}"
    assert o.classify(Xid.branch(unknown, 1)) == ("foreign", None)


def test_colliding_shard_ids_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="same name"):
        Owners({1: SHARDS["a"], "1": SHARDS["b"]}, {}, set())  # type: ignore[dict-item]
