"""Distributed deadlock detection inside the application's process.

No single server sees a lock cycle whose edges lie on different shards (thread 1 holds a
row on shard A and waits on shard B, thread 2 the reverse): PostgreSQL waits forever by
default, InnoDB for ``innodb_lock_wait_timeout`` (50 s). As Citus does, a detector reads the
lock waits of the shards involved, builds the wait-for graph of the global transactions
across them, and cancels the youngest global transaction of each cycle.

How it runs:

* every statement a branch of a global transaction (2+ shards) sends is noted in a
  process-wide registry (:func:`enter` / :func:`leave`, from the coordinator's engine
  listeners; a single-shard transaction is no branch and is never noted);
* a watcher thread lives while such statements run (it ends after a few idle seconds).
  It reads the servers only when one of them has waited longer than its coordinator's
  ``deadlock_timeout`` (default 1 s), and then every ``deadlock_timeout`` again while one
  still waits;
* a pass reads, on every server a branch of this process has run a statement on (a
  bounded list kept for the process's life), which backend waits for which
  (PostgreSQL ``pg_blocking_pids()`` over ``pg_stat_activity``, which any role may read; MariaDB
  ``information_schema.INNODB_LOCK_WAITS`` joined with ``INNODB_TRX``, which needs the
  ``PROCESS`` privilege), maps each backend to its global transaction (the branches of
  this process by their backend id, known to the driver without a round trip; those of
  other processes by their PostgreSQL ``application_name`` label, see :func:`label`),
  and looks for cycles;
* in each cycle the youngest global transaction is the victim (the same choice in every
  process that sees the cycle). A victim of this process is marked, and its waiting
  statement cancelled (``pg_cancel_backend``, ``KILL QUERY``: both allowed on the role's
  own backends). The cancelled statement raises :class:`~shardsession.exc.DistributedDeadlock`
  in its session (see :func:`victim_error`), and the commit of a marked transaction
  refuses. Commit-phase statements (PREPARE, the decision row) are noted as waits too;
  a decider whose COMMIT runs is never chosen (its outcome would be unknown): the next
  youngest is. A victim still running statements at a later pass is cancelled again.
  A victim of another process is left to that process's own detector for two
  ``deadlock_timeout`` intervals; if it still waits in the cycle then, it is cancelled
  here by its label (see
  :func:`_cancel_foreign`): its detector may not read a server holding an edge.
* where a server cannot show its lock waits (MariaDB without ``PROCESS``, SQLite, another
  dialect), a global transaction of this process waiting on it longer than its
  coordinator's ``deadlock_fallback`` (default 30 s) is cancelled the same way: a
  bounded wait with the same error.

Failure semantics: the detector never commits or rolls back anything itself; the victim's
own session rolls its branches back (a failed flush does; ``run_transaction`` does), so
nothing the victim wrote survives. A pass that fails to read a server logs and counts
that server as unable to show waits. Plain (acyclic) lock waits are never cancelled on
servers that show their waits.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

from ..exc import DistributedDeadlock

if TYPE_CHECKING:
    from .branch import Branch
    from .transaction import GlobalTransaction

__all__ = [
    "LABEL_PREFIX",
    "WatchState",
    "after_statement",
    "deadlocks_broken",
    "enter",
    "label",
    "leave",
    "schedule_labels",
    "state_of",
    "victim_error",
]

log = logging.getLogger(__name__)

#: prefix of the PostgreSQL ``application_name`` of a labelled branch:
#: ``shardsession:<token>:<born, epoch milliseconds>``
LABEL_PREFIX = "shardsession:"
#: how long the watcher thread stays alive without a statement to watch
_IDLE_EXIT = 5.0
#: how often the watcher looks at the statements running (a statement registers without
#: waking it up)
_POLL = 0.25

Node = tuple[str, ...]


@dataclass
class WatchState:
    """What the detector keeps of one global transaction (on ``GlobalTransaction.watch``)."""

    token: str = field(default_factory=lambda: secrets.token_hex(8))
    #: wall-clock birth (seconds since the epoch): comparable across processes
    born: float = field(default_factory=time.time)
    #: set when chosen as a victim: the shards of the cycle (or the shard waited on)
    victim: tuple[str, ...] | None = None
    reason: str = ""
    #: branches (by id) labelled, or to be labelled after their first statement
    labelled: set[int] = field(default_factory=set)
    deferred: set[int] = field(default_factory=set)
    #: labelled branches whose label a ROLLBACK TO SAVEPOINT reverted (set_config is
    #: local to the savepoint too): labelled again once that statement is answered
    relabel: set[int] = field(default_factory=set)
    #: the decider's COMMIT runs: never cancelled (its outcome would be unknown), so
    #: another transaction of the cycle is chosen
    committing: bool = False


@dataclass
class _Wait:
    branch: Branch
    gt: GlobalTransaction
    since: float
    timeout: float
    fallback: float


_lock = threading.Condition()
_waits: dict[int, _Wait] = {}
_thread: threading.Thread | None = None
_broken = [0]
_side: weakref.WeakKeyDictionary[Engine, Engine] = weakref.WeakKeyDictionary()
#: every server a branch of this process has run a statement on (bounded): a pass reads
#: them all, so that it sees the edges of a cycle on servers where none of its waiting
#: transactions has a branch (those of other processes' transactions)
_known: weakref.WeakValueDictionary[str, Engine] = weakref.WeakValueDictionary()
_KNOWN_MAX = 64
#: other processes' victims seen by the last pass, with when they were first seen
#: (cancelled here if still waiting two intervals later: their own detector, whose pass
#: comes once their wait is ``deadlock_timeout`` old, may not see the whole cycle)
_foreign: dict[Node, float] = {}
#: the watch states of this process's live transactions, by token
_mine: weakref.WeakValueDictionary[str, WatchState] = weakref.WeakValueDictionary()


def _side_engine(engine: Engine) -> Engine:
    """An engine over a pool of its own, made like ``engine``'s (same creator, connect
    arguments and pool listeners): the detector must never wait for a connection of the
    application's pool, which the blocked transactions may all hold."""
    side = _side.get(engine)
    if side is None:
        side = _side[engine] = create_engine(engine.url, pool=engine.pool.recreate())
    return side


