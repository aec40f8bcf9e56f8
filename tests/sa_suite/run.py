"""Run SQLAlchemy's own ORM tests with a one-shard ShardedSession, and compare.

Usage (from the repository root)::

    python tests/sa_suite/run.py [--backend sqlite|postgresql] [--dburi URL]
                                 [--files test/orm/test_x.py ...] [--timeout SECONDS]

What it does:

1. gets the source distribution of the installed SQLAlchemy version from the package
   registry (``pip download --no-binary :all: --no-deps sqlalchemy==<version>``), cached
   under ``tests/sa_suite/.cache/`` (gitignored), and unpacks it there;
2. runs the chosen test files of its suite (:data:`FILES`) twice with our plugin
   (``tests/sa_suite/plugin.py``): plainly, then with ``Session`` / ``sessionmaker`` /
   ``fixture_session()`` giving a one-shard :class:`shardsession.ShardedSession`;
3. fails when a file's tests made no sharded session (the substitution did not happen),
   or when a test that passes plainly does not pass sharded and is not listed in
   ``expected_differences.txt`` for this backend. A listed test that no longer differs is
   reported (remove it from the list), without failing.

The backend ``postgresql`` takes ``--dburi``, or starts a server the way the project's
tests do (``tests/harness/servers.py``) and creates a fresh database.

Exit status: 0 when there is no unexplained difference, 1 otherwise, 2 when the suite
could not be run at all.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CACHE = HERE / ".cache"
EXPECTED = HERE / "expected_differences.txt"

#: the chosen files of SQLAlchemy's suite (paths inside its source distribution)
FILES = (
    "test/orm/test_session.py",
    "test/orm/test_transaction.py",
    "test/orm/test_events.py",
    "test/orm/test_bind.py",
    "test/orm/test_query.py",
    "test/orm/test_unitofworkv2.py",
    "test/orm/test_versioning.py",
    "test/orm/test_cascade.py",
    "test/orm/test_merge.py",
    "test/orm/test_expire.py",
    "test/orm/dml/test_bulk.py",
    "test/orm/dml/test_bulk_statements.py",
    "test/orm/dml/test_evaluator.py",
    "test/orm/dml/test_orm_upd_del_assorted.py",
    "test/orm/dml/test_orm_upd_del_basic.py",
    "test/orm/dml/test_orm_upd_del_inheritance.py",
)

# SQLAlchemy names a backend test class after the database it ran on, with the server
# version ("TransactionTest_sqlite+pysqlite_3_40_1"): ids are compared without it.
_BACKEND_SUFFIX = re.compile(r"_[a-z][a-z0-9]*\+[a-z][a-z0-9]*_[0-9_]+(?=::)")


def normalize(nodeid: str) -> str:
    """A test id without the backend and server version SQLAlchemy puts in class names."""
    return _BACKEND_SUFFIX.sub("", nodeid)


def sdist(version: str, python: str) -> Path:
    """The unpacked source distribution of SQLAlchemy ``version`` (downloaded once)."""
    CACHE.mkdir(exist_ok=True)
    unpacked = CACHE / f"sqlalchemy-{version}"
    if (unpacked / "test" / "orm").is_dir():
        return unpacked
    archive = CACHE / f"sqlalchemy-{version}.tar.gz"
    if not archive.exists():
        subprocess.run(
            [python, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
             "--disable-pip-version-check", "-d", str(CACHE), f"sqlalchemy=={version}"],
            check=True,
        )
    with tarfile.open(archive) as tar:
        tar.extractall(CACHE, filter="data")
    if not (unpacked / "test" / "orm").is_dir():
        raise SystemExit(f"{archive} has no test/orm folder")
    return unpacked


def run_suite(
    source: Path, mode: str, files: Sequence[str], db_args: list[str], report: Path,
    log: Path, timeout: float,
) -> dict[str, Any]:
    """Run ``files`` of the suite in ``mode`` ('plain' or 'sharded'); the plugin's report."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p
    )
    cmd = [
        sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "tests.sa_suite.plugin",
        f"--sa-suite-mode={mode}", f"--sa-suite-report={report}", "-q", "--maxfail=1000000",
        *db_args, *files,
    ]
    report.unlink(missing_ok=True)
    started = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.run(cmd, cwd=source, env=env, stdout=out, stderr=subprocess.STDOUT,
                              timeout=timeout, check=False)
    elapsed = time.monotonic() - started
    if proc.returncode not in (0, 1) or not report.exists():
        raise SystemExit(f"{mode} run failed to complete (exit {proc.returncode}); see {log}")
    result: dict[str, Any] = json.loads(report.read_text())
    result["seconds"] = round(elapsed, 1)
    return result


def read_expected(path: Path, backend: str) -> dict[str, str]:
    """``{test id: reason}`` of the expected differences that apply to ``backend``.

    One test id per line, then two spaces, ``#`` and the reason (an id without ``[parameters]``
    covers all parameter sets of that test); an optional first word
    ``@sqlite`` / ``@postgresql`` (comma-separated) limits a line to those backends.
    Lines starting with ``#`` are comments.
    """
    found: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        entry, sep, reason = line.partition("  # ")
        if not sep or not reason.strip():
            raise SystemExit(f"{path}:{number}: a test id needs '  # reason' after it")
        entry = entry.strip()
        backends = None
        if entry.startswith("@"):
            first, _, entry = entry.partition(" ")
            backends = set(first[1:].split(","))
            entry = entry.strip()
        if "::" not in entry or (" " in entry.split("[", 1)[0]):
            raise SystemExit(f"{path}:{number}: one test id per line, not {entry!r}")
        if backends is None or backend in backends:
            found[entry] = reason.strip()
    return found


