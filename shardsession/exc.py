"""The exception tree of shardsession.

Every error the library raises on its own account derives from :class:`ShardSessionError`.
Driver errors raised by work on a single shard pass through unchanged (they are SQLAlchemy's
``DBAPIError`` subclasses), so code written for plain SQLAlchemy keeps catching them::

    ShardSessionError
    +-- ConfigurationError            a cluster, placement or strategy is set up wrongly
    +-- RoutingError                  (shard_id) where a row or statement should go
    |   +-- UnknownShardError         a shard id that is not configured
    |   +-- NoShardChosenError        a chooser returned None / nothing
    |   +-- ShardKeyMissingError      (mapper, key) a new object has no shard key value
    |   +-- CrossShardError           (shard_ids) related objects live on different shards
    +-- QueryError                    (shard_id) a cross-shard read or write
    |   +-- UnsupportedQueryError     (construct) cannot be merged exactly; never a wrong answer
    |   +-- FanoutTimeoutError        (pending_shards) the per-query deadline passed
    |   +-- PageTokenError            a pagination token is malformed, altered or foreign
    +-- TransactionError              (gtrid) a unit of work over several shards
    |   +-- AtomicityUnavailableError the commit cannot be atomic and atomic="require"
    |   +-- CapabilityError           (shard_id) a shard cannot do what is asked (e.g. PREPARE)
    |   +-- PrepareFailed             (failed_shards) nothing was committed
    |   +-- CommitIncomplete          (pending_shards) committed; recovery finishes the rest
    |   +-- OutcomeUnknown            the decision's fate is unknown; recovery settles it
    |   +-- DistributedDeadlock       (gtrid, shard_ids) chosen as the victim of a lock cycle
    +-- RecoveryError                 (gtrid, shard_id) recovery could not settle a branch
    +-- TenantError                   (tenant) multi-tenant use (shardsession.tenancy)
        +-- TenantIsolationError      (other_tenant) another tenant's row, or a tenant switch
        +-- TenantRequiredError       a tenant-owned mapper used without a tenant where refused
        +-- UnknownTenantError        (shard_id) the directory has no shard for the tenant;
        |                             also a RoutingError (a key no shard holds)
        +-- StaleTenantDirectoryError (shard_id) the shard no longer holds the tenant at the
                                      cached version; retryable (roll back, run again)

Every exception pickles with its structured fields (they cross process boundaries in
worker pools and in the recovery worker). The fields are typed, and are the constructors'
keyword arguments; shard ids are typed ``str``, as SQLAlchemy types them
(``ShardIdentifier``).

Every class says whether retrying the whole unit of work may succeed: ``retryable`` is
``True`` for :class:`DistributedDeadlock` and :class:`PrepareFailed` (nothing was committed:
a lost lock cycle, a "no" vote, a prepare lost to a recovery claim), ``False`` for every
other (an unknown outcome is never retryable: the first attempt may have committed).
:func:`shardsession.run_transaction` retries on it; a web framework may map it to a 503.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

__all__ = [
    "AtomicityUnavailableError",
    "CapabilityError",
    "ColocationWarning",
    "CommitIncomplete",
    "ConfigurationError",
    "CrossShardError",
    "DistributedDeadlock",
    "FanoutTimeoutError",
    "NoShardChosenError",
    "NonAtomicCommitWarning",
    "OutcomeUnknown",
    "PageTokenError",
    "PrepareFailed",
    "QueryError",
    "RecoveryError",
    "RoutingError",
    "ShardKeyMissingError",
    "ShardSessionError",
    "StaleTenantDirectoryError",
    "TenantError",
    "TenantIsolationError",
    "TenantRequiredError",
    "TransactionError",
    "UnknownShardError",
    "UnknownTenantError",
    "UnsupportedQueryError",
]


class ShardSessionError(Exception):
    """Root of every error raised by shardsession itself.

    Subclasses keep their structured fields as attributes; ``str()`` is the message.
    """

    #: names of the keyword fields a subclass stores; used for pickling and ``repr``
    _fields: tuple[str, ...] = ()
    #: whether running the whole unit of work again may succeed (nothing was committed)
    retryable: bool = False

    def __init__(self, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.message = message
        for name in self._fields:
            setattr(self, name, fields.pop(name, None))
        if fields:
            raise TypeError(
                f"{type(self).__name__} got unexpected fields: {', '.join(sorted(fields))}"
            )

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, {n: getattr(self, n) for n in self._fields}))

    def __repr__(self) -> str:
        extra = "".join(f", {n}={getattr(self, n)!r}" for n in self._fields)
        return f"{type(self).__name__}({self.message!r}{extra})"


def _rebuild(cls: type[ShardSessionError], message: str, fields: dict[str, Any]) -> Any:
    return cls(message, **fields)


class ConfigurationError(ShardSessionError):
    """A cluster, placement rule or strategy is configured wrongly (raised at setup time)."""


class RoutingError(ShardSessionError):
    """A row or statement could not be routed to a shard."""

    _fields: tuple[str, ...] = ("shard_id",)
    shard_id: str | None

    if TYPE_CHECKING:  # (the fields as keywords, for the type checker)
        def __init__(self, message: str, *, shard_id: str | None = None) -> None: ...


class UnknownShardError(RoutingError):
    """A shard id that is not one of the session's shards."""