def deadlocks_broken() -> int:
    """How many victims this process's detector has chosen so far (a counter for
    benchmarks and monitoring)."""
    return _broken[0]


def state_of(gt: GlobalTransaction) -> WatchState:
    """The transaction's :class:`WatchState`, made on first need."""
    st: WatchState | None = gt.watch
    if st is None:
        st = gt.watch = WatchState()
        _mine[st.token] = st
    return st


def enter(branch: Branch, timeout: float, fallback: float) -> None:
    """A statement of a global transaction's branch starts (from the session's thread)."""
    global _thread
    gt = branch.gt
    if gt is None:
        return
    state_of(gt)
    w = _Wait(branch, gt, time.monotonic(), timeout, fallback)
    server = _server_of(branch.engine)
    with _lock:
        _waits[id(branch)] = w
        if server not in _known and len(_known) < _KNOWN_MAX:
            _known[server] = branch.engine
        if _thread is None:
            _thread = threading.Thread(target=_watch, name="shardsession-deadlock",
                                       daemon=True)
            _thread.start()


def leave(branch: Branch) -> None:
    """The branch's statement ended (answered, failed or cancelled), or the branch did."""
    if _waits:
        with _lock:
            _waits.pop(id(branch), None)


def after_statement(branch: Branch) -> None:
    """The branch's statement was answered (from the session's thread): :func:`leave`,
    and label a flush's first shard now that its server transaction is open."""
    leave(branch)
    gt = branch.gt
    if gt is None:
        return
    st: WatchState | None = gt.watch
    if st is not None and id(branch) in st.relabel and not gt.protocol_ran:
        st.relabel.discard(id(branch))
        st.labelled.discard(id(branch))
        job = label(branch)
        if job is not None:  # in this thread: the next statement may wait on a lock
            job()
        return
    if st is not None and id(branch) in st.deferred and not gt.protocol_ran:
        job = label(branch)
        if job is not None:  # joined with the early BEGINs, before the transaction ends
            _submit(gt, job)


