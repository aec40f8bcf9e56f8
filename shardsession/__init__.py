"""shardsession: a sharded SQLAlchemy Session.

Routes each mapper or instance to one of several engines, merges cross-shard query results
exactly, and commits a unit of work that touched several databases atomically (two-phase
commit with a durable decision and crash recovery).
"""

from __future__ import annotations

from sqlalchemy.ext.horizontal_shard import ShardedQuery, set_shard_id

from ._typing import ExecuteChooser, IdentityChooser, ShardChooser
from .events import ShardSessionEvents
from .exc import (
    AtomicityUnavailableError,
    CapabilityError,
    ColocationWarning,
    CommitIncomplete,
    ConfigurationError,
    CrossShardError,
    DistributedDeadlock,
    FanoutTimeoutError,
    NonAtomicCommitWarning,
    NoShardChosenError,
    OutcomeUnknown,
    PageTokenError,
    PrepareFailed,
    QueryError,
    RecoveryError,
    RoutingError,
    ShardKeyMissingError,
    ShardSessionError,
    StaleTenantDirectoryError,
    TenantError,
    TenantIsolationError,
    TenantRequiredError,
    TransactionError,
    UnknownShardError,
    UnknownTenantError,
    UnsupportedQueryError,
)
from .retry import arun_transaction, is_retryable, run_transaction
from .routing import (
    Broadcast,
    DirectorySharding,
    Follows,
    HashSharding,
    Pinned,
    Placement,
    RangeSharding,
)
from .scoping import ShardedScopedSession
from .session import ShardedSession

__version__ = "0.1.0"

__all__ = [
    "AtomicityUnavailableError",
    "Broadcast",
    "CapabilityError",
    "ColocationWarning",
    "CommitIncomplete",
    "ConfigurationError",
    "CrossShardError",
    "DirectorySharding",
    "DistributedDeadlock",
    "ExecuteChooser",
    "FanoutTimeoutError",
    "Follows",
    "HashSharding",
    "IdentityChooser",
    "NoShardChosenError",
    "NonAtomicCommitWarning",
    "OutcomeUnknown",
    "PageTokenError",
    "Pinned",
    "Placement",
    "PrepareFailed",
    "QueryError",
    "RangeSharding",
    "RecoveryError",
    "RoutingError",
    "ShardChooser",
    "ShardKeyMissingError",
    "ShardSessionError",
    "ShardSessionEvents",
    "ShardedQuery",
    "ShardedScopedSession",
    "ShardedSession",
    "StaleTenantDirectoryError",
    "TenantError",
    "TenantIsolationError",
    "TenantRequiredError",
    "TransactionError",
    "UnknownShardError",
    "UnknownTenantError",
    "UnsupportedQueryError",
    "arun_transaction",
    "is_retryable",
    "run_transaction",
    "set_shard_id",
]