class NoShardChosenError(RoutingError):
    """A chooser returned ``None`` or an empty list."""


class ShardKeyMissingError(RoutingError):
    """A new object has no value for the shard key its placement needs."""

    _fields: tuple[str, ...] = ("shard_id", "mapper", "key")
    mapper: str | None
    key: tuple[str, ...] | None

    if TYPE_CHECKING:  # (the fields as keywords, for the type checker)
        def __init__(
            self, message: str, *, shard_id: str | None = None, mapper: str | None = None,
            key: tuple[str, ...] | None = None,
        ) -> None: ...


class CrossShardError(RoutingError):
    """Related objects would be written to different shards."""

    _fields: tuple[str, ...] = ("shard_id", "shard_ids")
    shard_ids: Sequence[str]

    if TYPE_CHECKING:  # (the fields as keywords, for the type checker)
        def __init__(
            self, message: str, *, shard_id: str | None = None, shard_ids: Sequence[str],
        ) -> None: ...


class QueryError(ShardSessionError):
    """A cross-shard read or bulk write failed."""

    _fields: tuple[str, ...] = ("shard_id",)
    shard_id: str | None

    if TYPE_CHECKING:  # (the fields as keywords, for the type checker)
        def __init__(self, message: str, *, shard_id: str | None = None) -> None: ...


class UnsupportedQueryError(QueryError):
    """The statement cannot be answered exactly across shards; names the construct."""

    _fields: tuple[str, ...] = ("shard_id", "construct")
    construct: str | None

    if TYPE_CHECKING:  # (the fields as keywords, for the type checker)
        def __init__(
            self, message: str, *, shard_id: str | None = None, construct: str | None = None,
        ) -> None: ...


class FanoutTimeoutError(QueryError):
    """A fan-out's deadline passed before every shard answered."""

    _fields: tuple[str, ...] = ("shard_id", "pending_shards", "timeout")
    pending_shards: Sequence[str]
    timeout: float | None

    if TYPE_CHECKING:  # (the fields as keywords, for the type checker)
        def __init__(
            self, message: str, *, shard_id: str | None = None, pending_shards: Sequence[str],
            timeout: float | None = None,
        ) -> None: ...


class PageTokenError(QueryError, ValueError):
    """A page token is malformed, was altered, or belongs to another query."""


class TransactionError(ShardSessionError):
    """A unit of work over several shards could not be completed as asked."""

    _fields: tuple[str, ...] = ("gtrid",)
    gtrid: str | None

    if TYPE_CHECKING:  # (the fields as keywords, for the type checker)
        def __init__(self, message: str, *, gtrid: str | None = None) -> None: ...


