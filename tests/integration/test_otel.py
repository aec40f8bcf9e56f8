"""OpenTelemetry spans of a two-phase commit (under the application's span) and of a
recovery pass, from the protocol's structured records."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from shardsession.coordinator import TransactionCoordinator, recover
from shardsession.otel import install, uninstall

from ._2pc_child import tables
from .test_crash_matrix import _create, run_child


@pytest.fixture
def spans() -> Iterator[tuple[InMemorySpanExporter, TracerProvider]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    maker = install(provider)
    yield exporter, provider
    uninstall(maker)


def test_commit_and_recovery_spans(pg_url_a: str, pg_url_b: str,
                                   spans: tuple[InMemorySpanExporter, TracerProvider]) -> None:
    exporter, provider = spans
    urls = _create({"alpha": pg_url_a, "beta": pg_url_b})
    engines = {n: create_engine(u) for n, u in urls.items()}
    _md, tbl = tables(list(urls))
    coord = TransactionCoordinator(atomic="require")
    names: dict[Any, str] = {e: n for n, e in engines.items()}
    try:
        with provider.get_tracer("app").start_as_current_span("app.request") as app_span:
            s = Session()
            coord.install(s, names.__getitem__)
            for n in ("alpha", "beta"):
                s.connection(bind_arguments={"bind": engines[n]}).execute(
                    tbl[n].insert().values(id=1, v="x"))
            s.commit()
    finally:
        for e in engines.values():
            e.dispose()
    finished = {sp.name: sp for sp in exporter.get_finished_spans()}
    commit = finished["shardsession.commit"]
    assert commit.parent is not None
    assert commit.parent.span_id == app_span.get_span_context().span_id
    assert commit.attributes["shardsession.outcome"] == "two_phase"
    gtrid = commit.attributes["shardsession.gtrid"]
    for name in ("shardsession.prepare", "shardsession.decision",
                 "shardsession.commit_prepared", "shardsession.prepare.branch",
                 "shardsession.commit_prepared.branch", "shardsession.decision_row"):
        span = finished[name]
        assert span.parent is not None and span.parent.span_id == commit.context.span_id, name
        assert span.attributes["shardsession.gtrid"] == gtrid, name
        assert span.start_time >= commit.start_time and span.end_time <= commit.end_time, name
    branch = finished["shardsession.prepare.branch"]
    assert branch.attributes["shardsession.shard"] in ("alpha", "beta")
    assert branch.attributes["shardsession.outcome"] == "ok"

    exporter.clear()
    proc = run_child({"urls": urls, "crash": "after_decision_commit", "key": 2})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    engines = {n: create_engine(u) for n, u in urls.items()}
    try:
        report = recover(engines, grace_period=0)
    finally:
        for e in engines.values():
            e.dispose()
    assert len(report.committed) == 1
    finished = {sp.name: sp for sp in exporter.get_finished_spans()}
    pass_span = finished["shardsession.recovery_pass"]
    action = finished["shardsession.recovery_action"]
    assert pass_span.attributes["shardsession.outcome"] == "resolved"
    assert action.parent is not None and action.parent.span_id == pass_span.context.span_id
    assert action.attributes["shardsession.outcome"] == "commit"
    assert action.attributes["shardsession.gtrid"] == report.committed[0].gtrid
