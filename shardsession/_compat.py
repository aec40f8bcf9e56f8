"""The one module allowed to touch SQLAlchemy's private names.

Everything here is checked against SQLAlchemy 2.1.9 (and the 2.0 series where noted);
each function documents the private name it relies on, so an upgrade has one place to look.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.horizontal_shard import set_shard_id
from sqlalchemy.orm import Mapper, ORMExecuteState, Session
from sqlalchemy.orm.state import InstanceState

__all__ = [
    "explicit_shard_of",
    "identity_token_of",
    "set_identity_token",
]


def identity_token_of(state: InstanceState[Any]) -> Any:
    """Return the shard an instance is (or will be) stored on, or ``None``.

    Persistent objects carry it as the third element of their identity key; pending
    objects carry it in ``InstanceState.identity_token`` (a public attribute in 2.x that
    SQLAlchemy's own ``horizontal_shard`` sets the same way).
    """
    if state.key is not None:
        return state.key[2]
    return state.identity_token


def set_identity_token(state: InstanceState[Any], shard_id: Any) -> None:
    """Assign a pending object to a shard (what ``horizontal_shard`` does on first flush)."""
    state.identity_token = shard_id


def session_identity_lookup(
    session: Session,
    mapper: Mapper[Any],
    primary_key_identity: Any,
    identity_token: Any,
    **kw: Any,
) -> Any:
    """Call ``Session._identity_lookup`` of the plain Session class (private in 2.x)."""
    return Session._identity_lookup(  # noqa: SLF001
        session, mapper, primary_key_identity, identity_token=identity_token, **kw
    )


def explicit_shard_of(orm_context: ORMExecuteState) -> Any:
    """Return the shard a statement is pinned to, or ``None`` to let the choosers decide.

    Mirrors ``sqlalchemy.ext.horizontal_shard.execute_and_instances`` exactly, in its order:
    a ``set_shard_id`` option (``ORMExecuteState._non_compile_orm_options``), the identity
    token of the load/update options (``_identity_token``: lazy loads and refreshes of an
    object stay on its shard), the ``_sa_shard_id`` execution option of
    ``ShardedQuery.set_shard``, then ``bind_arguments["shard_id"]``.
    """
    for opt in orm_context._non_compile_orm_options:  # noqa: SLF001
        if isinstance(opt, set_shard_id):
            return opt.shard_id
    active: Any
    if orm_context.is_select:
        active = orm_context.load_options
    elif orm_context.is_update or orm_context.is_delete:
        active = orm_context.update_delete_options
    else:
        active = None
    if active is not None and active._identity_token is not None:  # noqa: SLF001
        return active._identity_token  # noqa: SLF001
    if "_sa_shard_id" in orm_context.execution_options:
        return orm_context.execution_options["_sa_shard_id"]
    return orm_context.bind_arguments.get("shard_id")