def savepoint_rolled_back(branch: Branch) -> None:
    """A ROLLBACK TO SAVEPOINT is about to run on the branch (from the session's thread):
    it reverts a label set inside the savepoint, so the branch is labelled again once it
    is answered (see :func:`after_statement`)."""
    gt = branch.gt
    st: WatchState | None = gt.watch if gt is not None else None
    if st is not None and id(branch) in st.labelled:
        st.relabel.add(id(branch))


def victim_error(gt: GlobalTransaction) -> DistributedDeadlock | None:
    """The error of a transaction chosen as a victim (``None`` if it is not one): its
    cancelled statement raises it instead of the driver's cancellation, and so does its
    commit, should the application catch the first."""
    st: WatchState | None = gt.watch
    if st is None or st.victim is None:
        return None
    return DistributedDeadlock(
        f"transaction chosen as the victim of a distributed deadlock ({st.reason}); its "
        "waiting statement was cancelled and its branches are rolled back with the "
        "session: nothing it wrote is kept; run the whole unit of work again",
        gtrid=gt.gtrid, shard_ids=list(st.victim),
    )


def label(branch: Branch) -> Callable[[], None] | None:
    """The job that labels the branch's PostgreSQL backend with its global transaction
    (``application_name``, local to the transaction: it reverts at its end), so that the
    detectors of other processes can join its waits across servers; ``None`` where there
    is no label (MariaDB, SQLite, asyncio drivers: see the docs) or it has one already.

    The job runs in a worker thread, as an early BEGIN does (see :mod:`.early`: psycopg2
    and psycopg 3 connections serialise their use from several threads), and is joined
    with the early BEGINs, before the transaction ends (see :func:`schedule_labels`).
    """
    gt = branch.gt
    if gt is None or branch.adapter is None or branch.adapter.name != "postgresql":
        return None
    from ..backends import postgresql as pg

    dbapi = branch.dbapi
    if pg._driver(dbapi) is None:
        return None
    st = state_of(gt)
    if id(branch) in st.labelled:
        return None
    st.labelled.add(id(branch))
    st.deferred.discard(id(branch))
    name = f"{LABEL_PREFIX}{st.token}:{_born_ms(st)}"

    def run() -> None:
        cur = pg._cursor(dbapi)
        try:
            cur.execute("SELECT set_config('application_name', %s, true)", (name,))
        except Exception as e:  # the branch's own next statement meets a real problem
            log.debug("labelling branch %s failed: %s", branch.describe(), e)
        finally:
            cur.close()

    return run


def _submit(gt: GlobalTransaction, job: Callable[[], None]) -> None:
    """Run a label job on a thread of its own; its future joins ``gt.early``.

    Never on a shared pool: a job may wait for its connection's driver lock while the
    owner's statement waits on a row lock, and a queued job (or a PREPARE queued behind
    it) would then wait on other transactions, which may wait on us. A job of its own
    waits only for its owner's statement, which has ended when the owner joins it.
    """
    future: Future[None] = Future()

    def run() -> None:
        if future.set_running_or_notify_cancel():
            try:
                job()
            finally:
                future.set_result(None)

    threading.Thread(target=run, name="shardsession-label", daemon=True).start()
    gt.early.append(future)


def schedule_labels(gt: GlobalTransaction, early_begins: Sequence[Branch]) -> list[Branch]:
    """Label the transaction's PostgreSQL branches that have no label yet, at the cheapest
    moment for each; returns the branches of ``early_begins`` whose early BEGIN the label
    job makes (its statement begins the server transaction: the label costs no round
    trip of its own there).

    A branch whose server transaction is open is labelled from a worker now (its owner
    is busy with another shard); one about to begin early by that BEGIN's job; a flush's
    first shard (its BEGIN goes with its first statement) from a worker after its first
    statement (see :func:`leave`); a branch that joins outside a flush, before its first
    statement, in the calling thread: one round trip, so that its first statement, which
    may wait on a lock, is labelled while it waits. The jobs are joined with the early
    BEGINs (``gt.early``).
    """
    from ..backends import postgresql as pg

    early_ids = {id(b) for b in early_begins}
    replaced: list[Branch] = []
    for b in _branches(gt):
        if b.adapter is None or b.adapter.name != "postgresql":
            continue
        st = state_of(gt)
        if id(b) in st.labelled:
            continue
        begun = not pg._begins_next(b.dbapi)
        if not begun and id(b) not in early_ids and gt.defer_xa_start:
            st.deferred.add(id(b))  # labelled after its first statement
            continue
        job = label(b)
        if job is None:
            continue
        if not begun and id(b) not in early_ids:
            job()
            continue
        _submit(gt, job)
        if id(b) in early_ids and not begun:
            replaced.append(b)
    return replaced


