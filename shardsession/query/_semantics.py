"""Give a merge plan the value semantics of the shards it runs on.

The planner decides *what* is compared (sort keys, group keys, MIN/MAX partials,
DISTINCT columns); this module decides *how*, per :mod:`._dialect` and
:mod:`._collation`: every string value compared or grouped after the merge gets the
Python key of its collation on the shards (or the statement is refused when the shards
collate it differently, or in a way no Python key reproduces exactly); every NaN
compares as one value above all numbers (PostgreSQL's rule, the only backend that
stores NaN).  It also makes NULL ordering explicit in subqueries when shards of both
NULL conventions take part, so that an ``ORDER BY ... LIMIT`` inside a correlated
subquery picks the same row on every shard.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Connection
from sqlalchemy.sql import operators, visitors
from sqlalchemy.sql.elements import (
    BinaryExpression,
    ColumnClause,
    ColumnElement,
    FunctionFilter,
    UnaryExpression,
)
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.sql.selectable import Select
from sqlalchemy.types import Boolean, Enum, Integer, NullType, String

from .. import _compat
from ..exc import UnsupportedQueryError
from ._aggregates import Slot
from ._cache import LRUCache
from ._collation import BINARY, Collation, expression_collation, is_string, unwrap
from ._columns import as_clause
from ._dialect import ValueKey, enum_order_key, mixed_number_key, nan_safe
from ._plan import AggregatePlan, RowsPlan

__all__ = [
    "SEMANTICS_CACHE",
    "ValueSemantics",
    "apply_semantics",
    "check_having",
    "compound_sort_keys",
]

#: a function giving the connection of a shard (checked out in the calling thread)
ConnectionFor = Callable[[Any], Connection]


@dataclass(frozen=True)
class ValueSemantics:
    """Keys the merge applies where the plan does not carry them itself.

    :ivar distinct_keys: one key per visible column, for DISTINCT after the merge.
    :ivar group_keys: one key per group position, for grouping partial rows.
    """

    distinct_keys: tuple[ValueKey, ...] = ()
    group_keys: tuple[ValueKey, ...] = ()


class _Resolver:
    """Collations of expressions over the shards of one statement."""

    def __init__(
        self, shard_ids: Sequence[Any], dialects: Sequence[str], connection_for: ConnectionFor
    ) -> None:
        self.shard_ids = list(shard_ids)
        self.dialects = list(dialects)
        self.connection_for = connection_for
        self._conns: dict[Any, Connection] = {}
        #: shards of several backends: the same value may come back as different types
        self.mixed_types = len(set(self.dialects)) > 1

    def _conn(self, shard_id: Any) -> Connection:
        conn = self._conns.get(shard_id)
        if conn is None:
            conn = self._conns[shard_id] = self.connection_for(shard_id)
        return conn

    def key_for(self, expr: Any, what: str) -> ValueKey:
        """The key a string ``expr`` compares under on every shard; raise when the
        shards disagree or a collation is not reproduced exactly."""
        found: dict[str, Collation] = {}
        for shard_id, dialect in zip(self.shard_ids, self.dialects, strict=True):
            collation = expression_collation(expr, dialect, self._lazy(shard_id))
            found.setdefault(collation.ident, collation)
            if not collation.exact:
                raise UnsupportedQueryError(
                    f"{what} compares strings under collation {collation.name!r} on shard "
                    f"{shard_id!r}, which the merge cannot reproduce exactly; use a binary "
                    "collation (or an explicit COLLATE the merge knows) for this column",
                    construct=f"collation in {what}",
                    shard_id=shard_id,
                )
        if len(found) > 1:
            names = sorted(c.name for c in found.values())
            raise UnsupportedQueryError(
                f"{what} compares strings differently on different shards (collations "
                f"{names}): one database would use one of them",
                construct=f"collation in {what}",
            )
        collation = next(iter(found.values()), BINARY)
        if collation.key is None:
            return nan_safe
        return _strings_only(collation.key)

    def _lazy(self, shard_id: Any) -> Any:
        return _LazyConnection(lambda: self._conn(shard_id))


class _LazyConnection:
    """A connection opened only when a catalog must be read."""

    def __init__(self, open_: Callable[[], Connection]) -> None:
        self._open = open_
        self._conn: Connection | None = None

    def __getattr__(self, name: str) -> Any:
        if self._conn is None:
            self._conn = self._open()
        return getattr(self._conn, name)


def _strings_only(key: ValueKey) -> ValueKey:
    # An untyped function of a string column (lower(x), but also length(x)) may return
    # numbers: only strings compare under the collation.
    def on_strings(value: Any) -> Any:
        return key(value) if isinstance(value, str) else nan_safe(value)

    return on_strings


def _refusing_strings(error: UnsupportedQueryError) -> ValueKey:
    def refuse(value: Any) -> Any:
        if isinstance(value, str):
            raise error
        return nan_safe(value)

    return refuse


def _maybe_string(expr: ColumnElement[Any]) -> bool:
    """Whether an untyped expression (a function SQLAlchemy does not know) reads a
    string column: its result may be a string under that column's collation."""
    if not isinstance(expr.type, NullType):
        return False
    return any(
        isinstance(node, ColumnClause) and is_string(node.type)
        for node in visitors.iterate(expr)
    )


