"""A ``scoped_session`` that proxies what a :class:`~shardsession.ShardedSession` adds.

SQLAlchemy's :class:`~sqlalchemy.orm.scoped_session` proxies the methods and attributes
of :class:`~sqlalchemy.orm.Session` it lists when the class is defined; the ones a
sharded session adds (``shards``, ``bind_shard``, ``placement``...) are not among them.
:class:`ShardedScopedSession` is ``scoped_session`` with those added; everything else,
including the registry and ``remove()``, is SQLAlchemy's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from sqlalchemy.engine import Connection
from sqlalchemy.orm import ORMExecuteState, scoped_session

from .routing.placement import Placement
from .session import AtomicMode, ShardedSession

__all__ = ["ShardedScopedSession"]


class ShardedScopedSession(scoped_session[ShardedSession]):
    """:class:`~sqlalchemy.orm.scoped_session` for sharded sessions.

    Takes the arguments of ``scoped_session`` (a ``sessionmaker(class_=ShardedSession,
    ...)`` and an optional ``scopefunc``) and proxies, besides the Session methods and
    attributes ``scoped_session`` proxies, the public methods and attributes of
    :class:`~shardsession.ShardedSession` to the current session.
    """

    @property
    def shards(self) -> Mapping[str, Any]:
        """Proxy for :attr:`ShardedSession.shards`."""
        return self._proxied.shards

    def bind_shard(self, shard_id: Any, bind: Any) -> None:
        """Proxy for :meth:`ShardedSession.bind_shard` (the current session only)."""
        self._proxied.bind_shard(shard_id, bind)

    @property
    def placement(self) -> Placement | None:
        """Proxy for :attr:`ShardedSession.placement`."""
        return self._proxied.placement

    def connection_callable(
        self, mapper: Any = None, instance: Any = None, shard_id: Any = None, **kw: Any
    ) -> Connection:
        """Proxy for :meth:`ShardedSession.connection_callable`."""
        return self._proxied.connection_callable(mapper, instance, shard_id, **kw)

    @property
    def atomic(self) -> AtomicMode:
        """Proxy for :attr:`ShardedSession.atomic`."""
        return self._proxied.atomic

    @atomic.setter
    def atomic(self, value: AtomicMode) -> None:
        self._proxied.atomic = value

    @property
    def fanout_max_workers(self) -> int | None:
        """Proxy for :attr:`ShardedSession.fanout_max_workers`."""
        value: int | None = self._proxied.fanout_max_workers
        return value

    @fanout_max_workers.setter
    def fanout_max_workers(self, value: int | None) -> None:
        self._proxied.fanout_max_workers = value

    @property
    def fanout_timeout(self) -> float | None:
        """Proxy for :attr:`ShardedSession.fanout_timeout`."""
        value: float | None = self._proxied.fanout_timeout
        return value

    @fanout_timeout.setter
    def fanout_timeout(self, value: float | None) -> None:
        self._proxied.fanout_timeout = value

    @property
    def shard_chooser(self) -> Callable[..., Any]:
        """Proxy for ``ShardedSession.shard_chooser``."""
        return self._proxied.shard_chooser

    @property
    def identity_chooser(self) -> Callable[..., Any]:
        """Proxy for ``ShardedSession.identity_chooser``."""
        return self._proxied.identity_chooser

    @property
    def execute_chooser(self) -> Callable[[ORMExecuteState], Iterable[Any]]:
        """Proxy for ``ShardedSession.execute_chooser``."""
        return self._proxied.execute_chooser
