"""Cluster configuration: shards by name and URL, in code or in a TOML file.

The TOML format, kept simple at its core::

    [cluster]                 # optional
    atomic = "require"        # or "best_effort"
    decider = "main"          # optional shard id preferred as decision holder
    recovery_grace = 60       # seconds before recovery claims an abort for a stuck prepare
    tenant_directory = "main" # optional: the shard holding the tenant directory
                              # (shardsession.tenancy; create-all then creates its tables)

    [shards.main]
    url = "postgresql+psycopg2://app@db1/app"

    [shards.eu]
    url_env = "EU_DATABASE_URL"   # the URL from this environment variable (CLI, or the
                                  # ``env`` mapping given to from_toml/from_dict)
    pool_size = 10            # any other key is passed to create_engine()

    [shards.local]
    url = "sqlite:///shards/local.db"   # relative: against the config file's folder
"""

from __future__ import annotations

import logging
import math
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import sessionmaker

from .coordinator.xid import check_shard_ids
from .exc import ConfigurationError
from .routing.placement import Placement
from .session import ShardedSession

if TYPE_CHECKING:
    from typing_extensions import Self

    from .coordinator import TransactionCoordinator

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib  # type: ignore[import-not-found,no-redef,unused-ignore]

__all__ = ["Cluster", "masked_url"]

log = logging.getLogger(__name__)

_CLUSTER_KEYS = {"atomic", "decider", "recovery_grace", "tenant_directory"}

#: ``user:password@`` in text that does not parse as a URL
_USERINFO = re.compile(r"(//[^:/@\s]*):[^@\s]*@")

#: query parameters that carry a password (libpq, psycopg and PyMySQL accept them)
_SECRET_PARAMS = frozenset({"password", "passwd"})

#: ``?password=...`` / ``&passwd=...`` in text
_SECRET_QUERY = re.compile(r"([?&](?:password|passwd)=)[^&\s'\"]*", re.IGNORECASE)

#: the extra of ours that installs a driver module
_EXTRAS = {
    "psycopg2": "postgresql",
    "psycopg": "postgresql",
    "pymysql": "mysql",
    "asyncpg": "asyncpg",
    "aiomysql": "aiomysql",
    "aiosqlite": "aiosqlite",
}


