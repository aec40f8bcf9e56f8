"""The decisions of the commit protocol and of recovery, as pure functions and tables.

Nothing here does I/O: :mod:`.transaction` and :mod:`.recovery` feed facts in and carry
out the actions that come back (the commit table drives :mod:`.phases`, one handler per
action), and the unit tests walk every row.

Commit (DESIGN.md, "The commit protocol")::

    state       event               -> next state   action              client sees
    PREPARING   PREPARED_ALL        -> DECIDING     COMMIT_DECIDER
    PREPARING   PREPARE_FAILED      -> ABORTED      ROLLBACK_ALL        PrepareFailed
    DECIDING    DECISION_DURABLE    -> COMMITTING   COMMIT_PREPARED
    DECIDING    DECISION_FAILED     -> ABORTED      ROLLBACK_ALL        PrepareFailed
    DECIDING    DECISION_UNKNOWN    -> IN_DOUBT     LEAVE_TO_RECOVERY   OutcomeUnknown
    COMMITTING  COMMITTED_ALL       -> COMMITTED    DONE                (success)
    COMMITTING  COMMIT_FAILED       -> INCOMPLETE   LEAVE_TO_RECOVERY   CommitIncomplete

DECISION_FAILED is only the server's own refusal of the decider's COMMIT; any other
failure once the COMMIT may have been sent (a lost reply, an exception raised while the
driver waited) is DECISION_UNKNOWN.

The decider's local commit is the commit point: before it nothing is committed anywhere
(every failure rolls everything back); after it the transaction is committed whatever
happens (failures only delay branches, which recovery completes).

Recovery of one in-doubt gtrid (presumed abort)::

    decision row   branch young?  -> action
    COMMIT         any            -> COMMIT_BRANCH
    ABORT          any            -> ROLLBACK_BRANCH
    none           yes            -> LEAVE            (a live coordinator may be preparing)
    none           no             -> CLAIM_ABORT      (insert ABORT; the primary key decides)
    claim won                     -> ROLLBACK_BRANCH
    claim lost, row says COMMIT   -> COMMIT_BRANCH
    claim lost, row says ABORT    -> ROLLBACK_BRANCH
    claim lost, no row readable   -> LEAVE            (retry on the next pass)
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from ..exc import (
    AtomicityUnavailableError,
    CapabilityError,
    CommitIncomplete,
    OutcomeUnknown,
    PrepareFailed,
    TransactionError,
)

__all__ = [
    "COMMIT_TABLE",
    "Action",
    "BranchFacts",
    "CommitPlan",
    "Event",
    "PlanKind",
    "RecoveryAction",
    "State",
    "Step",
    "after_claim",
    "choose_absent_decider",
    "choose_decider",
    "may_delete_decision",
    "next_step",
    "plan_commit",
    "recovery_action",
]


class State(enum.Enum):
    PREPARING = "preparing"
    DECIDING = "deciding"
    COMMITTING = "committing"
    COMMITTED = "committed"
    ABORTED = "aborted"
    IN_DOUBT = "in_doubt"
    INCOMPLETE = "incomplete"


class Event(enum.Enum):
    PREPARED_ALL = "prepared_all"
    PREPARE_FAILED = "prepare_failed"
    DECISION_DURABLE = "decision_durable"
    DECISION_FAILED = "decision_failed"
    DECISION_UNKNOWN = "decision_unknown"
    COMMITTED_ALL = "committed_all"
    COMMIT_FAILED = "commit_failed"


class Action(enum.Enum):
    COMMIT_DECIDER = "commit_decider"
    ROLLBACK_ALL = "rollback_all"
    COMMIT_PREPARED = "commit_prepared"
    LEAVE_TO_RECOVERY = "leave_to_recovery"
    DONE = "done"


@dataclass(frozen=True)
class Step:
    """One row of the commit table."""

    next_state: State
    action: Action
    #: exception class the client gets (``None``: success so far)
    raises: type[TransactionError] | None


COMMIT_TABLE: dict[tuple[State, Event], Step] = {
    (State.PREPARING, Event.PREPARED_ALL): Step(State.DECIDING, Action.COMMIT_DECIDER, None),
    (State.PREPARING, Event.PREPARE_FAILED): Step(
        State.ABORTED, Action.ROLLBACK_ALL, PrepareFailed
    ),
    (State.DECIDING, Event.DECISION_DURABLE): Step(
        State.COMMITTING, Action.COMMIT_PREPARED, None
    ),
    (State.DECIDING, Event.DECISION_FAILED): Step(
        State.ABORTED, Action.ROLLBACK_ALL, PrepareFailed
    ),
    (State.DECIDING, Event.DECISION_UNKNOWN): Step(
        State.IN_DOUBT, Action.LEAVE_TO_RECOVERY, OutcomeUnknown
    ),
    (State.COMMITTING, Event.COMMITTED_ALL): Step(State.COMMITTED, Action.DONE, None),
    (State.COMMITTING, Event.COMMIT_FAILED): Step(
        State.INCOMPLETE, Action.LEAVE_TO_RECOVERY, CommitIncomplete
    ),
}


def next_step(state: State, event: Event) -> Step:
    """Look up the commit table; an event not allowed in ``state`` is a bug."""
    try:
        return COMMIT_TABLE[(state, event)]
    except KeyError:
        raise AssertionError(f"event {event.value} not allowed in state {state.value}") from None


# --- planning ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BranchFacts:
    """What planning needs to know about one branch."""

    index: int
    shard_id: str
    wrote: bool
    can_prepare: bool
    #: why it cannot prepare, for error messages
    reason: str | None = None
    #: it cannot prepare only because of a setting the user can change (the server's
    #: ``max_prepared_transactions``, the connection's isolation level)
    configurable: bool = False


class PlanKind(enum.Enum):
    NOTHING = "nothing"  # no writer: every branch just ends
    ONE_PHASE = "one_phase"  # exactly one writer: plain commit, no decision row
    TWO_PHASE = "two_phase"  # the protocol


@dataclass(frozen=True)
class CommitPlan:
    kind: PlanKind
    #: the branch whose local commit is the commit point (TWO_PHASE), or the single writer
    decider: int | None = None
    #: writers to PREPARE in phase one
    prepare: tuple[int, ...] = ()
    #: branches that wrote nothing: ended without PREPARE
    release: tuple[int, ...] = ()
    #: best effort only: writers that cannot prepare, committed one by one after the rest
    last: tuple[int, ...] = ()


def choose_decider(branches: Sequence[BranchFacts], configured: str | None) -> int:
    """Pick the decider among the branches known so far (when the gtrid must be fixed
    before commit time, e.g. at a MySQL branch's XA START).

    A branch that cannot prepare must be the decider if it writes, so it comes first; a
    branch that has not written may still decide (the decision row is its only write).
    """
    if not branches:
        raise ValueError("no branch to decide")
    for b in branches:
        if not b.can_prepare:
            return b.index
    for b in branches:
        if configured is not None and b.shard_id == configured:
            return b.index
    return branches[0].index


def choose_absent_decider(branches: Sequence[BranchFacts], absent: Sequence[str],
                          configured: str | None) -> str | None:
    """When the decider must be fixed before commit time, pick a shard that has not joined
    the transaction (yet) as the decider, or ``None`` to pick among ``branches``
    (:func:`choose_decider`).

    ``absent``: the session's shards that cannot prepare and are not branches, in the
    session's order. Such a shard may still be written after the gtrid is fixed, and then
    it must hold the decision; so, unless a branch already cannot prepare (it decides),
    the decision goes to one of them whatever the order of the writes (it is written in
    a transaction of its own when the shard takes no part). The configured decider is
    preferred among them; with several, a write to another one later cannot be atomic.
    """
    if not absent or any(not b.can_prepare for b in branches):
        return None
    if configured is not None and configured in absent:
        return configured
    return absent[0]


def plan_commit(
    branches: Sequence[BranchFacts],
    *,
    fixed_decider: int | None,
    configured_decider: str | None,
    atomic: str,
    gtrid: str | None = None,
) -> CommitPlan:
    """Decide how to commit.

    :param fixed_decider: the decider already written into the gtrid, if any.
    :raises CapabilityError: ``atomic="require"`` and a writer that cannot prepare only
        because of its server's configuration (e.g. PostgreSQL with
        ``max_prepared_transactions = 0``) or its isolation level (MariaDB XA below
        REPEATABLE READ) would have to.
    :raises AtomicityUnavailableError: ``atomic="require"`` and two or more writers
        cannot prepare.
    """
    writers = [b for b in branches if b.wrote]
    readers = tuple(b.index for b in branches if not b.wrote)
    if not writers:
        return CommitPlan(PlanKind.NOTHING, release=tuple(b.index for b in branches))
    if len(writers) == 1:
        return CommitPlan(PlanKind.ONE_PHASE, decider=writers[0].index, release=readers)

    unpreparable = [w for w in writers if not w.can_prepare]
    by_index = {b.index: b for b in branches}
    if fixed_decider is not None:
        decider = by_index[fixed_decider]
    elif len(unpreparable) >= 1:
        decider = unpreparable[0]
    else:
        preferred = [w for w in writers if w.shard_id == configured_decider]
        decider = preferred[0] if preferred else writers[0]
    stuck = [w for w in unpreparable if w.index != decider.index]
    if stuck and atomic == "require":
        config_limited = [w for w in stuck
                          if w.configurable or (w.reason and "max_prepared" in w.reason)]
        if config_limited:
            w = config_limited[0]
            raise CapabilityError(
                f"shard {w.shard_id!r} must prepare for this commit to be atomic, but: "
                f"{w.reason}",
                gtrid=gtrid,
                shard_id=w.shard_id,
            )
        names = sorted({decider.shard_id, *(w.shard_id for w in stuck)})
        raise AtomicityUnavailableError(
            f"shards {names} were written and cannot all take part in an atomic "
            "commit (at most one written shard may be unable to prepare, and it must "
            "hold the decision); nothing was committed. Use atomic='best_effort' to "
            "commit them one after another, or write to only one of them",
            gtrid=gtrid,
            shard_ids=names,
        )
    prepare = tuple(w.index for w in writers if w.can_prepare and w.index != decider.index)
    release = tuple(i for i in readers if i != decider.index)
    return CommitPlan(
        PlanKind.TWO_PHASE,
        decider=decider.index,
        prepare=prepare,
        release=release,
        last=tuple(w.index for w in stuck),
    )


# --- recovery ---------------------------------------------------------------------------


class RecoveryAction(enum.Enum):
    COMMIT_BRANCH = "commit"
    ROLLBACK_BRANCH = "rollback"
    CLAIM_ABORT = "claim_abort"
    LEAVE = "leave"


def recovery_action(decision: str | None, young: bool) -> RecoveryAction:
    """Action for an in-doubt gtrid given its decision row (``"C"``, ``"A"`` or none)."""
    if decision == "C":
        return RecoveryAction.COMMIT_BRANCH
    if decision == "A":
        return RecoveryAction.ROLLBACK_BRANCH
    if decision is not None:
        return RecoveryAction.LEAVE  # a value we do not understand: never guess
    return RecoveryAction.LEAVE if young else RecoveryAction.CLAIM_ABORT


def after_claim(claim_won: bool, existing: str | None) -> RecoveryAction:
    """Action after trying to insert the ABORT claim."""
    if claim_won:
        return RecoveryAction.ROLLBACK_BRANCH
    if existing == "C":
        return RecoveryAction.COMMIT_BRANCH
    if existing == "A":
        return RecoveryAction.ROLLBACK_BRANCH
    return RecoveryAction.LEAVE


def may_delete_decision(
    outcome: str, *, in_doubt: bool, listing_complete: bool, age: float, abort_retention: float
) -> bool:
    """Whether recovery may delete a decision row read *before* listing the branches.

    A COMMIT row exists only once every branch was prepared, so if none of its branches
    is in doubt in a listing taken after the row was read, none ever will be again. An
    ABORT row may have been claimed while its coordinator was still preparing; it must
    outlive that coordinator (which refuses to commit a transaction older than half the
    retention), so it is kept for ``abort_retention`` seconds after it was claimed: ``age``
    is the claim's age by the claiming server's clock, never the coordinator's (a
    coordinator clock days behind would make a fresh claim look old).
    """
    if in_doubt or not listing_complete:
        return False
    if outcome == "C":
        return True
    return age >= abort_retention
