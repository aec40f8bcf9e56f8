"""A global transaction: the branches of one root session transaction and the protocol.

:class:`GlobalTransaction` knows connections, adapters and xids, nothing of the ORM. The
decisions come from :mod:`.protocol`; this module only carries them out, in parallel where
the protocol allows (phase one, and the COMMIT PREPAREDs of phase two).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Connection, Engine

from .. import _compat
from ..exc import (
    AtomicityUnavailableError,
    CommitIncomplete,
    PrepareFailed,
    TransactionError,
)
from . import deadlock, early, trace
from .branch import (
    Branch,
    BranchState,
    discard_dead,
    isolation_of,
    rollback_all,
    run_parallel,
    wrap_error,
)
from .phases import run_two_phase
from .protocol import (
    BranchFacts,
    CommitPlan,
    PlanKind,
    choose_absent_decider,
    choose_decider,
    plan_commit,
)
from .xid import Xid, gtrid_cluster, new_gtrid

if TYPE_CHECKING:
    from .coordinator import TransactionCoordinator

__all__ = ["Branch", "BranchState", "GlobalTransaction"]

log = logging.getLogger(__name__)


class GlobalTransaction:
    """The branches of one root ``SessionTransaction`` and the commit protocol over them.

    Not thread-safe: used by the thread that owns the session (the protocol's worker
    threads each touch one branch's connection only).
    """

    __slots__ = ("_own", "_xa_pending", "absent_decider", "branches", "committed_decider",
                 "coordinator", "decider_index", "defer_xa_start", "early", "gtrid", "protocol_ran",
                 "session", "shard_of_engine", "shards", "watch")

    def __init__(self, coordinator: TransactionCoordinator,
                 shard_of_engine: Callable[[Engine], str],
                 shards: Mapping[str, Any] | None = None) -> None:
        self.coordinator = coordinator
        self.shard_of_engine = shard_of_engine
        #: the session's shards (id -> Engine or Connection), when it says: a shard that
        #: cannot prepare may then hold the decision before it joins (see _fix_gtrid)
        self.shards = shards
        self.branches: dict[Engine, Branch] = {}
        self.gtrid: str | None = None
        self.decider_index: int | None = None
        #: the decider fixed in the gtrid when it is not (yet) a branch: (shard id, engine)
        self.absent_decider: tuple[str, Engine] | None = None
        #: the connection of our own that holds the decision of an absent decider
        self._own: Connection | None = None
        self.protocol_ran = False
        #: the decider branch once its local commit (the decision) succeeded
        self.committed_decider: Branch | None = None
        #: early BEGINs still running (see :mod:`.early`); shared with the session
        self.early: list[Future[None]] = []
        #: while set, XA STARTs of new branches wait in ``_xa_pending`` (see
        #: :meth:`start_pending_xa`) instead of running one after another
        self.defer_xa_start = False
        self._xa_pending: list[Branch] = []
        #: the session whose listeners get the protocol's events (see shardsession.events)
        self.session: Any = None
        #: what the distributed deadlock detector keeps of it (see .deadlock)
        self.watch: Any = None

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
        if adapter is None:
            return branch
        if not begun:
            branch.mark = adapter.write_mark(branch.dbapi)
        if not adapter.xid_at_begin:
            return branch
        if begun or adapter.isolation_problem(isolation_of(connection)) is not None:
            # Too late for XA START, or XA cannot run at the connection's isolation level
            # (MariaDB below REPEATABLE READ): no XA, it commits as a plain Session's
            # connection would and can hold the decision (a writer that cannot prepare).
            branch.plain = True
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
            problem = branch.adapter.isolation_problem(isolation_of(branch.connection))
            return BranchFacts(branch.index, branch.shard_id, branch.wrote, False,
                               problem or "began without XA as the transaction's first "
                               "shard: it can hold the decision, not prepare",
                               configurable=problem is not None)
        caps = self.coordinator.capabilities(branch, detect=detect)
        return BranchFacts(branch.index, branch.shard_id, branch.wrote, caps.can_prepare,
                           caps.reason)

    def _fix_gtrid(self, decider_index: int | None) -> None:
        if self.gtrid is not None:
            return
        ordered = self._ordered()
        if decider_index is None:
            # Fixed early (at an XA START): later writers are unknown, so a shard that
            # cannot prepare decides even before it joins (it would have to if it wrote).
            facts = [self._facts(b, detect=False) for b in ordered]
            absent = self._absent_unpreparable()
            name = choose_absent_decider(facts, list(absent), self.coordinator.decider)
            if name is not None:
                self.absent_decider = (name, absent[name])
                self.gtrid = new_gtrid(
                    name, cluster=self.coordinator.engine_identity(absent[name]))
                return
            decider_index = choose_decider(facts, self.coordinator.decider)
        self.decider_index = decider_index
        decider = ordered[decider_index]
        self.gtrid = new_gtrid(decider.shard_id, cluster=self.coordinator.identity(decider))

    def _absent_unpreparable(self) -> dict[str, Engine]:
        """The session's shards that cannot prepare, can hold a decision and are not
        branches, in the session's order (by what is known without connecting: SQLite,
        or a server already found unable to prepare)."""
        out: dict[str, Engine] = {}
        if not self.shards:
            return out
        seen = set(self.branches)
        for name, bind in self.shards.items():
            engine = getattr(bind, "engine", bind)
            if not isinstance(engine, Engine) or engine in seen:
                continue
            seen.add(engine)
            adapter = self.coordinator.adapter(engine)
            if adapter is None:
                continue
            if adapter.name == "sqlite" or not self.coordinator.known_can_prepare(engine):
                out[str(name)] = engine
        return out

    def _decider_for_plan(self, ordered: list[Branch], writers: int) -> int | None:
        """The fixed decider's index for planning; an absent decider that did not join
        becomes a branch of our own connection when the commit needs a decision."""
        if self.absent_decider is None:
            return self.decider_index
        name, engine = self.absent_decider
        joined = self.branches.get(engine)
        if joined is not None:
            if writers > 1:
                self._confirm_identity(joined)
            return joined.index
        if writers < 2:
            return None  # no decision needed
        adapter = self.coordinator.adapter(engine)
        self._own = engine.connect()
        # a transaction for the decision row (with driver-level autocommit, as in the
        # local SQLite recipe, the INSERT would otherwise commit before the PREPAREs)
        self._own.begin()
        branch = Branch(len(ordered), engine, self._own, adapter, self, shard_id=name)
        if adapter is not None:
            branch.mark = adapter.write_mark(branch.dbapi)
        ordered.append(branch)
        self._confirm_identity(branch)
        return branch.index

    def _confirm_identity(self, decider: Branch) -> None:
        assert self.gtrid is not None
        cluster = gtrid_cluster(self.gtrid)
        if cluster is not None:
            self.coordinator.confirm_identity(decider, cluster)

    def _close_own(self) -> None:
        own, self._own = self._own, None
        if own is not None:
            with contextlib.suppress(Exception):  # a lost connection: nothing to end
                own.close()

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

    def late_failure(self, error: BaseException) -> BaseException | None:
        """What the caller must hear when SQLAlchemy's own end of the connections failed
        after :meth:`protocol` returned: once the decision is durable the transaction is
        committed, and a bare driver error (a server lost right after the decider's
        commit) would invite a retry that writes twice. ``None``: raise ``error``."""
        if self.committed_decider is None or isinstance(error, TransactionError):
            return None
        left = [b.shard_id for b in self.left_branches()]
        return CommitIncomplete(
            f"transaction {self.gtrid} is committed; ending a shard's connection "
            f"afterwards failed ({type(error).__name__}: {error}); "
            + (f"branches {left} are left to recovery" if left else "nothing is in doubt"),
            gtrid=self.gtrid, pending_shards=left)

    def commit(self) -> None:
        """Run the commit protocol (called once, after the session's final flush).

        Failure semantics: :class:`~shardsession.exc.PrepareFailed` and
        :class:`~shardsession.exc.AtomicityUnavailableError` /
        :class:`~shardsession.exc.CapabilityError` mean nothing was committed on any
        shard. :class:`~shardsession.exc.CommitIncomplete` means the transaction is
        committed (the decision is durable) and the named branches are left prepared for
        recovery (the coordinator lets the session finish its commit, then raises it).
        A branch the server already aborted fails the commit with ``PrepareFailed``
        before any decision; a transaction chosen as a distributed deadlock's victim
        fails it with :class:`~shardsession.exc.DistributedDeadlock`.
        :class:`~shardsession.exc.OutcomeUnknown` means the
        decider's COMMIT may have been sent and no definite answer from the server came
        back (a lost reply, or any exception while the driver waited: a signal handler's
        time limit, ``KeyboardInterrupt``): the prepared branches are left, recovery
        settles it (all committed or all rolled back), and the decider's server session
        is ended so that it does not hold up recovery's claim (see
        :meth:`_abandon_decider`). Anything that interrupts the commit after the decision
        is durable is :class:`~shardsession.exc.CommitIncomplete`. A driver error of a
        single-writer commit passes through unchanged. In every other failure case the
        caller rolls the session back; no branch is left in an XA or session state that
        could leak into the pool.
        """
        if self.protocol_ran:
            return
        if self.early:
            early.join(self.early)
        if self.watch is not None:
            victim = deadlock.victim_error(self)
            if victim is not None:  # its error may have been caught: never commit it
                raise victim
        self.protocol_ran = True
        if len(self.branches) == 1:
            only = next(iter(self.branches.values()))
            if not only.xa_started:
                if trace.enabled():  # (written or not: the server is not asked)
                    trace.record("commit", "one_phase", gtrid=self.gtrid, shard=only.shard_id,
                                 width=1)
                return  # one branch, no XA: SQLAlchemy's own commit is the whole protocol
        ordered = self._ordered()
        if not ordered:
            return
        self._inspect(ordered)
        writers = sum(1 for b in ordered if b.wrote)
        try:
            fixed = self._decider_for_plan(ordered, writers)
            facts = [self._facts(b, detect=writers > 1 and b.wrote) for b in ordered]
            try:
                plan = plan_commit(
                    facts, fixed_decider=fixed, configured_decider=self.coordinator.decider,
                    atomic=self.coordinator.atomic, gtrid=self.gtrid,
                )
            except AtomicityUnavailableError:
                if trace.enabled():
                    trace.record("commit", "refused", gtrid=self.gtrid, width=writers)
                raise
            if plan.kind is PlanKind.ONE_PHASE and trace.enabled():
                trace.record("commit", "one_phase", gtrid=self.gtrid,
                             shard=ordered[plan.decider or 0].shard_id, width=1)
            if plan.kind is PlanKind.TWO_PHASE:
                self._two_phase(ordered, plan)
            else:
                self._simple(ordered, plan)
        finally:
            self._close_own()

    def _inspect(self, ordered: Sequence[Branch]) -> None:
        """Before planning, learn from the servers what statement kinds cannot tell:
        whether a branch the statements call read-only wrote (a function called in a
        SELECT, say), and whether the server already rolled a branch's transaction back.

        Costs one round trip, in parallel, per PostgreSQL branch that ran no write
        statement, per asyncpg branch (whose driver does not say whether its
        transaction failed) and per MariaDB branch that joined a begun transaction and
        ran no write statement (its counters of rows written); none for SQLite. A
        single-shard transaction never gets here.

        :raises PrepareFailed: a branch's transaction was aborted by its server (an
            application caught the error and committed): its work is lost, so nothing is
            committed and every branch is rolled back, before any decision.
        """
        asked: dict[int, bool | None] = {}

        def ask(b: Branch) -> Callable[[], None]:
            def run() -> None:
                assert b.adapter is not None
                asked[b.index] = b.adapter.wrote_on_server(b.dbapi, b.mark)
            return run

        failed: dict[int, str] = {}
        tasks = []
        for b in ordered:
            if b.adapter is None or b.state is not BranchState.ACTIVE:
                continue
            problem = b.adapter.transaction_problem(b.dbapi)
            if problem is not None:
                failed[b.index] = problem
            elif not b.wrote or b.adapter.state_needs_asking(b.dbapi):
                if b.adapter.wrote_asks_server:
                    tasks.append((b, ask(b)))
                else:
                    ask(b)()  # the driver knows: no round trip, no other thread
        errors = self._parallel(tasks)
        discard_dead(ordered, errors)
        for i, e in errors.items():
            # (TransactionError: the adapter found the transaction aborted)
            failed[i] = str(e) if isinstance(e, TransactionError) else (
                f"asking whether it wrote failed: {e}")
        for i, wrote in asked.items():
            # "cannot tell" counts as a write: preparing a reader costs a round trip,
            # releasing a writer would lose its write
            if wrote is None or wrote:
                ordered[i].wrote = True
        for b in ordered:
            if b.errors and b.wrote and b.index not in failed and b.adapter is not None:
                for e in b.errors:
                    lost = b.adapter.lost_transaction(b.dbapi, e)
                    if lost is not None:
                        failed[b.index] = lost
                        break
        if failed:
            self._rollback_all(ordered)
            for e in errors.values():
                if not isinstance(e, Exception):
                    raise e  # an interrupt (KeyboardInterrupt) stays itself: nothing committed
            names = [ordered[i].shard_id for i in sorted(failed)]
            causes = "; ".join(f"{ordered[i].shard_id}: {failed[i]}" for i in sorted(failed))
            first = next((errors[i] for i in sorted(failed) if i in errors), None)
            raise PrepareFailed(
                f"cannot commit: the transaction of shard(s) {names} was rolled back by "
                f"the server ({causes}); nothing was committed",
                gtrid=self.gtrid, failed_shards=names,
            ) from first

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

    def _parallel(self, tasks: Sequence[tuple[Branch, Callable[[], None]]]
                  ) -> dict[int, BaseException]:
        return run_parallel(self.coordinator.executor(), tasks)

    def _two_phase(self, ordered: Sequence[Branch], plan: CommitPlan) -> None:
        # the phases, driven by the commit table of .protocol (see .phases)
        run_two_phase(self, ordered, plan)

    def _abandon_decider(self, decider: Branch, session_id: Any) -> None:
        """After an unknown decision commit: end the decider's server session, so that an
        uncommitted decision row stops blocking recovery's abort claim now, not when the
        server notices a half-open connection.

        The connection is closed here; the session is ended from a new connection in a
        worker thread (a server that cannot be reached must not delay the caller's
        ``OutcomeUnknown`` by a connect timeout). Best effort: if that fails, PostgreSQL
        ends the session itself after ``DECIDER_IDLE_TIMEOUT`` idle seconds (see the
        adapter); MariaDB only after its ``wait_timeout``.
        """
        with contextlib.suppress(Exception):
            if not decider.connection.invalidated:
                decider.connection.invalidate()
        adapter = decider.adapter
        if session_id is None or adapter is None:
            return
        engine, gtrid, shard_id = decider.engine, self.gtrid, decider.shard_id

        def end() -> None:
            try:
                with engine.connect() as c:
                    c = c.execution_options(isolation_level="AUTOCOMMIT")
                    adapter.end_session(c.connection.dbapi_connection, session_id)
            except Exception as e:
                log.warning("2PC %s: could not end the decider's session %s on %s (%s)",
                            gtrid, session_id, shard_id, e)

        self.coordinator.executor().submit(end)

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

