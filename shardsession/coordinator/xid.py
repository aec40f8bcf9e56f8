"""Transaction identifiers of shardsession's global transactions.

A global transaction id (``gtrid``) is built only from a safe alphabet (lower-case
letters, the digits 2-7 and ``.``) and reads, in exactly 64 bytes (MariaDB's limit)::

    ss2.<cluster: 12>.<created: 7>.<decider: 12>.<random: 26>

* ``ss2`` marks it as ours (and the format version);
* ``cluster`` is the identity of the decider's database (:func:`new_cluster_id`, 60
  bits, generated once and stored next to the decision table, see :mod:`.identity`). A
  branch is ours only when the decider shard named below stores exactly this identity:
  two applications with the same shard names on shared servers never take each other's
  branches for their own;
* ``created`` (unix seconds) lets recovery leave young transactions to their live
  coordinator for a grace period (the decision itself is never taken by time);
* ``decider`` names the shard holding the decision row: 60 bits of a SHA-256 of its shard
  id (:func:`shard_token`), so the id itself (which may be a tenant's name) never appears in
  the server's list of prepared transactions, which every role can read. Two shard ids of
  one configuration with the same token are refused at configuration
  (:func:`check_shard_ids`), so the token names one shard unambiguously;
* ``random`` is 130 bits from :mod:`secrets`: MySQL lets whoever knows an xid finish it.

The fields are base32 (RFC 4648 alphabet, lower case) to fit the 64 bytes. Each branch adds
a branch qualifier ``b<NNN>`` (its registration order, never a shard name). On PostgreSQL
the GID is ``<gtrid>.<bqual>`` (69 bytes; the limit is 199); on MySQL/MariaDB the xid is
``(gtrid, bqual, FORMAT_ID)`` (64 and 4 bytes; the limit is 64 each).

The previous format, ``ss1.<created: 8 hex>.<decider: 8 hex>.<random: 32 hex>``, named
neither its cluster nor its decider unambiguously (a 32-bit token). It is still parsed
(:attr:`Xid.legacy`) so that recovery can finish a legacy branch whose decision row it finds
in its own decision table; a legacy branch without one cannot be told apart from another
application's and is never claimed (see :mod:`.recovery`).

Everything read back from a server is untrusted: :func:`parse_gid` and :func:`parse_xa`
accept exactly what :func:`new_gtrid` / :meth:`Xid.gid` produce (or the legacy format), and
nothing else.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = [
    "FORMAT_ID",
    "LEGACY_PREFIX",
    "MAX_PREPARED_BRANCHES",
    "PARTICIPANTS_MAX_CHARS",
    "PREFIX",
    "Xid",
    "check_shard_ids",
    "decider_token",
    "gtrid_cluster",
    "gtrid_created",
    "gtrid_decider",
    "is_cluster_id",
    "is_legacy_gtrid",
    "is_our_gtrid",
    "legacy_decider_token",
    "location_mark",
    "new_cluster_id",
    "new_gtrid",
    "parse_gid",
    "parse_participants",
    "parse_participants_full",
    "parse_xa",
    "participants_text",
    "shard_token",
]

PREFIX = "ss2."
LEGACY_PREFIX = "ss1."
#: MySQL/MariaDB formatID of our branches ("SSN1"); a second mark of ownership.
FORMAT_ID = 0x53534E31
MAX_BRANCHES = 1000
#: the ``participants`` column's size (VARCHAR(4000) in every dialect's DDL) and how many
#: prepared branches (``b001@<token>.<location>``, 26 characters and a comma each) it can
#: name
PARTICIPANTS_MAX_CHARS = 4000
MAX_PREPARED_BRANCHES = (PARTICIPANTS_MAX_CHARS + 1) // 27

_B32 = "abcdefghijklmnopqrstuvwxyz234567"
_CLUSTER_LEN = 12  # 60 bits
_CREATED_LEN = 7  # 35 bits of unix seconds: until the year 3058
_TOKEN_LEN = 12  # 60 bits
_RANDOM_LEN = 26  # 130 bits

_F = "[a-z2-7]"
_NEW = (rf"ss2\.({_F}{{{_CLUSTER_LEN}}})\.({_F}{{{_CREATED_LEN}}})\.({_F}{{{_TOKEN_LEN}}})"
        rf"\.{_F}{{{_RANDOM_LEN}}}")
_OLD = r"ss1\.([0-9a-f]{8})\.([0-9a-f]{8})\.[0-9a-f]{32}"
_NEW_RE = re.compile(_NEW)
_OLD_RE = re.compile(_OLD)
_CLUSTER_RE = re.compile(f"{_F}{{{_CLUSTER_LEN}}}")
_BQUAL_RE = re.compile(r"b[0-9]{3}")
_GID_RE = re.compile(rf"(?P<gtrid>{_NEW}|{_OLD})\.(?P<bqual>b[0-9]{{3}})")
_LOCATION_LEN = 8  # 40 bits of the participant database's location
_PARTICIPANT_RE = re.compile(
    rf"(b[0-9]{{3}})@({_F}{{{_TOKEN_LEN}}})(?:\.({_F}{{{_LOCATION_LEN}}}))?")


def _b32(value: int, width: int) -> str:
    out = []
    for _ in range(width):
        out.append(_B32[value & 31])
        value >>= 5
    return "".join(reversed(out))


def _b32_int(text: str) -> int:
    n = 0
    for ch in text:
        n = n * 32 + _B32.index(ch)
    return n


def new_cluster_id() -> str:
    """Return a fresh cluster identity (12 base32 characters, 60 random bits)."""
    return _b32(secrets.randbits(5 * _CLUSTER_LEN), _CLUSTER_LEN)


def is_cluster_id(value: object) -> bool:
    """Whether ``value`` is exactly a cluster identity of ours (a ``str``)."""
    return isinstance(value, str) and _CLUSTER_RE.fullmatch(value) is not None


def shard_token(shard_id: object) -> str:
    """Return the 12-character token naming ``shard_id`` inside xids and decision rows."""
    digest = hashlib.sha256(b"shardsession/shard/" + str(shard_id).encode("utf-8")).digest()
    return _b32(int.from_bytes(digest[:8], "big") >> 4, _TOKEN_LEN)


#: the decider of a gtrid is named by its shard token
decider_token = shard_token


def legacy_decider_token(shard_id: object) -> str:
    """The 8-hex-digit decider token of the legacy ``ss1`` format."""
    digest = hashlib.sha256(b"shardsession/decider/" + str(shard_id).encode("utf-8"))
    return digest.hexdigest()[:8]


def check_shard_ids(shard_ids: Iterable[object]) -> None:
    """Refuse shard ids that would name the same decider inside an xid.

    :raises ValueError: two ids with the same text (``1`` and ``"1"``) or, against odds of
        2**-60 per pair, the same token; the message names both.
    """
    seen: dict[str, object] = {}
    texts: dict[str, object] = {}
    for sid in shard_ids:
        text = str(sid)
        if text in texts and texts[text] is not sid and texts[text] != sid:
            raise ValueError(f"shard ids {texts[text]!r} and {sid!r} are the same name "
                             "as text: a transaction could not tell them apart")
        texts[text] = sid
        token = shard_token(sid)
        if token in seen and str(seen[token]) != text:
            raise ValueError(f"shard ids {seen[token]!r} and {sid!r} have the same token "
                             f"{token!r}: rename one of them")
        seen[token] = sid


def new_gtrid(decider_shard_id: object, *, cluster: str, now: float | None = None) -> str:
    """Return a fresh, unguessable gtrid of ``cluster`` whose decision lives on
    ``decider_shard_id``.

    :raises ValueError: ``cluster`` is not a cluster identity.
    """
    if not is_cluster_id(cluster):
        raise ValueError("not a shardsession cluster identity")
    created = int(time.time() if now is None else now) & ((1 << 5 * _CREATED_LEN) - 1)
    rand = _b32(secrets.randbits(5 * _RANDOM_LEN), _RANDOM_LEN)
    return (f"{PREFIX}{cluster}.{_b32(created, _CREATED_LEN)}."
            f"{shard_token(decider_shard_id)}.{rand}")


def is_our_gtrid(value: object) -> bool:
    """Return whether ``value`` is exactly a gtrid of ours (either format, a ``str``)."""
    return isinstance(value, str) and (
        _NEW_RE.fullmatch(value) is not None or _OLD_RE.fullmatch(value) is not None)


def is_legacy_gtrid(value: object) -> bool:
    """Whether ``value`` is a gtrid of the legacy ``ss1`` format."""
    return isinstance(value, str) and _OLD_RE.fullmatch(value) is not None


def gtrid_created(gtrid: str) -> int:
    """Return the creation time (unix seconds, the coordinator's clock) written into ``gtrid``."""
    m = _NEW_RE.fullmatch(gtrid)
    if m is not None:
        return _b32_int(m.group(2))
    m = _OLD_RE.fullmatch(gtrid)
    if m is None:
        raise ValueError("not a shardsession gtrid")
    return int(m.group(1), 16)


def gtrid_decider(gtrid: str) -> str:
    """Return the decider token written into ``gtrid`` (12 base32, or 8 hex if legacy)."""
    m = _NEW_RE.fullmatch(gtrid)
    if m is not None:
        return m.group(3)
    m = _OLD_RE.fullmatch(gtrid)
    if m is None:
        raise ValueError("not a shardsession gtrid")
    return m.group(2)


def gtrid_cluster(gtrid: str) -> str | None:
    """Return the cluster identity written into ``gtrid`` (``None`` for the legacy format)."""
    m = _NEW_RE.fullmatch(gtrid)
    if m is not None:
        return m.group(1)
    if _OLD_RE.fullmatch(gtrid) is None:
        raise ValueError("not a shardsession gtrid")
    return None


@dataclass(frozen=True)
class Xid:
    """The id of one branch: the global ``gtrid`` and the branch qualifier ``bqual``."""

    gtrid: str
    bqual: str

    def __post_init__(self) -> None:
        # Constructing an Xid is the validation: every Xid that exists is safe to render.
        if not is_our_gtrid(self.gtrid) or _BQUAL_RE.fullmatch(self.bqual) is None:
            raise ValueError("not a shardsession xid")

    @classmethod
    def branch(cls, gtrid: str, index: int) -> Xid:
        """Return the xid of the ``index``-th branch (0-based) of ``gtrid``."""
        if not 0 <= index < MAX_BRANCHES:
            raise ValueError(f"branch index out of range: {index}")
        return cls(gtrid, f"b{index:03d}")

    @property
    def legacy(self) -> bool:
        """Whether this is an xid of the legacy ``ss1`` format (no cluster identity)."""
        return is_legacy_gtrid(self.gtrid)

    @property
    def cluster(self) -> str | None:
        """The cluster identity named by the xid (``None`` for a legacy xid)."""
        return gtrid_cluster(self.gtrid)

    @property
    def decider(self) -> str:
        """The decider's token named by the xid."""
        return gtrid_decider(self.gtrid)

    @property
    def gid(self) -> str:
        """PostgreSQL GID: unique per server, so two databases on one server differ."""
        return f"{self.gtrid}.{self.bqual}"

    @property
    def xa_parts(self) -> tuple[bytes, bytes, int]:
        """MySQL/MariaDB ``(gtrid, bqual, formatID)``."""
        return self.gtrid.encode("ascii"), self.bqual.encode("ascii"), FORMAT_ID

    @property
    def xa_literal(self) -> str:
        """The xid as ``X'..',X'..',<int>`` for XA statements.

        XA statements take no bound parameters in MariaDB's grammar; hex literals of a
        validated Xid are the manual's advice and leave nothing to quote.
        """
        g, b, fmt = self.xa_parts
        return f"X'{g.hex()}',X'{b.hex()}',{fmt:d}"


def parse_gid(value: object) -> Xid | None:
    """Parse a PostgreSQL GID read from the server; ``None`` unless exactly ours."""
    if not isinstance(value, str) or len(value) > 199:
        return None
    m = _GID_RE.fullmatch(value)
    if m is None:
        return None
    return Xid(m.group("gtrid"), m.group("bqual"))


def parse_xa(format_id: object, gtrid_length: object, bqual_length: object,
             data: object) -> Xid | None:
    """Parse one ``XA RECOVER`` row; ``None`` unless it is exactly one of our branches.

    ``data`` is the gtrid followed by the bqual, split by the two lengths (the server
    does not validate them against anything of ours, so check every field).
    """
    if isinstance(data, str):
        try:
            data = data.encode("latin-1")
        except UnicodeEncodeError:
            return None
    if not isinstance(data, (bytes, bytearray)):
        return None
    try:
        fmt, gl, bl = int(format_id), int(gtrid_length), int(bqual_length)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None
    if fmt != FORMAT_ID or not (1 <= gl <= 64 and 1 <= bl <= 64) or gl + bl != len(data):
        return None
    try:
        gtrid = bytes(data[:gl]).decode("ascii")
        bqual = bytes(data[gl:]).decode("ascii")
    except UnicodeDecodeError:
        return None
    if not is_our_gtrid(gtrid) or _BQUAL_RE.fullmatch(bqual) is None:
        return None
    return Xid(gtrid, bqual)


def location_mark(location: str) -> str:
    """The 8-character mark of a database's location (an adapter's ``location()``: server
    and database) recorded for each participant of a decision row."""
    digest = hashlib.sha256(b"shardsession/location/" + location.encode("utf-8")).digest()
    return _b32(int.from_bytes(digest[:5], "big"), _LOCATION_LEN)


def participants_text(branches: Iterable[tuple[Xid, object]],
                      locations: Mapping[str, str] | None = None) -> str:
    """The ``participants`` column of a decision row: ``b001@<shard token>.<location>,...``
    for each prepared branch ``(xid, shard id)``, so that recovery knows which shards it
    must have asked before the row may go (the token, not the shard id, for the reasons
    above), and can check that the database it asked is the one the branch was prepared
    in (the :func:`location_mark` of ``locations[shard id]``; left out where unknown)."""
    out = []
    for x, s in branches:
        loc = (locations or {}).get(str(s))
        mark = f".{location_mark(loc)}" if loc else ""
        out.append(f"{x.bqual}@{shard_token(s)}{mark}")
    return ",".join(out)


def parse_participants(text: str) -> list[tuple[str, str]] | None:
    """``[(bqual, shard token), ...]`` of a ``participants`` column; ``None`` when it is
    not in that form (a legacy row's ``b001,b002`` names no shard). ``""`` is ``[]``."""
    full = parse_participants_full(text)
    return None if full is None else [(b, t) for b, t, _m in full]


def parse_participants_full(text: str) -> list[tuple[str, str, str | None]] | None:
    """``[(bqual, shard token, location mark or None), ...]`` of a ``participants``
    column (rows written before location marks existed have none); ``None`` when it is
    not in that form. ``""`` is ``[]``."""
    if text == "":
        return []
    out = []
    for part in text.split(","):
        m = _PARTICIPANT_RE.fullmatch(part)
        if m is None:
            return None
        out.append((m.group(1), m.group(2), m.group(3)))
    return out