# --- the watcher thread ------------------------------------------------------------------


def _watch() -> None:
    global _thread
    next_pass = 0.0
    while True:
        with _lock:
            idle_since = time.monotonic()
            while not _waits:
                # (polled, not notified: a statement costs its session no wake-up)
                _lock.wait(_POLL)
                if not _waits and time.monotonic() - idle_since > _IDLE_EXIT:
                    _thread = None
                    return
            now = time.monotonic()
            due = min(w.since + w.timeout for w in _waits.values())
            due = max(due, next_pass)
            if now < due:
                _lock.wait(min(due - now, _POLL))
                continue
            long = [w for w in _waits.values() if now - w.since >= w.timeout]
            interval = min((w.timeout for w in long), default=1.0)
        try:
            _pass(long, now)
        except Exception:  # never let the watcher die; the next pass tries again
            log.exception("distributed deadlock detection pass failed")
        next_pass = time.monotonic() + interval


def _born_ms(st: WatchState) -> int:
    """The birth written into the label (epoch milliseconds)."""
    return int(st.born * 1000)


def _birth_of_label(ms: int) -> float:
    return ms / 1000.0


def _birth(st: WatchState) -> float:
    """The birth the victim rule compares: the label's, for this process's transactions
    too, so that every process orders the same (birth, token) pairs alike."""
    return _birth_of_label(_born_ms(st))


def _server_of(engine: Engine) -> str:
    u = engine.url
    # backend ids are unique per server, whatever the database
    return f"{u.get_backend_name()}://{u.host}:{u.port}/{u.query.get('host', '')}"


