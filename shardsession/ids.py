"""Global ids for sharded tables, made without a round trip to any database.

* :class:`Snowflake`: time-ordered 64-bit integers (fit ``BIGINT``), unique across every
  process and shard that uses a distinct node id.
* :func:`uuid7`: RFC 9562 version 7 UUIDs (time-ordered, 74 random bits), monotonic
  within a process.

Both are column defaults as they are::

    gen = Snowflake(node_id=7)
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, default=gen)
    key: Mapped[uuid.UUID] = mapped_column(default=uuid7)
"""

from __future__ import annotations

import os
import threading
import time
import uuid

from .exc import ConfigurationError

__all__ = ["EPOCH_MS", "Snowflake", "uuid7"]

#: the Snowflake epoch: 2024-01-01T00:00:00Z, in Unix milliseconds (41 bits of
#: milliseconds last until 2093)
EPOCH_MS = 1_704_067_200_000

_NODE_BITS = 10
_SEQ_BITS = 12
_MAX_NODE = (1 << _NODE_BITS) - 1
_MAX_SEQ = (1 << _SEQ_BITS) - 1
_MAX_MS = (1 << 41) - 1


class Snowflake:
    """A generator of time-ordered 64-bit ids: ``0 | 41 bits of milliseconds since
    :data:`EPOCH_MS` | 10 bits of node id | 12 bits of sequence``.

    Ids are positive, increase strictly within one generator (they sort by creation
    time across generators to the millisecond), and are unique across processes and
    shards as long as no two live generators share a node id. Up to 4,096 ids per
    millisecond per node; past that, or when the wall clock steps back, the generator
    runs on a logical clock ahead of the wall clock (never repeating an id, never
    sleeping) until the wall clock catches up.

    **Node ids** are assigned by the deployment, one per live process (or per
    generator): a replica's ordinal, a per-host number in the configuration, or a
    number leased from a shared table at start-up. shardsession does not assign them:
    two live processes given one node id can produce the same id. A process that forks
    must give the child its own generator with its own node id (the generator refuses
    to run in a child of the process that created it).

    :param node_id: 0 to 1023.
    :raises ConfigurationError: ``node_id`` out of range.
    """

    def __init__(self, node_id: int) -> None:
        if type(node_id) is not int or not 0 <= node_id <= _MAX_NODE:
            raise ConfigurationError(f"Snowflake node_id must be an int 0..{_MAX_NODE}")
        self.node_id = node_id
        self._last_ms = -1
        self._seq = 0
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def __call__(self) -> int:
        """The next id.

        :raises ConfigurationError: called in a forked child (its node id is its
            parent's), or the clock is past the 41-bit range.
        """
        if os.getpid() != self._pid:
            raise ConfigurationError(
                "this Snowflake generator was created in another process; give each "
                "process its own generator with its own node_id"
            )
        now = time.time_ns() // 1_000_000 - EPOCH_MS
        with self._lock:
            if now > self._last_ms:
                self._last_ms, self._seq = now, 0
            elif self._seq < _MAX_SEQ:
                self._seq += 1
            else:  # this millisecond is used up (or the clock stepped back): borrow the next
                self._last_ms, self._seq = self._last_ms + 1, 0
            ms, seq = self._last_ms, self._seq
        if ms > _MAX_MS or ms < 0:
            raise ConfigurationError("the clock is outside the Snowflake id range")
        return (ms << (_NODE_BITS + _SEQ_BITS)) | (self.node_id << _SEQ_BITS) | seq

    @staticmethod
    def parts(value: int) -> tuple[int, int, int]:
        """``(unix_ms, node_id, sequence)`` of an id."""
        return (
            (value >> (_NODE_BITS + _SEQ_BITS)) + EPOCH_MS,
            (value >> _SEQ_BITS) & _MAX_NODE,
            value & _MAX_SEQ,
        )

    def __repr__(self) -> str:
        return f"Snowflake(node_id={self.node_id})"


_uuid_lock = threading.Lock()
_uuid_last = [-1, 0]  # (unix ms, 12-bit counter) of the last UUID made in this process


def uuid7() -> uuid.UUID:
    """A version 7 UUID (RFC 9562): 48 bits of Unix milliseconds, a 12-bit counter in
    ``rand_a`` (monotonic within the process: strictly increasing, also across threads
    and when the clock steps back), and 62 random bits from :func:`os.urandom`."""
    now = time.time_ns() // 1_000_000
    with _uuid_lock:
        last_ms, counter = _uuid_last
        if now > last_ms:
            ms, counter = now, int.from_bytes(os.urandom(2), "big") & 0x1FF  # (room to grow)
        elif counter < 0xFFF:
            ms, counter = last_ms, counter + 1
        else:
            ms, counter = last_ms + 1, 0
        _uuid_last[0], _uuid_last[1] = ms, counter
    rand_b = int.from_bytes(os.urandom(8), "big") & ((1 << 62) - 1)
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | counter << 64 | 0b10 << 62 | rand_b
    return uuid.UUID(int=value)