#: functions SQLAlchemy leaves untyped that return a string of a string argument
_STRING_FUNCTIONS = frozenset(
    {
        "lower", "upper", "trim", "ltrim", "rtrim", "substr", "substring", "replace",
        "left", "right", "lpad", "rpad", "reverse", "repeat", "initcap",
    }
)  # fmt: skip


def _returns_string(expr: Any) -> bool:
    """Whether ``expr`` (under labels and column-level DISTINCT) is one of
    :data:`_STRING_FUNCTIONS`."""
    plain = unwrap(expr)
    while isinstance(plain, UnaryExpression) and plain.operator is operators.distinct_op:
        plain = unwrap(plain.element)
    return isinstance(plain, FunctionElement) and str(getattr(plain, "name", "")).lower() in (
        _STRING_FUNCTIONS
    )


def _expr_at(descs: Sequence[dict[str, Any]], position: int) -> Any:
    return as_clause(descs[position].get("expr"))


def _is_string_expr(expr: Any) -> bool:
    return isinstance(expr, ColumnElement) and is_string(expr.type)


_NATIVE_ENUM_DIALECTS = ("postgresql", "mysql", "mariadb")


def _enum_key(expr: Any, what: str, resolver: _Resolver) -> ValueKey:
    """What a value of an ENUM column compares as: its declaration position where the
    shards store a native ENUM, its string (under the column's collation) where they
    store a string; refused when they differ, and for MIN/MAX on MySQL/MariaDB (which
    compare ENUMs by string there but order them by position)."""
    type_ = expr.type
    natives = {
        bool(type_.native_enum) and d in _NATIVE_ENUM_DIALECTS for d in resolver.dialects
    }
    if natives == {False}:
        return _stored_label_key(type_, resolver.key_for(expr, what))
    mysql = any(d in ("mysql", "mariadb") for d in resolver.dialects)
    if len(natives) > 1 or (mysql and what in ("MIN", "MAX")):
        raise UnsupportedQueryError(
            f"{what} over an ENUM that some shards order by declaration and others by "
            "its string cannot be merged exactly",
            construct=f"ENUM in {what}",
        )
    return enum_order_key(type_)


