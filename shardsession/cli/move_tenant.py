"""``shardsession move-tenant``: move one tenant to another shard (see
:func:`shardsession.tenancy.move_tenant`).

The tenant-owned tables are those of the application's placement, named with
``--placement MODULE:NAME`` (a :class:`~shardsession.routing.Placement` object).
Exit status: 0 moved, 1 the move failed (the tenant stays where it was unless the switch
committed; the message says which), 2 a configuration error.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any

from ..exc import ConfigurationError, ShardSessionError
from ..routing.placement import Placement
from ._common import add_config_argument, config_path, emit_json, load_cluster, say

__all__ = ["add_arguments", "cmd_move_tenant", "load_placement"]


def load_placement(spec: str) -> Placement:
    """``"package.module:name"`` -> that :class:`Placement`.

    :raises ConfigurationError: it cannot be imported or is not a Placement.
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigurationError(f"--placement wants MODULE:NAME, not {spec!r}")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ConfigurationError(f"--placement {spec}: {e}") from e
    if not isinstance(obj, Placement):
        raise ConfigurationError(f"--placement {spec}: {type(obj).__name__} is not a Placement")
    return obj


def cmd_move_tenant(args: argparse.Namespace) -> int:
    from ..tenancy import move_tenant

    try:
        cluster = load_cluster(config_path(args))
        placement = load_placement(args.placement)
        maker = cluster.sessionmaker(placement)
    except ConfigurationError as e:
        say(f"shardsession move-tenant: {e}", err=True)
        return 2

    def progress(phase: str, table: str, rows: int) -> None:
        say(f"{phase}: {table}: {rows} rows")

    try:
        report = move_tenant(maker, args.tenant, args.shard, batch_size=args.batch_size,
                             progress=None if args.quiet or args.json else progress)
    except ConfigurationError as e:
        say(f"shardsession move-tenant: {e}", err=True)
        return 2
    except ShardSessionError as e:
        say(f"shardsession move-tenant: {type(e).__name__}: {e}", err=True)
        return 1
    finally:
        cluster.dispose()
    if args.json:
        emit_json({"tenant": report.tenant, "source": report.source, "target": report.target,
                   "version": report.version, "copied": report.copied,
                   "caught_up": report.caught_up})
        return 0
    say(f"moved tenant {report.tenant} from {report.source} to {report.target} "
        f"(directory version {report.version}); copied "
        f"{sum(report.copied.values())} rows, caught up {sum(report.caught_up.values())}")
    return 0


def add_arguments(subparsers: Any) -> None:
    """Register ``move-tenant`` on the CLI's subparsers."""
    p = subparsers.add_parser("move-tenant", help="move one tenant to another shard, online")
    add_config_argument(p)
    p.add_argument("--placement", required=True, metavar="MODULE:NAME",
                   help="the application's Placement (its TenantSharding rules)")
    p.add_argument("--batch-size", type=int, default=1000, help="rows per copy batch")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    p.add_argument("tenant", metavar="TENANT")
    p.add_argument("shard", metavar="SHARD")
    p.set_defaults(func=cmd_move_tenant)
