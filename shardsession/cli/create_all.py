"""``shardsession create-all``: create the decision table and the cluster identity (and,
optionally, the application's tables) on every shard of a cluster, say which shards can
prepare, and warn about server settings that could lose a committed decision in a crash.

Exit status: 0 when every shard is set up, 1 when a shard failed, 2 on a configuration
error (unreadable file, unknown ``--metadata`` object).

``--metadata MODULE:NAME`` imports ``MODULE`` with the current folder first on the module
search path (as ``python -m`` would), so ``mymodels.py`` next to the user is found.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Any

from sqlalchemy import MetaData

from ..coordinator.setup import prepare_shards
from ..exc import ConfigurationError
from ._common import (
    EXIT_OK,
    EXIT_PROBLEM,
    add_config_argument,
    config_error,
    config_path,
    emit_json,
    say,
)
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
    # A console script's sys.path starts with its bin folder, not the working directory.
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
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
    """Set up every shard; prints one line per shard (or one JSON document)."""
    try:
        cluster = load_cluster(config_path(args))
        metadata = load_metadata(args.metadata) if args.metadata else None
    except ConfigurationError as e:
        return config_error(args, "create-all", e)
    engines = cluster.engines
    code = EXIT_OK
    identities: dict[str, str | None] = {}
    results: list[dict[str, Any]] = []
    try:
        for setup in prepare_shards(engines):
            result: dict[str, Any] = {
                "shard": setup.shard, "ok": not setup.failed, "can_prepare": setup.can_prepare,
                "reason": setup.reason, "identity": setup.identity,
                "warnings": list(setup.warnings), "application_tables": None,
            }
            results.append(result)
            if setup.failed:
                if not args.json:
                    say(f"{setup.shard}: FAILED: {setup.reason}")
                code = EXIT_PROBLEM
                continue
            tables = ""
            if cluster.tenant_directory is not None:
                from ..tenancy import tenancy_metadata

                try:  # the owner table on every shard; the directory table too (unused
                    # but on the directory's shard; one MetaData keeps this simple)
                    tenancy_metadata.create_all(engines[setup.shard])
                    tables = ", tenant tables ready"
                except Exception as e:
                    result["ok"] = False
                    result["reason"] = f"creating the tenant tables: {type(e).__name__}: {e}"
                    if not args.json:
                        say(f"{setup.shard}: FAILED creating the tenant tables: "
                            f"{type(e).__name__}: {e}")
                    code = EXIT_PROBLEM
                    continue
            if metadata is not None:
                try:
                    metadata.create_all(engines[setup.shard])
                except Exception as e:
                    result["ok"] = False
                    result["reason"] = f"creating tables: {type(e).__name__}: {e}"
                    if not args.json:
                        say(f"{setup.shard}: FAILED creating tables: {type(e).__name__}: {e}")
                    code = EXIT_PROBLEM
                    continue
                result["application_tables"] = len(metadata.tables)
                tables += f", {len(metadata.tables)} application tables present"
            if not args.json:
                prepare = (
                    "can prepare" if setup.can_prepare else f"cannot prepare ({setup.reason})"
                )
                say(f"{setup.shard}: decision table ready{tables}; {prepare}")
                for w in setup.warnings:
                    say(f"warning: {setup.shard}: {w}")
            identities[setup.shard] = setup.identity
    finally:
        cluster.dispose()
    distinct = set(identities.values())
    if args.json:
        emit_json({
            "ok": code == EXIT_OK,
            "identity": distinct.pop() if len(distinct) == 1 else None,
            "shards": results,
        })
    elif len(distinct) == 1:
        say(f"cluster identity: {distinct.pop()}")
    else:  # shards that already had different identities keep them (xids name them)
        for shard, identity in identities.items():
            say(f"{shard}: cluster identity {identity}")
    return code


def add_arguments(subparsers: Any) -> None:
    """Register ``create-all`` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "create-all", help="create the decision table (and application tables) on every shard")
    add_config_argument(p)
    p.add_argument("--metadata", metavar="MODULE:NAME",
                   help="also create the tables of this MetaData or declarative base on "
                   "every shard (like MetaData.create_all per engine)")
    p.set_defaults(func=cmd_create_all)
