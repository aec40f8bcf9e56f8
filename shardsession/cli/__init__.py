"""The ``shardsession`` command: demo, recover, status, create-all.

The CLI is the one place that reads the process environment and prints; the library
itself does neither.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shardsession",
        description="Sharded SQLAlchemy sessions: demo, recovery of in-doubt transactions.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    from . import demo

    demo.add_arguments(sub)
    try:
        from . import recover
    except ImportError:  # pragma: no cover - only while the coordinator is absent
        recover = None  # type: ignore[assignment]
    if recover is not None:
        recover.add_arguments(sub)
        from . import create_all

        create_all.add_arguments(sub)
        from . import move_tenant, tenants

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
    code: int = args.func(args)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
