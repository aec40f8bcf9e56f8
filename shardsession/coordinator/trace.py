"""Structured records of the commit protocol and of recovery: one per phase, per branch
and per recovery action, with the gtrid, the shard, the duration and the outcome.

Every record goes to the logger ``shardsession.trace`` (commit records at DEBUG, recovery
records at INFO) with its fields in ``record.shardsession`` (a dict: ``event``, ``gtrid``,
``shard``, ``duration``, ``outcome`` and any more), and to every observer added with
:func:`add_observer` (the Prometheus metrics of :mod:`shardsession.metrics` are one).

Events (``event``: ``outcome`` values):

* ``commit`` -- a global transaction's commit, once planned: ``one_phase`` (one writer,
  or a transaction that used one shard, written or not; its commit is the driver's, after
  this record; a transaction on one connection is recorded only while an observer is
  registered, and has no gtrid), ``two_phase`` (the decision is durable),
  ``aborted`` (a prepare or the decision failed: nothing committed), ``refused`` (cannot be
  atomic, nothing committed), ``unknown`` (the decision's reply was lost); fields
  ``width`` (branches that wrote);
* ``prepare``, ``commit_prepared`` -- one branch: ``ok`` or ``failed``; ``decision_row``
  -- the insert of the decision row on the decider (during phase one): ``ok``, ``failed``;
* ``decision`` -- the decider's commit: ``commit``, ``refused``, ``unknown``;
* ``phase`` -- ``phase`` field ``prepare``, ``decision`` or ``commit``, with the phase's
  duration and ``width`` (branches in it);
* ``recovery_action`` -- one branch recovery acted on or left: ``commit``, ``rollback``,
  ``already_finished``, ``left_in_doubt`` (field ``reason``);
* ``recovery_pass`` -- ``resolved``, ``unresolved`` or ``failed``, with counts.

Observers observe: an exception an observer raises is logged and otherwise ignored.
Recording costs one check of a module flag when nobody observes and DEBUG is off.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .. import _compat

__all__ = ["TraceEvent", "add_observer", "enabled", "record", "remove_observer"]

log = logging.getLogger("shardsession.trace")


@dataclass(frozen=True)
class TraceEvent:
    """One structured record (see the module docstring for the events)."""

    event: str
    outcome: str
    gtrid: str | None = None
    shard: str | None = None
    #: seconds, where the event has a duration
    duration: float | None = None
    fields: Mapping[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"event": self.event, "outcome": self.outcome, "gtrid": self.gtrid,
                "shard": self.shard, "duration": self.duration, **self.fields}


_observers: tuple[Callable[[TraceEvent], None], ...] = ()
_lock = threading.Lock()

#: events logged at INFO (the rest at DEBUG)
_INFO = frozenset({"recovery_action", "recovery_pass"})


def add_observer(observer: Callable[[TraceEvent], None]) -> None:
    """Call ``observer`` with every :class:`TraceEvent` from now on (any thread)."""
    global _observers
    with _lock:
        if observer not in _observers:
            _observers = (*_observers, observer)
        _compat.one_shard_commit_hook = _one_shard_commit


def remove_observer(observer: Callable[[TraceEvent], None]) -> None:
    global _observers
    with _lock:
        _observers = tuple(o for o in _observers if o is not observer)
        if not _observers:
            _compat.one_shard_commit_hook = None


def _one_shard_commit() -> None:
    # a transaction on one connection: no GlobalTransaction, no gtrid
    record("commit", "one_phase", width=1)


def enabled(event: str = "commit") -> bool:
    """Whether a record of ``event`` would go anywhere (skip measuring when not)."""
    level = logging.INFO if event in _INFO else logging.DEBUG
    return bool(_observers) or log.isEnabledFor(level)


def record(event: str, outcome: str, *, gtrid: str | None = None, shard: Any = None,
           duration: float | None = None, **fields: Any) -> None:
    """Emit one record to the log and the observers."""
    level = logging.INFO if event in _INFO else logging.DEBUG
    observers = _observers
    if not observers and not log.isEnabledFor(level):
        return
    ev = TraceEvent(event, outcome, gtrid, None if shard is None else str(shard), duration,
                    fields)
    if log.isEnabledFor(level):
        took = "" if duration is None else f" in {duration * 1000:.1f} ms"
        where = "" if ev.shard is None else f" on {ev.shard}"
        log.log(level, "%s %s%s%s%s", event, outcome, where,
                "" if gtrid is None else f" ({gtrid})", took,
                extra={"shardsession": ev.as_dict()})
    for observer in observers:
        try:
            observer(ev)
        except Exception:
            log.exception("trace observer %r failed", observer)
