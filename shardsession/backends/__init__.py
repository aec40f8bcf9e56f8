"""Backend adapters, one per dialect, looked up by SQLAlchemy dialect name."""

from __future__ import annotations

from .base import DECISION_TABLE, BackendAdapter, Capabilities, DecisionRow, InDoubt, Outcome
from .mysql import MySQLAdapter
from .postgresql import PostgreSQLAdapter
from .sqlite import SQLiteAdapter

__all__ = [
    "DECISION_TABLE",
    "BackendAdapter",
    "Capabilities",
    "DecisionRow",
    "InDoubt",
    "Outcome",
    "adapter_for",
    "register_adapter",
]

_REGISTRY: dict[str, BackendAdapter] = {
    "postgresql": PostgreSQLAdapter(),
    "mysql": MySQLAdapter(),
    "mariadb": MySQLAdapter(),
    "sqlite": SQLiteAdapter(),
}


def adapter_for(dialect_name: str) -> BackendAdapter:
    """Return the adapter of a SQLAlchemy dialect name.

    :raises KeyError: no adapter for that dialect (it cannot take part in a commit of
        several shards; single-shard work does not need one).
    """
    return _REGISTRY[dialect_name]


def register_adapter(dialect_name: str, adapter: BackendAdapter) -> None:
    """Register (or replace) the adapter of a dialect."""
    _REGISTRY[dialect_name] = adapter
