"""Recovery: finish every in-doubt branch of ours, by the decision or by presumed abort.

One pass (:func:`recover`):

1. read a snapshot of every decider's decision rows (*before* listing branches: a row
   read then had all its branches prepared already, so the listing that follows shows any
   still in doubt; this ordering is what makes deleting rows safe, as in Citus);
2. list prepared transactions on every shard: on PostgreSQL in the current database only,
   on MySQL/MariaDB server-wide (deduplicated per server); every id is parsed strictly
   and anything not exactly ours is counted as foreign and left untouched;
3. per gtrid: follow its decision row; without one, leave it for ``grace_period`` seconds
   after its creation (a live coordinator may still be preparing), then claim ABORT by
   inserting the row (the primary key decides the race with a slow coordinator; timing
   never decides the outcome);
4. COMMIT or ROLLBACK PREPARED each branch (an unknown xid means someone finished it);
5. delete decision rows none of whose branches is in doubt (see
   :func:`~.protocol.may_delete_decision`).

It is idempotent and safe to run from many processes at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import Engine

from ..backends import BackendAdapter, DecisionRow, adapter_for
from ..backends.base import printable
from ..events import emit_global
from ..exc import RecoveryError
from .decisions import (
    CLAIM_LOCK_TIMEOUT,
    ClaimBlocked,
    admin_connection,
    claim_abort,
    read_all,
)
from .protocol import RecoveryAction, after_claim, may_delete_decision, recovery_action
from .xid import Xid, decider_token, gtrid_created, gtrid_decider, parse_gid, parse_xa

__all__ = ["BranchRef", "InDoubtBranch", "RecoveryReport", "in_doubt", "recover"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BranchRef:
    """A branch of ours on a shard."""

    shard: str
    gtrid: str
    bqual: str


@dataclass
class RecoveryReport:
    """What one recovery pass did."""

    committed: list[BranchRef] = field(default_factory=list)
    rolled_back: list[BranchRef] = field(default_factory=list)
    #: branches found finished by someone else meanwhile (unknown xid)
    already_finished: list[BranchRef] = field(default_factory=list)
    #: (branch, reason) in doubt and deliberately not touched this pass
    left_alone: list[tuple[BranchRef, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    #: prepared transactions that are not ours (other prefix, other application, hostile)
    foreign: int = 0
    decisions_deleted: int = 0

    @property
    def resolved(self) -> bool:
        """Everything of ours is settled (the CLI's exit status 0)."""
        return not self.left_alone and not self.errors


@dataclass(frozen=True)
class InDoubtBranch:
    """One prepared branch of ours (for ``status``)."""

    shard: str
    xid: Xid
    age: float | None
    decider: str | None


def _parse(raw: Any) -> Xid | None:
    if isinstance(raw, str):
        return parse_gid(raw)
    if isinstance(raw, tuple) and len(raw) == 4:
        return parse_xa(*raw)
    return None


@dataclass
class _Listing:
    #: (server key, xid) -> (shard name, age)
    branches: dict[tuple[str, Xid], tuple[str, float | None]] = field(default_factory=dict)
    foreign: set[tuple[str, str]] = field(default_factory=set)
    complete: bool = True
    errors: list[str] = field(default_factory=list)
    #: shards that could not be listed
    failed: list[str] = field(default_factory=list)


def _adapters(shards: Mapping[str, Engine]) -> dict[str, BackendAdapter]:
    out: dict[str, BackendAdapter] = {}
    for name, engine in shards.items():
        try:
            out[name] = adapter_for(engine.dialect.name)
        except KeyError:
            continue
    return out


def _list(shards: Mapping[str, Engine], adapters: Mapping[str, BackendAdapter]) -> _Listing:
    listing = _Listing()
    for name, adapter in adapters.items():
        if adapter.name == "sqlite":
            continue
        engine = shards[name]
        try:
            with admin_connection(engine) as dbapi:
                key = adapter.server_key(dbapi, engine.url.render_as_string(hide_password=True))
                rows = adapter.list_in_doubt(dbapi)
        except Exception as e:
            listing.complete = False
            listing.failed.append(name)
            listing.errors.append(f"{name}: cannot list prepared transactions: {e}")
            continue
        for row in rows:
            xid = _parse(row.raw)
            if xid is None:
                listing.foreign.add((key, printable(row.raw)))
                continue
            listing.branches.setdefault((key, xid), (name, row.age))
    return listing


def in_doubt(shards: Mapping[str, Engine]) -> list[InDoubtBranch]:
    """Every prepared branch of ours on ``shards``, with its age in seconds.

    :raises RecoveryError: a shard could not be listed (``shard_id`` names the first);
        the answer would be incomplete.
    """
    adapters = _adapters(shards)
    tokens = {decider_token(n): n for n in shards}
    listing = _list(shards, adapters)
    now = time.time()
    out = []
    for (_key, xid), (shard, age) in sorted(listing.branches.items(), key=lambda kv: kv[1][0]):
        if age is None:
            age = max(0.0, now - gtrid_created(xid.gtrid))
        out.append(InDoubtBranch(shard, xid, age, tokens.get(gtrid_decider(xid.gtrid))))
    if listing.errors:
        raise RecoveryError(
            "cannot list prepared transactions on every shard: " + "; ".join(listing.errors),
            gtrid=None, shard_id=listing.failed[0] if listing.failed else None,
        )
    return out


def recover(
    shards: Mapping[str, Engine],
    *,
    grace_period: float = 60.0,
    abort_retention: float = 7 * 86400.0,
    claim_timeout: float = CLAIM_LOCK_TIMEOUT,
    crash_point: Callable[[str], None] | None = None,
) -> RecoveryReport:
    """Run one recovery pass over ``shards`` (shard id -> Engine, as configured).

    :param grace_period: seconds after a gtrid's creation during which an undecided
        branch is left to its coordinator (it is counted in ``left_alone``).
    :param abort_retention: seconds an ABORT claim is kept after its gtrid's creation.
    :param claim_timeout: seconds an abort claim waits on a live coordinator's
        uncommitted decision row before leaving the gtrid to the next pass.
    :param crash_point: tests only.

    Failure semantics: each branch is finished on its own; a failure is recorded in
    ``errors`` and that branch stays prepared for the next pass; nothing is ever decided
    for a gtrid whose decider shard is not in ``shards`` (reported, never guessed).
    """
    report = RecoveryReport()
    adapters = _adapters(shards)
    tokens = {decider_token(n): n for n in shards}

    def crash(point: str) -> None:
        if crash_point is not None:
            crash_point(point)

    # 1. decision snapshot, before listing (see module docstring)
    snapshot: dict[str, list[DecisionRow]] = {}
    snapshot_complete = True
    for name, adapter in adapters.items():
        try:
            snapshot[name] = read_all(adapter, shards[name])
        except Exception as e:
            snapshot_complete = False
            report.errors.append(f"{name}: cannot read decisions: {e}")
    decided = {(name, r.gtrid): r.outcome for name, rows in snapshot.items() for r in rows}

    # 2. listing
    listing = _list(shards, adapters)
    report.errors.extend(listing.errors)
    report.foreign = len(listing.foreign)
    groups: dict[str, list[tuple[Xid, str]]] = {}
    for (_key, xid), (shard, _age) in listing.branches.items():
        groups.setdefault(xid.gtrid, []).append((xid, shard))

    # 3-4. settle each gtrid
    now = time.time()
    for gtrid, branches in sorted(groups.items()):
        refs = [(xid, shard, BranchRef(shard, gtrid, xid.bqual)) for xid, shard in branches]
        decider = tokens.get(gtrid_decider(gtrid))
        if decider is None or decider not in adapters:
            msg = f"{gtrid}: decider shard is not configured; left in doubt (never guessed)"
            report.errors.append(msg)
            report.left_alone.extend((r, "decider not configured") for _x, _s, r in refs)
            continue
        outcome = decided.get((decider, gtrid))
        young = now - gtrid_created(gtrid) < grace_period
        action = recovery_action(outcome, young)
        if action is RecoveryAction.CLAIM_ABORT:
            try:
                won, existing = claim_abort(adapters[decider], shards[decider], gtrid,
                                            lock_timeout=claim_timeout)
            except ClaimBlocked:
                report.left_alone.extend((r, "decision in progress") for _x, _s, r in refs)
                continue
            except Exception as e:
                report.errors.append(f"{gtrid}: cannot claim abort on {decider}: {e}")
                report.left_alone.extend((r, "claim failed") for _x, _s, r in refs)
                continue
            action = after_claim(won, existing)
            log.info("recovery %s: abort claim %s (%s)", gtrid, "won" if won else "lost", existing)
            crash("recovery_after_claim")
        if action is RecoveryAction.LEAVE:
            reason = "within grace period" if young and outcome is None else "undecidable"
            report.left_alone.extend((r, reason) for _x, _s, r in refs)
            continue
        commit = action is RecoveryAction.COMMIT_BRANCH
        for xid, shard, ref in refs:
            try:
                with admin_connection(shards[shard]) as dbapi:
                    done = adapters[shard].finish_prepared(dbapi, xid, commit)
            except Exception as e:
                report.errors.append(f"{gtrid}: {shard} {xid.bqual}: {e}")
                report.left_alone.append((ref, "finish failed"))
                continue
            if not done:
                report.already_finished.append(ref)
            elif commit:
                report.committed.append(ref)
            else:
                report.rolled_back.append(ref)
            emit_global("shardsession_in_doubt_resolved", ref.gtrid, ref.shard, ref.bqual,
                        "already_finished" if not done else "commit" if commit else "rollback")
            log.info("recovery %s: %s %s on %s", gtrid, "committed" if commit else "rolled back",
                     xid.bqual, shard)
            crash("recovery_after_finish")

    # 5. garbage-collect decision rows read in step 1
    complete = listing.complete and snapshot_complete
    for name, rows in snapshot.items():
        doomed = []
        for row in rows:
            try:
                age = now - gtrid_created(row.gtrid)
            except ValueError:
                continue  # not ours: never touched
            # Branches settled in this pass were still in doubt at listing time: their
            # rows go on the next pass, once a listing shows them gone.
            if may_delete_decision(row.outcome, in_doubt=row.gtrid in groups,
                                   listing_complete=complete, age=age,
                                   abort_retention=abort_retention):
                doomed.append(row.gtrid)
        if doomed:
            try:
                with admin_connection(shards[name]) as dbapi:
                    report.decisions_deleted += adapters[name].delete_decisions(dbapi, doomed)
            except Exception as e:
                report.errors.append(f"{name}: cannot delete decisions: {e}")
    return report