def _pass(long: Sequence[_Wait], now: float) -> None:
    gts: dict[int, GlobalTransaction] = {id(w.gt): w.gt for w in long}
    with _lock:
        waiting = list(_waits.values())
    # every statement of ours now running, by transaction (the victim's is cancelled)
    running: dict[int, list[_Wait]] = {}
    for w in waiting:
        running.setdefault(id(w.gt), []).append(w)
        gts.setdefault(id(w.gt), w.gt)
    # our backends: (server, backend id) -> transaction node; the engines to read
    ours: dict[Node, Node] = {}
    engines: dict[str, Engine] = {}
    for gt in gts.values():
        st = state_of(gt)
        for b in _branches(gt):
            server = _server_of(b.engine)
            engines.setdefault(server, b.engine)
            sid = b.adapter.session_id(b.dbapi) if b.adapter is not None else None
            if sid is not None:
                ours[(server, str(sid))] = ("gt", st.token)
    mine_now = set(engines)  # servers of the transactions now running
    with _lock:
        for server, engine in list(_known.items()):
            engines.setdefault(server, engine)
    edges: list[tuple[Node, Node]] = []
    born: dict[Node, float] = {}
    blind: set[str] = set()
    #: other processes' transactions: their waiting backends (server, pid, label)
    waiting_of: dict[Node, list[tuple[str, str, str]]] = {}
    for gt in gts.values():
        st = state_of(gt)
        # at the label's precision (milliseconds), so that every process compares the same
        # (birth, token) pairs: with the full float here, two transactions born in the
        # same millisecond could each be the younger in its own process's eyes
        born[("gt", st.token)] = _birth(st)
    for server, engine in engines.items():
        found = _read_waits(engine)
        if found is None:
            blind.add(server)
            if server not in mine_now:  # (a server gone: not read again until used)
                with _lock:
                    _known.pop(server, None)
            continue
        pairs, labels = found

        def node(backend: str, server: str = server,
                 labels: Mapping[str, str] = labels) -> Node:
            mine = ours.get((server, backend))
            if mine is not None:
                return mine
            lab = labels.get(backend, "")
            if lab.startswith(LABEL_PREFIX):
                parts = lab[len(LABEL_PREFIX):].split(":")
                if len(parts) == 2 and parts[1].isdigit():
                    n: Node = ("gt", parts[0])
                    born.setdefault(n, _birth_of_label(int(parts[1])))
                    return n
            return ("backend", server, backend)

        for waiter, blocker in pairs:
            nw = node(waiter)
            edges.append((nw, node(blocker)))
            if nw[0] == "gt" and nw[1] not in _mine:
                waiting_of.setdefault(nw, []).append((server, waiter,
                                                      labels.get(waiter, "")))
    own: dict[Node, GlobalTransaction] = {("gt", state_of(gt).token): gt
                                          for gt in gts.values()}
    foreign: dict[Node, float] = {}
    grace = 2 * min((w.timeout for w in long), default=1.0)
    for cycle in _cycles(edges):
        # youngest first: (birth, token) is a total order every process agrees on; a
        # decider committing (ours) is never cancelled: the next youngest is chosen
        candidates = sorted((n for n in cycle if n in born),
                            key=lambda n: (born[n], n), reverse=True)
        candidates = [n for n in candidates
                      if not getattr(_mine.get(n[1]), "committing", False)]
        if not candidates:
            continue
        victim = candidates[0]
        gt_victim = own.get(victim)
        if gt_victim is None and victim[1] in _mine:
            continue  # ours, but no statement of it noted: nothing to cancel
        if gt_victim is None:
            # another process's transaction: its own detector cancels it, if it sees the
            # cycle; if it still waits two intervals later, it does not (a server where it
            # has no branch holds an edge): cancelled here, by its label
            foreign[victim] = first = _foreign.get(victim, now)
            if now - first >= grace:
                _cancel_foreign(victim, waiting_of.get(victim, []), engines)
            continue
        shards = sorted({b.shard_id for n in cycle if n in own for b in _branches(own[n])})
        _cancel(gt_victim, running.get(id(gt_victim), []), tuple(shards),
                f"a lock cycle of {len(cycle)} transactions over shards {shards}")
    _foreign.clear()
    _foreign.update(foreign)
    # bounded wait where the server cannot show its waits
    for w in long:
        if _server_of(w.branch.engine) in blind and now - w.since >= w.fallback:
            _cancel(w.gt, [w], (w.branch.shard_id,),
                    f"waited {now - w.since:.0f} s on shard {w.branch.shard_id!r}, whose "
                    "lock waits cannot be read")


def _branches(gt: GlobalTransaction) -> list[Branch]:
    # read from the watcher thread while the owner waits in a statement: copy first
    for _ in range(3):
        with contextlib.suppress(RuntimeError):
            seen: dict[int, Branch] = {}
            for b in list(gt.branches.values()):
                seen.setdefault(id(b), b)
            return list(seen.values())
    return []


