"""Xid generation and strict parsing (hostile input included)."""

from __future__ import annotations

import pytest

from shardsession.coordinator.xid import (
    FORMAT_ID,
    Xid,
    check_shard_ids,
    decider_token,
    gtrid_cluster,
    gtrid_created,
    gtrid_decider,
    is_cluster_id,
    is_our_gtrid,
    legacy_decider_token,
    new_cluster_id,
    new_gtrid,
    parse_gid,
    parse_participants,
    parse_xa,
    participants_text,
    shard_token,
)

C = new_cluster_id()


def test_roundtrip_and_limits() -> None:
    g = new_gtrid("tenant-eu", cluster=C, now=1_700_000_000)
    x = Xid.branch(g, 3)
    assert parse_gid(x.gid) == x
    assert len(x.gid.encode()) < 200
    gt, bq, fmt = x.xa_parts
    assert len(gt) == 64 and len(bq) <= 64 and fmt == FORMAT_ID  # MariaDB: <= 64 each
    assert parse_xa(fmt, len(gt), len(bq), gt + bq) == x
    assert gtrid_created(g) == 1_700_000_000
    assert gtrid_decider(g) == decider_token("tenant-eu") == x.decider
    assert gtrid_cluster(g) == C == x.cluster and not x.legacy
    assert "tenant" not in x.gid and "eu" not in x.bqual
    assert x.xa_literal == f"X'{gt.hex()}',X'{bq.hex()}',{FORMAT_ID}"


def test_cluster_and_decider_are_named_unambiguously() -> None:
    assert is_cluster_id(C) and len(C) == 12
    assert len({new_cluster_id() for _ in range(1000)}) == 1000
    other = new_cluster_id()
    g1, g2 = new_gtrid("a", cluster=C), new_gtrid("a", cluster=other)
    assert gtrid_cluster(g1) == C and gtrid_cluster(g2) == other
    # 60-bit tokens, not the old 32-bit hash
    assert len(shard_token("a")) == 12 and shard_token("a") != shard_token("b")
    with pytest.raises(ValueError):
        new_gtrid("a", cluster="not-an-id")


def test_check_shard_ids_refuses_names_that_collide() -> None:
    check_shard_ids(["a", "b", "tenant_eu"])
    with pytest.raises(ValueError, match="same name"):
        check_shard_ids([1, "1"])


def test_legacy_format_still_parses() -> None:
    legacy = "ss1.6553f100." + legacy_decider_token("alpha") + "." + "ab" * 16
    x = Xid.branch(legacy, 1)
    assert parse_gid(x.gid) == x and x.legacy and x.cluster is None
    assert x.decider == legacy_decider_token("alpha")
    gt, bq, fmt = x.xa_parts
    assert parse_xa(fmt, len(gt), len(bq), gt + bq) == x
    assert gtrid_created(legacy) == 0x6553F100


def test_participants_round_trip() -> None:
    g = new_gtrid("a", cluster=C)
    text = participants_text([(Xid.branch(g, 1), "eu"), (Xid.branch(g, 2), "us")])
    assert parse_participants(text) == [("b001", shard_token("eu")), ("b002", shard_token("us"))]
    assert parse_participants("") == []
    assert parse_participants("b001,b002") is None  # legacy rows name no shard
    assert parse_participants("b001@x';--") is None


def test_unguessable_and_distinct() -> None:
    gs = {new_gtrid("a", cluster=C) for _ in range(1000)}
    assert len(gs) == 1000
    # two databases on one server: branches of one gtrid differ
    g = new_gtrid("a", cluster=C)
    assert Xid.branch(g, 0).gid != Xid.branch(g, 1).gid


GOOD = Xid.branch(new_gtrid("a", cluster=C, now=1), 0).gid
HOSTILE = [
    "", "ss2.", GOOD + "'", GOOD + ";", "'" + GOOD, GOOD + "\n", GOOD + "\x00", GOOD + "\\",
    GOOD.upper(), GOOD.replace("ss2.", "ss3."), GOOD.replace(".b000", ".b00"),
    GOOD + "; DROP TABLE x; --", "ss2." + "a" * 300, GOOD + " ", " " + GOOD,
    GOOD.replace("b000", "b0000"), GOOD.replace(".", "_"), "_sa_" + "0" * 32,
    "ss1.00000001.12345678.0123456789abcdef0123456789abcdeg.b000",
    "ss2.aaaaaaaaaaaa.aaaaaaa.aaaaaaaaaaaa.aaaaaaaaaaaaaaaaaaaaaaaaa1.b000",  # 1 is not base32
    "ss2.aaaaaaaaaaa.aaaaaaa.aaaaaaaaaaaa.aaaaaaaaaaaaaaaaaaaaaaaaaa.b000",  # short cluster
    GOOD[:-1] + "\u0660",  # Arabic-Indic digit zero: \d would match it
]


@pytest.mark.parametrize("gid", HOSTILE)
def test_parse_gid_rejects_hostile(gid: str) -> None:
    assert parse_gid(gid) is None


@pytest.mark.parametrize("value", [None, 1, b"ss1.", object(), ["x"]])
def test_parse_gid_rejects_non_str(value: object) -> None:
    assert parse_gid(value) is None


def test_parse_xa_strict() -> None:
    x = Xid.branch(new_gtrid("a", cluster=C), 1)
    gt, bq, fmt = x.xa_parts
    data = gt + bq
    assert parse_xa(fmt, len(gt), len(bq), data) == x
    assert parse_xa(str(fmt), str(len(gt)), str(len(bq)), data.decode()) == x
    bad = [
        (fmt + 1, len(gt), len(bq), data),  # other application's formatID
        (fmt, len(gt) - 1, len(bq) + 1, data),  # lengths that split elsewhere
        (fmt, len(gt), len(bq), data + b"x"),  # length mismatch
        (fmt, 65, 0, b"s" * 65),
        (fmt, len(gt) + 1, len(bq) - 1, data),  # a 65-byte gtrid is never ours
        (fmt, len(gt), len(bq), data.replace(b"b0", b"b'")),
        (fmt, len(gt), len(bq), data[:-1] + b"\x00"),
        (fmt, len(gt), len(bq), data[:-1] + b"\xff"),
        (fmt, -1, 0, b""),
        ("x", 1, 1, b"ab"),
        (fmt, len(gt), len(bq), None),
    ]
    for row in bad:
        assert parse_xa(*row) is None, row


def test_xid_constructor_validates() -> None:
    with pytest.raises(ValueError):
        Xid("ss2.x'; --", "b000")
    with pytest.raises(ValueError):
        Xid(new_gtrid("a", cluster=C), "shard-eu")
    with pytest.raises(ValueError):
        Xid.branch(new_gtrid("a", cluster=C), 1000)
    assert not is_our_gtrid(123)