class AtomicityUnavailableError(TransactionError):
    """The commit cannot be atomic (two or more writers cannot prepare) and
    ``atomic="require"``; raised before anything is committed."""

    _fields: tuple[str, ...] = ("gtrid", "shard_ids")
    shard_ids: Sequence[str]

    if TYPE_CHECKING:  # (the fields as keywords, for the type checker)
        def __init__(
            self, message: str, *, gtrid: str | None = None, shard_ids: Sequence[str],
        ) -> None: ...


class CapabilityError(TransactionError):
    """A shard cannot take part as asked, e.g. PostgreSQL with
    ``max_prepared_transactions = 0`` asked to PREPARE."""

    _fields: tuple[str, ...] = ("gtrid", "shard_id")
    shard_id: str | None

    if TYPE_CHECKING:  # (the fields as keywords, for the type checker)
        def __init__(
            self, message: str, *, gtrid: str | None = None, shard_id: str | None = None,
        ) -> None: ...


class PrepareFailed(TransactionError):
    """One or more branches could not be prepared; every branch was rolled back and
    nothing was committed. Retryable: a "no" vote (a serialization failure at PREPARE),
    a prepare lost to a recovery claim or a branch its server rolled back may all succeed
    on a new attempt; a permanent cause (a temporary table) fails again."""

    retryable = True

    _fields: tuple[str, ...] = ("gtrid", "failed_shards")
    failed_shards: Sequence[str]

    if TYPE_CHECKING:  # (the fields as keywords, for the type checker)
        def __init__(
            self, message: str, *, gtrid: str | None = None, failed_shards: Sequence[str],
        ) -> None: ...


class CommitIncomplete(TransactionError):
    """The transaction is committed (the decision is durable) but some branches are
    still being completed; recovery finishes them. The data will appear."""

    _fields: tuple[str, ...] = ("gtrid", "pending_shards")
    pending_shards: Sequence[str]

    if TYPE_CHECKING:  # (the fields as keywords, for the type checker)
        def __init__(
            self, message: str, *, gtrid: str | None = None, pending_shards: Sequence[str],
        ) -> None: ...


class OutcomeUnknown(TransactionError):
    """The decision commit was sent but its reply was lost; recovery settles the
    transaction (named by ``gtrid``) one way or the other. Never retryable: the first
    attempt may have committed, and running it again could apply it twice."""

    retryable = False

    _fields: tuple[str, ...] = ("gtrid", "pending_shards")
    pending_shards: Sequence[str]

    if TYPE_CHECKING:  # (the fields as keywords, for the type checker)
        def __init__(
            self, message: str, *, gtrid: str | None = None, pending_shards: Sequence[str],
        ) -> None: ...


class DistributedDeadlock(TransactionError):
    """The transaction was chosen as the victim of a lock cycle that spans shards (no
    single server sees it), or waited on a shard that cannot show its lock waits longer
    than the bounded wait. Its waiting statement was cancelled and every branch is rolled
    back with the session: nothing it wrote survives, and a new attempt of the whole unit
    of work may succeed (``retryable``). ``shard_ids`` are the shards of the cycle."""

    retryable = True
    _fields: tuple[str, ...] = ("gtrid", "shard_ids")
    shard_ids: Sequence[str]

    if TYPE_CHECKING:  # (the fields as keywords, for the type checker)
        def __init__(
            self, message: str, *, gtrid: str | None = None, shard_ids: Sequence[str] = (),
        ) -> None: ...


class RecoveryError(ShardSessionError):
    """Recovery could not settle a branch (it is left in doubt and reported)."""

    _fields: tuple[str, ...] = ("gtrid", "shard_id")
    gtrid: str | None
    shard_id: str | None

    if TYPE_CHECKING:  # (the fields as keywords, for the type checker)
        def __init__(
            self, message: str, *, gtrid: str | None = None, shard_id: str | None = None,
        ) -> None: ...


