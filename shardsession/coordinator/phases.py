"""The phases of a two-phase commit, driven by the commit table of :mod:`.protocol`.

:func:`run_two_phase` begins in ``State.PREPARING`` with phase one; every transition after
that is looked up in :data:`~.protocol.COMMIT_TABLE` (:func:`~.protocol.next_step`), and
the step's action is carried out by its handler in :data:`HANDLERS`, one per
:class:`~.protocol.Action` (checked at import). Each handler returns the event that ends
its phase, or ``None`` when the run is over; the exception the client gets is the step's
``raises``. So the table the unit tests walk is the table the code follows.

Failure semantics are those of :meth:`.transaction.GlobalTransaction.commit`: before the
decider's COMMIT every failure rolls every branch back; once it may have been sent, only
the server's own refusal does (anything else is ``OutcomeUnknown``); after it, failures
only leave prepared branches to recovery (``CommitIncomplete``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from ..backends import DecisionRow, Outcome
from ..events import emit
from ..exc import (
    AtomicityUnavailableError,
    CapabilityError,
    CommitIncomplete,
    OutcomeUnknown,
    PrepareFailed,
    TransactionError,
    warn_non_atomic,
)
from . import deadlock, trace
from .branch import IMPLICIT_COMMIT_KEY, Branch, BranchState, discard_dead, isolation_of, leave
from .protocol import Action, CommitPlan, Event, State, Step, next_step
from .xid import MAX_PREPARED_BRANCHES, Xid, gtrid_cluster, gtrid_created, participants_text

if TYPE_CHECKING:
    from .transaction import GlobalTransaction

__all__ = ["HANDLERS", "TwoPhaseRun", "run_two_phase"]

log = logging.getLogger(__name__)


def run_two_phase(gt: GlobalTransaction, ordered: Sequence[Branch], plan: CommitPlan) -> None:
    """Commit ``ordered`` as ``plan`` says (a TWO_PHASE plan), following the commit table.

    :raises AtomicityUnavailableError, CapabilityError, TransactionError: refused before
        anything was prepared (nothing committed).
    :raises PrepareFailed: nothing was committed, every branch rolled back.
    :raises OutcomeUnknown: the decision's fate is unknown; prepared branches left.
    :raises CommitIncomplete: committed; the named branches are left to recovery.
    """
    run = TwoPhaseRun(gt, ordered, plan)
    started = time.perf_counter()
    kind = "failed"
    try:
        state = State.PREPARING
        event = run.prepare_all()
        while True:
            step = next_step(state, event)
            state = step.next_state
            following = HANDLERS[step.action](run, step)
            if following is None:
                kind = "two_phase"
                return
            event = following
    except CommitIncomplete:
        kind = "two_phase"  # committed; recovery finishes the pending branches
        raise
    except OutcomeUnknown:
        kind = "unknown"
        raise
    except PrepareFailed:
        kind = "aborted"
        raise
    except (AtomicityUnavailableError, CapabilityError):
        kind = "refused"
        raise
    finally:
        if trace.enabled():
            trace.record("commit", kind, gtrid=run.gtrid, shard=run.decider.shard_id,
                         duration=time.perf_counter() - started,
                         width=1 + len(run.prepare) + len(plan.last))


_LOCATION_KEY = "shardsession_location"


def _location(b: Branch) -> str | None:
    """The location (server and database) of ``b``'s database, asked once per pooled
    connection (kept in its ``info``); ``None`` when it cannot be asked (the decision row
    then names the participant by token only, and recovery checks its identity instead)."""
    info = b.connection.connection.info
    loc = info.get(_LOCATION_KEY)
    if loc is None and b.adapter is not None:
        try:
            loc = b.adapter.location(b.dbapi) or None
        except Exception as e:  # recorded without it; recovery is stricter then
            log.warning("cannot read the location of shard %s: %s", b.shard_id, e)
            return None
        info[_LOCATION_KEY] = loc
    return loc if isinstance(loc, str) else None


@contextlib.contextmanager
def _noted(gt: GlobalTransaction, b: Branch) -> Iterator[None]:
    """Note a commit-phase statement of ``b`` as a wait for the deadlock detector."""
    coord = gt.coordinator
    if coord.deadlock_timeout is None:
        yield
        return
    deadlock.enter(b, coord.deadlock_timeout, coord.deadlock_fallback)
    try:
        yield
    finally:
        deadlock.leave(b)


def _timed(event: str, gtrid: str, b: Branch, work: Callable[[], None]
           ) -> Callable[[], None]:
    """``work`` recording its duration and outcome as ``event`` of branch ``b``."""
    if not trace.enabled():
        return work

    def run() -> None:
        started = time.perf_counter()
        outcome = "failed"
        try:
            work()
            outcome = "ok"
        finally:
            trace.record(event, outcome, gtrid=gtrid, shard=b.shard_id,
                         duration=time.perf_counter() - started)
    return run


class TwoPhaseRun:
    """One run of the protocol over the branches of a global transaction: what the phases
    share, and the phases themselves."""

    __slots__ = ("decider", "decider_session", "failure", "gt", "gtrid", "left_decider",
                 "ordered", "pending", "plan", "prepare", "unsettled")

    def __init__(self, gt: GlobalTransaction, ordered: Sequence[Branch],
                 plan: CommitPlan) -> None:
        assert plan.decider is not None
        gt._fix_gtrid(plan.decider)
        assert gt.gtrid is not None
        self.gt = gt
        self.gtrid: str = gt.gtrid
        self.ordered = ordered
        self.plan = plan
        self.decider = ordered[plan.decider]
        self.prepare = [ordered[i] for i in plan.prepare]
        #: (message, structured fields, cause) of the failure the next handler raises
        self.failure: tuple[str, dict[str, Any], BaseException | None] = ("", {}, None)
        #: branches a failure leaves to recovery
        self.pending: list[Branch] = []
        self.left_decider = False
        self.unsettled: dict[int, BaseException] = {}
        self.decider_session: Any = None

    # --- before the protocol: refusals, nothing prepared yet ------------------------------

    def _check(self) -> None:
        gtrid, decider = self.gtrid, self.decider
        if decider.adapter is None:
            raise AtomicityUnavailableError(
                f"shard {decider.shard_id!r} has no adapter and cannot hold the decision",
                gtrid=gtrid, shard_ids=[decider.shard_id],
            )
        if gtrid_created(gtrid) < time.time() - self.gt.coordinator.max_commit_age:
            # Recovery may delete ABORT claims after abort_retention (> 2 x this age):
            # committing an older transaction could follow a claim that was forgotten.
            raise TransactionError(
                "transaction too old to commit atomically (max_commit_age exceeded); "
                "nothing was committed", gtrid=gtrid,
            )
        if len(self.prepare) > MAX_PREPARED_BRANCHES:
            # the decision row must name every prepared branch's shard (for recovery to
            # know when it may go), and its column holds that many
            self.gt._rollback_all(self.ordered)
            raise TransactionError(
                f"{len(self.prepare)} shards would prepare; one atomic commit can name at "
                f"most {MAX_PREPARED_BRANCHES} prepared branches in its decision row. "
                "Nothing was committed; write to fewer shards per transaction", gtrid=gtrid,
            )
        for b in self.ordered:
            if b.xid is None:
                b.xid = Xid.branch(gtrid, b.index)
        for b in self.prepare:
            problem = b.adapter.isolation_problem(isolation_of(b.connection)) if b.adapter else None
            if problem is not None:
                self.gt._rollback_all(self.ordered)
                raise CapabilityError(
                    f"shard {b.shard_id!r} must prepare for this commit to be atomic, but: "
                    f"{problem}; nothing was committed", gtrid=gtrid, shard_id=b.shard_id,
                )

    # --- phase one (state PREPARING) --------------------------------------------------------

    def _refuse_implicit_commits(self) -> None:
        """A MariaDB/MySQL branch that sent DDL (or another statement the server commits
        implicitly) already committed it and its earlier writes: this commit cannot be
        atomic. Everything still open is rolled back, and the error says what is
        committed (never "nothing was committed")."""
        for b in self.ordered:
            statement = getattr(b.connection, IMPLICIT_COMMIT_KEY, None)
            if statement is None:
                continue
            self.gt._rollback_all(self.ordered)
            raise TransactionError(
                f"shard {b.shard_id!r} ran a statement MariaDB/MySQL commits implicitly "
                f"({statement!r}): it and the writes made on that shard before it are "
                "COMMITTED; everything else was rolled back, so this cross-shard "
                "transaction is not atomic. Run DDL outside cross-shard transactions",
                gtrid=self.gtrid)

    def prepare_all(self) -> Event:
        """PREPARE every other writer, insert the decision row in the decider's
        transaction and release the readers, all at once."""
        self._check()
        gt, gtrid, decider, prepare = self.gt, self.gtrid, self.decider, self.prepare
        self._refuse_implicit_commits()
        # which shards recovery must have asked before it may delete the decision row
        # (and where each branch's database is, so that recovery asking another database
        # under the same shard id never takes "no branch there" for an answer)
        locations = {b.shard_id: loc for b in prepare if (loc := _location(b))}
        participants = participants_text(((b.xid, b.shard_id) for b in prepare if b.xid),
                                         locations)
        # With nothing to prepare (best effort over unpreparable shards only) there is no
        # in-doubt branch for a decision row to settle.
        need_decision = bool(prepare)
        if need_decision:
            gt.coordinator.ensure_decision_table(decider)
        gt._crash("after_writes")
        log.debug("2PC %s: prepare %d branch(es), decider %s", gtrid, len(prepare),
                  decider.describe())

        def prepare_one(b: Branch) -> Callable[[], None]:
            def run() -> None:
                assert b.adapter is not None
                # noted as a wait: a PREPARE may wait on a lock (a deferred constraint's
                # check), and cancelling it is safe (it fails, the protocol aborts)
                with _noted(gt, b):
                    b.adapter.prepare(b.dbapi, b.xid)
                b.state = BranchState.PREPARED
                gt._crash(f"after_prepare:{b.xid.bqual if b.xid else b.index}")
            return run

        def decide() -> None:
            assert decider.adapter is not None
            with _noted(gt, decider):  # before the commit point: cancelling it is safe
                decider.adapter.insert_decision(
                    decider.dbapi, DecisionRow(gtrid, Outcome.COMMIT, time.time(),
                                               participants)
                )
            # The identity this process wrote into the xids may be stale (another process
            # re-keyed the database since it was read): deciding under it would leave
            # branches no recovery takes for this database's. Checked in the decider's
            # transaction, before the commit point; a mismatch fails the commit.
            cluster = gtrid_cluster(gtrid)
            if cluster is not None:
                stored = decider.adapter.read_cluster_id_locked(decider.dbapi)
                # (None or "": not visible in this transaction's snapshot -- PostgreSQL at
                # REPEATABLE READ or SERIALIZABLE, a table newer than MariaDB's read view
                # -- so it was stored while the transaction ran: nothing to compare)
                if stored and stored != cluster:
                    gt.coordinator.forget_identity(decider.engine)
                    raise CapabilityError(
                        f"the decider shard {decider.shard_id!r} now stores the cluster "
                        f"identity {stored}, not {cluster} this transaction was prepared "
                        "under (re-keyed by another process); nothing was committed, retry "
                        "the transaction", gtrid=gtrid, shard_id=decider.shard_id)

        def release_one(b: Branch) -> Callable[[], None]:
            return lambda: gt._release(b)

        tasks: list[tuple[Branch, Callable[[], None]]] = []
        if need_decision:
            tasks.append((decider, _timed("decision_row", gtrid, decider, decide)))
        tasks.extend((b, _timed("prepare", gtrid, b, prepare_one(b))) for b in prepare)
        tasks.extend((self.ordered[i], release_one(self.ordered[i])) for i in self.plan.release)
        prepared_ids = [b.shard_id for b in prepare]
        emit(gt.session, "shardsession_before_prepare", gtrid, prepared_ids, decider.shard_id)
        started = time.perf_counter()
        errors = gt._parallel(tasks)
        if trace.enabled():
            trace.record("phase", "failed" if errors else "ok", gtrid=gtrid, phase="prepare",
                         duration=time.perf_counter() - started, width=len(tasks))
        discard_dead(self.ordered, errors)
        failed = [self.ordered[i] for i in errors if i not in self.plan.release]
        emit(gt.session, "shardsession_after_prepare", gtrid, prepared_ids,
             [b.shard_id for b in failed])
        if failed:
            # a PREPARE cancelled by the deadlock detector fails with its victim error
            first = deadlock.victim_error(gt) or errors[failed[0].index]
            self.failure = (f"prepare failed on {[b.shard_id for b in failed]}: {first}",
                            {"failed_shards": [b.shard_id for b in failed]}, first)
            return Event.PREPARE_FAILED
        gt._crash("after_all_prepared")
        return Event.PREPARED_ALL

    # --- the commit point (state DECIDING) --------------------------------------------------

    def commit_decider(self, step: Step) -> Event:
        """Commit the decider one phase: its local commit is the commit point."""
        gt, decider, prepare = self.gt, self.decider, self.prepare
        assert decider.adapter is not None
        gt._crash("before_decision_commit")

        def commit() -> None:
            assert decider.adapter is not None
            decider.adapter.commit_one_phase(decider.dbapi,
                                             decider.xid if decider.xa_started else None)

        def settle_one(b: Branch) -> Callable[[], None]:
            return lambda: b.adapter.settle_prepared(b.dbapi) if b.adapter else None

        # The decider's COMMIT is never cancelled (its outcome would be unknown): the
        # detector chooses another transaction of a cycle it waits in.
        deadlock.state_of(gt).committing = True
        # Known to the driver without a round trip; needed only if the outcome is unknown.
        self.decider_session = decider.adapter.session_id(decider.dbapi)
        # While the decider commits, the prepared branches' drivers are brought to idle
        # (no effect on the server) so that phase two is one round trip per branch.
        started = time.perf_counter()
        try:
            errors = gt._parallel([(decider, commit), *((b, settle_one(b)) for b in prepare)])
        except BaseException as interrupted:
            # Raised in this thread while it waited for the workers (a signal handler's
            # exception): the decider's COMMIT may have been sent.
            errors = {decider.index: interrupted}
        if trace.enabled():
            failed = errors.get(decider.index)
            outcome = ("commit" if failed is None else
                       "refused" if decider.adapter.commit_refused(failed) else "unknown")
            took = time.perf_counter() - started
            trace.record("decision", outcome, gtrid=self.gtrid, shard=decider.shard_id,
                         duration=took)
            trace.record("phase", outcome, gtrid=self.gtrid, phase="decision", duration=took,
                         width=1)
        discard_dead(self.ordered, errors)
        self.unsettled = {i: e for i, e in errors.items() if i != decider.index}
        if decider.index not in errors:
            decider.state = BranchState.FINISHED
            gt.committed_decider = decider
            emit(gt.session, "shardsession_after_decision", self.gtrid, "commit",
                 decider.shard_id)
            return Event.DECISION_DURABLE
        e = errors[decider.index]
        if decider.adapter.commit_refused(e):
            self.failure = (f"the decision commit on {decider.shard_id!r} failed: {e}",
                            {"failed_shards": [decider.shard_id]}, e)
            return Event.DECISION_FAILED
        # Once the COMMIT may have been sent, only the server's own refusal means "not
        # committed": anything else (a lost reply, an exception a signal handler raised
        # while the driver waited, a driver bug) leaves it unknown.
        self.pending = list(prepare)
        self.left_decider = True
        self.failure = (
            f"the decision commit on {decider.shard_id!r} was sent but its outcome is "
            f"unknown ({type(e).__name__}: {e}); recovery will commit or roll back every "
            "branch", {"pending_shards": [b.shard_id for b in prepare]}, e)
        return Event.DECISION_UNKNOWN

    # --- phase two (state COMMITTING) -------------------------------------------------------

    def commit_prepared(self, step: Step) -> Event:
        """COMMIT PREPARED every prepared branch (in parallel), then the best-effort
        shards. The transaction is committed: whatever interrupts this (a signal
        handler's exception, ``KeyboardInterrupt``) only delays the prepared branches."""
        try:
            return self._commit_prepared()
        except (TransactionError, Warning):  # best-effort shards' outcome, warnings as errors
            raise
        except BaseException as e:
            self.pending = [b for b in self.prepare if b.state is not BranchState.FINISHED]
            names = [b.shard_id for b in self.pending]
            self.failure = (
                f"transaction {self.gtrid} is committed; completing it was interrupted "
                f"({type(e).__name__}: {e}): branches {names} are still prepared and will "
                "be completed by recovery", {"pending_shards": names}, e)
            return Event.COMMIT_FAILED

    def _commit_prepared(self) -> Event:
        gt, gtrid, ordered, plan = self.gt, self.gtrid, self.ordered, self.plan
        gt._crash("after_decision_commit")

        def commit_one(b: Branch) -> Callable[[], None]:
            def run() -> None:
                assert b.adapter is not None
                b.adapter.commit_prepared_here(b.dbapi, b.xid)
                b.state = BranchState.FINISHED
                gt._crash(f"after_commit_prepared:{b.xid.bqual if b.xid else b.index}")
            return run

        started = time.perf_counter()
        tasks = [(b, _timed("commit_prepared", gtrid, b, commit_one(b))) for b in self.prepare
                 if b.index not in self.unsettled]
        errors = gt._parallel(tasks)
        if trace.enabled():
            trace.record("phase", "failed" if errors else "ok", gtrid=gtrid, phase="commit",
                         duration=time.perf_counter() - started, width=len(tasks))
        discard_dead(ordered, errors)
        errors.update(self.unsettled)
        pending = [ordered[i] for i in errors]
        for b in pending:
            log.warning("2PC %s: COMMIT PREPARED of %s failed (%s); recovery will finish it",
                        gtrid, b.describe(), errors[b.index])
        leave(pending)

        last_errors: list[str] = []
        if plan.last:
            names = [ordered[i].shard_id for i in plan.last]
            for i in plan.last:
                b = ordered[i]
                try:
                    assert b.adapter is not None
                    b.adapter.commit_one_phase(b.dbapi, b.xid if b.xa_started else None)
                    b.state = BranchState.FINISHED
                except Exception as e:
                    last_errors.append(f"{b.shard_id}: {e}")
            warn_non_atomic(
                f"shards {names} cannot prepare and were committed one after another after "
                f"the atomic part of transaction {gtrid}: a crash in between leaves them "
                "inconsistent"
            )
        if pending:
            names = [b.shard_id for b in pending]
            self.pending = pending
            self.failure = (f"transaction {gtrid} is committed; branches {names} are still "
                            "prepared and will be completed by recovery",
                            {"pending_shards": names}, None)
            return Event.COMMIT_FAILED
        gt._crash("after_all_committed")
        if last_errors:
            raise TransactionError(
                f"transaction {gtrid}: the atomic part committed but best-effort shards "
                f"failed to commit: {last_errors}", gtrid=gtrid,
            )
        return Event.COMMITTED_ALL

    # --- endings ------------------------------------------------------------------------------

    def rollback_all(self, step: Step) -> NoReturn:
        """Before the commit point: roll every branch back and raise the step's error (an
        interrupt such as ``KeyboardInterrupt`` stays itself: nothing was committed)."""
        self.gt._rollback_all(self.ordered)
        emit(self.gt.session, "shardsession_after_decision", self.gtrid, "abort",
             self.decider.shard_id)
        cause = self.failure[2]
        if cause is not None and not isinstance(cause, Exception):
            raise cause
        self._raise(step)

    def leave_to_recovery(self, step: Step) -> NoReturn:
        """Leave the pending branches prepared for recovery and raise the step's error; an
        unknown decision also abandons the decider's connection and server session."""
        leave(self.pending)
        if self.left_decider:
            self.decider.state = BranchState.LEFT
            self.gt._abandon_decider(self.decider, self.decider_session)
            emit(self.gt.session, "shardsession_after_decision", self.gtrid, "unknown",
                 self.decider.shard_id)
        cause = self.failure[2]
        if isinstance(cause, asyncio.CancelledError) and step.raises is not None:
            # asyncio's convention: a cancelled task ends cancelled (asyncio.wait_for then
            # raises its TimeoutError). What the caller would have heard is recorded (the
            # log, and the CancelledError's __cause__): the outcome is unknown and
            # recovery settles it.
            message, fields, _ = self.failure
            unknown = step.raises(message, gtrid=self.gtrid, **fields)
            log.error("2PC %s cancelled while its decision committed: %s", self.gtrid,
                      unknown)
            raise cause from unknown
        self._raise(step)

    def done(self, step: Step) -> None:
        return None

    def _raise(self, step: Step) -> NoReturn:
        assert step.raises is not None
        message, fields, cause = self.failure
        raise step.raises(message, gtrid=self.gtrid, **fields) from cause


#: the handler of every action of the commit table
HANDLERS: dict[Action, Callable[[TwoPhaseRun, Step], Event | None]] = {
    Action.COMMIT_DECIDER: TwoPhaseRun.commit_decider,
    Action.COMMIT_PREPARED: TwoPhaseRun.commit_prepared,
    Action.ROLLBACK_ALL: TwoPhaseRun.rollback_all,
    Action.LEAVE_TO_RECOVERY: TwoPhaseRun.leave_to_recovery,
    Action.DONE: TwoPhaseRun.done,
}
if set(HANDLERS) != set(Action):  # a new action in the table needs its phase here
    raise AssertionError(f"commit actions without a handler: {set(Action) - set(HANDLERS)}")