def _stored_label_key(type_: Any, string_key: ValueKey) -> ValueKey:
    """A non-native ENUM compares as the string the database stores: for an ``Enum``
    of a Python enum class, the member's label (its name, or ``values_callable``'s
    value), under ``string_key`` (the column's collation)."""
    enum_class = getattr(type_, "enum_class", None)
    if enum_class is None:
        return string_key
    members = list(enum_class)
    values_callable = getattr(type_, "values_callable", None)
    labels = values_callable(enum_class) if values_callable else [m.name for m in members]
    label_of = dict(zip(members, labels, strict=False))

    def key(value: Any) -> Any:
        return string_key(label_of.get(value, value))

    return key


def _value_key(expr: Any, what: str, resolver: _Resolver) -> ValueKey:
    """What values of ``expr`` compare and group as on the shards (``nan_safe``: as
    themselves, NaN as one value)."""
    if not isinstance(expr, ColumnElement):
        return nan_safe
    if isinstance(expr.type, Enum):
        return _enum_key(expr, what, resolver)
    if is_string(expr.type):
        return resolver.key_for(expr, what)
    if _maybe_string(expr):
        if _returns_string(expr):
            # lower(x) and its kind are strings: refuse before any shard is asked
            return resolver.key_for(expr, what)
        try:
            return resolver.key_for(expr, what)
        except UnsupportedQueryError as err:
            # length(x) of such a column is a number: refuse only if strings come back
            return _refusing_strings(err)
    if resolver.mixed_types and not isinstance(expr.type, Integer | Boolean | String):
        # one shard's driver may return a float where another returns a Decimal
        return mixed_number_key
    return nan_safe


def _aggregate_argument(expr: Any) -> Any:
    plain = unwrap(expr)
    if isinstance(plain, FunctionFilter):
        plain = plain.func
    if isinstance(plain, FunctionElement):
        args = list(plain.clauses.clauses)
        if len(args) == 1:
            return args[0]
    return plain


@dataclass(frozen=True)
class _Recipe:
    """What :func:`apply_semantics` decided for one statement shape on some engines."""

    engines: tuple[Any, ...]
    sort_keys: tuple[ValueKey | None, ...]
    slot_keys: tuple[ValueKey | None, ...]
    semantics: ValueSemantics | None


#: decisions by (statement cache key, dialects, shard ids); an entry keeps its engines
#: alive and is used only for the same engine objects (their catalogs were read)
SEMANTICS_CACHE: LRUCache[_Recipe] = LRUCache(1024)


def apply_semantics(
    plan: RowsPlan | AggregatePlan,
    shard_ids: Sequence[Any],
    dialects: Sequence[str],
    connection_for: ConnectionFor,
    *,
    cache_key: Hashable | None = None,
    engines: Sequence[Any] = (),
) -> tuple[RowsPlan | AggregatePlan, ValueSemantics | None]:
    """``plan`` with collation keys on its sort keys and MIN/MAX slots, and the keys the
    merge applies to DISTINCT and GROUP BY values.

    A string column's collation may be read from a shard's catalog (once per engine and
    table), on the session's connection of that shard.  With ``cache_key`` (the
    statement's structural cache key) and the shards' ``engines``, the decisions are
    kept in :data:`SEMANTICS_CACHE`; refusals are not cached.

    :raises UnsupportedQueryError: a compared string column collates differently on two
        shards, or under a collation no Python key reproduces exactly.

    Failure semantics: raised before the statement is sent to any shard; a catalog
    read may have begun the session's transaction on a shard (as the fan-out itself
    would have), nothing was written.
    """
    if isinstance(plan, RowsPlan) and not plan.sort_keys and not plan.distinct:
        return plan, None
    key = None
    if cache_key is not None and engines:
        key = (cache_key, tuple(dialects), tuple(shard_ids), isinstance(plan, RowsPlan))
        hit = SEMANTICS_CACHE.get(key)
        if (
            hit is not None
            and len(hit.engines) == len(engines)
            and all(a is b for a, b in zip(hit.engines, engines, strict=True))
        ):
            return _replay(plan, hit), hit.semantics
    resolver = _Resolver(shard_ids, dialects, connection_for)
    descs = plan.statement.column_descriptions
    refined: RowsPlan | AggregatePlan
    if isinstance(plan, RowsPlan):
        refined, semantics = _rows(plan, descs, resolver)
    else:
        refined, semantics = _aggregate(plan, descs, resolver)
    if key is not None:
        slots = refined.slots if isinstance(refined, AggregatePlan) else []
        SEMANTICS_CACHE.put(
            key,
            _Recipe(
                tuple(engines),
                tuple(k.key for k in refined.sort_keys),
                tuple(s.key for s in slots),
                semantics,
            ),
        )
    return refined, semantics