def compare(
    plain: dict[str, str], sharded: dict[str, str], expected: dict[str, str]
) -> tuple[dict[str, str], dict[str, str], list[str]]:
    """(unexplained differences, explained ones, listed tests that no longer differ);
    the differences map a test id to its sharded outcome."""
    plain_n = {normalize(k): v for k, v in plain.items()}
    sharded_n = {normalize(k): v for k, v in sharded.items()}
    differ = {
        k: sharded_n.get(k, "not run")
        for k, v in plain_n.items()
        if v == "passed" and sharded_n.get(k) != "passed"
    }
    new = {k: v for k, v in differ.items() if _listed(k, expected) is None}
    explained = {k: v for k, v in differ.items() if _listed(k, expected) is not None}
    used = {_listed(k, expected) for k in explained}
    stale = sorted(k for k in expected if k not in used)
    return new, explained, stale


def _listed(test_id: str, expected: dict[str, str]) -> str | None:
    """The entry of ``expected`` that covers ``test_id``: the id itself, or the id
    without its parameters (``test_x`` covers every ``test_x[...]``)."""
    if test_id in expected:
        return test_id
    function_id = test_id.split("[", 1)[0]
    return function_id if function_id in expected else None


def _counts(outcomes: Iterable[str]) -> str:
    tally: dict[str, int] = {}
    for o in outcomes:
        tally[o] = tally.get(o, 0) + 1
    return ", ".join(f"{n} {o}" for o, n in sorted(tally.items()))


def _postgresql_database() -> tuple[str, Any]:
    """A fresh database on the project's first PostgreSQL test server, and a function
    that drops it (and stops the server when this process started it)."""
    sys.path.insert(0, str(ROOT / "tests"))
    import sqlalchemy
    from harness import servers
    from sqlalchemy.engine import make_url

    server = servers.get_server("pg1")
    url = server.create_database()
    # (the schemas SQLAlchemy's README.unittests asks for: some ORM tests use them)
    engine = sqlalchemy.create_engine(url)
    with engine.begin() as conn:
        for schema in ("test_schema", "test_schema_2"):
            conn.execute(sqlalchemy.schema.CreateSchema(schema))
    engine.dispose()

    def done() -> None:
        try:
            server.drop_database(make_url(url).database)
        finally:
            servers.forget_server("pg1")

    return url, done


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--dburi", help="database URL for the suite (default: per backend)")
    parser.add_argument("--files", nargs="+", default=list(FILES))
    parser.add_argument("--timeout", type=float, default=1800, help="per run, in seconds")
    parser.add_argument("--out", type=Path, default=CACHE / "results",
                        help="folder for the logs and reports")
    parser.add_argument("--reuse", action="store_true",
                        help="compare the reports of the last runs again, without running")
    args = parser.parse_args(argv)

    import sqlalchemy

    version = sqlalchemy.__version__
    source = sdist(version, sys.executable)
    args.out.mkdir(parents=True, exist_ok=True)
    done: Any = None
    if args.reuse:
        runs = {mode: json.loads((args.out / f"{args.backend}-{mode}.json").read_text())
                for mode in ("plain", "sharded")}
        for run in runs.values():
            run.setdefault("seconds", "?")
        return report(args, version, runs)
    if args.dburi:
        db_args = [f"--dburi={args.dburi}"]
    elif args.backend == "postgresql":
        url, done = _postgresql_database()
        db_args = [f"--dburi={url}"]
    else:
        db_args = []  # the suite's default: SQLite in memory
    read_expected(EXPECTED, args.backend)  # (a malformed list fails before the runs)
    try:
        runs = {
            mode: run_suite(source, mode, args.files, db_args,
                            args.out / f"{args.backend}-{mode}.json",
                            args.out / f"{args.backend}-{mode}.log", args.timeout)
            for mode in ("plain", "sharded")
        }
    finally:
        if done is not None:
            done()

    return report(args, version, runs)


def report(args: argparse.Namespace, version: str, runs: dict[str, dict[str, Any]]) -> int:
    """Print the comparison of the two runs and write its summary; the exit status."""
    expected = {  # (the entries of the files that ran)
        k: v for k, v in read_expected(EXPECTED, args.backend).items()
        if k.split("::", 1)[0] in args.files
    }
    failed = False
    plain, sharded = runs["plain"], runs["sharded"]
    print(f"SQLAlchemy {version} suite, backend {args.backend}, {len(args.files)} files")
    for mode, run in runs.items():
        print(f"  {mode}: {_counts(run['outcomes'].values())} in {run['seconds']} s")
    for name in args.files:
        made = sharded["sharded_sessions"].get(name, 0)
        if made == 0:
            failed = True
            print(f"FAIL {name}: no sharded session was created (substitution failed)")
    new, explained, stale = compare(plain["outcomes"], sharded["outcomes"], expected)
    print(f"  differences: {len(explained)} expected (listed), {len(new)} unexplained")
    for test_id, outcome in sorted(new.items()):
        failed = True
        print(f"FAIL new difference ({outcome} sharded, passed plainly): {test_id}")
    for test_id in stale:
        print(f"note: listed but no longer differs (remove it): {test_id}")
    summary = {
        "backend": args.backend, "sqlalchemy": version, "files": args.files,
        "seconds": {m: r["seconds"] for m, r in runs.items()},
        "sharded_sessions": sharded["sharded_sessions"],
        "new": new, "explained": explained, "stale": stale,
    }
    (args.out / f"{args.backend}-summary.json").write_text(json.dumps(summary, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
