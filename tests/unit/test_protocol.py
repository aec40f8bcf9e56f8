"""Walk the commit and recovery tables of the protocol (pure, no database)."""

from __future__ import annotations

import pytest

from shardsession.coordinator.protocol import (
    COMMIT_TABLE,
    Action,
    BranchFacts,
    Event,
    PlanKind,
    RecoveryAction,
    State,
    after_claim,
    choose_absent_decider,
    choose_decider,
    may_delete_decision,
    next_step,
    plan_commit,
    recovery_action,
)
from shardsession.exc import (
    AtomicityUnavailableError,
    CapabilityError,
    CommitIncomplete,
    OutcomeUnknown,
    PrepareFailed,
)


def B(i: int, wrote: bool = True, prep: bool = True, name: str | None = None,
      reason: str | None = None) -> BranchFacts:
    return BranchFacts(i, name or f"s{i}", wrote, prep, reason)


def test_happy_path_walk() -> None:
    state = State.PREPARING
    actions = []
    for ev in (Event.PREPARED_ALL, Event.DECISION_DURABLE, Event.COMMITTED_ALL):
        step = next_step(state, ev)
        assert step.raises is None
        actions.append(step.action)
        state = step.next_state
    assert state is State.COMMITTED
    assert actions == [Action.COMMIT_DECIDER, Action.COMMIT_PREPARED, Action.DONE]


@pytest.mark.parametrize("state,event,exc,action", [
    (State.PREPARING, Event.PREPARE_FAILED, PrepareFailed, Action.ROLLBACK_ALL),
    (State.DECIDING, Event.DECISION_FAILED, PrepareFailed, Action.ROLLBACK_ALL),
    (State.DECIDING, Event.DECISION_UNKNOWN, OutcomeUnknown, Action.LEAVE_TO_RECOVERY),
    (State.COMMITTING, Event.COMMIT_FAILED, CommitIncomplete, Action.LEAVE_TO_RECOVERY),
])
def test_failure_rows(state: State, event: Event, exc: type, action: Action) -> None:
    step = next_step(state, event)
    assert step.raises is exc and step.action is action


def test_before_commit_point_always_rolls_back_after_never() -> None:
    for (state, _ev), step in COMMIT_TABLE.items():
        if state in (State.PREPARING,):
            assert step.action in (Action.COMMIT_DECIDER, Action.ROLLBACK_ALL)
        if state is State.COMMITTING:
            assert step.action is not Action.ROLLBACK_ALL


def test_illegal_event() -> None:
    with pytest.raises(AssertionError):
        next_step(State.COMMITTED, Event.PREPARE_FAILED)


def test_plans() -> None:
    kw = dict(fixed_decider=None, configured_decider=None, atomic="require")
    assert plan_commit([B(0, False), B(1, False)], **kw).kind is PlanKind.NOTHING
    p = plan_commit([B(0, False), B(1)], **kw)
    assert p.kind is PlanKind.ONE_PHASE and p.decider == 1 and p.release == (0,)
    # several writers: SQLite (cannot prepare) decides
    p = plan_commit([B(0), B(1, prep=False), B(2, False)], **kw)
    assert p.kind is PlanKind.TWO_PHASE and p.decider == 1 and p.prepare == (0,)
    assert p.release == (2,)
    # configured decider among writers
    p = plan_commit([B(0), B(1, name="d")], fixed_decider=None, configured_decider="d",
                    atomic="require")
    assert p.decider == 1 and p.prepare == (0,)
    # decider fixed early (XA START) may be a reader
    p = plan_commit([B(0, False), B(1), B(2)], fixed_decider=0, configured_decider=None,
                    atomic="require")
    assert p.decider == 0 and p.prepare == (1, 2) and p.release == ()


def test_two_unpreparable_writers() -> None:
    facts = [B(0, prep=False), B(1, prep=False), B(2)]
    with pytest.raises(AtomicityUnavailableError) as ei:
        plan_commit(facts, fixed_decider=None, configured_decider=None, atomic="require",
                    gtrid="g")
    assert ei.value.gtrid == "g" and sorted(ei.value.shard_ids) == ["s0", "s1"]
    p = plan_commit(facts, fixed_decider=None, configured_decider=None, atomic="best_effort")
    assert p.decider == 0 and p.last == (1,) and p.prepare == (2,)