def _replay(plan: RowsPlan | AggregatePlan, recipe: _Recipe) -> RowsPlan | AggregatePlan:
    if not any(recipe.sort_keys) and not any(recipe.slot_keys):
        return plan  # no collation key anywhere: NaN is handled by default
    sort_keys = [
        k if v is None else dataclasses.replace(k, key=v)
        for k, v in zip(plan.sort_keys, recipe.sort_keys, strict=True)
    ]
    if isinstance(plan, RowsPlan):
        return dataclasses.replace(plan, sort_keys=sort_keys)
    slots = [
        s if v is None else dataclasses.replace(s, key=v)
        for s, v in zip(plan.slots, recipe.slot_keys, strict=True)
    ]
    return dataclasses.replace(plan, sort_keys=sort_keys, slots=slots)


def _rows(
    plan: RowsPlan, descs: Sequence[dict[str, Any]], resolver: _Resolver
) -> tuple[RowsPlan, ValueSemantics | None]:
    sort_keys = []
    for key in plan.sort_keys:
        value_key = _value_key(_expr_at(descs, key.index), "ORDER BY", resolver)
        if value_key is not nan_safe:
            key = dataclasses.replace(key, key=value_key)
        sort_keys.append(key)
    distinct_keys = (
        _distinct_keys(descs, range(plan.visible), resolver) if plan.distinct else ()
    )
    return dataclasses.replace(plan, sort_keys=sort_keys), ValueSemantics(distinct_keys)


def _distinct_keys(
    descs: Sequence[dict[str, Any]], positions: Iterable[int], resolver: _Resolver
) -> tuple[ValueKey, ...]:
    """What DISTINCT compares each visible column (at ``positions``) as."""
    return tuple(_equality_key(_expr_at(descs, p), "DISTINCT", resolver) for p in positions)


def _equality_key(expr: Any, what: str, resolver: _Resolver) -> ValueKey:
    # Equality of ENUM values is equality of labels on every backend.
    if isinstance(expr, ColumnElement) and isinstance(expr.type, Enum):
        natives = {
            bool(expr.type.native_enum) and d in _NATIVE_ENUM_DIALECTS
            for d in resolver.dialects
        }
        if True in natives:
            return nan_safe
    return _value_key(expr, what, resolver)


def _aggregate(
    plan: AggregatePlan, descs: Sequence[dict[str, Any]], resolver: _Resolver
) -> tuple[AggregatePlan, ValueSemantics]:
    slots: list[Slot] = []
    for slot in plan.slots:
        if slot.kind in ("min", "max"):
            arg = _aggregate_argument(_expr_at(descs, slot.positions[0]))
            value_key = _value_key(arg, slot.kind.upper(), resolver)
            if value_key is not nan_safe:
                slot = dataclasses.replace(slot, key=value_key)
        slots.append(slot)
    group_keys = tuple(
        _equality_key(_expr_at(descs, p), "GROUP BY", resolver) for p in plan.group_positions
    )
    sort_keys = []
    for key in plan.sort_keys:
        slot = plan.slots[key.index]
        expr = _expr_at(descs, slot.positions[0])
        if slot.kind in ("min", "max"):
            arg = _aggregate_argument(expr)
            if isinstance(arg, ColumnElement) and isinstance(arg.type, Enum):
                # ORDER BY MIN(enum): the merged value is compared as MIN compared it
                value_key = _value_key(arg, slot.kind.upper(), resolver)
            else:
                value_key = _value_key(expr, "ORDER BY", resolver)
        elif slot.kind == "key":
            value_key = _value_key(expr, "ORDER BY", resolver)
        else:
            value_key = nan_safe
        if value_key is not nan_safe:
            key = dataclasses.replace(key, key=value_key)
        sort_keys.append(key)
    distinct_keys = (
        _distinct_keys(descs, (s.positions[0] for s in plan.slots[: plan.visible]), resolver)
        if plan.distinct
        else ()
    )
    refined = dataclasses.replace(plan, slots=slots, sort_keys=sort_keys)
    return refined, ValueSemantics(distinct_keys, group_keys)