def mask_url_text(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***``: the
    ``user:password@`` part and ``password=`` / ``passwd=`` query parameters (structural:
    other text is left alone, however short the password)."""
    return _SECRET_QUERY.sub(r"\1***", _USERINFO.sub(r"\1:***@", text))


def url_secrets(url: URL) -> list[str]:
    """The passwords a URL carries: its password field and its password query
    parameters."""
    found = [] if url.password is None else [str(url.password)]
    for key, value in url.query.items():
        if key.lower() in _SECRET_PARAMS:
            found.extend([value] if isinstance(value, str) else list(value))
    return found


def masked_url(url: str | URL) -> str:
    """A URL as text with its passwords hidden (for logs, errors and ``repr``): the
    password field and the ``password`` / ``passwd`` query parameters. Text that is not
    a URL is shown with anything in the place of a password replaced by ``***``."""
    try:
        parsed = make_url(url)
    except Exception:
        return mask_url_text(str(url))
    return mask_url_text(parsed.render_as_string(hide_password=True))


def _driver_hint(url: URL, error: BaseException) -> str:
    """What to install when ``create_engine`` could not import the URL's driver."""
    if not isinstance(error, ImportError) or not error.name:
        return ""
    module = error.name.partition(".")[0]
    extra = _EXTRAS.get(module)
    if extra is None:
        return f" (the driver {module!r} that {url.drivername} names is not installed)"
    return f" (the driver is not installed: pip install 'shardsession[{extra}]')"


def _resolve_sqlite_path(url: str, base: Path) -> str:
    """A SQLite URL whose file path is relative, made absolute against ``base`` (the
    config file's folder: the working directory would silently create an empty
    database elsewhere)."""
    try:
        parsed = make_url(url)
    except Exception:
        return url  # reported by Cluster with its reason
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return url
    prefix = ""
    if database.startswith("file:"):  # a URI filename (``?uri=true``): file:PATH
        prefix, database = "file:", database[len("file:"):]
        if (not database or database.startswith("/") or database.startswith(":memory:")
                or parsed.query.get("mode") == "memory"):
            return url
    if Path(database).is_absolute():
        return url
    resolved = parsed.set(database=prefix + str((base / database).resolve()))
    return resolved.render_as_string(hide_password=False)


def _sqlite_identity(dbapi_conn: Any, _record: Any) -> None:
    """Store a SQLite shard's cluster identity on its first connection, before any
    transaction: a transaction that writes SQLite first holds its file's lock, so the
    identity could otherwise only commit with its first decision (see
    :mod:`shardsession.coordinator.identity`)."""
    from .backends import adapter_for
    from .coordinator.identity import ensure_identity_here

    try:
        ensure_identity_here(adapter_for("sqlite"), dbapi_conn)
        dbapi_conn.commit()
    except Exception as e:  # read-only file, say: the coordinator tries again on use
        log.info("SQLite cluster identity not stored on first connect: %s", e)
        dbapi_conn.rollback()


class Cluster:
    """A named set of shards and how commits over them behave.

    :param shards: ``{shard_id: URL string, URL or Engine}``.
    :param atomic: ``"require"`` (default) or ``"best_effort"``; see
        :class:`~shardsession.ShardedSession`.
    :param decider: shard id preferred as the decision holder.
    :param recovery_grace: seconds a prepared branch may wait before recovery claims an
        abort for it (the claim itself is what decides, never the clock alone).
    :param engine_options: ``{shard_id: {create_engine keyword: value}}``.
    :param tenant_directory: the shard holding the tenant directory of
        :mod:`shardsession.tenancy` (read by ``shardsession tenants`` and
        ``create-all``), or ``None``.
    :raises ConfigurationError: no shards, a bad shard id or URL, an unknown decider or
        tenant directory shard, two
        shard ids that would name the same decider inside an xid.

    The cluster's identity, written into every xid, is not configured here: it is
    generated once and stored next to each decider's decision table (see
    :mod:`shardsession.coordinator.identity`; :meth:`identities` reads it), so two
    deployments sharing one config file still have different identities.
    """

    def __init__(
        self,
        shards: Mapping[str, str | URL | Engine],
        *,
        atomic: Literal["require", "best_effort"] = "require",
        decider: str | None = None,
        recovery_grace: float = 60.0,
        engine_options: Mapping[str, Mapping[str, Any]] | None = None,
        tenant_directory: str | None = None,
    ) -> None:
        if not shards:
            raise ConfigurationError("a cluster needs at least one shard")
        if atomic not in ("require", "best_effort"):
            raise ConfigurationError(f"atomic must be 'require' or 'best_effort', not {atomic!r}")
        if decider is not None and decider not in shards:
            raise ConfigurationError(f"decider {decider!r} is not one of the shards")
        if tenant_directory is not None and tenant_directory not in shards:
            raise ConfigurationError(
                f"tenant_directory {tenant_directory!r} is not one of the shards")
        self.tenant_directory = tenant_directory
        if (
            isinstance(recovery_grace, bool)
            or not isinstance(recovery_grace, (int, float))
            or not math.isfinite(recovery_grace)
            or recovery_grace < 0
        ):
            raise ConfigurationError(
                f"recovery_grace must be a finite number of seconds >= 0, not {recovery_grace!r}"
            )
        try:  # an xid names its decider by shard id: two ids must never name one
            check_shard_ids(shards)
        except ValueError as e:
            raise ConfigurationError(str(e)) from e
        options = dict(engine_options or {})
        unknown = set(options) - set(shards)
        if unknown:
            raise ConfigurationError(f"engine_options name unknown shards {sorted(unknown)}")
        self.atomic = atomic
        self.decider = decider
        self.recovery_grace = recovery_grace
        self._engines: dict[str, Engine] = {}
        # Shards given the same URL and options are one database: one engine, one pool
        # (and one branch of a commit).
        by_url: dict[tuple[str, str], Engine] = {}
        for name, target in shards.items():
            if not isinstance(name, str) or not name or not name.isidentifier():
                raise ConfigurationError(
                    f"shard ids are identifiers (letters, digits, _), not {name!r}"
                )
            if isinstance(target, Engine):
                self._engines[name] = target
                continue
            try:
                url = make_url(target)
            except Exception as e:
                raise ConfigurationError(
                    f"shard {name!r}: not a database URL: {masked_url(target)}"
                ) from e
            kw = dict(options.get(name, {}))
            key = (url.render_as_string(hide_password=False), repr(sorted(kw.items())))
            if key in by_url:
                self._engines[name] = by_url[key]
                continue
            try:
                self._engines[name] = by_url[key] = create_engine(url, **kw)
            except TypeError as e:  # SQLAlchemy's answer to an unknown keyword
                found = re.search(r"Invalid argument\(s\) (.+?) sent", str(e))
                if found is None:  # a known keyword with a value of the wrong type
                    raise ConfigurationError(
                        f"shard {name!r}: a create_engine() option has a value of the wrong "
                        f"type ({sorted(kw)}): {mask_url_text(str(e))}"
                    ) from e
                raise ConfigurationError(
                    f"shard {name!r}: unknown key(s) {found.group(1) if found else ''} "
                    f"(not create_engine() options): {e}"
                ) from e
            except Exception as e:
                raise ConfigurationError(
                    f"shard {name!r}: cannot create an engine for {masked_url(url)}: "
                    f"{type(e).__name__}: {mask_url_text(str(e))}{_driver_hint(url, e)}"
                ) from e
            if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
                event.listen(self._engines[name], "first_connect", _sqlite_identity)
        self._coordinator: Any = None

    @classmethod
    def from_toml(
        cls, path: str | Path, *, env: Mapping[str, str] | None = None, **engine_defaults: Any
    ) -> Self:
        """Read a cluster from a TOML file (see the module docstring for the format).

        Relative SQLite file paths are resolved against the file's folder.

        :param env: where ``url_env`` names are looked up (the library never reads the
            process environment itself: pass ``os.environ`` to use it).
        :param engine_defaults: ``create_engine`` keywords for every shard (a shard's own
            keys in the file win).
        :raises ConfigurationError: unreadable file, bad TOML, or a bad table or key.
        """
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as e:
            raise ConfigurationError(f"cannot read cluster config {path}: {e.strerror}") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigurationError(f"{path}: invalid TOML: {e}") from e
        return cls.from_dict(
            data, source=str(path), env=env, base=Path(path).resolve().parent, **engine_defaults
        )

    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any],
        *,
        source: str = "config",
        env: Mapping[str, str] | None = None,
        base: Path | None = None,
        **engine_defaults: Any,
    ) -> Self:
        """Build a cluster from the parsed TOML structure.

        :param env: where ``url_env`` names are looked up (none given: ``url_env`` is an error).
        :param base: the folder relative SQLite paths are resolved against (none: left as is).
        :raises ConfigurationError: a bad table or key, a ``url_env`` not set.
        """
        unknown = set(data) - {"cluster", "shards"}
        if unknown:
            raise ConfigurationError(f"{source}: unknown top-level tables {sorted(unknown)}")
        shards_table = data.get("shards")
        if not isinstance(shards_table, Mapping) or not shards_table:
            raise ConfigurationError(f"{source}: needs at least one [shards.NAME] table")
        shards: dict[str, str] = {}
        options: dict[str, dict[str, Any]] = {}
        for name, spec in shards_table.items():
            url = cls._shard_url(source, name, spec, env)
            shards[name] = url if base is None else _resolve_sqlite_path(url, base)
            extra = {
                **engine_defaults,
                **{k: v for k, v in spec.items() if k not in ("url", "url_env")},
            }
            if extra:
                options[name] = extra
        settings = data.get("cluster", {})
        if not isinstance(settings, Mapping):
            raise ConfigurationError(f"{source}: [cluster] must be a table")
        bad = set(settings) - _CLUSTER_KEYS
        if bad:
            raise ConfigurationError(f"{source}: unknown [cluster] keys {sorted(bad)}")
        return cls(shards, engine_options=options, **dict(settings))

    @staticmethod
    def _shard_url(source: str, name: str, spec: Any, env: Mapping[str, str] | None) -> str:
        if not isinstance(spec, Mapping):
            raise ConfigurationError(f"{source}: [shards.{name}] must be a table")
        if "url" in spec and "url_env" in spec:
            raise ConfigurationError(f"{source}: [shards.{name}] has both url and url_env")
        if isinstance(spec.get("url"), str):
            url: str = spec["url"]
            return url
        var = spec.get("url_env")
        if not isinstance(var, str) or not var:
            raise ConfigurationError(
                f'{source}: [shards.{name}] needs url = "..." or url_env = "VARIABLE"'
            )
        if env is None:
            raise ConfigurationError(
                f"{source}: [shards.{name}] url_env = {var!r}: no environment given to read it"
            )
        value = env.get(var)
        if not value:
            raise ConfigurationError(
                f"{source}: [shards.{name}] url_env = {var!r}: that environment variable "
                "is not set"
            )
        return value

    @property
    def engines(self) -> dict[str, Engine]:
        """The shard engines by id."""
        return dict(self._engines)

    @property
    def shard_ids(self) -> list[str]:
        return list(self._engines)

    def coordinator(self) -> TransactionCoordinator:
        """The cluster's shared transaction coordinator (created on first use)."""
        if self._coordinator is None:
            from .coordinator import TransactionCoordinator

            self._coordinator = TransactionCoordinator(atomic=self.atomic, decider=self.decider)
        coordinator: TransactionCoordinator = self._coordinator
        return coordinator

    def sessionmaker(
        self, placement: Placement | None = None, **session_kw: Any
    ) -> sessionmaker[ShardedSession]:
        """A ``sessionmaker`` of :class:`ShardedSession` over this cluster.

        With ``placement`` the choosers are derived from it; otherwise pass
        ``shard_chooser``/``identity_chooser``/``execute_chooser`` in ``session_kw``.
        """
        return sessionmaker(
            class_=ShardedSession,
            shards=self.engines,
            placement=placement,
            coordinator=self.coordinator(),
            **session_kw,
        )

    def identities(self) -> dict[str, str | None]:
        """The cluster identity stored on each shard (``None``: none stored yet); a shard
        that cannot be read is left out (``shardsession status`` reports why)."""
        from .coordinator.identity import read_identities

        found, _errors = read_identities(self._engines)
        return found

    def create_all(self, metadata: Any) -> None:
        """Create ``metadata``'s tables on every shard (idempotent)."""
        for engine in self._engines.values():
            metadata.create_all(engine)

    def dispose(self) -> None:
        """Close every pooled connection of every shard engine."""
        for engine in self._engines.values():
            engine.dispose()

    def __repr__(self) -> str:
        shards = ", ".join(f"{n}={masked_url(e.url)}" for n, e in self._engines.items())
        return f"Cluster({shards}, atomic={self.atomic!r})"
