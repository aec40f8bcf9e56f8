"""``shardsession tenants``: list the tenants of the tenant directory, per shard.

The directory's shard is ``[cluster] tenant_directory`` of the config file, or
``--directory SHARD``. Exit status: 0 listed, 1 the directory could not be read, 2 a
configuration error.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..exc import ConfigurationError
from .recover import load_cluster

__all__ = ["add_arguments", "cmd_tenants"]


def cmd_tenants(args: argparse.Namespace) -> int:
    from ..tenancy import TenantDirectory

    try:
        cluster = load_cluster(args.config)
        shard = args.directory or cluster.tenant_directory
        if shard is None:
            raise ConfigurationError(
                "no tenant directory: set [cluster] tenant_directory in the config file "
                "or pass --directory SHARD")
        directory = TenantDirectory(shard, shards=cluster.engines)
    except ConfigurationError as e:
        print(f"shardsession tenants: {e}", file=sys.stderr)
        return 2
    try:
        assignments = directory.assignments()
    except Exception as e:
        print(f"shardsession tenants: cannot read the tenant directory on {shard!r}: "
              f"{type(e).__name__}: {e}", file=sys.stderr)
        return 1
    finally:
        cluster.dispose()
    by_shard: dict[str, list[dict[str, Any]]] = {s: [] for s in sorted(cluster.shard_ids)}
    for tenant, (where, version) in assignments.items():
        by_shard.setdefault(where, []).append({"tenant": tenant, "version": version})
    if args.json:
        print(json.dumps({"directory": shard, "shards": by_shard}, indent=2, sort_keys=True))
        return 0
    for where, tenants in by_shard.items():
        print(f"{where}: {len(tenants)} tenant{'' if len(tenants) == 1 else 's'}")
        for t in tenants:
            print(f"  {t['tenant']} (version {t['version']})")
    return 0


def add_arguments(subparsers: Any) -> None:
    """Register ``tenants`` on the CLI's subparsers."""
    p = subparsers.add_parser("tenants", help="list the tenants of the tenant directory per shard")
    p.add_argument("--config", required=True, metavar="FILE", help="TOML with [shards.NAME] url")
    p.add_argument("--directory", metavar="SHARD",
                   help="the shard holding the directory (default: [cluster] tenant_directory)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_tenants)
