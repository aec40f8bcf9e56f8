"""What every ``shardsession`` command shares: the config file option, loading a cluster
(relative paths, ``url_env``), argument types, JSON output, timestamps and masking of
passwords in everything the CLI prints or logs."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import event

from ..config import Cluster, mask_url_text, url_secrets
from ..exc import ConfigurationError

__all__ = [
    "CONFIG_ENV",
    "EXIT_CONFIG",
    "EXIT_OK",
    "EXIT_PROBLEM",
    "Redactor",
    "add_config_argument",
    "config_error",
    "config_path",
    "emit_json",
    "interval_float",
    "load_cluster",
    "non_negative_float",
    "positive_float",
    "redactor",
    "say",
    "set_driver_timeouts",
    "timestamp",
]

#: environment variable naming the config file when ``--config`` is not given
CONFIG_ENV = "SHARDSESSION_CONFIG"

#: exit codes (documented in the README's "Command line" section)
EXIT_OK = 0
EXIT_PROBLEM = 1
EXIT_CONFIG = 2


def positive_float(text: str) -> float:
    """argparse type: a number of seconds above zero."""
    value = _float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, not {text!r}")
    return value


#: the shortest ``--interval`` a worker accepts (less would only busy-loop)
MIN_INTERVAL = 0.05


def interval_float(text: str) -> float:
    """argparse type: a worker's interval, at least :data:`MIN_INTERVAL` seconds."""
    value = _float(text)
    if not value >= MIN_INTERVAL:
        raise argparse.ArgumentTypeError(
            f"must be a number of seconds >= {MIN_INTERVAL:g}, not {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a number of seconds, zero allowed."""
    value = _float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, not {text!r}")
    return value


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    """``--config FILE`` (default: the file ``$SHARDSESSION_CONFIG`` names) and ``--json``."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help=f"cluster TOML with [shards.NAME] tables (default: ${CONFIG_ENV})",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def config_path(args: argparse.Namespace) -> str:
    """The config file to read: ``--config``, else ``$SHARDSESSION_CONFIG``.

    :raises ConfigurationError: neither is given.
    """
    path: str | None = args.config or os.environ.get(CONFIG_ENV) or None
    if path is None:
        raise ConfigurationError(f"no config file: give --config FILE or set {CONFIG_ENV}")
    return path


def load_cluster(path: str) -> Cluster:
    """Read the cluster's TOML file: relative SQLite paths against its folder, ``url_env``
    from the process environment, and every password of it registered with
    :data:`redactor` so that nothing the CLI prints or logs shows it.

    :raises ConfigurationError: the file is unreadable or not a valid cluster config.
    """
    cluster = Cluster.from_toml(path, env=os.environ, pool_pre_ping=True)
    redactor.add(s for engine in cluster.engines.values() for s in url_secrets(engine.url))
    set_driver_timeouts(cluster)
    return cluster


#: seconds to establish a connection (every command) and to wait for one answer of the
#: server (``status`` and ``recover`` only: a migration's DDL may rightly take longer)
CONNECT_TIMEOUT = 10
READ_TIMEOUT = 60


def set_driver_timeouts(cluster: Cluster, *, read: bool = False) -> None:
    """Default network timeouts on every shard engine whose driver takes them, so that a
    server that accepts connections but never answers cannot stall a command forever.
    A value the shard's URL or ``connect_args`` already gives wins.

    psycopg2 / psycopg: ``connect_timeout`` (libpq has no read timeout: a server that
    stops answering after the connection is made is not bounded). PyMySQL and mysqlclient:
    ``connect_timeout``, and with ``read`` also ``read_timeout`` and ``write_timeout``.
    SQLite and the async drivers: nothing."""
    for engine in cluster.engines.values():
        driver = engine.dialect.driver
        defaults: dict[str, int] = {}
        if driver in ("psycopg2", "psycopg"):
            defaults = {"connect_timeout": CONNECT_TIMEOUT}
        elif driver in ("pymysql", "mysqldb"):
            defaults = {"connect_timeout": CONNECT_TIMEOUT}
            if read:
                defaults |= {"read_timeout": READ_TIMEOUT, "write_timeout": READ_TIMEOUT}
        if not defaults:
            continue

        def _defaults(dialect: Any, record: Any, cargs: Any, cparams: dict[str, Any],
                      defaults: dict[str, int] = defaults) -> None:
            for key, value in defaults.items():
                cparams.setdefault(key, value)

        event.listen(engine, "do_connect", _defaults)


#: passwords shorter than this are masked only where they stand in a URL (a plain text
#: replacement of ``p`` would print ``O***erationalError`` and so reveal it)
MIN_TEXT_SECRET = 6


class Redactor(logging.Filter):
    """Replaces passwords by ``***`` in text and in log records: in every URL (its
    password field and ``password=`` / ``passwd=`` parameters, whatever their length),
    and any known password of :data:`MIN_TEXT_SECRET` characters or more anywhere."""

    def __init__(self) -> None:
        super().__init__()
        self._secrets: set[str] = set()

    def add(self, secrets: Iterable[Any]) -> None:
        for secret in secrets:
            if secret is not None and str(secret):
                self._secrets.add(str(secret))

    def __call__(self, text: str) -> str:
        text = mask_url_text(text)
        # longest first: a password that contains another is masked whole
        for secret in sorted(self._secrets, key=len, reverse=True):
            if len(secret) >= MIN_TEXT_SECRET:
                text = text.replace(secret, "***")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        record.msg, record.args = self(message), None
        if record.exc_text:
            record.exc_text = self(record.exc_text)
        return True


#: the CLI's one redactor (installed on the log handlers by :func:`shardsession.cli.main`)
redactor = Redactor()


def say(text: str = "", *, err: bool = False) -> None:
    """Print a line, passwords masked."""
    print(redactor(text), file=sys.stderr if err else sys.stdout)


def config_error(args: argparse.Namespace, command: str, message: object) -> int:
    """Report a configuration or usage error: one line on stderr and, with ``--json``,
    also ``{"ok": false, "error": ...}`` on stdout; returns :data:`EXIT_CONFIG`."""
    say(f"shardsession {command}: {message}", err=True)
    if getattr(args, "json", False):
        emit_json({"ok": False, "error": str(message), "exit": EXIT_CONFIG})
    return EXIT_CONFIG


def emit_json(obj: Any) -> None:
    """One JSON document on one line (a watch loop prints JSON Lines), passwords masked."""
    print(redactor(json.dumps(obj, sort_keys=True, default=str)))
    sys.stdout.flush()


def timestamp() -> str:
    """Now, UTC, ISO 8601 to the second (prefix of watch-mode lines)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
