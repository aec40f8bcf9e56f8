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
configuration error. ``status``: 0 when nothing of ours is in doubt, 1 otherwise or when
a shard cannot be listed, 2 on a configuration error.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from types import FrameType
from typing import Any

from ..config import Cluster
from ..coordinator.recovery import RecoveryReport, in_doubt, recover
from ..coordinator.setup import shard_health
from ..exc import ConfigurationError

__all__ = ["add_arguments", "cmd_recover", "cmd_status", "load_cluster"]

log = logging.getLogger(__name__)

#: foreign prepared transactions listed by name in a report (a shared server may hold many)
_FOREIGN_SHOWN = 20


def load_cluster(path: str) -> Cluster:
    """Read the cluster's TOML file (the format of :class:`shardsession.config.Cluster`).

    :raises ConfigurationError: the file is unreadable or not a valid cluster config.
    """
    return Cluster.from_toml(path, pool_pre_ping=True)


def _print_report(report: RecoveryReport) -> None:
    print(
        f"committed={len(report.committed)} rolled_back={len(report.rolled_back)} "
        f"already_finished={len(report.already_finished)} left_alone={len(report.left_alone)} "
        f"errors={len(report.errors)} foreign={report.foreign} "
        f"decisions_deleted={report.decisions_deleted}"
    )
    for ref, reason in report.left_alone:
        print(f"  left in doubt: {ref.shard} {ref.gtrid}.{ref.bqual} ({reason})")
    for shard, gtrid, reason in report.decisions_kept:
        print(f"  decision kept: {shard} {gtrid} ({reason})")
    for shard, ident in report.foreign_ids[:_FOREIGN_SHOWN]:
        print(f"  foreign (not touched): {shard} {ident}")
    if len(report.foreign_ids) > _FOREIGN_SHOWN:
        print(f"  ... and {len(report.foreign_ids) - _FOREIGN_SHOWN} more foreign")
    if report.legacy_rows_kept:
        print(f"  legacy decision rows kept: {report.legacy_rows_kept}")
    for err in report.errors:
        print(f"  error: {err}")


def cmd_recover(args: argparse.Namespace) -> int:
    """One recovery pass, or a worker loop with ``--watch`` (stops on SIGTERM/SIGINT)."""
    try:
        cluster = load_cluster(args.config)
    except ConfigurationError as e:
        print(f"shardsession recover: {e}", file=sys.stderr)
        return 2
    engines = cluster.engines
    grace = args.grace if args.grace is not None else cluster.recovery_grace
    stop = threading.Event()
    if args.watch:
        def on_signal(signum: int, frame: FrameType | None) -> None:
            log.info("signal %d: stopping after the current pass", signum)
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    code = 0
    try:
        while True:
            try:
                report = recover(engines, grace_period=grace, claim_legacy=args.claim_legacy,
                                 adopt_previous=args.adopt_previous_identity)
            except Exception as e:  # keep the worker alive across transient failures
                log.exception("recovery pass failed")
                print(f"recovery pass failed: {type(e).__name__}: {e}")
                code = 1
            else:
                _print_report(report)
                code = 0 if report.resolved else 1
            sys.stdout.flush()
            if not args.watch or stop.wait(args.interval):
                break
    finally:
        for engine in set(engines.values()):
            engine.dispose()
    return code


def cmd_status(args: argparse.Namespace) -> int:
    """Print in-doubt branches of ours per shard with their age."""
    try:
        engines = load_cluster(args.config).engines
    except ConfigurationError as e:
        print(f"shardsession status: {e}", file=sys.stderr)
        return 2
    try:
        health = shard_health(engines)
        rows = in_doubt(engines)
    except Exception as e:
        print(f"status incomplete: {e}")
        return 1
    finally:
        for engine in set(engines.values()):
            engine.dispose()
    identities = {h.identity for h in health if h.error is None}
    if len(identities) == 1 and None not in identities:
        print(f"cluster identity: {identities.pop()}")
    for h in health:
        if h.error is not None:
            print(f"{h.shard}: cannot check: {h.error}")
        elif len(identities) != 1 or h.identity is None:
            print(f"{h.shard}: cluster identity {h.identity or '(none stored yet)'}")
        for w in h.warnings:
            print(f"warning: {h.shard}: {w}")
    if not rows:
        print("no in-doubt transactions")
        return 0
    for r in rows:
        age = f"{r.age:.0f}s" if r.age is not None else "?"
        line = f"{r.shard}\t{r.xid.gid}\tage={age}\tdecider={r.decider or '(not configured)'}"
        if r.xid.legacy:
            line += "\tlegacy-format"
        if r.blocked:
            line += f"\tCANNOT FINISH: {r.blocked}"
        print(line)
    return 1


def add_arguments(subparsers: Any) -> None:
    """Register ``recover`` and ``status`` on the CLI's subparsers."""
    p = subparsers.add_parser("recover", help="finish in-doubt two-phase transactions")
    p.add_argument("--config", required=True, metavar="FILE", help="TOML with [shards.NAME] url")
    p.add_argument("--watch", action="store_true", help="run as a worker until SIGTERM")
    p.add_argument("--interval", type=float, default=30.0, metavar="SECONDS",
                   help="seconds between passes with --watch (default 30)")
    p.add_argument("--grace", type=float, default=None, metavar="SECONDS",
                   help="seconds before an undecided prepared branch is claimed aborted "
                   "(default: [cluster] recovery_grace of the config, else 60)")
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
    s.add_argument("--config", required=True, metavar="FILE", help="TOML with [shards.NAME] url")
    s.set_defaults(func=cmd_status)
