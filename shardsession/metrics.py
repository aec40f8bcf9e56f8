"""Prometheus metrics of commits, fan-outs and recovery (the ``metrics`` extra:
``pip install 'shardsession[metrics]'``).

:func:`install` registers the metrics in a ``prometheus_client`` registry and feeds them
from the protocol's structured records (:mod:`shardsession.coordinator.trace`) and the
fan-out events (:mod:`shardsession.events`); ``shardsession recover --watch --listen``
serves them. Metrics (all prefixed ``shardsession_``):

================================= ========= ==============================================
``commits_total{kind}``           counter   ``one_phase``, ``two_phase``, ``aborted``,
                                            ``refused``, ``unknown``, ``failed``
``commit_phase_seconds{phase}``   histogram ``prepare``, ``decision``, ``commit``
``commit_width``                  histogram branches written by a two-phase commit
``fanout_seconds``                histogram one statement over several shards
``fanout_width``                  histogram shards a fan-out asked
``fanout_errors_total``           counter   fan-outs that raised
``recovery_actions_total{action}`` counter  ``commit``, ``rollback``, ``already_finished``,
                                            ``left_in_doubt``
``recovery_passes_total{result}`` counter   ``resolved``, ``unresolved``, ``failed``
``recovery_pass_seconds``         histogram
``in_doubt_branches{shard}``      gauge     branches of ours in doubt (set by the worker)
``in_doubt_oldest_seconds{shard}`` gauge    age of the oldest of them
================================= ========= ==============================================
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

from .coordinator import trace

__all__ = ["Metrics", "install", "uninstall"]

_installed: dict[int, Metrics] = {}
_lock = threading.Lock()


class Metrics:
    """The metric objects of one registry, and the observers that update them."""

    def __init__(self, registry: Any) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.registry = registry
        ns = "shardsession"
        self.commits = Counter("commits", "Global transactions committed, by kind",
                               ["kind"], namespace=ns, registry=registry)
        self.phase_seconds = Histogram("commit_phase_seconds",
                                       "Duration of a two-phase commit phase", ["phase"],
                                       namespace=ns, registry=registry)
        self.commit_width = Histogram("commit_width", "Branches of a two-phase commit",
                                      namespace=ns, registry=registry,
                                      buckets=(2, 3, 4, 6, 8, 12, 16, 32, 64))
        self.fanout_seconds = Histogram("fanout_seconds", "Duration of a fan-out",
                                        namespace=ns, registry=registry)
        self.fanout_width = Histogram("fanout_width", "Shards a fan-out asked",
                                      namespace=ns, registry=registry,
                                      buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64))
        self.fanout_errors = Counter("fanout_errors", "Fan-outs that raised",
                                     namespace=ns, registry=registry)
        self.recovery_actions = Counter("recovery_actions",
                                        "Prepared branches recovery finished or left",
                                        ["action"], namespace=ns, registry=registry)
        self.recovery_passes = Counter("recovery_passes", "Recovery passes by result",
                                       ["result"], namespace=ns, registry=registry)
        self.recovery_seconds = Histogram("recovery_pass_seconds",
                                          "Duration of a recovery pass", namespace=ns,
                                          registry=registry)
        self.in_doubt = Gauge("in_doubt_branches", "Branches of ours in doubt", ["shard"],
                              namespace=ns, registry=registry)
        self.in_doubt_age = Gauge("in_doubt_oldest_seconds",
                                  "Age of the oldest branch of ours in doubt", ["shard"],
                                  namespace=ns, registry=registry)
        for kind in ("one_phase", "two_phase", "aborted", "refused", "unknown", "failed"):
            self.commits.labels(kind)
        for phase in ("prepare", "decision", "commit"):
            self.phase_seconds.labels(phase)

    # --- observers ---------------------------------------------------------------------

    def observe(self, ev: trace.TraceEvent) -> None:
        """A :mod:`~shardsession.coordinator.trace` observer."""
        if ev.event == "commit":
            self.commits.labels(ev.outcome).inc()
            if ev.outcome != "one_phase" and ev.fields.get("width"):
                self.commit_width.observe(ev.fields["width"])
        elif ev.event == "phase" and ev.duration is not None:
            self.phase_seconds.labels(ev.fields["phase"]).observe(ev.duration)
        elif ev.event == "recovery_action":
            self.recovery_actions.labels(ev.outcome).inc()
        elif ev.event == "recovery_pass":
            self.recovery_passes.labels(ev.outcome).inc()
            if ev.duration is not None:
                self.recovery_seconds.observe(ev.duration)

    def fanout_finished(self, session: Any, statement: Any, shard_ids: Any, elapsed: float,
                        error: BaseException | None) -> None:
        """A ``shardsession_fanout_finished`` listener."""
        self.fanout_width.observe(len(shard_ids))
        self.fanout_seconds.observe(elapsed)
        if error is not None:
            self.fanout_errors.inc()

    def set_in_doubt(self, shards: Iterable[str], rows: Iterable[Any]) -> None:
        """Set the in-doubt gauges from :func:`shardsession.coordinator.in_doubt` rows
        (every shard of ``shards`` gets a value, 0 when none is in doubt)."""
        counts = dict.fromkeys(shards, 0)
        oldest = dict.fromkeys(counts, 0.0)
        for r in rows:
            counts[r.shard] = counts.get(r.shard, 0) + 1
            oldest[r.shard] = max(oldest.get(r.shard, 0.0), r.age or 0.0)
        for shard, n in counts.items():
            self.in_doubt.labels(shard).set(n)
            self.in_doubt_age.labels(shard).set(oldest[shard])


def install(registry: Any = None) -> Metrics:
    """Register the metrics in ``registry`` (default: ``prometheus_client.REGISTRY``) and
    start updating them; a second call with the same registry returns the same object.

    :raises ImportError: ``prometheus_client`` is not installed (the ``metrics`` extra).
    """
    from prometheus_client import REGISTRY
    from sqlalchemy import event

    from .session import ShardedSession

    reg = REGISTRY if registry is None else registry
    with _lock:
        found = _installed.get(id(reg))
        if found is not None:
            return found
        metrics = _installed[id(reg)] = Metrics(reg)
    trace.add_observer(metrics.observe)
    event.listen(ShardedSession, "shardsession_fanout_finished", metrics.fanout_finished)
    return metrics


def uninstall(metrics: Metrics) -> None:
    """Stop updating ``metrics`` (its collectors stay registered)."""
    from sqlalchemy import event

    from .session import ShardedSession

    trace.remove_observer(metrics.observe)
    event.remove(ShardedSession, "shardsession_fanout_finished", metrics.fanout_finished)
    with _lock:
        _installed.pop(id(metrics.registry), None)