_COMPARISONS = {
    operators.eq,
    operators.ne,
    operators.lt,
    operators.le,
    operators.gt,
    operators.ge,
}


def check_having(
    statement: Select[Any],
    shard_ids: Sequence[Any],
    dialects: Sequence[str],
    connection_for: ConnectionFor,
) -> None:
    """Refuse a HAVING that compares strings under a collation other than binary (it
    is evaluated in Python, by code point).

    :raises UnsupportedQueryError: such a comparison.
    """
    having = _compat.select_parts(statement).having
    if not having:
        return
    resolver = _Resolver(shard_ids, dialects, connection_for)
    for criterion in having:
        for node in visitors.iterate(criterion):
            if isinstance(node, BinaryExpression) and node.operator in _COMPARISONS:
                for side in (node.left, node.right):
                    if (
                        (_is_string_expr(side) or _maybe_string(side))
                        and not _is_bound(side)
                        and resolver.key_for(side, "HAVING") is not nan_safe
                    ):
                        raise UnsupportedQueryError(
                            "HAVING compares strings under a collation other than "
                            "binary; it is evaluated after the merge by code point",
                            construct="collation in HAVING",
                        )


def _is_bound(expr: Any) -> bool:
    from sqlalchemy.sql.elements import BindParameter

    return isinstance(unwrap(expr), BindParameter)


def compound_sort_keys(
    sort_keys: Sequence[Any],
    branches: Sequence[Select[Any]],
    shard_ids: Sequence[Any],
    dialects: Sequence[str],
    connection_for: ConnectionFor,
) -> list[Any]:
    """The ORDER BY keys of a UNION / UNION ALL with the collation its column compares
    under on the shards, as a plain SELECT's ORDER BY gets (:func:`apply_semantics`).

    A column of the UNION is each branch's column at that position: every branch must
    compare its strings under the same collation.

    :raises UnsupportedQueryError: the branches or shards collate the column
        differently, or under a collation no Python key reproduces exactly (before any
        shard is asked; a catalog read may have begun the session's transaction).
    """
    resolver = _Resolver(shard_ids, dialects, connection_for)
    out = []
    for key in sort_keys:
        exprs = [list(b.selected_columns)[key.index] for b in branches]
        value_keys = [_value_key(e, "ORDER BY of a UNION", resolver) for e in exprs]
        if all(v is nan_safe for v in value_keys):
            out.append(key)
            continue
        idents = {
            expression_collation(e, d, resolver._lazy(sid)).ident
            for e in exprs
            if is_string(getattr(e, "type", None)) or _maybe_string(e)
            for sid, d in zip(resolver.shard_ids, resolver.dialects, strict=True)
        }
        if len(idents) > 1 or len({v is nan_safe for v in value_keys}) > 1:
            raise UnsupportedQueryError(
                "the branches of a UNION compare the ORDER BY column's strings under "
                "different collations; one database would use one of them",
                construct="collation in ORDER BY of a UNION",
            )
        out.append(dataclasses.replace(key, key=value_keys[0]))
    return out
