"""Transaction identifiers of shardsession's global transactions.

A global transaction id (``gtrid``) is built only from a safe alphabet (lower-case hex,
digits and ``.``) and reads::

    ss1.<created: 8 hex, unix seconds>.<decider: 8 hex>.<random: 32 hex>

* ``ss1`` marks it as ours (and the format version);
* ``created`` lets recovery leave young transactions to their live coordinator for a grace
  period (the decision itself is never taken by time: see :mod:`.recovery`);
* ``decider`` names the branch holding the decision row: the first 8 hex digits of a
  SHA-256 of the decider's shard id, so the id itself (which may be a tenant's name) never
  appears in the server's list of prepared transactions, which every role can read;
* ``random`` is 128 bits from :mod:`secrets`: MySQL lets whoever knows an xid finish it.

Each branch adds a branch qualifier ``b<NNN>`` (its registration order, never a shard
name). On PostgreSQL the GID is ``<gtrid>.<bqual>`` (59 bytes; the limit is 199); on
MySQL/MariaDB the xid is ``(gtrid, bqual, FORMAT_ID)`` (55 and 4 bytes; the limit is 64).

Everything read back from a server is untrusted: :func:`parse_gid` and :func:`parse_xa`
accept exactly what :func:`new_gtrid` / :meth:`Xid.gid` produce, and nothing else.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import dataclass

__all__ = [
    "FORMAT_ID",
    "PREFIX",
    "Xid",
    "decider_token",
    "gtrid_created",
    "gtrid_decider",
    "is_our_gtrid",
    "new_gtrid",
    "parse_gid",
    "parse_xa",
]

PREFIX = "ss1."
#: MySQL/MariaDB formatID of our branches ("SSN1"); a second mark of ownership.
FORMAT_ID = 0x53534E31
MAX_BRANCHES = 1000

_GTRID_RE = re.compile(r"ss1\.([0-9a-f]{8})\.([0-9a-f]{8})\.[0-9a-f]{32}")
_BQUAL_RE = re.compile(r"b[0-9]{3}")
_GID_RE = re.compile(r"(ss1\.[0-9a-f]{8}\.[0-9a-f]{8}\.[0-9a-f]{32})\.(b[0-9]{3})")


def decider_token(shard_id: str) -> str:
    """Return the 8-hex-digit token naming ``shard_id`` as a decider inside a gtrid."""
    digest = hashlib.sha256(b"shardsession/decider/" + str(shard_id).encode("utf-8"))
    return digest.hexdigest()[:8]


def new_gtrid(decider_shard_id: str, *, now: float | None = None) -> str:
    """Return a fresh, unguessable gtrid whose decision lives on ``decider_shard_id``."""
    created = int(time.time() if now is None else now) & 0xFFFFFFFF
    return f"{PREFIX}{created:08x}.{decider_token(decider_shard_id)}.{secrets.token_hex(16)}"


def is_our_gtrid(value: object) -> bool:
    """Return whether ``value`` is exactly a gtrid of our format (a ``str``)."""
    return isinstance(value, str) and _GTRID_RE.fullmatch(value) is not None


def gtrid_created(gtrid: str) -> int:
    """Return the creation time (unix seconds) written into ``gtrid``."""
    m = _GTRID_RE.fullmatch(gtrid)
    if m is None:
        raise ValueError("not a shardsession gtrid")
    return int(m.group(1), 16)


def gtrid_decider(gtrid: str) -> str:
    """Return the decider token written into ``gtrid``."""
    m = _GTRID_RE.fullmatch(gtrid)
    if m is None:
        raise ValueError("not a shardsession gtrid")
    return m.group(2)


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
    return Xid(m.group(1), m.group(2))


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
