"""SQLAlchemy's deprecated constructor arguments, kept working as SQLAlchemy keeps them.

``id_chooser`` (deprecated in 2.0) and ``query_chooser`` (deprecated in 1.4) are wrapped
into ``identity_chooser`` / ``execute_chooser`` exactly as ``horizontal_shard`` does,
with the same deprecation warnings attributed to the program's own line.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy.exc import ArgumentError, SADeprecationWarning
from sqlalchemy.orm import Mapper, ORMExecuteState, Session

from . import _compat
from .exc import user_stacklevel

__all__ = ["execute_chooser_of", "identity_chooser_of"]


def _warn_deprecated(message: str, since: str) -> None:
    """Warn as ``sqlalchemy.util.warn_deprecated`` does: attributed to the first frame
    outside shardsession and SQLAlchemy (the program's constructor or sessionmaker call),
    however deep the call."""
    warning = SADeprecationWarning(message)
    warning.deprecated_since = since  # type: ignore[attr-defined, unused-ignore]
    warnings.warn(warning, stacklevel=user_stacklevel())


def identity_chooser_of(
    session: Session,
    identity_chooser: Callable[..., Any] | None,
    id_chooser: Callable[..., Any] | None,
) -> Callable[..., Any]:
    """SQLAlchemy's rules: ``identity_chooser``, or the deprecated ``id_chooser``."""
    if id_chooser is not None:
        _warn_deprecated(
            "The ``id_chooser`` parameter is deprecated; please use ``identity_chooser``.",
            "2.0",
        )
        legacy = id_chooser

        def _legacy(
            mapper: Mapper[Any], primary_key: Any, *, lazy_loaded_from: Any = None, **kw: Any
        ) -> Any:
            q = session.query(mapper)
            if lazy_loaded_from:
                q = _compat.query_lazyload_from(q, lazy_loaded_from)
            return legacy(q, primary_key)

        return _legacy
    if identity_chooser is None:
        raise ArgumentError("identity_chooser or id_chooser is required")
    return identity_chooser


def execute_chooser_of(
    execute_chooser: Callable[..., Any] | None, query_chooser: Callable[..., Any] | None
) -> Callable[[ORMExecuteState], Iterable[Any]]:
    """SQLAlchemy's rules: ``execute_chooser``, or the deprecated ``query_chooser``."""
    if query_chooser is not None:
        _warn_deprecated(
            "The ``query_chooser`` parameter is deprecated; please use ``execute_chooser``.",
            "1.4",
        )
        if execute_chooser is not None:
            raise ArgumentError("Can't pass query_chooser and execute_chooser at the same time.")
        legacy = query_chooser
        return lambda orm_context: legacy(orm_context.statement)  # type: ignore[no-any-return, unused-ignore]
    if execute_chooser is None:
        raise ArgumentError("execute_chooser or query_chooser is required")
    return execute_chooser
