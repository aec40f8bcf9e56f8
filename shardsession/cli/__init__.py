"""The ``shardsession`` command: demo, status, recover, create-all, migrate.

The CLI is the one place that reads the process environment and prints; the library
itself does neither.

Exit codes, the same for every command:

* ``0`` -- done, nothing left to do (``status``/``recover``: nothing of ours in doubt);
* ``1`` -- the command ran, but something is left (a branch in doubt, a shard that failed
  or could not be checked);
* ``2`` -- nothing was done: a usage or configuration error (bad option, unreadable or
  invalid config, a ``url_env`` variable not set, no config given).

Every command that reads a cluster takes ``--config FILE`` (default: the file
``$SHARDSESSION_CONFIG`` names) and ``--json``; passwords of the config's URLs are masked
as ``***`` in everything printed or logged.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from ._common import redactor

__all__ = ["main"]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("shardsession")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown (not installed)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shardsession",
        description="Sharded SQLAlchemy sessions: demo, setup, status and recovery of "
        "in-doubt transactions. Exit codes: 0 done, 1 something left (in doubt, a shard "
        "failed), 2 usage or configuration error.",
    )
    parser.add_argument("--version", action="version", version=f"shardsession {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    from . import create_all, demo, migrate, move_tenant, recover, tenants

    demo.add_arguments(sub)
    recover.add_arguments(sub)
    create_all.add_arguments(sub)
    migrate.add_arguments(sub)
    tenants.add_arguments(sub)
    move_tenant.add_arguments(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for handler in logging.getLogger().handlers:
        if redactor not in handler.filters:
            handler.addFilter(redactor)
    code: int = args.func(args)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
