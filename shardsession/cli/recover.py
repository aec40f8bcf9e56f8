"""``shardsession recover`` and ``shardsession status``.

The configuration file is TOML with one table per shard::

    [shards.eu]
    url = "postgresql+psycopg2://app:secret@db-eu/app"

    [shards.us]
    url = "mysql+pymysql://app:secret@db-us/app"

Shard names must be the shard ids the application uses (the decider of a transaction is
found by its shard id), and a transaction is ours only when that decider's database stores
the cluster identity its xid carries: prepared transactions of other applications and
other clusters on the same servers are reported as foreign and never touched.

Exit status of ``recover``: 0 only when nothing of ours is left in doubt (a second listing
after acting shows every branch it finished gone, and no decision row names a shard this
configuration lacks), 1 when something is left in doubt or errors occurred, 2 on a
configuration or usage error. ``status``: 0 when nothing of ours is in doubt, 1 otherwise
or when a shard cannot be listed, 2 on a configuration or usage error. With ``--watch``
every pass's lines start with a UTC timestamp (with ``--json``: one JSON document per pass,
with a ``time`` key).
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from ..config import Cluster
from ..coordinator.recovery import RecoveryReport, in_doubt, recover
from ..coordinator.setup import shard_health
from ..exc import ConfigurationError
from . import _common
from ._common import (
    EXIT_OK,
    EXIT_PROBLEM,
    add_config_argument,
    config_path,
    emit_json,
    non_negative_float,
    say,
    timestamp,
)

__all__ = ["add_arguments", "cmd_recover", "cmd_status", "load_cluster", "report_dict"]

log = logging.getLogger(__name__)

#: foreign prepared transactions listed by name in a report (a shared server may hold many)
_FOREIGN_SHOWN = 20


def load_cluster(path: str) -> Cluster:
    """Read the cluster's TOML file (the format of :class:`shardsession.config.Cluster`;
    relative SQLite paths against the file's folder, ``url_env`` from the environment).

    :raises ConfigurationError: the file is unreadable or not a valid cluster config.
    """
    return _common.load_cluster(path)


def _load_worker_cluster(path: str) -> Cluster:
    """:func:`load_cluster` with read timeouts too (see
    :func:`shardsession.cli._common.set_driver_timeouts`)."""
    cluster = load_cluster(path)
    _common.set_driver_timeouts(cluster, read=True)
    return cluster


def report_dict(report: RecoveryReport) -> dict[str, Any]:
    """A recovery report as JSON-ready data."""

    def refs(items: list[Any]) -> list[dict[str, str]]:
        return [{"shard": r.shard, "gtrid": r.gtrid, "bqual": r.bqual} for r in items]

    return {
        "resolved": report.resolved,
        "committed": refs(report.committed),
        "rolled_back": refs(report.rolled_back),
        "already_finished": refs(report.already_finished),
        "left_in_doubt": [
            {"shard": r.shard, "gtrid": r.gtrid, "bqual": r.bqual, "reason": why}
            for r, why in report.left_alone
        ],
        "errors": list(report.errors),
        "foreign": report.foreign,
        "foreign_ids": [{"shard": s, "id": i} for s, i in report.foreign_ids[:_FOREIGN_SHOWN]],
        "decisions_deleted": report.decisions_deleted,
        "decisions_kept": [
            {"shard": s, "gtrid": g, "reason": why} for s, g, why in report.decisions_kept
        ],
        "legacy_rows_kept": report.legacy_rows_kept,
        "identities": dict(report.identities),
    }


def _print_report(report: RecoveryReport, prefix: str = "") -> None:
    say(
        f"{prefix}committed={len(report.committed)} rolled_back={len(report.rolled_back)} "
        f"already_finished={len(report.already_finished)} left_alone={len(report.left_alone)} "
        f"errors={len(report.errors)} foreign={report.foreign} "
        f"decisions_deleted={report.decisions_deleted}"
    )
    for ref, reason in report.left_alone:
        say(f"{prefix}  left in doubt: {ref.shard} {ref.gtrid}.{ref.bqual} ({reason})")
    for shard, gtrid, reason in report.decisions_kept:
        say(f"{prefix}  decision kept: {shard} {gtrid} ({reason})")
    for shard, ident in report.foreign_ids[:_FOREIGN_SHOWN]:
        say(f"{prefix}  foreign (not touched): {shard} {ident}")
    if len(report.foreign_ids) > _FOREIGN_SHOWN:
        say(f"{prefix}  ... and {len(report.foreign_ids) - _FOREIGN_SHOWN} more foreign")
    if report.legacy_rows_kept:
        say(f"{prefix}  legacy decision rows kept: {report.legacy_rows_kept}")
    for err in report.errors:
        say(f"{prefix}  error: {err}")


def _config_error(args: argparse.Namespace, command: str, error: ConfigurationError) -> int:
    return _common.config_error(args, command, error)


def cmd_recover(args: argparse.Namespace) -> int:
    """One recovery pass, or a worker loop with ``--watch`` (stops on SIGTERM/SIGINT)."""
    try:
        cluster = _load_worker_cluster(config_path(args))
    except ConfigurationError as e:
        return _config_error(args, "recover", e)
    engines = cluster.engines
    grace = args.grace if args.grace is not None else cluster.recovery_grace
    stop = threading.Event()
    endpoint = metrics = None
    if args.listen is not None:
        try:
            endpoint, metrics = _serve(args)
        except ConfigurationError as e:
            cluster.dispose()
            return _config_error(args, "recover", e)
    if args.watch:
        def on_signal(signum: int, frame: FrameType | None) -> None:
            log.info("signal %d: stopping after the current pass", signum)
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    code = EXIT_OK
    try:
        while True:
            prefix = f"{timestamp()} " if args.watch else ""
            try:
                report = _one_pass(stop, lambda: recover(
                    engines, grace_period=grace, claim_legacy=args.claim_legacy,
                    adopt_previous=args.adopt_previous_identity))
            except _Abandoned:
                say(f"{prefix}stopped: the current pass did not end within {STOP_WAIT:g} s "
                    "of the signal (a shard not answering); left it unfinished", err=True)
                code = EXIT_PROBLEM
                break
            except Exception as e:  # keep the worker alive across transient failures
                log.exception("recovery pass failed")
                if args.json:
                    emit_json({"time": timestamp(), "resolved": False,
                               "errors": [f"recovery pass failed: {type(e).__name__}: {e}"]})
                else:
                    say(f"{prefix}recovery pass failed: {type(e).__name__}: {e}")
                code = EXIT_PROBLEM
                if endpoint is not None:
                    endpoint.record_pass(False, None)
            else:
                if args.json:
                    emit_json({"time": timestamp(), **report_dict(report)})
                else:
                    _print_report(report, prefix)
                code = EXIT_OK if report.resolved else EXIT_PROBLEM
                if endpoint is not None:
                    endpoint.record_pass(True, report.resolved, len(report.errors))
            if metrics is not None:
                _set_in_doubt(metrics, engines)
            if not args.watch or stop.wait(args.interval):
                break
    finally:
        if endpoint is not None:
            endpoint.close()
        cluster.dispose()
    return code


#: seconds a signalled worker waits for its current pass before it leaves the pass
STOP_WAIT = 5.0


class _Abandoned(Exception):
    """The worker was signalled and its pass did not end in time."""


def _one_pass(stop: threading.Event, run: Callable[[], RecoveryReport]) -> RecoveryReport:
    """``run()`` in a daemon thread, waited for in a way a signal interrupts: a pass
    stalled in a driver call (a shard that never answers) cannot keep a signalled worker
    alive. Leaving a pass unfinished is safe: every step of recovery is decided by a
    durable row and repeated by the next pass.

    :raises _Abandoned: ``stop`` was set and the pass did not end within
        :data:`STOP_WAIT` seconds.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["report"] = run()
        except BaseException as e:
            box["error"] = e

    thread = threading.Thread(target=target, name="shardsession-recovery-pass", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
        if stop.is_set() and thread.is_alive():
            thread.join(STOP_WAIT)
            if thread.is_alive():
                raise _Abandoned
    if "error" in box:
        raise box["error"]
    report: RecoveryReport = box["report"]
    return report


def _serve(args: argparse.Namespace) -> tuple[Any, Any]:
    """Start ``/metrics`` and ``/healthz`` on ``--listen``.

    :raises ConfigurationError: a bad address, a port in use, prometheus_client missing.
    """
    from ._http import WorkerEndpoint, parse_listen

    if not args.watch:
        raise ConfigurationError("--listen needs --watch (a worker to observe)")
    host, port = parse_listen(args.listen)
    try:
        from prometheus_client import CollectorRegistry

        from ..metrics import install
    except ImportError as e:
        raise ConfigurationError(
            "--listen serves Prometheus metrics: pip install 'shardsession[metrics]'") from e
    registry = CollectorRegistry()
    metrics = install(registry)
    try:
        endpoint = WorkerEndpoint(host, port, registry, stale_after=max(3 * args.interval, 60))
    except OSError as e:
        raise ConfigurationError(f"--listen {args.listen}: {e.strerror or e}") from e
    say(f"serving /metrics and /healthz on {host or '0.0.0.0'}:{endpoint.port}", err=True)
    return endpoint, metrics


def _set_in_doubt(metrics: Any, engines: dict[str, Any]) -> None:
    try:
        rows = in_doubt(engines)
    except Exception as e:  # the pass itself reported what failed
        log.warning("in-doubt gauges not updated: %s", e)
        return
    metrics.set_in_doubt(engines, rows)


def cmd_status(args: argparse.Namespace) -> int:
    """Print in-doubt branches of ours per shard with their age."""
    try:
        cluster = _load_worker_cluster(config_path(args))
    except ConfigurationError as e:
        return _config_error(args, "status", e)
    engines = cluster.engines
    listing_error: str | None = None
    try:
        health = shard_health(engines)  # per shard: never raises for one shard's failure
        try:
            rows = in_doubt(engines)
        except Exception as e:
            rows, listing_error = [], f"status incomplete: {type(e).__name__}: {e}"
    finally:
        cluster.dispose()
    identities = {h.identity for h in health if h.error is None}
    one = identities.pop() if len(identities) == 1 and None not in identities else None
    problem = rows or listing_error or any(h.error for h in health)
    code = EXIT_PROBLEM if problem else EXIT_OK
    if args.json:
        emit_json({
            "ok": code == EXIT_OK,
            "identity": one,
            "error": listing_error,
            "shards": [
                {"shard": h.shard, "identity": h.identity, "error": h.error,
                 "warnings": list(h.warnings)}
                for h in health
            ],
            "in_doubt": [
                {"shard": r.shard, "gid": r.xid.gid, "age": r.age, "decider": r.decider,
                 "legacy": r.xid.legacy, "cannot_finish": r.blocked}
                for r in rows
            ],
        })
        return code
    if one is not None:
        say(f"cluster identity: {one}")
    for h in health:
        if h.error is not None:
            say(f"{h.shard}: cannot check: {h.error}")
        elif one is None or h.identity is None:
            say(f"{h.shard}: cluster identity {h.identity or '(none stored yet)'}")
        for w in h.warnings:
            say(f"warning: {h.shard}: {w}")
    if listing_error is not None:
        say(listing_error)
        return code
    if not rows:
        say("no in-doubt transactions")
        return code
    for r in rows:
        age = f"{r.age:.0f}s" if r.age is not None else "?"
        line = f"{r.shard}\t{r.xid.gid}\tage={age}\tdecider={r.decider or '(not configured)'}"
        if r.xid.legacy:
            line += "\tlegacy-format"
        if r.blocked:
            line += f"\tCANNOT FINISH: {r.blocked}"
        say(line)
    return code


def add_arguments(subparsers: Any) -> None:
    """Register ``recover`` and ``status`` on the CLI's subparsers."""
    p = subparsers.add_parser("recover", help="finish in-doubt two-phase transactions")
    add_config_argument(p)
    p.add_argument("--watch", action="store_true", help="run as a worker until SIGTERM")
    p.add_argument("--interval", type=_common.interval_float, default=30.0, metavar="SECONDS",
                   help="seconds between passes with --watch (default 30, must be > 0)")
    p.add_argument("--grace", type=non_negative_float, default=None, metavar="SECONDS",
                   help="seconds before an undecided prepared branch is claimed aborted "
                   "(default: [cluster] recovery_grace of the config, else 60)")
    p.add_argument("--listen", default=None, metavar="[HOST:]PORT",
                   help="with --watch: serve /metrics (Prometheus; the metrics extra) and "
                   "/healthz on this address")
    p.add_argument("--claim-legacy", action="store_true",
                   help="also claim an abort for undecided branches of the old xid format "
                   "(ss1, no cluster identity) whose decider name matches; only when no other "
                   "application shares these servers")
    p.add_argument("--adopt-previous-identity", action="store_true",
                   help="also finish branches naming the identity a decider database had "
                   "before it was re-keyed as a copy; only when that database is the "
                   "original, restored or moved (never for a copy such as staging)")
    p.set_defaults(func=cmd_recover)
    s = subparsers.add_parser("status", help="list in-doubt transactions per shard")
    add_config_argument(s)
    s.set_defaults(func=cmd_status)
