"""``shardsession create-all``: create the decision table and the cluster identity (and,
optionally, the application's tables) on every shard of a cluster, say which shards can
prepare, and warn about server settings that could lose a committed decision in a crash.

Exit status: 0 when every shard is set up, 1 when a shard failed, 2 on a configuration
error (unreadable file, unknown ``--metadata`` object).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

from sqlalchemy import MetaData

from ..coordinator.setup import prepare_shards
from ..exc import ConfigurationError
from .recover import load_cluster

__all__ = ["add_arguments", "cmd_create_all", "load_metadata"]


def load_metadata(spec: str) -> MetaData:
    """``"package.module:name"`` -> that :class:`MetaData` (or a declarative base's).

    :raises ConfigurationError: the module or name cannot be imported, or is not a
        MetaData / declarative base.
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigurationError(f"--metadata wants MODULE:NAME, not {spec!r}")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ConfigurationError(f"--metadata {spec}: {e}") from e
    metadata = obj if isinstance(obj, MetaData) else getattr(obj, "metadata", None)
    if not isinstance(metadata, MetaData):
        raise ConfigurationError(
            f"--metadata {spec}: {type(obj).__name__} is neither a MetaData nor a declarative base"
        )
    return metadata


def cmd_create_all(args: argparse.Namespace) -> int:
    try:
        cluster = load_cluster(args.config)
        metadata = load_metadata(args.metadata) if args.metadata else None
    except ConfigurationError as e:
        print(f"shardsession create-all: {e}", file=sys.stderr)
        return 2
    engines = cluster.engines
    code = 0
    identities: dict[str, str | None] = {}
    try:
        for setup in prepare_shards(engines):
            if setup.failed:
                print(f"{setup.shard}: FAILED: {setup.reason}")
                code = 1
                continue
            tables = ""
            if cluster.tenant_directory is not None:
                from ..tenancy import tenancy_metadata

                try:  # the owner table on every shard; the directory table too (unused
                    # but on the directory's shard; one MetaData keeps this simple)
                    tenancy_metadata.create_all(engines[setup.shard])
                    tables = ", tenant tables ready"
                except Exception as e:
                    print(f"{setup.shard}: FAILED creating the tenant tables: "
                          f"{type(e).__name__}: {e}")
                    code = 1
                    continue
            if metadata is not None:
                try:
                    metadata.create_all(engines[setup.shard])
                    tables += f", {len(metadata.tables)} application tables present"
                except Exception as e:
                    print(f"{setup.shard}: FAILED creating tables: {type(e).__name__}: {e}")
                    code = 1
                    continue
            prepare = "can prepare" if setup.can_prepare else f"cannot prepare ({setup.reason})"
            print(f"{setup.shard}: decision table ready{tables}; {prepare}")
            for w in setup.warnings:
                print(f"warning: {setup.shard}: {w}")
            identities[setup.shard] = setup.identity
    finally:
        for engine in set(engines.values()):
            engine.dispose()
    distinct = set(identities.values())
    if len(distinct) == 1:
        print(f"cluster identity: {distinct.pop()}")
    else:  # shards that already had different identities keep them (xids name them)
        for shard, identity in identities.items():
            print(f"{shard}: cluster identity {identity}")
    return code


def add_arguments(subparsers: Any) -> None:
    """Register ``create-all`` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "create-all", help="create the decision table (and application tables) on every shard")
    p.add_argument("--config", required=True, metavar="FILE", help="TOML with [shards.NAME] url")
    p.add_argument("--metadata", metavar="MODULE:NAME",
                   help="also create the tables of this MetaData or declarative base on "
                   "every shard (like MetaData.create_all per engine)")
    p.set_defaults(func=cmd_create_all)