class TenantError(ShardSessionError):
    """Multi-tenant use went wrong (see :mod:`shardsession.tenancy`); names the tenant."""

    _fields: tuple[str, ...] = ("tenant",)
    tenant: str | None

    if TYPE_CHECKING:  # (the fields as keywords, for the type checker)
        def __init__(self, message: str, *, tenant: str | None = None) -> None: ...


class TenantIsolationError(TenantError):
    """A tenant-scoped session was asked to read or write another tenant's rows, to run
    SQL it cannot scope, or to change its own tenant or an object's; raised before
    anything is sent to a database or returned to the caller."""

    _fields: tuple[str, ...] = ("tenant", "other_tenant")
    other_tenant: str | None

    if TYPE_CHECKING:  # (the fields as keywords, for the type checker)
        def __init__(
            self, message: str, *, tenant: str | None = None, other_tenant: str | None = None,
        ) -> None: ...


class TenantRequiredError(TenantError):
    """A statement on a tenant-owned mapper ran without a tenant where the placement
    refuses unscoped access (``TenantSharding(..., allow_unscoped=False)``)."""


class UnknownTenantError(TenantError, RoutingError):
    """The tenant directory has no shard for the tenant (add it first)."""

    _fields: tuple[str, ...] = ("tenant", "shard_id")

    if TYPE_CHECKING:  # (the fields as keywords, for the type checker)
        def __init__(
            self, message: str, *, tenant: str | None = None, shard_id: str | None = None,
        ) -> None: ...


class StaleTenantDirectoryError(TenantError):
    """The shard a session used for a tenant no longer holds it at the directory version
    the session had cached (the tenant moved). Retryable: roll the session back and run
    the unit of work again; the directory cache is already refreshed. Nothing was
    written to the old shard."""

    retryable = True
    _fields: tuple[str, ...] = ("tenant", "shard_id")
    shard_id: str | None

    if TYPE_CHECKING:  # (the fields as keywords, for the type checker)
        def __init__(
            self, message: str, *, tenant: str | None = None, shard_id: str | None = None,
        ) -> None: ...


class NonAtomicCommitWarning(UserWarning):
    """A commit touched several shards that cannot prepare and ``atomic="best_effort"``
    committed them one after another: a crash in between leaves them inconsistent."""


class ColocationWarning(UserWarning):
    """A cross-shard read relates rows of several sharded tables (a join, a correlated
    or ``IN`` subquery) under the drop-in constructor, which has no placement to tell
    whether related rows live on one shard: each shard pairs only its own rows, as
    SQLAlchemy's ``horizontal_shard`` does.  Exact only when related rows are
    co-located; turn it into an error with
    ``warnings.simplefilter("error", ColocationWarning)``, or give the session a
    placement, which checks and refuses."""


def warn_colocation(message: str) -> None:
    """Emit :class:`ColocationWarning` attributed to the program's own line."""
    warnings.warn(message, ColocationWarning, stacklevel=user_stacklevel())


def warn_non_atomic(message: str) -> None:
    """Emit :class:`NonAtomicCommitWarning` attributed to the program's own line."""
    warnings.warn(message, NonAtomicCommitWarning, stacklevel=user_stacklevel())


def user_stacklevel() -> int:
    """The ``stacklevel`` that attributes a warning to the first frame outside
    shardsession and SQLAlchemy (the program's ``commit()`` or constructor call), as
    SQLAlchemy's own warnings do, however deep inside the libraries it is raised."""
    # frame 2 is the caller of the function that calls warnings.warn (stacklevel 2)
    frame: Any = sys._getframe(2)
    level = 2
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] in (
        "shardsession",
        "sqlalchemy",
        "contextlib",  # `with sessionmaker.begin():` exits through contextlib
    ):
        frame = frame.f_back
        level += 1
    return level
