"""Types of the public API: the chooser callables and the keywords of identity lookups.

Types only: nothing here runs on a hot path. The chooser Protocols are
SQLAlchemy's own (``sqlalchemy.ext.horizontal_shard``), re-exported, so a chooser typed
for SQLAlchemy's sharded session type-checks unchanged against ours and the other way
round (the drop-in promise, kept for the type checker too).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypedDict, TypeVar

from sqlalchemy.ext.horizontal_shard import IdentityChooser, ShardChooser
from sqlalchemy.orm import Mapper, ORMExecuteState

# (re-exported for the session's signatures, so its own imports stay as they were)
from sqlalchemy.sql import ClauseElement, Executable

if sys.version_info >= (3, 11):
    from typing import Unpack
else:  # (a dependency of SQLAlchemy's, always installed with it)
    from typing_extensions import Unpack

if TYPE_CHECKING:
    from sqlalchemy.orm.interfaces import ORMOption
    from sqlalchemy.sql.selectable import ForUpdateParameter

__all__ = [
    "ClauseElement",
    "EntityKey",
    "Executable",
    "ExecuteChooser",
    "GetOptions",
    "IdentityChooser",
    "ShardChooser",
    "Unpack",
]

_O = TypeVar("_O", bound=object)

#: ``execute_chooser``: the shard ids an :class:`~sqlalchemy.orm.ORMExecuteState`'s
#: statement is sent to (SQLAlchemy's ``ShardedSession.execute_chooser`` type)
ExecuteChooser = Callable[[ORMExecuteState], Iterable[Any]]

#: what ``Session.get()`` is given as its entity: a mapped class or its mapper
#: (SQLAlchemy's private ``_EntityBindKey``, spelled with public names)
EntityKey = type[_O] | Mapper[_O]


class GetOptions(TypedDict, total=False):
    """The keyword arguments of ``Session.get()`` / ``get_one()`` other than
    ``identity_token`` (which the sharded session reads itself), with SQLAlchemy 2.1's
    types: ``**kw: Unpack[GetOptions]`` checks them as SQLAlchemy's signature does,
    without a wrapper that would name each one at run time."""

    options: Sequence[ORMOption] | None
    populate_existing: bool | None
    with_for_update: ForUpdateParameter
    execution_options: Mapping[str, Any]
    bind_arguments: dict[str, Any] | None
