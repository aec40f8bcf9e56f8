"""Keyset (cursor) pagination over an ordered fan-out.

Each page is one merged query: ``WHERE <after the last row> ORDER BY <total order>
LIMIT page_size + 1``.  The order is made total by appending the primary key, and, since
two shards may hold the same primary key, by the shard itself: rows with equal keys come
out of the merge in shard order, and each shard is told (through a per-shard bound
parameter) whether its rows equal to the last one come before or after it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

from sqlalchemy import and_, bindparam, false, inspect, or_, true
from sqlalchemy.engine import Row
from sqlalchemy.orm import Session
from sqlalchemy.sql import Select
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.schema import Table
from sqlalchemy.types import Boolean, String

from .. import _compat
from ..exc import UnsupportedQueryError
from ._dialect import exact_float_key
from ._nodes import unwrap_label
from ._ordering import default_nulls_first
from ._plan import parse_order_by
from ._token import PageTokenError, decode_token, encode_token

if TYPE_CHECKING:
    from typing_extensions import TypeVarTuple, Unpack

    _Ts = TypeVarTuple("_Ts")

__all__ = ["Page", "PageTokenError", "paginate"]

_T = TypeVar("_T")
_T2 = TypeVar("_T2")

_TIE = "_shardsession_page_tie"
_SHARD = "_shardsession_page_shard"


@dataclass(frozen=True)
class Page(Generic[_T]):
    """One page of a keyset-paginated query.

    Typed by its statement: ``paginate(session, select(User), ...)`` is a
    ``Page[User]``, ``select(User.id, User.name)`` a ``Page[Row[int, str]]``.

    :ivar rows: the rows, as the statement's own result would give them.
    :ivar items: the objects (or values) for a one-column statement, else the rows.
    :ivar next_token: pass to :func:`paginate` for the next page; ``None`` on the last.
    """

    rows: list[Row[Any]]
    items: list[_T]
    next_token: str | None


@dataclass(frozen=True)
class _Key:
    expr: ColumnElement[Any]
    descending: bool
    nulls_first: bool


def _primary_key(stmt: Select[Any]) -> list[ColumnElement[Any]]:
    descs = stmt.column_descriptions
    entity = descs[0].get("entity") if descs else None
    if entity is not None:
        insp = inspect(entity, raiseerr=False)
        if insp is not None and getattr(insp, "is_mapper", False):
            return list(insp.primary_key)
    for frm in stmt.get_final_froms():
        if isinstance(frm, Table) and frm.primary_key.columns:
            return list(frm.primary_key.columns)
    raise UnsupportedQueryError(
        "keyset pagination needs a primary key to make the order total",
        construct="paginate without primary key",
    )


def _shards_of(session: Session) -> list[str]:
    shards = getattr(session, "shards", None)
    if not shards:
        raise UnsupportedQueryError(
            "paginate() needs a ShardedSession", construct="paginate"
        )
    return sorted((str(s) for s in shards), key=str)


def _keys(stmt: Select[Any], dialects: Sequence[str]) -> list[_Key]:
    keys = []
    for element in _compat.select_parts(stmt).order_by:
        item = parse_order_by(element)
        expr = unwrap_label(item.target)
        if not isinstance(expr, ColumnElement):
            raise UnsupportedQueryError(
                "paginate() needs ORDER BY expressions, not label names",
                construct="ORDER BY label",
            )
        nulls_first = item.nulls_first
        if nulls_first is None:
            nulls_first, _ = default_nulls_first(item.descending, dialects)
        keys.append(_Key(expr, item.descending, nulls_first))
    for col in _primary_key(stmt):
        if not any(_compat.same_expression(k.expr, col) for k in keys):
            keys.append(_Key(col, False, default_nulls_first(False, dialects)[0]))
    return keys


def _fingerprint(stmt: Select[Any], page_size: int) -> str:
    compiled = stmt.compile()
    params = sorted((k, repr(v)) for k, v in compiled.params.items())
    text = f"{compiled}\x00{params!r}\x00{page_size}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


def _after(keys: Sequence[_Key], values: Sequence[Any]) -> ColumnElement[bool]:
    # The expanded OR chain of a row-value comparison, with NULLs placed explicitly
    # (row values would compare NULL as unknown), then the shard tie-break.
    disjuncts = []
    equal_so_far: list[ColumnElement[bool]] = []
    for key, value in zip(keys, values, strict=True):
        expr = key.expr
        strictly: ColumnElement[bool]
        same: ColumnElement[bool]
        if value is None:
            strictly = expr.is_not(None) if key.nulls_first else false()
            same = expr.is_(None)
        else:
            # A bound value of the key's type: SQLAlchemy refuses `<`/`>` against a
            # Python True/False (it makes them the SQL constants).
            bound = bindparam(None, value, type_=expr.type)
            beyond = expr < bound if key.descending else expr > bound
            strictly = or_(beyond, expr.is_(None)) if not key.nulls_first else beyond
            same = expr == bound
        disjuncts.append(and_(*equal_so_far, strictly) if equal_so_far else strictly)
        equal_so_far.append(same)
    disjuncts.append(and_(*equal_so_far, bindparam(_TIE, False, type_=Boolean) == true()))
    return or_(*disjuncts)


# SQLAlchemy 2.1 types a statement by its columns (``Select[User]``, ``Select[int, str]``),
# 2.0 by a tuple of them (``Select[tuple[User]]``): the first overload serves 2.0's one
# column, the other two 2.1 (and 2.0's several columns); the ignores are for the version
# each line is not written for.
@overload
def paginate(  # type: ignore[overload-overlap, unused-ignore]
    session: Session,
    stmt: Select[tuple[_T]],
    *,
    page_size: int,
    token: str | None = None,
    secret: bytes | None = None,
) -> Page[_T]: ...


@overload
def paginate(
    session: Session,
    stmt: Select[_T],  # type: ignore[type-var, unused-ignore]
    *,
    page_size: int,
    token: str | None = None,
    secret: bytes | None = None,
) -> Page[_T]: ...


@overload
def paginate(
    session: Session,
    stmt: Select[_T, _T2, Unpack[_Ts]],  # type: ignore[valid-type, type-arg, unused-ignore]
    *,
    page_size: int,
    token: str | None = None,
    secret: bytes | None = None,
) -> Page[Row[_T, _T2, Unpack[_Ts]]]: ...  # type: ignore[valid-type, type-arg, unused-ignore]


def paginate(
    session: Session,
    stmt: Select[Unpack[tuple[Any, ...]]],  # type: ignore[valid-type, type-arg, unused-ignore]
    *,
    page_size: int,
    token: str | None = None,
    secret: bytes | None = None,
) -> Page[Any]:
    """Return one page of ``stmt`` (ordered by its ORDER BY, then primary key, then shard).

    Pages stay consistent while rows are inserted or deleted elsewhere in the order:
    a page starts strictly after the previous page's last row.

    :param page_size: rows per page (>= 1).
    :param token: ``next_token`` of the previous page; ``None`` for the first page.
    :param secret: key for the token MAC; without it tokens detect corruption but can be
        forged (values still only reach SQL as bound parameters).
    :raises PageTokenError: the token is malformed, altered or from another query.

    Failure semantics: read-only; a failure leaves nothing behind.  Pages are separate
    queries, so they do not share one snapshot.
    """
    if not isinstance(page_size, int) or page_size < 1:
        raise ValueError("page_size must be an int >= 1")
    shards = _shards_of(session)
    dialects = [session.get_bind(shard_id=s).dialect.name for s in shards]
    keys = _keys(stmt, dialects)
    fingerprint = _fingerprint(stmt, page_size)
    visible = len(stmt.column_descriptions)

    # The statement's own ORDER BY stays as written (the merge plans its NULL placement);
    # only the primary key columns that make it total are appended.
    n_written = len(_compat.select_parts(stmt).order_by)
    page_stmt = stmt.order_by(*[k.expr.asc() for k in keys[n_written:]])
    shard_params: dict[str, dict[str, Any]] = {s: {_SHARD: s, _TIE: False} for s in shards}
    if token is not None:
        values, last_shard = decode_token(token, fingerprint, len(keys), secret)
        page_stmt = page_stmt.where(_after(keys, values))
        for s in shards:
            shard_params[s][_TIE] = last_shard is not None and s > last_shard
    page_stmt = page_stmt.add_columns(
        *[exact_float_key(k.expr).label(f"_shardsession_pk{i}") for i, k in enumerate(keys)],
        bindparam(_SHARD, None, type_=String).label("_shardsession_shard"),
    ).limit(page_size + 1)
    from . import SHARD_PARAMS_OPTION

    result = session.execute(page_stmt, execution_options={SHARD_PARAMS_OPTION: shard_params})
    frozen = result.freeze()
    full = frozen().all()
    rows = frozen().columns(*range(visible)).all()
    more = len(full) > page_size
    full, rows = full[:page_size], rows[:page_size]
    next_token = None
    if more and full:
        last = full[-1]
        next_token = encode_token(
            fingerprint,
            [last[visible + i] for i in range(len(keys))],
            last[visible + len(keys)],
            secret,
        )
    items = [r[0] for r in rows] if visible == 1 else list(rows)
    return Page(rows=list(rows), items=items, next_token=next_token)
