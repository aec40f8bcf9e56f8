"""OpenTelemetry spans of commits and recovery (the ``otel`` extra:
``pip install 'shardsession[otel]'``).

:func:`install` turns the protocol's structured records
(:mod:`shardsession.coordinator.trace`) into spans: one ``shardsession.commit`` span per
two-phase commit (a child of the span current where ``commit()`` was called), with a child
span per phase (``shardsession.prepare``, ``shardsession.decision``,
``shardsession.commit_prepared``) and per branch (``shardsession.prepare.branch``,
``shardsession.commit_prepared.branch``, ``shardsession.decision_row``); one
``shardsession.recovery_pass`` span per recovery pass with a ``shardsession.recovery_action``
span per branch it finished or left. Attributes: ``shardsession.gtrid``,
``shardsession.shard``, ``shardsession.outcome``, ``shardsession.width``, and the record's
other fields under ``shardsession.``.

Records arrive when each step has ended (with its duration), so spans are made after the
fact with explicit start and end times; the branch records of a commit come from worker
threads and are held until the commit's own record arrives in the committing thread.
One-phase commits make no span (they have no phases of ours).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from .coordinator import trace

__all__ = ["SpanMaker", "install", "uninstall"]

_PHASE_SPANS = {"prepare": "shardsession.prepare", "decision": "shardsession.decision",
                "commit": "shardsession.commit_prepared"}
_BRANCH_SPANS = {"prepare": "shardsession.prepare.branch",
                 "commit_prepared": "shardsession.commit_prepared.branch",
                 "decision_row": "shardsession.decision_row"}
#: a commit's held records are dropped if its own record never comes (seconds)
_HOLD = 600.0


class SpanMaker:
    """A :mod:`~shardsession.coordinator.trace` observer that makes spans."""

    def __init__(self, tracer: Any) -> None:
        self.tracer = tracer
        self._held: dict[str, list[tuple[int, trace.TraceEvent]]] = {}
        self._actions: list[tuple[int, trace.TraceEvent]] = []
        self._lock = threading.Lock()

    def __call__(self, ev: trace.TraceEvent) -> None:
        now = time.time_ns()
        if ev.event in _BRANCH_SPANS or ev.event in ("phase", "decision"):
            if ev.gtrid is not None:
                with self._lock:
                    self._held.setdefault(ev.gtrid, []).append((now, ev))
            return
        if ev.event == "recovery_action":
            with self._lock:
                self._actions.append((now, ev))
            return
        if ev.event == "commit":
            with self._lock:
                held = self._held.pop(ev.gtrid, []) if ev.gtrid else []
                self._expire(now)
            if ev.outcome != "one_phase":
                self._tree("shardsession.commit", now, ev, held)
        elif ev.event == "recovery_pass":
            with self._lock:
                actions, self._actions = self._actions, []
            self._tree("shardsession.recovery_pass", now, ev, actions)

    def _tree(self, name: str, end: int, ev: trace.TraceEvent,
              children: list[tuple[int, trace.TraceEvent]]) -> None:
        from opentelemetry import trace as otel_trace

        start = end - int((ev.duration or 0.0) * 1e9)
        if children:
            start = min(start, *(t - int((c.duration or 0.0) * 1e9) for t, c in children))
        parent = self.tracer.start_span(name, start_time=start, attributes=_attributes(ev))
        context = otel_trace.set_span_in_context(parent)
        for t, child in children:
            if child.event == "phase":
                child_name = _PHASE_SPANS.get(str(child.fields.get("phase")),
                                              "shardsession.phase")
            elif child.event == "decision":
                continue  # the decision phase's span carries it (with the same duration)
            else:
                child_name = _BRANCH_SPANS.get(child.event, f"shardsession.{child.event}")
            span = self.tracer.start_span(
                child_name, context=context, attributes=_attributes(child),
                start_time=t - int((child.duration or 0.0) * 1e9))
            span.end(end_time=t)
        parent.end(end_time=end)

    def _expire(self, now: int) -> None:
        limit = now - int(_HOLD * 1e9)
        for gtrid in [g for g, items in self._held.items() if items[-1][0] < limit]:
            del self._held[gtrid]


def _attributes(ev: trace.TraceEvent) -> dict[str, Any]:
    attrs: dict[str, Any] = {"shardsession.outcome": ev.outcome}
    if ev.gtrid is not None:
        attrs["shardsession.gtrid"] = ev.gtrid
    if ev.shard is not None:
        attrs["shardsession.shard"] = ev.shard
    for key, value in ev.fields.items():
        if isinstance(value, (str, bool, int, float)):
            attrs[f"shardsession.{key}"] = value
    return attrs


def install(tracer_provider: Any = None) -> SpanMaker:
    """Start making spans with a tracer of ``tracer_provider`` (default: the global one).

    :raises ImportError: ``opentelemetry-api`` is not installed (the ``otel`` extra).
    """
    from opentelemetry import trace as otel_trace

    tracer = otel_trace.get_tracer("shardsession", tracer_provider=tracer_provider)
    maker = SpanMaker(tracer)
    trace.add_observer(maker)
    return maker


def uninstall(maker: SpanMaker) -> None:
    """Stop making spans."""
    trace.remove_observer(maker)
