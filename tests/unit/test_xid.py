"""Xid generation and strict parsing (hostile input included)."""

from __future__ import annotations

import pytest

from shardsession.coordinator.xid import (
    FORMAT_ID,
    Xid,
    decider_token,
    gtrid_created,
    gtrid_decider,
    is_our_gtrid,
    new_gtrid,
    parse_gid,
    parse_xa,
)


def test_roundtrip_and_limits() -> None:
    g = new_gtrid("tenant-eu", now=1_700_000_000)
    x = Xid.branch(g, 3)
    assert parse_gid(x.gid) == x
    assert len(x.gid.encode()) < 200
    gt, bq, fmt = x.xa_parts
    assert len(gt) <= 64 and len(bq) <= 64 and fmt == FORMAT_ID
    assert parse_xa(fmt, len(gt), len(bq), gt + bq) == x
    assert gtrid_created(g) == 1_700_000_000
    assert gtrid_decider(g) == decider_token("tenant-eu")
    assert "tenant" not in x.gid and "eu" not in x.bqual
    assert x.xa_literal == f"X'{gt.hex()}',X'{bq.hex()}',{FORMAT_ID}"


def test_unguessable_and_distinct() -> None:
    gs = {new_gtrid("a") for _ in range(1000)}
    assert len(gs) == 1000
    # two databases on one server: branches of one gtrid differ
    g = new_gtrid("a")
    assert Xid.branch(g, 0).gid != Xid.branch(g, 1).gid


GOOD = Xid.branch(new_gtrid("a", now=1), 0).gid
HOSTILE = [
    "", "ss1.", GOOD + "'", GOOD + ";", "'" + GOOD, GOOD + "\n", GOOD + "\x00", GOOD + "\\",
    GOOD.upper(), GOOD.replace("ss1.", "ss2."), GOOD.replace(".b000", ".b00"),
    GOOD + "; DROP TABLE x; --", "ss1." + "a" * 300, GOOD + " ", " " + GOOD,
    GOOD.replace("b000", "b0000"), GOOD.replace(".", "_"), "_sa_" + "0" * 32,
    "ss1.00000001.12345678.0123456789abcdef0123456789abcdeg.b000",
    GOOD[:-1] + "\u0660",  # Arabic-Indic digit zero: \d would match it
]


@pytest.mark.parametrize("gid", HOSTILE)
def test_parse_gid_rejects_hostile(gid: str) -> None:
    assert parse_gid(gid) is None


@pytest.mark.parametrize("value", [None, 1, b"ss1.", object(), ["x"]])
def test_parse_gid_rejects_non_str(value: object) -> None:
    assert parse_gid(value) is None


def test_parse_xa_strict() -> None:
    x = Xid.branch(new_gtrid("a"), 1)
    gt, bq, fmt = x.xa_parts
    data = gt + bq
    assert parse_xa(fmt, len(gt), len(bq), data) == x
    assert parse_xa(str(fmt), str(len(gt)), str(len(bq)), data.decode()) == x
    bad = [
        (fmt + 1, len(gt), len(bq), data),  # other application's formatID
        (fmt, len(gt) - 1, len(bq) + 1, data),  # lengths that split elsewhere
        (fmt, len(gt), len(bq), data + b"x"),  # length mismatch
        (fmt, 65, 0, b"s" * 65),
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
        Xid("ss1.x'; --", "b000")
    with pytest.raises(ValueError):
        Xid(new_gtrid("a"), "shard-eu")
    with pytest.raises(ValueError):
        Xid.branch(new_gtrid("a"), 1000)
    assert not is_our_gtrid(123)
