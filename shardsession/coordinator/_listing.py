"""What recovery and ``status`` see: prepared branches listed on every shard, and whose
each one is (see :mod:`.recovery` for the rules)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import Engine

from ..backends import BackendAdapter, adapter_for
from ..backends.base import printable
from ..exc import ConfigurationError
from .decisions import admin_connection
from .xid import Xid, check_shard_ids, legacy_decider_token, parse_gid, parse_xa, shard_token

__all__ = ["Listing", "Owners", "Seen", "adapters_of", "list_branches"]


def _parse(raw: Any) -> Xid | None:
    if isinstance(raw, str):
        return parse_gid(raw)
    if isinstance(raw, tuple) and len(raw) == 4:
        return parse_xa(*raw)
    return None


@dataclass(frozen=True)
class Seen:
    """Where a branch was listed: the shard, its age by the server's clock (if known) and
    why the listing role cannot finish it (if it cannot)."""

    shard: str
    age: float | None
    blocked: str | None


@dataclass
class Listing:
    """One listing of prepared transactions over the shards, parsed strictly."""

    #: (server key, xid) -> where it was seen
    branches: dict[tuple[str, Xid], Seen] = field(default_factory=dict)
    #: (server key, printable id) -> shard that listed it
    foreign: dict[tuple[str, str], str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    #: shards listed successfully / that could not be listed
    listed: set[str] = field(default_factory=set)
    failed: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.failed


def adapters_of(shards: Mapping[str, Engine]) -> dict[str, BackendAdapter]:
    out: dict[str, BackendAdapter] = {}
    for name, engine in shards.items():
        try:
            out[name] = adapter_for(engine.dialect.name)
        except KeyError:
            continue
    return out


def list_branches(shards: Mapping[str, Engine], adapters: Mapping[str, BackendAdapter],
          only: set[str] | None = None) -> Listing:
    listing = Listing()
    for name, adapter in adapters.items():
        if adapter.name == "sqlite" or (only is not None and name not in only):
            continue
        engine = shards[name]
        try:
            with admin_connection(engine) as dbapi:
                key = adapter.server_key(dbapi, engine.url.render_as_string(hide_password=True))
                rows = adapter.list_in_doubt(dbapi)
        except Exception as e:
            listing.failed.append(name)
            listing.errors.append(f"{name}: cannot list prepared transactions: {e}")
            continue
        listing.listed.add(name)
        for row in rows:
            xid = _parse(row.raw)
            if xid is None:
                listing.foreign.setdefault((key, printable(row.raw)), name)
                continue
            listing.branches.setdefault((key, xid), Seen(name, row.age, row.blocked))
    return listing


class Owners:
    """Whose is an xid: the decider shard it names must store the identity it carries."""

    def __init__(self, shards: Mapping[str, Engine], identities: Mapping[str, str | None],
                 unreadable: set[str], previous: Mapping[str, str] | None = None,
                 adopt_previous: bool = False) -> None:
        try:
            check_shard_ids(shards)
        except ValueError as e:
            raise ConfigurationError(str(e)) from e
        self.tokens = {shard_token(n): n for n in shards}
        self.sqlite = {n for n, e in shards.items() if e.dialect.name == "sqlite"}
        self.legacy_tokens = {legacy_decider_token(n): n for n in shards}
        self.identities = identities
        self.ours = {i for i in identities.values() if i is not None}
        self.unreadable = unreadable
        self.previous = dict(previous or {})
        self.adopt_previous = adopt_previous

    def classify(self, xid: Xid) -> tuple[str, str | None]:
        """``(kind, decider shard)``; kind: ``ours``, ``legacy``, ``unchecked`` (ours,
        decider not configured or its identity unreadable: never guessed),
        ``unattributed`` (its SQLite decider stores no identity yet), ``previous`` (it
        names the identity its decider had before it was re-keyed as a copy: it may be
        the original's; ``ours`` under ``adopt_previous``) or ``foreign``."""
        if xid.legacy:
            decider = self.legacy_tokens.get(xid.decider)
            return ("legacy", decider) if decider is not None else ("foreign", None)
        decider = self.tokens.get(xid.decider)
        if decider is not None and self.identities.get(decider) == xid.cluster:
            return "ours", decider
        if decider is not None and self.previous.get(decider) == xid.cluster:
            return ("ours" if self.adopt_previous else "previous"), decider
        if decider in self.sqlite and decider not in self.unreadable:
            # A SQLite decider locked by its transaction's own writes stores its identity
            # with its first decision (see .identity): a crash before that leaves branches
            # naming an identity stored nowhere, also once a later commit stored another
            # one. Never claimed, never called foreign (a SQLite file is no shared server:
            # another cluster's branch naming the same shard id is the rare case, and it is
            # only reported).
            return "unattributed", decider
        if decider is not None and decider in self.unreadable:
            return "unchecked", decider
        if xid.cluster in self.ours:
            return "unchecked", None
        return "foreign", None
