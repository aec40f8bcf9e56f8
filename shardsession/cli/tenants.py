"""``shardsession tenants``: list the tenants of the tenant directory, per shard.

The directory's shard is ``[cluster] tenant_directory`` of the config file, or
``--directory SHARD``. Exit status: 0 listed, 1 the directory could not be read, 2 a
configuration error.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..exc import ConfigurationError
from ._common import (
    EXIT_CONFIG,
    EXIT_OK,
    EXIT_PROBLEM,
    add_config_argument,
    config_path,
    emit_json,
    load_cluster,
    say,
)

__all__ = ["add_arguments", "cmd_tenants"]


def cmd_tenants(args: argparse.Namespace) -> int:
    from ..tenancy import TenantDirectory

    try:
        cluster = load_cluster(config_path(args))
        shard = args.directory or cluster.tenant_directory
        if shard is None:
            raise ConfigurationError(
                "no tenant directory: set [cluster] tenant_directory in the config file "
                "or pass --directory SHARD")
        directory = TenantDirectory(shard, shards=cluster.engines)
    except ConfigurationError as e:
        say(f"shardsession tenants: {e}", err=True)
        return EXIT_CONFIG
    try:
        assignments = directory.assignments()
    except Exception as e:
        say(f"shardsession tenants: cannot read the tenant directory on {shard!r}: "
            f"{type(e).__name__}: {e}", err=True)
        return EXIT_PROBLEM
    finally:
        cluster.dispose()
    by_shard: dict[str, list[dict[str, Any]]] = {s: [] for s in sorted(cluster.shard_ids)}
    for tenant, (where, version) in assignments.items():
        by_shard.setdefault(where, []).append({"tenant": tenant, "version": version})
    if args.json:
        emit_json({"directory": shard, "shards": by_shard})
        return EXIT_OK
    for where, tenants in by_shard.items():
        say(f"{where}: {len(tenants)} tenant{'' if len(tenants) == 1 else 's'}")
        for t in tenants:
            say(f"  {t['tenant']} (version {t['version']})")
    return EXIT_OK


def add_arguments(subparsers: Any) -> None:
    """Register ``tenants`` on the CLI's subparsers."""
    p = subparsers.add_parser("tenants", help="list the tenants of the tenant directory per shard")
    add_config_argument(p)
    p.add_argument("--directory", metavar="SHARD",
                   help="the shard holding the directory (default: [cluster] tenant_directory)")
    p.set_defaults(func=cmd_tenants)
