"""Atomic commit across shards: xids, the protocol, decision records and recovery.

The coordinator works on branches (a connection and its xid) and knows nothing of the
ORM's mapping or of queries; the session installs it with
:meth:`TransactionCoordinator.install`.
"""

from __future__ import annotations

from .aio import ain_doubt, arecover
from .coordinator import TransactionCoordinator
from .recovery import BranchRef, InDoubtBranch, RecoveryReport, in_doubt, recover
from .setup import ShardSetup, prepare_shards

__all__ = [
    "BranchRef",
    "InDoubtBranch",
    "RecoveryReport",
    "ShardSetup",
    "TransactionCoordinator",
    "ain_doubt",
    "arecover",
    "in_doubt",
    "prepare_shards",
    "recover",
]
