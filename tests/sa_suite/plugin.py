"""pytest plugin: run SQLAlchemy's own ORM tests with a one-shard ShardedSession.

Loaded into a run of SQLAlchemy's test suite (from its source distribution) with
``-p tests.sa_suite.plugin``; ``tests/sa_suite/run.py`` does that twice, once with
``--sa-suite-mode=plain`` and once with ``--sa-suite-mode=sharded``, and compares.

In ``sharded`` mode, before any test module is imported, ``sqlalchemy.orm.Session`` (which
SQLAlchemy's test modules import, and which the suite's ``fixture_session()`` calls) and
``sqlalchemy.orm.sessionmaker`` are replaced by :class:`OneShardSession`, a subclass of
:class:`shardsession.ShardedSession` that takes the plain Session arguments: ``bind``
becomes its only shard and every chooser answers that shard. SQLAlchemy's own modules
keep their ``Session`` (``sqlalchemy.orm.session.Session``), so isinstance checks and
subclasses defined by SQLAlchemy itself are unchanged.

Both modes write ``--sa-suite-report`` (JSON): each test id's outcome and, per test file,
how many sharded sessions its tests created. A file with zero sharded sessions means the
substitution did not reach it: run.py fails on that.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

# (sqlalchemy is imported before SQLAlchemy's conftest puts its lib/ on sys.path: both
# modes then test the installed SQLAlchemy, the one shardsession runs on)
import pytest
import sqlalchemy

#: the only shard's id
SHARD = "default"

_state: dict[str, Any] = {"file": None, "counts": Counter(), "outcomes": {}}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("shardsession sa_suite")
    group.addoption("--sa-suite-mode", choices=("plain", "sharded"), default="plain")
    group.addoption("--sa-suite-report", default=None, help="write outcomes (JSON) here")


def _choose_shard(*args: Any, **kw: Any) -> str:
    return SHARD


def _choose_shards(*args: Any, **kw: Any) -> list[str]:
    return [SHARD]


def _make_classes() -> tuple[type, type]:
    from sqlalchemy import orm

    import shardsession

    class OneShardSession(shardsession.ShardedSession):
        """A ShardedSession taking Session's arguments: ``bind`` is its only shard."""

        def __init__(self, bind: Any = None, **kw: Any) -> None:
            binds = kw.get("binds")
            if bind is None and binds:
                # (Session(binds={...}): one of them; the chooser decides, not the map)
                bind = next(iter(binds.values()))
            super().__init__(
                shard_chooser=_choose_shard,
                identity_chooser=_choose_shards,
                execute_chooser=_choose_shards,
                shards={SHARD: bind} if bind is not None else {},
                bind=bind,
                **kw,
            )
            current = _state["file"]
            _state["counts"][current] += 1

    class OneShardSessionmaker(orm.sessionmaker):  # type: ignore[type-arg]
        """``sessionmaker`` whose default class is :class:`OneShardSession`."""

        def __init__(self, bind: Any = None, *, class_: Any = None, **kw: Any) -> None:
            super().__init__(bind, class_=class_ or OneShardSession, **kw)

    return OneShardSession, OneShardSessionmaker


def pytest_sessionstart(session: pytest.Session) -> None:
    # (after every plugin's configure, SQLAlchemy's included; before collection imports
    # the test modules, which bind ``Session`` when they are imported)
    if session.config.getoption("sa_suite_mode") != "sharded":
        return
    from sqlalchemy import orm

    one_shard_session, one_shard_sessionmaker = _make_classes()
    orm.Session = one_shard_session  # type: ignore[misc]
    orm.sessionmaker = one_shard_sessionmaker  # type: ignore[misc]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    _state["file"] = item.nodeid.split("::", 1)[0]


def pytest_runtest_teardown(item: pytest.Item) -> None:
    _state["file"] = item.nodeid.split("::", 1)[0]


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    outcomes: dict[str, str] = _state["outcomes"]
    if report.failed:
        outcome = "failed"
    elif report.skipped:
        outcome = "xfailed" if hasattr(report, "wasxfail") else "skipped"
    elif report.when == "call":
        outcome = "xpassed" if hasattr(report, "wasxfail") else "passed"
    else:
        return  # a passed setup or teardown says nothing yet
    previous = outcomes.get(report.nodeid)
    if previous == "failed" or (previous is not None and report.when == "teardown"
                                and outcome != "failed"):
        return  # the worst phase wins; a teardown only reports a failure
    outcomes[report.nodeid] = outcome


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    counts: Counter[str] = _state["counts"]
    files = sorted({nodeid.split("::", 1)[0] for nodeid in _state["outcomes"]})
    unreached = [f for f in files if not counts.get(f)]
    if session.config.getoption("sa_suite_mode") == "sharded" and unreached:
        # the substitution did not reach these files: their results say nothing about us
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"sa_suite: no sharded session was created by {unreached}")
    path = session.config.getoption("sa_suite_report")
    if not path:
        return
    report = {
        "mode": session.config.getoption("sa_suite_mode"),
        "sqlalchemy": sqlalchemy.__version__,
        "sqlalchemy_file": sqlalchemy.__file__,
        "session_class": __import__("sqlalchemy.orm").orm.Session.__qualname__,
        "sharded_sessions": {f: counts.get(f, 0) for f in files},
        "outcomes": _state["outcomes"],
        "pid": os.getpid(),
    }
    Path(path).write_text(json.dumps(report, indent=1, sort_keys=True))
