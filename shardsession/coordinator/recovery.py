"""Recovery: finish every in-doubt branch of ours, by the decision or by presumed abort.

One pass (:func:`recover`):

1. read the cluster identity of every shard (:mod:`.identity`) and a snapshot of every
   decider's decision rows (*before* listing branches: a row read then had all its branches
   prepared already, so the listing that follows shows any still in doubt; this ordering
   is what makes deleting rows safe, as in Citus);
2. list prepared transactions on every shard: on PostgreSQL in the current database only,
   on MySQL/MariaDB server-wide (deduplicated per server); every id is parsed strictly.
   A branch is *ours* only when the decider shard its xid names (by token) is configured
   and stores exactly the cluster identity its xid carries. Anything else is *foreign*:
   counted, reported, never touched, and no decision is ever written for it. An xid that
   carries one of our identities but names a decider we cannot check is ours, left in
   doubt and reported as an error (never guessed);
3. per gtrid of ours: follow its decision row; without one, leave it for ``grace_period``
   seconds (see :func:`recover`) to a live coordinator,
   then claim ABORT by inserting the row (the primary key decides the race with a slow
   coordinator; timing never decides the outcome);
4. COMMIT or ROLLBACK PREPARED each branch, then list again: a branch is reported
   finished only when that second listing no longer shows it (MariaDB answers
   ``XA COMMIT`` for a branch still attached to a live, hung session with "unknown XID");
5. delete a decision row only when every participant its ``participants`` column names
   is a configured shard that was listed in this pass and no branch of its gtrid is in
   doubt; for a COMMIT row, each participant shard must also positively be the database
   its branch was prepared in (the location mark the row records for it matches the
   shard's location here; rows without marks: the shard stores the decision's cluster
   identity), otherwise the row is kept and an error names the shard; an ABORT row
   only once ``abort_retention`` seconds have passed since it was
   claimed, by the claiming server's clock (see :func:`~.protocol.may_delete_decision`).

Legacy xids (the ``ss1`` format, before cluster identities) carry no identity: recovery
follows a decision row it finds for one in the table of the decider its 32-bit token
names, but never claims an abort for one (it could be another application's with the same
shard names) unless told to with ``claim_legacy=True``; such a branch is left in doubt
with that reason. Legacy COMMIT rows name no participant's shard and are never deleted by
recovery (delete them by hand once no legacy branch is listed anywhere); legacy ABORT
claims age out as new ones do.

It is idempotent and safe to run from many processes at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from sqlalchemy.engine import Engine

from ..backends import BackendAdapter, DecisionRow, Outcome
from ..events import emit_global
from ..exc import RecoveryError
from . import trace
from ._listing import Listing, Owners, Seen, adapters_of, list_branches
from .decisions import (
    CLAIM_LOCK_TIMEOUT,
    ClaimBlocked,
    admin_connection,
    claim_abort,
    read_all,
)
from .identity import read_identities_full
from .protocol import RecoveryAction, after_claim, may_delete_decision, recovery_action
from .xid import (
    Xid,
    gtrid_cluster,
    gtrid_created,
    is_legacy_gtrid,
    is_our_gtrid,
    location_mark,
    parse_participants_full,
)

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
    #: branches the server answered "unknown xid" for and a second listing showed gone
    already_finished: list[BranchRef] = field(default_factory=list)
    #: (branch, reason) in doubt and deliberately not touched, or not seen finished
    left_alone: list[tuple[BranchRef, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    #: prepared transactions that are not ours (other prefix, other cluster, hostile)
    foreign: int = 0
    #: the foreign ones, as listed (printable, bounded), with the shard that listed them
    foreign_ids: list[tuple[str, str]] = field(default_factory=list)
    decisions_deleted: int = 0
    #: (decider shard, gtrid, reason) decision rows kept because a participant they name
    #: was not asked in this pass (not configured here, or its listing failed)
    decisions_kept: list[tuple[str, str, str]] = field(default_factory=list)
    #: legacy (``ss1``) decision rows kept: they name no participant's shard
    legacy_rows_kept: int = 0
    #: the cluster identity stored on each shard (``None``: none stored yet)
    identities: dict[str, str | None] = field(default_factory=dict)

    @property
    def resolved(self) -> bool:
        """Nothing of ours is known to be, or may be, in doubt (the CLI's exit status 0)."""
        return not self.left_alone and not self.errors and not self.decisions_kept


@dataclass(frozen=True)
class InDoubtBranch:
    """One prepared branch of ours (for ``status``)."""

    shard: str
    xid: Xid
    age: float | None
    decider: str | None
    #: why the listing role cannot finish it (PostgreSQL role rules), if it cannot
    blocked: str | None = None


def in_doubt(shards: Mapping[str, Engine]) -> list[InDoubtBranch]:
    """Every prepared branch of ours on ``shards``, with its age in seconds (the server's
    clock where it keeps the prepare time) and whether this role can finish it.

    :raises RecoveryError: a shard could not be listed or its identity read
        (``shard_id`` names the first); the answer would be incomplete.
    :raises ConfigurationError: two shard ids name the same decider.
    """
    adapters = adapters_of(shards)
    identities, previous, id_errors = read_identities_full({n: shards[n] for n in adapters})
    owners = Owners(shards, identities, set(id_errors), previous)
    listing = list_branches(shards, adapters)
    now = time.time()
    out = []
    for (_key, xid), seen in sorted(listing.branches.items(), key=lambda kv: kv[1].shard):
        kind, decider = owners.classify(xid)
        if kind == "foreign":
            continue
        age = seen.age if seen.age is not None else max(0.0, now - gtrid_created(xid.gtrid))
        out.append(InDoubtBranch(seen.shard, xid, age, decider, seen.blocked))
    errors = listing.errors + list(id_errors.values())
    if errors:
        failed = listing.failed + list(id_errors)
        raise RecoveryError(
            "cannot list prepared transactions on every shard: " + "; ".join(errors),
            gtrid=None, shard_id=failed[0] if failed else None,
        )
    return out


@dataclass
class _Group:
    """The branches of one gtrid of ours found in a listing."""

    kind: str
    decider: str | None
    #: (server key, xid, where seen, ref)
    branches: list[tuple[str, Xid, Seen, BranchRef]] = field(default_factory=list)


def recover(
    shards: Mapping[str, Engine],
    *,
    grace_period: float = 60.0,
    abort_retention: float = 7 * 86400.0,
    claim_timeout: float = CLAIM_LOCK_TIMEOUT,
    claim_legacy: bool = False,
    adopt_previous: bool = False,
    crash_point: Callable[[str], None] | None = None,
) -> RecoveryReport:
    """Run one recovery pass over ``shards`` (shard id -> Engine, as configured).

    :param grace_period: seconds after the gtrid's creation (or after the branch was
        prepared, by the server's clock where it keeps it, whichever is older) during
        which an undecided branch is left to its coordinator (counted in ``left_alone``).
    :param abort_retention: seconds an ABORT claim is kept after it was claimed (the
        claiming server's clock).
    :param claim_timeout: seconds an abort claim waits on a live coordinator's
        uncommitted decision row before leaving the gtrid to the next pass.
    :param claim_legacy: also claim an abort for an undecided legacy (``ss1``) branch
        whose 32-bit decider token matches a configured shard. Only safe when no other
        application using shardsession's legacy format shares these servers.
    :param adopt_previous: take branches naming a decider's previous identity (the one
        it had before it was re-keyed as a copy of another database) for this cluster's.
        Only when that database is the original, restored or moved, not a copy.
    :param crash_point: tests only.
    :raises ConfigurationError: two shard ids of ``shards`` name the same decider.

    Failure semantics: each branch is finished on its own; a failure is recorded in
    ``errors`` and that branch stays prepared for the next pass; nothing is ever decided
    for a gtrid whose decider shard is not in ``shards`` or does not store the gtrid's
    cluster identity (reported, never guessed); foreign branches and their decisions are
    never touched.
    """
    started = time.perf_counter()
    report = RecoveryReport()
    try:
        _recover(report, shards, grace_period, abort_retention, claim_timeout, claim_legacy,
                 adopt_previous, crash_point)
    except BaseException:
        if trace.enabled("recovery_pass"):
            trace.record("recovery_pass", "failed", duration=time.perf_counter() - started)
        raise
    if trace.enabled("recovery_pass"):
        _trace_report(report, time.perf_counter() - started)
    return report


def _trace_report(report: RecoveryReport, took: float) -> None:
    for outcome, refs in (("commit", report.committed), ("rollback", report.rolled_back),
                          ("already_finished", report.already_finished)):
        for ref in refs:
            trace.record("recovery_action", outcome, gtrid=ref.gtrid, shard=ref.shard,
                         bqual=ref.bqual)
    for ref, reason in report.left_alone:
        trace.record("recovery_action", "left_in_doubt", gtrid=ref.gtrid, shard=ref.shard,
                     bqual=ref.bqual, reason=reason)
    trace.record("recovery_pass", "resolved" if report.resolved else "unresolved",
                 duration=took, committed=len(report.committed),
                 rolled_back=len(report.rolled_back),
                 already_finished=len(report.already_finished),
                 left_in_doubt=len(report.left_alone), errors=len(report.errors),
                 foreign=report.foreign)


def _recover(report: RecoveryReport, shards: Mapping[str, Engine], grace_period: float,
             abort_retention: float, claim_timeout: float, claim_legacy: bool,
             adopt_previous: bool, crash_point: Callable[[str], None] | None) -> None:
    adapters = adapters_of(shards)
    identities, previous, id_errors = read_identities_full({n: shards[n] for n in adapters})
    report.identities = dict(identities)
    report.errors.extend(f"{n}: {msg}" for n, msg in id_errors.items())
    owners = Owners(shards, identities, set(id_errors), previous, adopt_previous)

    def crash(point: str) -> None:
        if crash_point is not None:
            crash_point(point)

    # 1. decision snapshot, before listing (see module docstring)
    snapshot: dict[str, list[DecisionRow]] = {}
    for name, adapter in adapters.items():
        try:
            snapshot[name] = read_all(adapter, shards[name])
        except Exception as e:
            report.errors.append(f"{name}: cannot read decisions: {e}")
    decided = {(name, r.gtrid): r.outcome for name, rows in snapshot.items() for r in rows}

    # 2. listing, and whose each branch is
    listing = list_branches(shards, adapters)
    report.errors.extend(listing.errors)
    groups: dict[str, _Group] = {}
    for (key, xid), seen in listing.branches.items():
        kind, decider = owners.classify(xid)
        if kind in ("foreign", "previous", "unattributed", "unchecked") and not xid.legacy:
            # A decision row for exactly this gtrid (130 random bits) in the table of the
            # configured decider its xid names decides it, whatever identity the xid
            # carries (decided before a re-key, by a process holding a stale identity):
            # never foreign, never resolved without it. Following it is what the database
            # that decided would do; nothing is claimed, no such row is deleted.
            named = owners.tokens.get(xid.decider)
            if named is not None and (named, xid.gtrid) in decided:
                if kind != "ours":
                    log.warning("recovery %s: xid names identity %s, not %s's; following "
                                "its decision row there", xid.gtrid, xid.cluster, named)
                kind, decider = "decided", named
        if kind == "previous":
            # Undecided, naming the identity its decider had before it was re-keyed as a
            # copy: on a copy these are the original's in-flight transactions (its own
            # recovery finishes them), so they are foreign here, never an error; `status`
            # still lists them. A moved original finishes them with adopt_previous.
            log.info("recovery %s: names the identity %s's database had before it was "
                     "re-keyed as a copy; left to the original (if this database is the "
                     "original, moved, run recover with --adopt-previous-identity)",
                     xid.gtrid, decider)
            kind = "foreign"
        if kind == "foreign":
            listing.foreign.setdefault((key, xid.gid), seen.shard)
            continue
        group = groups.setdefault(xid.gtrid, _Group(kind, decider))
        group.branches.append((key, xid, seen, BranchRef(seen.shard, xid.gtrid, xid.bqual)))
    report.foreign = len(listing.foreign)
    report.foreign_ids = sorted((shard, ident) for (_k, ident), shard in listing.foreign.items())

    # 3-4. settle each gtrid
    now = time.time()
    server_now: dict[str, float | None] = {}
    acted: list[tuple[str, Xid, BranchRef]] = []
    for gtrid, group in sorted(groups.items()):
        refs = [ref for _k, _x, _s, ref in group.branches]
        decider = group.decider
        if group.kind == "unattributed":
            stored = owners.identities.get(decider) if decider is not None else None
            what = ("stores no cluster identity" if stored is None
                    else f"stores the cluster identity {stored}, not the one its xid names")
            report.left_alone.extend(
                (r, f"its decider {decider} (SQLite) {what} and holds no decision row for "
                    "it: if a cross-shard commit crashed before its identity was committed, "
                    "roll it back by hand (it was never decided); run create-all to prevent "
                    "this")
                for r in refs)
            report.errors.append(f"{gtrid}: unattributed branch of SQLite decider {decider}; "
                                 "left in doubt")
            continue
        if group.kind == "unchecked" or decider is None or decider not in adapters:
            why = ("its decider's cluster identity could not be read" if decider is not None
                   else "its decider shard is not configured")
            report.errors.append(f"{gtrid}: {why}; left in doubt (never guessed)")
            report.left_alone.extend((r, "decider not configured") for r in refs)
            continue
        if decider not in snapshot:
            report.left_alone.extend((r, "decisions unreadable") for r in refs)
            continue
        outcome = decided.get((decider, gtrid))
        # The older of the two clocks' answers: a coordinator clock running ahead must not
        # keep a branch (and its locks) waiting; claiming early is safe, the claim decides.
        # The gtrid's creation time is the coordinator's clock: aged by the decider
        # server's clock, and not trusted at all when it lies in that server's future
        # beyond FUTURE_TOLERANCE (MariaDB keeps no prepare time to fall back on).
        ages = [s.age for _k, _x, s, _r in group.branches if s.age is not None]
        if decider not in server_now:
            server_now[decider] = _server_clock(adapters[decider], shards[decider])
        clock = server_now[decider]
        created_age = (clock if clock is not None else now) - gtrid_created(gtrid)
        if created_age < -FUTURE_TOLERANCE:
            log.warning("recovery %s: created %.0f s in the decider server's future; its "
                        "creation time is not trusted", gtrid, -created_age)
            created_age = float("inf")
        young = max([created_age, *ages]) < grace_period
        action = recovery_action(outcome, young)
        if action is RecoveryAction.CLAIM_ABORT and group.kind == "legacy" and not claim_legacy:
            report.left_alone.extend(
                (r, "legacy xid without a decision row: it may be another application's "
                    "(no cluster identity); see recover --claim-legacy") for r in refs)
            continue
        if action is RecoveryAction.CLAIM_ABORT:
            try:
                won, existing = claim_abort(adapters[decider], shards[decider], gtrid,
                                            lock_timeout=claim_timeout)
            except ClaimBlocked:
                report.left_alone.extend((r, "decision in progress") for r in refs)
                continue
            except Exception as e:
                report.errors.append(f"{gtrid}: cannot claim abort on {decider}: {e}")
                report.left_alone.extend((r, "claim failed") for r in refs)
                continue
            action = after_claim(won, existing)
            log.info("recovery %s: abort claim %s (%s)", gtrid, "won" if won else "lost", existing)
            crash("recovery_after_claim")
        if action is RecoveryAction.LEAVE:
            reason = "within grace period" if young and outcome is None else "undecidable"
            report.left_alone.extend((r, reason) for r in refs)
            continue
        commit = action is RecoveryAction.COMMIT_BRANCH
        for key, xid, seen, ref in group.branches:
            if seen.blocked is not None:
                report.errors.append(f"{gtrid}: {ref.shard} {xid.bqual}: {seen.blocked}")
                report.left_alone.append((ref, "recovery role cannot finish it"))
                continue
            try:
                with admin_connection(shards[ref.shard]) as dbapi:
                    done = adapters[ref.shard].finish_prepared(dbapi, xid, commit)
            except Exception as e:
                report.errors.append(f"{gtrid}: {ref.shard} {xid.bqual}: {e}")
                report.left_alone.append((ref, "finish failed"))
                continue
            if not done:
                report.already_finished.append(ref)
            elif commit:
                report.committed.append(ref)
            else:
                report.rolled_back.append(ref)
            acted.append((key, xid, ref))
            log.info("recovery %s: %s %s on %s", gtrid, "committed" if commit else "rolled back",
                     xid.bqual, ref.shard)
            crash("recovery_after_finish")

    _confirm(report, shards, adapters, acted)
    # (announced once confirmed: a branch still listed after it was "finished" is not)
    for outcome, refs in (("commit", report.committed), ("rollback", report.rolled_back),
                          ("already_finished", report.already_finished)):
        for ref in refs:
            emit_global("shardsession_in_doubt_resolved", ref.gtrid, ref.shard, ref.bqual,
                        outcome)
    _collect(report, shards, adapters, snapshot, owners, listing, set(groups), abort_retention)


#: seconds a gtrid's creation time (the coordinator's clock) may lie in the decider
#: server's future and still be trusted for the grace period
FUTURE_TOLERANCE = 300.0


def _server_clock(adapter: BackendAdapter, engine: Engine) -> float | None:
    """The server's clock (unix seconds), ``None`` when it cannot be read."""
    try:
        with admin_connection(engine) as dbapi:
            return adapter.server_time(dbapi)
    except Exception as e:
        log.warning("cannot read the server clock: %s", e)
        return None


def _confirm(report: RecoveryReport, shards: Mapping[str, Engine],
             adapters: Mapping[str, BackendAdapter],
             acted: list[tuple[str, Xid, BranchRef]]) -> None:
    """List again the shards recovery acted on: whatever is still listed is in doubt.

    A branch still attached to a live session on MariaDB answers ``XA COMMIT`` from
    another connection with "unknown XID" (1397) although it is prepared and listed: that
    answer alone must not count as finished.
    """
    if not acted:
        return
    again = list_branches(shards, adapters, only={ref.shard for _k, _x, ref in acted})
    done = {"committed": report.committed, "rolled_back": report.rolled_back,
            "already_finished": report.already_finished}
    for key, xid, ref in acted:
        if ref.shard not in again.listed:
            if ref in report.already_finished:
                report.already_finished.remove(ref)
                report.left_alone.append((ref, "not confirmed finished (listing failed)"))
                report.errors.append(f"{ref.gtrid}: {ref.shard}: cannot list again to "
                                     f"confirm {xid.bqual} finished")
            continue
        if (key, xid) in again.branches:
            for lst in done.values():
                if ref in lst:
                    lst.remove(ref)
            report.left_alone.append(
                (ref, "still prepared after it was finished (attached to a live session?)"))


def _not_the_participant(shard: str, mark: str | None, cluster: str | None, owners: Owners,
                         locations: dict[str, str | None], shards: Mapping[str, Engine],
                         adapters: Mapping[str, BackendAdapter]) -> str | None:
    """Why ``shard`` as configured here is not positively the database that prepared a
    COMMIT row's branch (``None``: it is). With a location mark (rows written since marks
    exist) its location must match; without one, it must store the gtrid's identity."""
    if mark is not None:
        if shard not in locations:
            try:
                with admin_connection(shards[shard]) as dbapi:
                    locations[shard] = adapters[shard].location(dbapi) or None
            except Exception as e:
                locations[shard] = None
                log.warning("cannot read the location of shard %s: %s", shard, e)
        here = locations[shard]
        if here is None:
            return f"participant shard {shard}: its location could not be read"
        if location_mark(here) != mark:
            return (f"participant shard {shard} is configured here as another database "
                    f"({here}) than the one its branch was prepared in; fix the configuration "
                    "(the branch may still be prepared there)")
        return None
    if cluster is None or owners.identities.get(shard) != cluster:
        return (f"participant shard {shard} does not store the decision's cluster identity "
                "and the row does not record where its branch was prepared: it cannot be "
                "told from another database; delete the row by hand once no branch of it "
                "is prepared anywhere")
    return None


def _collect(report: RecoveryReport, shards: Mapping[str, Engine],
             adapters: Mapping[str, BackendAdapter], snapshot: Mapping[str, list[DecisionRow]],
             owners: Owners, listing: Listing, in_doubt_gtrids: set[str],
             abort_retention: float) -> None:
    """Delete the decision rows read in step 1 that no branch can need any more."""
    now = time.time()
    locations: dict[str, str | None] = {}
    for name, rows in snapshot.items():
        doomed = []
        for row in rows:
            if not is_our_gtrid(row.gtrid):
                continue  # not ours: never touched
            if is_legacy_gtrid(row.gtrid):
                if row.outcome != Outcome.ABORT:
                    # a legacy COMMIT row names no participant's shard: never provably
                    # unneeded (an old claim may go by the ABORT rule below)
                    report.legacy_rows_kept += 1
                    continue
                parts: list[tuple[str, str, str | None]] | None = []
            elif gtrid_cluster(row.gtrid) != owners.identities.get(name):
                continue  # not decided under this database's identity: not ours to delete
            else:
                parts = parse_participants_full(row.participants)
            if parts is None:
                report.decisions_kept.append((name, row.gtrid, "participants unreadable"))
                continue
            asked = True
            for _bqual, token, mark in parts:
                shard = owners.tokens.get(token)
                if shard is None:
                    report.decisions_kept.append(
                        (name, row.gtrid, f"participant shard {token} is not configured here"))
                    asked = False
                elif shard not in listing.listed:
                    asked = False  # its listing failed: already an error of this pass
                elif row.outcome == Outcome.COMMIT:
                    # "no branch there" counts only from the database that took part
                    why = _not_the_participant(shard, mark, gtrid_cluster(row.gtrid),
                                               owners, locations, shards, adapters)
                    if why is not None:
                        report.decisions_kept.append((name, row.gtrid, why))
                        report.errors.append(f"{row.gtrid}: COMMIT decision on {name} kept: "
                                             f"{why}")
                        asked = False
            if row.outcome == Outcome.ABORT:
                # a claim names no participant: any branch may be anywhere
                asked = asked and listing.complete
            # Branches settled in this pass were still in doubt at listing time: their
            # rows go on the next pass, once a listing shows them gone.
            age = row.age if row.age is not None else now - (row.decided_at or now)
            if may_delete_decision(row.outcome, in_doubt=row.gtrid in in_doubt_gtrids,
                                   listing_complete=asked, age=age,
                                   abort_retention=abort_retention):
                doomed.append(row.gtrid)
        if doomed:
            try:
                with admin_connection(shards[name]) as dbapi:
                    report.decisions_deleted += adapters[name].delete_decisions(dbapi, doomed)
            except Exception as e:
                report.errors.append(f"{name}: cannot delete decisions: {e}")
