"""Placement strategies: pure functions from a shard key value to a shard id.

A strategy never touches a database or the ORM. :class:`~shardsession.routing.Placement`
binds each strategy to a mapper and its key attribute(s).
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

from ..exc import ConfigurationError, RoutingError
from ._keys import INT_KEY, canonical_key

if TYPE_CHECKING:
    from sqlalchemy.orm import QueryableAttribute

__all__ = [
    "Broadcast",
    "DirectorySharding",
    "Follows",
    "HashSharding",
    "KeyStrategy",
    "Pinned",
    "RangeSharding",
    "Rule",
]

#: keys remembered per HashSharding (a plain dict, cleared when full). Kept small: the
#: memo serves a key placed again soon (an identity lookup, then its statement, then the
#: flush); a bigger dict only spreads every insert over more memory (measured: a 65,536
#: entry memo, about 2.5 MB, made a one-shard transaction ~0.5 us slower in place).
_MEMO_SIZE = 8_192

#: an attribute name, an ORM attribute (``User.id``), or a tuple of those
KeySpec: TypeAlias = (
    "str | QueryableAttribute[Any] | tuple[str | QueryableAttribute[Any], ...]"
)


class Rule:
    """Base of every placement rule (what a mapper's rows are placed by)."""

    def bind(self, all_shards: Sequence[str]) -> None:
        """Check the rule against the cluster's shard ids.

        :raises ConfigurationError: a shard the rule names does not exist.
        """

    def bind_engines(self, engines: Mapping[str, Any]) -> None:
        """Receive the session's ``{shard id: Engine}`` (for rules that read a
        database, such as :class:`~shardsession.tenancy.TenantSharding`'s directory)."""

    def _check_known(self, names: Iterable[str], all_shards: Sequence[str]) -> None:
        unknown = sorted(set(names) - set(all_shards))
        if unknown:
            raise ConfigurationError(
                f"{type(self).__name__} names unknown shard(s) {unknown}; "
                f"configured shards are {sorted(all_shards)}"
            )


def integer_from_text(value: str) -> int:
    """The integer a database stores for ``value`` given to an integer column.

    :raises RoutingError: ``value`` is not an integer's text (the database would refuse
        it, or SQLite would store text that no integer key finds).
    """
    text = value.strip()
    digits = text[1:] if text[:1] in ("+", "-") else text
    if not digits.isascii() or not digits.isdigit():
        raise RoutingError(
            f"shard key {value!r} is text that is not an integer, for an integer key column",
            shard_id=None,
        )
    return int(text)


class KeyStrategy(Rule):
    """A rule that places each row by the value of its shard key.

    :param key: the key attribute: a name (``"user_id"``), an ORM attribute
        (``Order.user_id``), or a tuple of them for a composite key.
    :param normalize: applied to every key value (the tuple, for a composite key)
        before it is placed, for a key column the database compares other than
        byte for byte (a case-insensitive collation: ``'Bob@X.com'`` and
        ``'bob@x.com'`` are one key there, so they must be one key here):
        :func:`shardsession.routing.nocase` for SQLite ``NOCASE``, or your own function
        that maps every value to one representative of its class under the column's
        collation.  A directory's keys must be normalised values.  Without it, a string
        key column declared with such a collation is refused when the placement is
        resolved; the placement of keys without a normaliser never changes.
    """

    def __init__(self, key: KeySpec, *, normalize: Callable[[Any], Any] | None = None) -> None:
        keys = key if isinstance(key, tuple) else (key,)
        if not keys:
            raise ConfigurationError(f"{type(self).__name__} needs a shard key")
        names: list[str] = []
        for k in keys:
            name = k if isinstance(k, str) else getattr(k, "key", None)
            if not isinstance(name, str) or not name:
                raise ConfigurationError(
                    f"{type(self).__name__}: shard key must be an attribute name or an ORM "
                    f"attribute, not {k!r}"
                )
            names.append(name)
        self.key: tuple[str, ...] = tuple(names)
        if normalize is not None and not callable(normalize):
            raise ConfigurationError(f"{type(self).__name__}: normalize must be callable")
        self.normalize = normalize
        #: set when the placement finds the key to be one integer column: a key given as
        #: text (``"1001"``) is then placed as the integer the database stores
        self.integer_key = False
        if normalize is not None:
            # Wrap once here, so that strategies without a normaliser keep their hot
            # path untouched.
            place = type(self).shard_for.__get__(self)

            def normalized(value: Any) -> str:
                shard: str = place(None if value is None else normalize(value))
                return shard

            self.shard_for = normalized  # type: ignore[method-assign]

    def shard_for(self, value: Any) -> str:
        """Return the shard for one key value (a tuple for a composite key).

        :raises RoutingError: the value cannot be placed.
        """
        raise NotImplementedError

    def candidate_shards(self) -> Sequence[str]:
        """Every shard this strategy can return (where a fan-out must look)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(self.key)})"


class HashSharding(KeyStrategy):
    """Place rows by a stable hash of the shard key (rendezvous hashing).

    Each key goes to the shard with the highest BLAKE2b score of ``(shard, key)``. The
    result depends only on the key bytes and the shard names, never on the process,
    machine or Python version.

    Adding a shard moves only the keys that now score highest on the new shard, about
    ``1/(n+1)`` of them, and moves them *only to the new shard*; removing a shard moves only
    its own keys. Integer ``weights`` give a shard proportionally more keys (a weight of 2
    acts as two shards).

    :param key: see :class:`KeyStrategy`.
    :param shards: the shards to spread over; ``None`` means every shard of the session,
        bound when the placement is attached.
    :param weights: optional ``{shard: positive int}``.
    """

    def __init__(
        self,
        key: KeySpec,
        shards: Sequence[str] | None = None,
        *,
        weights: Mapping[str, int] | None = None,
        normalize: Callable[[Any], Any] | None = None,
    ) -> None:
        super().__init__(key, normalize=normalize)
        self._explicit = list(shards) if shards is not None else None
        self._weights = dict(weights or {})
        for name, w in self._weights.items():
            if not isinstance(w, int) or isinstance(w, bool) or w < 1:
                raise ConfigurationError(f"HashSharding weight of {name!r} must be an int >= 1")
        self._slots: list[tuple[Any, str]] = []
        self._memo: dict[Any, str] = {}
        self._int_memo: dict[int, str] = {}  # plain int keys, the most common, by value
        if self._explicit is not None:
            self._build(self._explicit)

    def _build(self, shards: Sequence[str]) -> None:
        if not shards:
            raise ConfigurationError("HashSharding needs at least one shard")
        if len(set(shards)) != len(shards):
            raise ConfigurationError(f"HashSharding shards repeat: {list(shards)}")
        unknown = set(self._weights) - set(shards)
        if unknown:
            raise ConfigurationError(f"HashSharding weights name unknown shards {sorted(unknown)}")
        slots = []
        for name in shards:
            for i in range(self._weights.get(name, 1)):
                slot = name if i == 0 else f"{name}#{i}"
                # score = BLAKE2b-64(person="shardsession", salt="hrw", slot NUL key); the
                # prefix state is hashed once and copied per key.
                pre = hashlib.blake2b(digest_size=8, person=b"shardsession", salt=b"hrw")
                pre.update(slot.encode("utf-8") + b"\x00")
                slots.append((pre, name))
        self._slots = slots
        self._shards = list(shards)
        self._memo.clear()
        self._int_memo.clear()

    def bind(self, all_shards: Sequence[str]) -> None:
        if self._explicit is None:
            self._build(sorted(all_shards))
        else:
            self._check_known(self._explicit, all_shards)

    def shard_for(self, value: Any) -> str:
        # A small memo: the same keys are placed again and again (identity lookups, the
        # statement that follows, the flush). Plain ints are remembered by value (no key
        # tuple to build); other values by (type, value), which keeps 1, True and 1.0
        # apart.
        memo: dict[Any, str]
        memo_key: Any
        if type(value) is int:
            memo, memo_key = self._int_memo, value
            hit = memo.get(value)
            if hit is not None:
                return hit
            hit = self._score(INT_KEY % value)  # (canonical_key's encoding of an int)
        else:
            if type(value) is str and self.integer_key:
                return self.shard_for(integer_from_text(value))
            memo, memo_key = self._memo, (type(value), value)
            try:
                hit = memo.get(memo_key)
            except TypeError:  # unhashable: compute every time
                return self._score(canonical_key(value))
            if hit is not None:
                return hit
            hit = self._score(canonical_key(value))
        if len(memo) >= _MEMO_SIZE:
            memo.clear()
        memo[memo_key] = hit
        return hit

    def _score(self, key: bytes) -> str:
        """The shard of an encoded key (see :func:`canonical_key`)."""
        if not self._slots:
            raise ConfigurationError("HashSharding is not bound to any shards yet")
        # The score is the digest read as a big-endian 64-bit integer; digests of one
        # length compare as bytes exactly as those integers compare, so no conversion.
        best_score = b""
        best = ""
        for pre, name in self._slots:
            h = pre.copy()
            h.update(key)
            score = h.digest()
            # ties are astronomically unlikely; break them by name so the answer is total
            if score > best_score or (score == best_score and name < best):
                best_score, best = score, name
        return best

    def candidate_shards(self) -> Sequence[str]:
        return list(self._shards) if self._slots else []


class RangeSharding(KeyStrategy):
    """Place rows by ranges of the shard key.

    :param key: see :class:`KeyStrategy`.
    :param ranges: ``[(upper_bound, shard), ...]`` in increasing order of bound; a key goes
        to the first range whose upper bound is greater than the key (bounds are exclusive).
        The last bound may be ``None`` (no upper limit). A key at or above the last
        bound when it is not ``None`` raises :class:`RoutingError`.
    """

    def __init__(
        self,
        key: KeySpec,
        ranges: Sequence[tuple[Any, str]],
        *,
        normalize: Callable[[Any], Any] | None = None,
    ) -> None:
        super().__init__(key, normalize=normalize)
        if not ranges:
            raise ConfigurationError("RangeSharding needs at least one range")
        bounds: list[Any] = []
        shards: list[str] = []
        self._open_ended = False
        for i, item in enumerate(ranges):
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], str)):
                raise ConfigurationError(
                    f"RangeSharding range #{i} must be (upper_bound, shard_id), got {item!r}"
                )
            bound, shard = item
            if bound is None:
                if i != len(ranges) - 1:
                    raise ConfigurationError(
                        "RangeSharding: only the last range may have no upper bound"
                    )
                self._open_ended = True
            else:
                if bounds:
                    try:
                        increasing = bound > bounds[-1]
                    except TypeError as e:
                        raise ConfigurationError(
                            f"RangeSharding bounds are not comparable: {bounds[-1]!r}, {bound!r}"
                        ) from e
                    if not increasing:
                        raise ConfigurationError(
                            f"RangeSharding bounds must increase: {bounds[-1]!r} then {bound!r}"
                        )
                bounds.append(bound)
            shards.append(shard)
        self._bounds = bounds
        self._shards = shards

    def bind(self, all_shards: Sequence[str]) -> None:
        self._check_known(self._shards, all_shards)

    def shard_for(self, value: Any) -> str:
        if value is None:
            raise RoutingError("a shard key value is None", shard_id=None)
        try:
            i = bisect.bisect_right(self._bounds, value)
        except TypeError as e:
            raise RoutingError(
                f"shard key {value!r} cannot be compared with the range bounds", shard_id=None
            ) from e
        if i >= len(self._shards):
            raise RoutingError(
                f"shard key {value!r} is above the last range bound {self._bounds[-1]!r}",
                shard_id=None,
            )
        return self._shards[i]

    def candidate_shards(self) -> Sequence[str]:
        return list(dict.fromkeys(self._shards))


class DirectorySharding(KeyStrategy):
    """Place rows by looking their key up in a directory (a lookup table).

    :param key: see :class:`KeyStrategy`.
    :param directory: a mapping ``{key: shard}`` or a callable ``key -> shard | None``
        (for example one that reads a directory table, with a cache).
    :param assign: optional callable ``key -> shard`` for keys the directory does not know
        yet (a new tenant); it should record its choice so later lookups agree. Without it
        an unknown key raises :class:`RoutingError`.
    :param shards: the shards the directory may return; ``None`` means every shard.
    """

    def __init__(
        self,
        key: KeySpec,
        directory: Mapping[Any, str] | Callable[[Any], str | None],
        *,
        assign: Callable[[Any], str] | None = None,
        shards: Sequence[str] | None = None,
        normalize: Callable[[Any], Any] | None = None,
    ) -> None:
        super().__init__(key, normalize=normalize)
        if not (isinstance(directory, Mapping) or callable(directory)):
            raise ConfigurationError("DirectorySharding directory must be a mapping or callable")
        self._directory = directory
        self._assign = assign
        self._shards: list[str] = list(shards) if shards is not None else []
        self._explicit = shards is not None

    def bind(self, all_shards: Sequence[str]) -> None:
        if self._explicit:
            self._check_known(self._shards, all_shards)
        else:
            self._shards = sorted(all_shards)
        if isinstance(self._directory, Mapping):
            self._check_known(set(self._directory.values()), all_shards)

    def shard_for(self, value: Any) -> str:
        if value is None:
            raise RoutingError("a shard key value is None", shard_id=None)
        if isinstance(self._directory, Mapping):
            shard = self._directory.get(value)
        else:
            shard = self._directory(value)
        if shard is None and self._assign is not None:
            shard = self._assign(value)
        if shard is None:
            raise RoutingError(f"the directory has no shard for key {value!r}", shard_id=None)
        if shard not in self._shards:
            raise RoutingError(
                f"the directory placed key {value!r} on unknown shard {shard!r}", shard_id=shard
            )
        return shard

    def candidate_shards(self) -> Sequence[str]:
        return list(self._shards)


class Pinned(Rule):
    """Every row of the mapper lives on one shard (vertical partitioning)."""

    def __init__(self, shard_id: str) -> None:
        if not isinstance(shard_id, str) or not shard_id:
            raise ConfigurationError(f"Pinned needs a shard id, got {shard_id!r}")
        self.shard_id = shard_id

    def bind(self, all_shards: Sequence[str]) -> None:
        self._check_known([self.shard_id], all_shards)

    def __repr__(self) -> str:
        return f"Pinned({self.shard_id!r})"


class Broadcast(Rule):
    """A reference table: every write goes to every shard, reads go to one.

    :param read_from: the shard reads use; ``None`` means the first shard by name.
    """

    def __init__(self, read_from: str | None = None) -> None:
        self.read_from = read_from
        self.shards: list[str] = []

    def bind(self, all_shards: Sequence[str]) -> None:
        if self.read_from is not None:
            self._check_known([self.read_from], all_shards)
        else:
            self.read_from = sorted(all_shards)[0]
        self.shards = sorted(all_shards)

    def __repr__(self) -> str:
        return f"Broadcast(read_from={self.read_from!r})"


class Follows(Rule):
    """Rows live on the shard of their parent, reached through a many-to-one relationship.

    :param relationship: the relationship attribute (name or ``Order.user``) leading to the
        parent; ``None`` means any many-to-one relationship to a placed mapper.
    """

    def __init__(self, relationship: str | QueryableAttribute[Any] | None = None) -> None:
        if relationship is None or isinstance(relationship, str):
            self.relationship: str | None = relationship
        else:
            name = getattr(relationship, "key", None)
            if not isinstance(name, str):
                raise ConfigurationError(f"Follows needs a relationship, got {relationship!r}")
            self.relationship = name

    def __repr__(self) -> str:
        return f"Follows({self.relationship!r})"
