"""Value semantics per dialect, in one table: what the merge and the tests' oracle read.

Everything that makes "the same value" or "the smaller value" depend on the backend lives
here: where NULL sorts, whether NaN exists and where it sorts, how AVG is divided, how a
REAL column's partial sums must be widened, and how each known string collation compares
(as a Python key function, exact, or no key at all: the caller then refuses).

Nothing here touches a database (server introspection is :mod:`._collation`).
"""

from __future__ import annotations

import decimal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Double, cast
from sqlalchemy.sql import operators
from sqlalchemy.sql.elements import (
    ClauseElement,
    ColumnClause,
    ColumnElement,
    Grouping,
    Label,
    UnaryExpression,
)
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.types import REAL, Float, NullType, TypeEngine

__all__ = [
    "DIALECTS",
    "NAN_KEY",
    "DialectRules",
    "ValueKey",
    "add_numbers",
    "ascii_nocase_key",
    "avg_sum_argument",
    "enum_order_key",
    "exact_float_key",
    "is_nan",
    "is_single_precision",
    "mixed_number_key",
    "nan_safe",
    "pad_space_key",
    "rtrim_key",
    "rules_for",
]

#: a function from a (non-NULL) value to what it compares and groups as
ValueKey = Callable[[Any], Any]


@dataclass(frozen=True)
class DialectRules:
    """How one backend compares, groups and aggregates values.

    :ivar nulls_high: NULL sorts above every value (NULLS LAST for ASC by default).
    :ivar nulls_syntax: ``NULLS FIRST/LAST`` is understood in ORDER BY.
    :ivar stores_nan: a float column can hold NaN.  Where it does (PostgreSQL), NaN
        equals NaN (one group, one DISTINCT value) and sorts above every number; the
        others store NULL (SQLite) or reject it (MySQL/MariaDB), so a NaN can only come
        from a shard that follows PostgreSQL's rule, and the merge applies that rule to
        every NaN it sees.
    :ivar real_avg_widens: AVG over a single-precision column accumulates in double
        precision while SUM stays single (PostgreSQL ``avg(real)`` is ``float8``,
        ``sum(real)`` is ``real``): AVG's partial SUM must be cast to double.
    :ivar avg_rule: how :func:`._aggregates.finalize_avg` divides (``None``: not modelled).
    :ivar bool_sum_is_int: ``SUM(boolean)`` is allowed and counts TRUE values (SQLite,
        MySQL/MariaDB store booleans as integers; PostgreSQL has no ``sum(boolean)``).
    """

    nulls_high: bool
    nulls_syntax: bool
    stores_nan: bool
    real_avg_widens: bool
    avg_rule: str | None
    bool_sum_is_int: bool


DIALECTS: dict[str, DialectRules] = {
    "postgresql": DialectRules(
        nulls_high=True,
        nulls_syntax=True,
        stores_nan=True,
        real_avg_widens=True,
        avg_rule="postgresql",
        bool_sum_is_int=False,
    ),
    "sqlite": DialectRules(
        nulls_high=False,
        nulls_syntax=True,  # SQLite >= 3.30
        stores_nan=False,
        real_avg_widens=False,
        avg_rule="sqlite",
        bool_sum_is_int=True,
    ),
    "mysql": DialectRules(
        nulls_high=False,
        nulls_syntax=False,
        stores_nan=False,
        real_avg_widens=False,
        avg_rule="mysql",
        bool_sum_is_int=True,
    ),
    "mariadb": DialectRules(
        nulls_high=False,
        nulls_syntax=False,
        stores_nan=False,
        real_avg_widens=False,
        avg_rule="mysql",
        bool_sum_is_int=True,
    ),
    "oracle": DialectRules(
        nulls_high=True,
        nulls_syntax=True,
        stores_nan=True,
        real_avg_widens=False,
        avg_rule=None,
        bool_sum_is_int=False,
    ),
}

_UNKNOWN = DialectRules(
    nulls_high=False,
    nulls_syntax=False,
    stores_nan=True,
    real_avg_widens=False,
    avg_rule=None,
    bool_sum_is_int=False,
)


def rules_for(dialect_name: str) -> DialectRules:
    """The rules of ``dialect_name`` (an unknown dialect gets conservative ones)."""
    return DIALECTS.get(dialect_name, _UNKNOWN)


# -- NaN ---------------------------------------------------------------------------------


