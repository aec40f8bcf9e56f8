"""Canonical, process-independent encodings of shard key values.

Python's ``hash()`` is salted per process for ``str`` and differs across versions, so it
must never place data. Every key value is turned into bytes by a fixed, documented rule
and hashed with BLAKE2b; the same key gives the same bytes on every machine and version.
"""

from __future__ import annotations

import datetime
import decimal
import hashlib
import uuid
from typing import Any

from ..exc import RoutingError

__all__ = ["INT_KEY", "canonical_key", "compares_bytewise", "key_hash", "nocase"]

#: the encoding of a plain ``int`` key: ``INT_KEY % value``
INT_KEY: bytes = b"i:%d"


def _one(value: Any) -> bytes:
    # A type tag keeps 1, "1" and b"1" apart; bool is tested before int (bool is an int).
    kind = type(value)
    if kind is int:  # the common keys first, without isinstance checks
        encoded: bytes = INT_KEY % value
        return encoded
    if kind is str:
        return b"s:" + str.encode(value, "utf-8")
    if isinstance(value, bool):
        return b"b:1" if value else b"b:0"
    if isinstance(value, int):
        # By its integer value, as the database stores it: str() of an int subclass is
        # its own (an IntEnum member's is "Color.RED" on Python 3.10 and "1" on 3.11+).
        return INT_KEY % int(value)  # type: ignore[no-any-return, unused-ignore]
    if isinstance(value, str):
        return b"s:" + str.encode(value, "utf-8")
    if isinstance(value, bytes | bytearray | memoryview):
        return b"y:" + bytes(value)
    if isinstance(value, uuid.UUID):
        return b"u:" + value.bytes
    if isinstance(value, decimal.Decimal):
        if value == value.to_integral_value():
            # 5 and Decimal("5.00") are the same key, as they are in the database.
            return b"i:" + str(int(value)).encode("ascii")
        return b"d:" + str(value.normalize()).encode("ascii")
    if isinstance(value, datetime.datetime | datetime.date | datetime.time):
        return b"t:" + value.isoformat().encode("ascii")
    raise RoutingError(
        f"cannot place a shard key of type {type(value).__name__!r}: "
        "use int, str, bytes, uuid.UUID, Decimal, date/time, or a tuple of those",
        shard_id=None,
    )


def canonical_key(value: Any) -> bytes:
    """Encode a key value (or a tuple of them, for a composite key) as bytes.

    :raises RoutingError: for ``None`` or a type with no stable encoding.
    """
    if value is None:
        raise RoutingError("a shard key value is None", shard_id=None)
    if isinstance(value, tuple):
        parts = [_one(v) for v in value]
        return b"(" + b"\x00".join(len(p).to_bytes(4, "big") + p for p in parts) + b")"
    return _one(value)


def key_hash(salt: bytes, key: bytes) -> int:
    """A 64-bit hash of ``key`` under ``salt`` (BLAKE2b, stable everywhere)."""
    return int.from_bytes(hashlib.blake2b(key, digest_size=8, key=salt[:64]).digest(), "big")


_ASCII_FOLD = {c: c + 32 for c in range(ord("A"), ord("Z") + 1)}


def nocase(value: Any) -> Any:
    """Key normaliser for SQLite's ``NOCASE`` collation: A-Z folded to a-z (exactly what
    SQLite folds), other characters kept; tuple members and non-strings unchanged but
    for their strings."""
    if isinstance(value, str):
        return value.translate(_ASCII_FOLD)
    if isinstance(value, tuple):
        return tuple(nocase(v) for v in value)
    return value


#: declared collations whose equality is byte (code point) equality
_BYTEWISE = {"binary", "c", "posix", "ucs_basic", "pg_c_utf8"}


def compares_bytewise(collation: str | None) -> bool:
    """Whether a column declared ``COLLATE collation`` (``None``: none declared) finds a
    string key only by its exact value; ``False`` for a case- or accent-insensitive
    collation, a PAD SPACE one (MariaDB ``*_bin``: ``'a' = 'a '``), SQLite ``NOCASE`` /
    ``RTRIM`` and any collation not known to compare byte for byte."""
    if collation is None:
        return True
    name = collation.strip('"`').lower()
    return name in _BYTEWISE or name.endswith("_nopad_bin")
