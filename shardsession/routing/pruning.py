"""Shard pruning: which shard key values can a WHERE clause match?

The analysis is conservative: whenever it cannot prove that a clause restricts the key,
it answers "unconstrained" and the statement fans out to every candidate shard. A wrong
"constrained" answer would silently lose rows, so every construct not understood here
falls back to unconstrained.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy.sql import operators
from sqlalchemy.sql.elements import (
    BinaryExpression,
    BindParameter,
    BooleanClauseList,
    ClauseElement,
    ColumnElement,
    Grouping,
)

__all__ = ["MAX_KEY_COMBINATIONS", "key_values"]

#: above this many key combinations we stop enumerating and fan out instead
MAX_KEY_COMBINATIONS = 10_000

# A constraint in disjunctive normal form: a list of boxes (OR), each box maps a key
# position to the set of values it may take (AND). ``[{}]`` is "unconstrained", ``[]`` is
# "matches nothing".
_Box = dict[int, frozenset[Any]]
_DNF = list[_Box]
_UNCONSTRAINED: _DNF = [{}]
_NOTHING = object()


def _position(col: Any, key_columns: Sequence[ColumnElement[Any]]) -> int | None:
    if not isinstance(col, ColumnElement):
        return None
    proxies = getattr(col, "proxy_set", None)
    if not proxies:
        return None
    for i, key_col in enumerate(key_columns):
        if key_col in proxies:
            return i
    return None


def _bind_value(element: Any, params: Mapping[str, Any]) -> Any:
    if not isinstance(element, BindParameter):
        return _NOTHING
    if element.key in params:
        value = params[element.key]
    elif element.callable is not None:
        value = element.effective_value
    elif element.value is None:
        return _NOTHING
    else:
        value = element.value
    return value


def _coerce(values: Sequence[Any], python_type: type | None) -> frozenset[Any] | None:
    out = []
    for v in values:
        if v is None:
            return None
        # A value of another type than the column's (``User.id == "5"``) is coerced by
        # the database, not by us: its placement is unknowable here, so do not prune.
        if python_type is not None and (
            not isinstance(v, python_type) or (isinstance(v, bool) and python_type is not bool)
        ):
            return None
        try:
            hash(v)
        except TypeError:
            return None
        out.append(v)
    return frozenset(out)


def _leaf(
    clause: BinaryExpression[Any],
    key_columns: Sequence[ColumnElement[Any]],
    params: Mapping[str, Any],
    types: Sequence[type | None],
) -> _DNF:
    op = clause.operator
    for col, other in ((clause.left, clause.right), (clause.right, clause.left)):
        pos = _position(col, key_columns)
        if pos is None:
            continue
        if op is operators.eq:
            value = _bind_value(other, params)
            if value is _NOTHING:
                return _UNCONSTRAINED
            values = _coerce([value], types[pos])
        elif op is operators.in_op and col is clause.left:
            value = _bind_value(other, params)
            if value is _NOTHING or not isinstance(value, list | tuple | set | frozenset):
                return _UNCONSTRAINED
            if isinstance(other, BindParameter) and not other.expanding:
                return _UNCONSTRAINED
            values = _coerce(list(value), types[pos])
        else:
            return _UNCONSTRAINED
        if values is None:
            return _UNCONSTRAINED
        return [{pos: values}]
    return _UNCONSTRAINED


def _and(a: _DNF, b: _DNF) -> _DNF:
    out: _DNF = []
    for x, y in itertools.product(a, b):
        box = dict(x)
        empty = False
        for pos, vals in y.items():
            merged = box[pos] & vals if pos in box else vals
            if not merged:
                empty = True
                break
            box[pos] = merged
        if not empty:
            out.append(box)
        if len(out) > MAX_KEY_COMBINATIONS:
            return _UNCONSTRAINED
    return out


def _walk(
    clause: Any,
    key_columns: Sequence[ColumnElement[Any]],
    params: Mapping[str, Any],
    types: Sequence[type | None],
) -> _DNF:
    while isinstance(clause, Grouping):
        clause = clause.element
    if isinstance(clause, BooleanClauseList):
        parts = [_walk(c, key_columns, params, types) for c in clause.clauses]
        if clause.operator is operators.and_:
            acc = _UNCONSTRAINED
            for p in parts:
                acc = _and(acc, p)
            return acc
        if clause.operator is operators.or_:
            if any(p == _UNCONSTRAINED for p in parts):
                return _UNCONSTRAINED
            return [box for p in parts for box in p]
        return _UNCONSTRAINED
    if isinstance(clause, BinaryExpression):
        return _leaf(clause, key_columns, params, types)
    return _UNCONSTRAINED


def key_python_type(col: ColumnElement[Any]) -> type | None:
    """The Python type of a key column's values where keys are compared by it (``int``,
    ``str``, ``bytes``, UUID, Decimal, dates); ``None`` for any other."""
    try:
        t = col.type.python_type
    except (NotImplementedError, AttributeError):
        return None
    # bool is an int; an int column compared to True is not something to prune on
    return t if t in (int, str, bytes) or t.__module__ in ("uuid", "decimal", "datetime") else None


def key_values(
    where: ClauseElement | None,
    key_columns: Sequence[ColumnElement[Any]],
    params: Mapping[str, Any] | None = None,
) -> list[tuple[Any, ...]] | None:
    """Return every key tuple the clause can match, or ``None`` when it is unconstrained.

    An empty list means the clause can match no row at all (``id IN ()`` or ``id = 1 AND
    id = 2``).
    """
    if where is None:
        return None
    types = [key_python_type(c) for c in key_columns]
    dnf = _walk(where, key_columns, params or {}, types)
    combos: set[tuple[Any, ...]] = set()
    for box in dnf:
        if len(box) < len(key_columns):
            return None
        product = 1
        for vals in box.values():
            product *= len(vals)
        if product + len(combos) > MAX_KEY_COMBINATIONS:
            return None
        for combo in itertools.product(
            *(sorted(box[i], key=repr) for i in range(len(key_columns)))
        ):
            combos.add(combo)
    return sorted(combos, key=repr)