class _NaNKey:
    """What every NaN compares as: equal to itself, above every number (PostgreSQL)."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        return other is self

    def __ne__(self, other: object) -> bool:
        return other is not self

    def __lt__(self, other: object) -> bool:
        return False

    def __le__(self, other: object) -> bool:
        return other is self

    def __gt__(self, other: object) -> bool:
        return other is not self

    def __ge__(self, other: object) -> bool:
        return True

    def __hash__(self) -> int:
        return 0x4E614E

    def __repr__(self) -> str:
        return "NaN"


#: the single value every float or Decimal NaN is replaced by when compared or grouped
NAN_KEY: Any = _NaNKey()


def is_nan(value: Any) -> bool:
    """Whether ``value`` is a float or Decimal NaN (the only values unequal to themselves
    among what drivers return)."""
    return isinstance(value, float | decimal.Decimal) and value != value


def nan_safe(value: Any) -> Any:
    """``value``, or :data:`NAN_KEY` for a NaN: totally ordered, hashable, equal to itself.

    Numbers compare with ``NAN_KEY`` through its reflected operators (``1 < NAN_KEY``
    asks ``NAN_KEY.__gt__``), so a plain ``<`` between mixed values is right.
    """
    if value != value and isinstance(value, float | decimal.Decimal):
        return NAN_KEY
    return value


def mixed_number_key(value: Any) -> Any:
    """What a number compares and groups as when shards of different backends return
    the same column as different Python types (SQLite a float ``1.1``, PostgreSQL a
    ``Decimal('1.10')``): a float as the Decimal of its shortest repr, so both are one
    value; NaN as :data:`NAN_KEY`; anything else as :func:`nan_safe` gives it."""
    if isinstance(value, float):
        if value != value:
            return NAN_KEY
        return decimal.Decimal(repr(value))
    return nan_safe(value)


def add_numbers(a: Any, b: Any) -> Any:
    """``a + b`` for partial sums, also when one shard's driver returned a ``Decimal``
    and another's a float for the same column (the sum is then a ``Decimal``, the float
    taken by its shortest repr)."""
    try:
        return a + b
    except TypeError:
        if isinstance(a, float) and isinstance(b, decimal.Decimal):
            return decimal.Decimal(repr(a)) + b
        if isinstance(a, decimal.Decimal) and isinstance(b, float):
            return a + decimal.Decimal(repr(b))
        raise


def nan_aware(key: ValueKey | None) -> ValueKey:
    """``key`` (or identity) with NaN mapped to :data:`NAN_KEY` first."""
    if key is None:
        return nan_safe

    def both(value: Any) -> Any:
        return key(nan_safe(value))

    return both


# -- REAL precision --------------------------------------------------------------------


def is_single_precision(type_: Any) -> bool:
    """Whether ``type_`` is a single-precision float (``REAL``, ``Float(precision<=24)``)."""
    return isinstance(type_, REAL) or (
        isinstance(type_, Float) and type_.precision is not None and type_.precision <= 24
    )


def _reads_single_precision(expr: Any) -> bool:
    # A float-typed expression over a REAL column (abs(r), coalesce(r, 0.5), r * 2) is
    # single precision on PostgreSQL too (its functions and operators keep float4).
    stack = [expr]
    while stack:
        node = stack.pop()
        if isinstance(node, ColumnClause) and is_single_precision(node.type):
            return True
        if isinstance(node, ClauseElement):
            stack.extend(node.get_children())
    return False


#: functions that return their (float) argument's type on PostgreSQL
_FLOAT_PRESERVING = frozenset(
    {"abs", "sign", "ceil", "ceiling", "floor", "trunc", "coalesce", "nullif", "greatest",
     "least"}
)


def _float_preserving(expr: Any) -> bool:
    """Whether ``expr`` is (a negation of) a function of :data:`_FLOAT_PRESERVING`."""
    while True:
        if isinstance(expr, Grouping | Label) or (
            isinstance(expr, UnaryExpression) and expr.operator is operators.neg
        ):
            expr = expr.element
        else:
            break
    return isinstance(expr, FunctionElement) and str(getattr(expr, "name", "")).lower() in (
        _FLOAT_PRESERVING)


def avg_sum_argument(arg: Any, dialects: Sequence[str]) -> Any:
    """The argument of AVG's partial SUM: a single-precision expression cast to double
    where the dialect's AVG accumulates in double (so the partials keep the precision
    the one database's AVG has).  An expression counts as single precision when its
    type is (``REAL``, ``Float(precision<=24)``), or when it is float-typed and reads a
    single-precision column; integer and numeric expressions are never cast (their AVG
    is exact numeric)."""
    type_: TypeEngine[Any] | None = getattr(arg, "type", None)
    if (
        isinstance(type_, NullType)
        and _float_preserving(arg)
        and _reads_single_precision(arg)
        and any(rules_for(d).real_avg_widens for d in dialects)
    ):
        # an untyped function SQLAlchemy does not know (func.abs(r)): single precision
        # when it keeps its REAL argument's type
        return cast(arg, Double())
    if not (
        isinstance(arg, ColumnElement)
        and isinstance(type_, Float)
        and not type_.asdecimal
        and any(rules_for(d).real_avg_widens for d in dialects)
    ):
        return arg
    if is_single_precision(type_) or _reads_single_precision(arg):
        return cast(arg, Double())
    return arg


# -- collations as Python keys -----------------------------------------------------------

_ASCII_FOLD = {c: c + 32 for c in range(ord("A"), ord("Z") + 1)}


def ascii_nocase_key(value: str) -> str:
    """SQLite ``NOCASE``: ASCII letters folded to lower case, everything else by code
    point (SQLite folds only A-Z)."""
    return value.translate(_ASCII_FOLD)


def rtrim_key(value: str) -> str:
    """SQLite ``RTRIM``: binary, trailing spaces ignored."""
    return value.rstrip(" ")


def pad_space_key(units: Sequence[int], space: int) -> tuple[Any, ...]:
    """A tuple that compares like ``units`` padded with ``space`` units to any length
    (SQL's PAD SPACE semantics: ``'a'`` equals ``'a '`` and sorts after ``'a\\t'``).

    Trailing spaces are dropped; every run of spaces inside becomes one element that
    compares, against a shorter string or a shorter run, as the character after the run
    compares with a space.  Equal padded strings give equal (hashable) keys.
    """
    out: list[tuple[Any, ...]] = []
    run = 0
    for unit in units:
        if unit == space:
            run += 1
            continue
        if run:
            if unit > space:
                out.append((space, 2, -run, unit))
            else:
                out.append((space, 0, run, unit))
            run = 0
        else:
            out.append((unit,))
    out.append((space, 1))  # the end: spaces forever
    return tuple(out)


def code_point_pad_key(value: str) -> tuple[Any, ...]:
    """A binary PAD SPACE collation (MariaDB ``utf8mb4_bin``): code points, padded."""
    return pad_space_key([ord(c) for c in value], 32)


def weight_table_pad_key(table: Sequence[int], beyond: int, space: int) -> ValueKey:
    """A per-character weight collation with PAD SPACE (MariaDB ``*_general_ci``):
    ``table[code point]`` for the Basic Multilingual Plane, ``beyond`` above it."""
    size = len(table)

    def key(value: str) -> tuple[Any, ...]:
        units = [table[o] if (o := ord(c)) < size else beyond for c in value]
        return pad_space_key(units, space)

    return key


def enum_order_key(type_: Any) -> ValueKey:
    """A native ENUM's order (PostgreSQL, MySQL/MariaDB): the position of its label in
    the declaration, for the label string or the Python enum member the type returns."""
    order = {label: i for i, label in enumerate(type_.enums)}
    enum_class = getattr(type_, "enum_class", None)
    if enum_class is not None:
        values_callable = getattr(type_, "values_callable", None)
        members = list(enum_class)
        labels = values_callable(enum_class) if values_callable else [m.name for m in members]
        for member, label in zip(members, labels, strict=False):
            if label in order:
                order[member] = order[label]

    def key(value: Any) -> int:
        return order[value]

    return key


def exact_float_key(expr: Any) -> Any:
    """``expr`` as a page token should read it: a float column cast to double precision.

    Drivers return a single-precision value as the shortest decimal that reads back as
    the same single-precision number (``-1.7``); sent back in a page condition, the
    server compares it as double precision, where it is not the stored value
    (``-1.70000004...``), and rows tied with a page's last row are lost or repeated.
    Read as double precision, the value is exact and compares equal on every backend
    (a double column is unchanged).
    """
    type_ = getattr(expr, "type", None)
    if isinstance(type_, Float) and not type_.asdecimal:
        return cast(expr, Double())
    return expr
