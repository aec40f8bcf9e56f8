"""A global transaction: the branches of one root session transaction and the protocol.

:class:`GlobalTransaction` knows connections, adapters and xids, nothing of the ORM. The
decisions come from :mod:`.protocol`; this module only carries them out, in parallel where
the protocol allows (phase one, and the COMMIT PREPAREDs of phase two).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Connection, Engine

from .. import _compat
from ..backends import DecisionRow, Outcome
from ..events import emit
from ..exc import (
    AtomicityUnavailableError,
    CapabilityError,
    CommitIncomplete,
    TransactionError,
    warn_non_atomic,
)
from . import early
from .branch import (
    Branch,
    BranchState,
    discard_dead,
    is_disconnect,
    isolation_of,
    leave,
    rollback_all,
    run_parallel,
    wrap_error,
)
from .protocol import (
    Action,
    BranchFacts,
    CommitPlan,
    Event,
    PlanKind,
    State,
    choose_decider,
    next_step,
    plan_commit,
)
from .xid import Xid, gtrid_created, new_gtrid

if TYPE_CHECKING:
    from .coordinator import TransactionCoordinator

__all__ = ["Branch", "BranchState", "GlobalTransaction"]

log = logging.getLogger(__name__)


class GlobalTransaction:
    """The branches of one root ``SessionTransaction`` and the commit protocol over them.

    Not thread-safe: used by the thread that owns the session (the protocol's worker
    threads each touch one branch's connection only).
    """

    __slots__ = ("_xa_pending", "branches", "coordinator", "decider_index", "defer_xa_start",
                 "early", "gtrid", "protocol_ran", "session", "shard_of_engine")

    def __init__(self, coordinator: TransactionCoordinator,
                 shard_of_engine: Callable[[Engine], str]) -> None:
        self.coordinator = coordinator
        self.shard_of_engine = shard_of_engine
        self.branches: dict[Engine, Branch] = {}
        self.gtrid: str | None = None
        self.decider_index: int | None = None
        self.protocol_ran = False
        #: early BEGINs still running (see :mod:`.early`); shared with the session
        self.early: list[Future[None]] = []
        #: while set, XA STARTs of new branches wait in ``_xa_pending`` (see
        #: :meth:`start_pending_xa`) instead of running one after another
        self.defer_xa_start = False
        self._xa_pending: list[Branch] = []
        #: the session whose listeners get the protocol's events (see shardsession.events)
        self.session: Any = None

    # --- branches --------------------------------------------------------------------

    def add_branch(self, connection: Connection, *, begun: bool = False) -> Branch:
        """Register the connection a root session transaction just began.

        ``begun``: the connection's transaction began earlier, as the transaction's only
        shard, and may have run statements: a MySQL branch then has no XA START (it must
        be the first statement) and cannot prepare; it can hold the decision.
        """
        engine = connection.engine
        branches = self.branches
        existing = branches.get(engine)
        if existing is not None:
            return existing
        if branches:
            dbapi = connection.connection.dbapi_connection
            for other in branches.values():
                if other.dbapi is dbapi:
                    # Two engines on one DBAPI connection (e.g. the local SQLite cluster, or
                    # option engines of one pool) share one transaction: one branch.
                    branches[engine] = other
                    return other
        if self.protocol_ran:
            raise TransactionError(
                "the commit protocol already ran for this transaction; no new shard "
                "may join it", gtrid=self.gtrid,
            )
        adapter = self.coordinator.adapter(engine)
        index = len({id(b) for b in branches.values()}) if branches else 0
        branch = Branch(index, engine, connection, adapter, self)
        self.branches[engine] = branch
        if adapter is None or not adapter.xid_at_begin:
            return branch
        if begun:
            branch.plain = True  # too late for XA START: no XA, holds the decision
            return branch
        # XA START must be this transaction's first statement, so the xid (and with it
        # the decider) is fixed now, from the branches known so far.
        self._fix_gtrid(None)
        assert self.gtrid is not None
        branch.xid = Xid.branch(self.gtrid, branch.index)
        if self.defer_xa_start:
            self._xa_pending.append(branch)
        else:
            adapter.begin_branch(branch.dbapi, branch.xid)
            branch.xa_started = True
        return branch

    def start_pending_xa(self) -> None:
        """Send the XA STARTs deferred by ``defer_xa_start``, all at once (each on its own
        connection, which nothing else uses meanwhile).

        :raises sqlalchemy.exc.DBAPIError: an XA START failed (the first, in branch order);
            the branches that did start are XA ACTIVE and are rolled back with the session.
        """
        pending, self._xa_pending = self._xa_pending, []
        if not pending:
            return

        def start(b: Branch) -> Callable[[], None]:
            def run() -> None:
                assert b.adapter is not None and b.xid is not None
                b.adapter.begin_branch(b.dbapi, b.xid)
                b.xa_started = True
            return run

        errors = self._parallel([(b, start(b)) for b in pending])
        if errors:
            b = next(x for x in pending if x.index in errors)
            e = errors[b.index]
            raise wrap_error(b, e, "XA START") from e

    def _ordered(self) -> list[Branch]:
        """Distinct branches in registration order (index == position)."""
        seen: dict[int, Branch] = {}
        for b in self.branches.values():
            seen.setdefault(id(b), b)
        return sorted(seen.values(), key=lambda b: b.index)

    def left_branches(self) -> list[Branch]:
        """Branches left prepared for recovery by the last protocol run."""
        return [b for b in self._ordered() if b.state is BranchState.LEFT]

    def _facts(self, branch: Branch, *, detect: bool) -> BranchFacts:
        if branch.adapter is None:
            return BranchFacts(branch.index, branch.shard_id, branch.wrote, False,
                               f"no shardsession adapter for dialect {branch.engine.dialect.name}")
        if branch.plain:
            return BranchFacts(branch.index, branch.shard_id, branch.wrote, False,
                               "began without XA as the transaction's first shard: it can "
                               "hold the decision, not prepare")
        caps = self.coordinator.capabilities(branch, detect=detect)
        return BranchFacts(branch.index, branch.shard_id, branch.wrote, caps.can_prepare,
                           caps.reason)

    def _fix_gtrid(self, decider_index: int | None) -> None:
        if self.gtrid is not None:
            return
        ordered = self._ordered()
        if decider_index is None:
            facts = [self._facts(b, detect=False) for b in ordered]
            decider_index = choose_decider(facts, self.coordinator.decider)
        self.decider_index = decider_index
        self.gtrid = new_gtrid(ordered[decider_index].shard_id)

    # --- the protocol ----------------------------------------------------------------

    def protocol(self, transaction: Any) -> BaseException | None:
        """Run :meth:`commit` for the root ``SessionTransaction`` that owns this global
        transaction (called by it after its final flush, see ``_compat.coordinate``).

        Returns a :class:`~shardsession.exc.CommitIncomplete` instead of raising it: the
        data is committed, so SQLAlchemy must finish its commit (objects persistent and
        expired, as after any commit) without touching the branches left to recovery;
        the session raises the returned exception from ``commit()`` afterwards. Every
        other error is raised (see :meth:`commit`).
        """
        try:
            self.commit()
        except CommitIncomplete as e:
            for b in self.left_branches():
                _compat.skip_connection_commit(transaction, b.connection)
            return e
        return None

    def commit(self) -> None:
        """Run the commit protocol (called once, after the session's final flush).

        Failure semantics: :class:`~shardsession.exc.PrepareFailed` and
        :class:`~shardsession.exc.AtomicityUnavailableError` /
        :class:`~shardsession.exc.CapabilityError` mean nothing was committed on any
        shard. :class:`~shardsession.exc.CommitIncomplete` means the transaction is
        committed (the decision is durable) and the named branches are left prepared for
        recovery (the coordinator lets the session finish its commit, then raises it).
        :class:`~shardsession.exc.OutcomeUnknown` means the decider's commit
        was sent and its reply lost: recovery settles it (all committed or all rolled
        back). A driver error of a single-writer commit passes through unchanged. In every
        other failure case the caller rolls the session back; no branch is left in an XA or
        session state that could leak into the pool.
        """
        if self.protocol_ran:
            return
        if self.early:
            early.join(self.early)
        self.protocol_ran = True
        if len(self.branches) == 1:
            only = next(iter(self.branches.values()))
            if not only.xa_started:
                return  # one branch, no XA: SQLAlchemy's own commit is the whole protocol
        ordered = self._ordered()
        if not ordered:
            return
        writers = sum(1 for b in ordered if b.wrote)
        facts = [self._facts(b, detect=writers > 1 and b.wrote) for b in ordered]
        plan = plan_commit(
            facts, fixed_decider=self.decider_index, configured_decider=self.coordinator.decider,
            atomic=self.coordinator.atomic, gtrid=self.gtrid,
        )
        if plan.kind is PlanKind.TWO_PHASE:
            self._two_phase(ordered, plan)
        else:
            self._simple(ordered, plan)

    def _simple(self, ordered: Sequence[Branch], plan: CommitPlan) -> None:
        # Readers and a single writer: only XA branches need anything from us; PostgreSQL
        # and SQLite branches are committed by SQLAlchemy itself, at plain cost.
        for i in plan.release:
            self._release(ordered[i])
        if plan.kind is PlanKind.ONE_PHASE:
            assert plan.decider is not None
            b = ordered[plan.decider]
            if b.xa_started and b.adapter is not None:
                try:
                    b.adapter.commit_one_phase(b.dbapi, b.xid)
                except Exception as e:
                    raise wrap_error(b, e, "XA COMMIT ONE PHASE") from e
                b.state = BranchState.FINISHED

    def _release(self, b: Branch) -> None:
        if b.xa_started and b.adapter is not None and b.state is BranchState.ACTIVE:
            try:
                b.adapter.rollback_active(b.dbapi, b.xid)
            except Exception as e:
                raise wrap_error(b, e, "XA ROLLBACK") from e
            b.state = BranchState.FINISHED

    def _crash(self, point: str) -> None:
        hook = self.coordinator.crash_point
        if hook is not None:
            hook(point)

    def _parallel(self, tasks: Sequence[tuple[Branch, Callable[[], None]]]) -> dict[int, Exception]:
        return run_parallel(self.coordinator.executor(), tasks)

    def _two_phase(self, ordered: Sequence[Branch], plan: CommitPlan) -> None:
        assert plan.decider is not None
        self._fix_gtrid(plan.decider)
        assert self.gtrid is not None
        gtrid = self.gtrid
        decider = ordered[plan.decider]
        if decider.adapter is None:
            raise AtomicityUnavailableError(
                f"shard {decider.shard_id!r} has no adapter and cannot hold the decision",
                gtrid=gtrid, shard_ids=[decider.shard_id],
            )
        if gtrid_created(gtrid) < time.time() - self.coordinator.max_commit_age:
            # Recovery may delete ABORT claims after abort_retention (> 2 x this age):
            # committing an older transaction could follow a claim that was forgotten.
            raise TransactionError(
                "transaction too old to commit atomically (max_commit_age exceeded); "
                "nothing was committed", gtrid=gtrid,
            )
        for b in ordered:
            if b.xid is None:
                b.xid = Xid.branch(gtrid, b.index)
        prepare = [ordered[i] for i in plan.prepare]
        for b in prepare:
            problem = b.adapter.isolation_problem(isolation_of(b.connection)) if b.adapter else None
            if problem is not None:
                self._rollback_all(ordered)
                raise CapabilityError(
                    f"shard {b.shard_id!r} must prepare for this commit to be atomic, but: "
                    f"{problem}; nothing was committed", gtrid=gtrid, shard_id=b.shard_id,
                )
        participants = ",".join(b.xid.bqual for b in prepare if b.xid)
        # With nothing to prepare (best effort over unpreparable shards only) there is no
        # in-doubt branch for a decision row to settle.
        need_decision = bool(prepare)
        if need_decision:
            self.coordinator.ensure_decision_table(decider)
        self._crash("after_writes")
        log.debug("2PC %s: prepare %d branch(es), decider %s", gtrid, len(prepare),
                  decider.describe())

        state = State.PREPARING
        tasks: list[tuple[Branch, Callable[[], None]]] = []

        def prepare_one(b: Branch) -> Callable[[], None]:
            def run() -> None:
                assert b.adapter is not None
                b.adapter.prepare(b.dbapi, b.xid)
                b.state = BranchState.PREPARED
                self._crash(f"after_prepare:{b.xid.bqual if b.xid else b.index}")
            return run

        def decide() -> None:
            assert decider.adapter is not None
            decider.adapter.insert_decision(
                decider.dbapi, DecisionRow(gtrid, Outcome.COMMIT, time.time(), participants)
            )

        def release_one(b: Branch) -> Callable[[], None]:
            return lambda: self._release(b)

        if need_decision:
            tasks.append((decider, decide))
        tasks.extend((b, prepare_one(b)) for b in prepare)
        tasks.extend((ordered[i], release_one(ordered[i])) for i in plan.release)
        prepared_ids = [b.shard_id for b in prepare]
        emit(self.session, "shardsession_before_prepare", gtrid, prepared_ids,
             decider.shard_id)
        errors = self._parallel(tasks)
        discard_dead(ordered, errors)
        failed = [ordered[i] for i in errors if i not in plan.release]
        emit(self.session, "shardsession_after_prepare", gtrid, prepared_ids,
             [b.shard_id for b in failed])
        if failed:
            step = next_step(state, Event.PREPARE_FAILED)
            self._rollback_all(ordered)
            emit(self.session, "shardsession_after_decision", gtrid, "abort", decider.shard_id)
            first = errors[failed[0].index]
            raise self._raise(step.raises, gtrid,
                              f"prepare failed on {[b.shard_id for b in failed]}: {first}",
                              failed_shards=[b.shard_id for b in failed]) from first
        step = next_step(state, Event.PREPARED_ALL)
        state = step.next_state
        self._crash("after_all_prepared")

        # Phase two: the decider's local commit is the commit point.
        assert step.action is Action.COMMIT_DECIDER
        self._crash("before_decision_commit")

        def commit_decider() -> None:
            assert decider.adapter is not None
            decider.adapter.commit_one_phase(decider.dbapi,
                                             decider.xid if decider.xa_started else None)

        def settle_one(b: Branch) -> Callable[[], None]:
            return lambda: b.adapter.settle_prepared(b.dbapi) if b.adapter else None

        # While the decider commits, the prepared branches' drivers are brought to idle
        # (no effect on the server) so that phase two is one round trip per branch.
        errors = self._parallel([(decider, commit_decider),
                                 *((b, settle_one(b)) for b in prepare)])
        discard_dead(ordered, errors)
        unsettled = {i: e for i, e in errors.items() if i != decider.index}
        if decider.index in errors:
            e = errors[decider.index]
            if is_disconnect(decider, e):
                step = next_step(state, Event.DECISION_UNKNOWN)
                leave(prepare)
                decider.state = BranchState.LEFT
                emit(self.session, "shardsession_after_decision", gtrid, "unknown",
                     decider.shard_id)
                raise self._raise(
                    step.raises, gtrid,
                    f"the decision commit on {decider.shard_id!r} was sent but its outcome is "
                    f"unknown ({e}); recovery will commit or roll back every branch",
                    pending_shards=[b.shard_id for b in prepare],
                ) from e
            step = next_step(state, Event.DECISION_FAILED)
            self._rollback_all(ordered)
            emit(self.session, "shardsession_after_decision", gtrid, "abort", decider.shard_id)
            raise self._raise(step.raises, gtrid,
                              f"the decision commit on {decider.shard_id!r} failed: {e}",
                              failed_shards=[decider.shard_id]) from e
        decider.state = BranchState.FINISHED
        step = next_step(state, Event.DECISION_DURABLE)
        state = step.next_state
        self._crash("after_decision_commit")
        emit(self.session, "shardsession_after_decision", gtrid, "commit", decider.shard_id)

        def commit_one(b: Branch) -> Callable[[], None]:
            def run() -> None:
                assert b.adapter is not None
                b.adapter.commit_prepared_here(b.dbapi, b.xid)
                b.state = BranchState.FINISHED
                self._crash(f"after_commit_prepared:{b.xid.bqual if b.xid else b.index}")
            return run

        errors = self._parallel([(b, commit_one(b)) for b in prepare
                                 if b.index not in unsettled])
        discard_dead(ordered, errors)
        errors.update(unsettled)
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
            step = next_step(state, Event.COMMIT_FAILED)
            raise self._raise(
                step.raises, gtrid,
                f"transaction {gtrid} is committed; branches {[b.shard_id for b in pending]} "
                "are still prepared and will be completed by recovery",
                pending_shards=[b.shard_id for b in pending],
            )
        step = next_step(state, Event.COMMITTED_ALL)
        self._crash("after_all_committed")
        if last_errors:
            raise TransactionError(
                f"transaction {gtrid}: the atomic part committed but best-effort shards "
                f"failed to commit: {last_errors}", gtrid=gtrid,
            )

    @staticmethod
    def _raise(cls: type[TransactionError] | None, gtrid: str, message: str,
               **fields: Any) -> TransactionError:
        assert cls is not None
        return cls(message, gtrid=gtrid, **fields)

    def _rollback_all(self, ordered: Sequence[Branch]) -> None:
        """Roll back every branch before the commit point (nothing is committed)."""
        rollback_all(self.coordinator.executor(), ordered, self.gtrid)

    # --- SQLAlchemy's own end of the connection transaction ----------------------------

    def on_connection_rollback(self, branch: Branch) -> None:
        """Called before SQLAlchemy's ROLLBACK on a branch's connection."""
        if self.early:
            early.join(self.early)
        if branch.state is BranchState.ACTIVE and branch.xa_started and branch.adapter:
            try:
                branch.adapter.rollback_active(branch.dbapi, branch.xid)
            except Exception as e:
                log.warning("rollback of XA branch %s failed (%s); discarding the connection",
                            branch.describe(), e)
                branch.connection.invalidate()
        if branch.state is not BranchState.LEFT:
            branch.state = BranchState.FINISHED

    def close(self) -> None:
        """The root session transaction ended: forget every branch."""
        if self.early:
            early.join(self.early)
        branches = self.branches
        if not branches:
            return
        for b in self._ordered() if len(branches) > 1 else branches.values():
            if b.state is BranchState.ACTIVE and b.xa_started and b.adapter is not None:
                # Not ended by commit or rollback (should not happen): do not let an XA
                # ACTIVE connection go back to the pool.
                self.on_connection_rollback(b)
            b.state = BranchState.CLOSED
            self.coordinator.forget(b)
        self.branches.clear()