def test_pg_without_prepared_transactions_is_a_capability_error() -> None:
    facts = [B(0, prep=False), B(1, prep=False, reason="max_prepared_transactions = 0")]
    with pytest.raises(CapabilityError) as ei:
        plan_commit(facts, fixed_decider=None, configured_decider=None, atomic="require")
    assert ei.value.shard_id == "s1"


def test_isolation_limited_writer_is_a_capability_error_or_committed_last() -> None:
    # MariaDB below REPEATABLE READ: no XA, so it cannot prepare; it can still decide
    weak = BranchFacts(1, "s1", True, False, "MariaDB XA needs REPEATABLE READ",
                       configurable=True)
    p = plan_commit([B(0), weak], fixed_decider=None, configured_decider=None,
                    atomic="require")
    assert p.kind is PlanKind.TWO_PHASE and p.decider == 1 and p.prepare == (0,)
    # a second writer that cannot prepare: require refuses, naming the weak shard
    facts = [B(0, prep=False), weak]
    with pytest.raises(CapabilityError) as ei:
        plan_commit(facts, fixed_decider=None, configured_decider=None, atomic="require")
    assert ei.value.shard_id == "s1"
    p = plan_commit(facts, fixed_decider=None, configured_decider=None, atomic="best_effort")
    assert p.decider == 0 and p.last == (1,)


def test_choose_decider() -> None:
    assert choose_decider([B(0), B(1, prep=False)], None) == 1
    assert choose_decider([B(0), B(1, name="d")], "d") == 1
    assert choose_decider([B(0), B(1)], None) == 0
    with pytest.raises(ValueError):
        choose_decider([], None)


@pytest.mark.parametrize("decision,young,action", [
    ("C", True, RecoveryAction.COMMIT_BRANCH), ("C", False, RecoveryAction.COMMIT_BRANCH),
    ("A", True, RecoveryAction.ROLLBACK_BRANCH), ("A", False, RecoveryAction.ROLLBACK_BRANCH),
    (None, True, RecoveryAction.LEAVE), (None, False, RecoveryAction.CLAIM_ABORT),
    ("?", False, RecoveryAction.LEAVE),
])
def test_recovery_table(decision: str | None, young: bool, action: RecoveryAction) -> None:
    assert recovery_action(decision, young) is action


def test_claim_table() -> None:
    assert after_claim(True, "A") is RecoveryAction.ROLLBACK_BRANCH
    assert after_claim(False, "C") is RecoveryAction.COMMIT_BRANCH
    assert after_claim(False, "A") is RecoveryAction.ROLLBACK_BRANCH
    assert after_claim(False, None) is RecoveryAction.LEAVE


def test_gc_table() -> None:
    kw = dict(listing_complete=True, age=10.0, abort_retention=100.0)
    assert may_delete_decision("C", in_doubt=False, **kw)
    assert not may_delete_decision("C", in_doubt=True, **kw)
    assert not may_delete_decision("C", in_doubt=False, listing_complete=False, age=10.0,
                                   abort_retention=100.0)
    assert not may_delete_decision("A", in_doubt=False, **kw)
    assert may_delete_decision("A", in_doubt=False, listing_complete=True, age=200.0,
                               abort_retention=100.0)


def test_absent_decider_when_fixed_early() -> None:
    """A shard that cannot prepare and has not joined decides when no branch must."""
    preparable = [B(0), B(1)]
    assert choose_absent_decider(preparable, [], None) is None
    assert choose_absent_decider(preparable, ["lite"], None) == "lite"
    assert choose_absent_decider(preparable, ["l1", "l2"], "l2") == "l2"
    assert choose_absent_decider(preparable, ["l1", "l2"], "s0") == "l1"
    # a branch that cannot prepare already decides
    assert choose_absent_decider([B(0), B(1, prep=False)], ["lite"], None) is None


def test_every_action_of_the_table_has_its_phase() -> None:
    """The two-phase run follows COMMIT_TABLE: each action a row names is carried out by
    one handler of shardsession.coordinator.phases, and no handler is for anything else."""
    from shardsession.coordinator.phases import HANDLERS

    used = {step.action for step in COMMIT_TABLE.values()}
    assert used <= set(HANDLERS) == set(Action)
    # every failure row has an exception for its handler to raise; success rows none
    for step in COMMIT_TABLE.values():
        failing = step.action in (Action.ROLLBACK_ALL, Action.LEAVE_TO_RECOVERY)
        assert (step.raises is not None) is failing