def _cycles(edges: Iterable[tuple[Node, Node]]) -> list[list[Node]]:
    """The strongly connected components that hold a cycle (Tarjan, iterative)."""
    graph: dict[Node, set[Node]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index: dict[Node, int] = {}
    low: dict[Node, int] = {}
    stack: list[Node] = []
    on: set[Node] = set()
    out: list[list[Node]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work: list[tuple[Node, Iterable[Node]]] = [(root, iter(graph[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            advanced = False
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(graph[w])))
                    advanced = True
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp: list[Node] = []
                while True:
                    x = stack.pop()
                    on.discard(x)
                    comp.append(x)
                    if x == v:
                        break
                if len(comp) > 1 or v in graph[v]:
                    out.append(comp)
    return out


def _read_waits(engine: Engine) -> tuple[list[tuple[str, str]], dict[str, str]] | None:
    """(waiter, blocker) backend ids of the server's lock waits, and the labels of its
    backends; ``None`` when the server cannot show them."""
    dialect = engine.dialect.name
    try:
        with _side_engine(engine).connect() as c:
            c = c.execution_options(isolation_level="AUTOCOMMIT")
            if dialect == "postgresql":
                pairs: list[tuple[str, str]] = []
                labels: dict[str, str] = {}
                rows = c.execute(text(
                    "SELECT pid, application_name, CASE WHEN wait_event_type = 'Lock' "
                    "THEN pg_blocking_pids(pid) END FROM pg_stat_activity "
                    "WHERE wait_event_type = 'Lock' OR application_name LIKE 'shardsession:%'"
                )).all()
                for pid, app, blockers in rows:
                    labels[str(pid)] = app or ""
                    for b in blockers or ():
                        if b:  # 0: a prepared transaction, no backend to cancel
                            pairs.append((str(pid), str(b)))
                return pairs, labels
            if dialect in ("mysql", "mariadb"):
                rows = c.execute(text(
                    "SELECT r.trx_mysql_thread_id, b.trx_mysql_thread_id "
                    "FROM information_schema.INNODB_LOCK_WAITS w "
                    "JOIN information_schema.INNODB_TRX r ON r.trx_id = w.requesting_trx_id "
                    "JOIN information_schema.INNODB_TRX b ON b.trx_id = w.blocking_trx_id"
                )).all()
                return [(str(a), str(b)) for a, b in rows], {}
    except Exception as e:
        log.warning("deadlock detection: cannot read the lock waits of %s (%s)",
                    engine.url.render_as_string(hide_password=True), e)
        return None
    return None


def _cancel_foreign(victim: Node, waiting: Sequence[tuple[str, str, str]],
                    engines: Mapping[str, Engine]) -> None:
    """Cancel another process's victim's waiting statements, each only while its backend
    still waits under the same label (the label is local to its transaction: a backend
    that moved on to another transaction is never cancelled)."""
    for server, pid, lab in waiting:
        engine = engines.get(server)
        if engine is None or engine.dialect.name != "postgresql" or not lab:
            continue
        log.info("distributed deadlock: cancelling %s's backend %s on %s (another "
                 "process's transaction, the youngest of a cycle its detector cannot see)",
                 victim[-1], pid, server)
        try:
            with _side_engine(engine).connect() as c:
                c = c.execution_options(isolation_level="AUTOCOMMIT")
                c.execute(text(
                    "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE pid = :pid "
                    "AND application_name = :label AND wait_event_type = 'Lock' "
                    # never a COMMIT (a decider's: its outcome would be unknown)
                    "AND upper(left(ltrim(query), 6)) NOT IN ('COMMIT', 'END')"),
                    {"pid": int(pid), "label": lab})
        except Exception as e:
            log.warning("deadlock detection: cancelling %s on %s failed (%s)", pid, server, e)


def _cancel(gt: GlobalTransaction, running: Sequence[_Wait], shards: tuple[str, ...],
            reason: str) -> None:
    st = state_of(gt)
    if st.victim is None:
        st.victim, st.reason = shards, reason
        _broken[0] += 1
    elif not running:
        return
    # (chosen again while statements of it still run: the last cancel missed them, or
    # they began after it; each is cancelled, the transaction is refused anyway)
    log.info("distributed deadlock: cancelling transaction %s (%s)",
                gt.gtrid or st.token, reason)
    for w in running:
        b = w.branch
        sid = b.adapter.session_id(b.dbapi) if b.adapter is not None else None
        dialect = b.engine.dialect.name
        try:
            if sid is None:
                continue
            with _side_engine(b.engine).connect() as c:
                c = c.execution_options(isolation_level="AUTOCOMMIT")
                if dialect == "postgresql":
                    c.execute(text("SELECT pg_cancel_backend(:pid)"), {"pid": int(sid)})
                elif dialect in ("mysql", "mariadb"):
                    c.execute(text(f"KILL QUERY {int(sid):d}"))
        except Exception as e:
            log.warning("deadlock detection: cancelling %s on %s failed (%s)",
                        sid, b.shard_id, e)
