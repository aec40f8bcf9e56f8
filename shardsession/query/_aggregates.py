"""Pure aggregate merging: partial results per shard combined into what one database
would compute, including each backend's AVG precision rules.

Rows are plain tuples of processed values; the slots say where each partial is.
"""

from __future__ import annotations

import decimal
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ..exc import UnsupportedQueryError
from ._dialect import ValueKey, add_numbers, nan_safe, rules_for

__all__ = [
    "GroupMerger",
    "Slot",
    "finalize_avg",
    "pg_numeric_div",
]

#: the aggregate kinds merged exactly
KINDS = ("count", "sum", "min", "max", "avg")


@dataclass(frozen=True)
class Slot:
    """One value of a merged group row and where its partials are in a shard's row.

    ``kind`` is ``"key"`` (a GROUP BY value or a value functionally dependent on it: any
    shard's value will do), one of :data:`KINDS`, or of :data:`DISTINCT_KINDS` (its
    position holds one distinct value of the argument). ``positions`` holds one position,
    or two (SUM, COUNT) for ``"avg"``.  ``key`` is what MIN/MAX compare values as (a
    string collation); without one, values compare as themselves and NaN as the
    largest number.
    """

    kind: str
    positions: tuple[int, ...]
    key: ValueKey | None = None
    #: a SUM over a Boolean argument: the merged integer total given as a bool, as the
    #: Boolean result processor gives one database's SUM (SQLite, MySQL/MariaDB)
    as_bool: bool = False


_MISSING = object()


def _add_sum(acc: Any, value: Any) -> Any:
    # SQL SUM ignores NULLs and is NULL only when every input is NULL.
    if value is None:
        return acc
    if acc is None:
        return value
    try:
        return add_numbers(acc, value)
    except TypeError as err:
        raise UnsupportedQueryError(
            f"cannot add {type(value).__name__} to {type(acc).__name__} returned by "
            "different shards",
            construct="SUM",
        ) from err


def _pick(
    acc: Any, value: Any, better: Callable[[Any, Any], bool], key: ValueKey
) -> Any:
    if value is None:
        return acc
    if acc is None:
        return value
    try:
        return value if better(key(value), key(acc)) else acc
    except TypeError as err:
        raise UnsupportedQueryError(
            f"cannot compare {type(value).__name__} with {type(acc).__name__} "
            "returned by different shards",
            construct="MIN/MAX",
        ) from err


#: aggregates over DISTINCT x, merged from the distinct values of x of every shard
DISTINCT_KINDS = ("count_distinct", "sum_distinct", "avg_distinct")


def _add_distinct(values: dict[Any, Any], value: Any) -> None:
    # keyed as the databases compare them: every NaN one value (a set keeps each NaN
    # object apart, NaN != NaN)
    try:
        values.setdefault(nan_safe(value), value)
    except TypeError as err:
        raise UnsupportedQueryError(
            "DISTINCT aggregates over values of an unhashable type cannot be merged",
            construct="aggregate(DISTINCT)",
        ) from err


def _finish_distinct(kind: str, values: dict[Any, Any], avg_dialect: str) -> Any:
    if kind == "count_distinct":
        return len(values)
    total = None
    for value in values.values():
        total = _add_sum(total, value)
    if kind == "sum_distinct":
        # MySQL's SUM of exact values is a DECIMAL, as its partial SUMs are.
        if isinstance(total, int) and avg_dialect in ("mysql", "mariadb"):
            return decimal.Decimal(total)
        return total
    return finalize_avg(total, len(values), avg_dialect)


class GroupMerger:
    """Hash aggregation of per-shard partial rows into final group rows.

    Memory is proportional to the number of groups (not rows).
    """

    def __init__(
        self,
        slots: Sequence[Slot],
        group_positions: Sequence[int],
        avg_dialect: str,
        group_keys: Sequence[ValueKey] = (),
    ) -> None:
        self.slots = tuple(slots)
        self.group_positions = tuple(group_positions)
        self.avg_dialect = avg_dialect
        #: what each group value is grouped as: its collation key, or itself with every
        #: NaN as one value (PostgreSQL puts all NaNs in one group)
        self.group_keys = tuple(group_keys) or (nan_safe,) * len(self.group_positions)
        self._groups: dict[tuple[Any, ...], list[Any]] = {}

    def _initial(self) -> list[Any]:
        state: list[Any] = []
        for slot in self.slots:
            if slot.kind == "key":
                state.append(_MISSING)
            elif slot.kind == "count":
                state.append(0)
            elif slot.kind == "avg":
                state.append([None, 0])
            elif slot.kind in DISTINCT_KINDS:
                state.append({})
            else:
                state.append(None)
        return state

    def add(self, row: Sequence[Any]) -> None:
        """Fold one shard's partial row into its group."""
        key = tuple(
            None if (v := row[p]) is None else k(v)
            for p, k in zip(self.group_positions, self.group_keys, strict=True)
        )
        try:
            state = self._groups.get(key)
        except TypeError as err:
            raise UnsupportedQueryError(
                "GROUP BY values of an unhashable type cannot be merged",
                construct="GROUP BY",
            ) from err
        if state is None:
            state = self._initial()
            self._groups[key] = state
        for i, slot in enumerate(self.slots):
            kind = slot.kind
            value = row[slot.positions[0]]
            if kind == "key":
                if state[i] is _MISSING:
                    state[i] = value
            elif kind == "count":
                state[i] += value or 0
            elif kind == "sum":
                state[i] = _add_sum(state[i], value)
            elif kind == "min":
                state[i] = _pick(state[i], value, operator.lt, slot.key or nan_safe)
            elif kind == "max":
                state[i] = _pick(state[i], value, operator.gt, slot.key or nan_safe)
            elif kind in DISTINCT_KINDS:
                if value is not None:  # (SQL's DISTINCT aggregates skip NULLs)
                    _add_distinct(state[i], value)
            else:  # avg: (sum, count) partials
                pair = state[i]
                pair[0] = _add_sum(pair[0], value)
                pair[1] += row[slot.positions[1]] or 0

    def add_all(self, rows: Iterable[Sequence[Any]]) -> None:
        for row in rows:
            self.add(row)

    def results(self, *, empty_group: bool) -> list[tuple[Any, ...]]:
        """The merged group rows, one value per slot.

        :param empty_group: produce one row even when no shard returned any (an
            aggregate without GROUP BY always yields one row: COUNT 0, SUM NULL).
        """
        groups = list(self._groups.values())
        if not groups and empty_group:
            groups = [self._initial()]
        out = []
        for state in groups:
            values = []
            for slot, acc in zip(self.slots, state, strict=True):
                if slot.kind == "key":
                    values.append(None if acc is _MISSING else acc)
                elif slot.kind == "avg":
                    values.append(finalize_avg(acc[0], acc[1], self.avg_dialect))
                elif slot.kind in DISTINCT_KINDS:
                    values.append(_finish_distinct(slot.kind, acc, self.avg_dialect))
                elif slot.as_bool:
                    values.append(None if acc is None else bool(acc))
                else:
                    values.append(acc)
            out.append(tuple(values))
        return out


def _pg_weight_and_first_digit(value: decimal.Decimal) -> tuple[int, int]:
    # PostgreSQL stores numerics as base-10000 digits; select_div_scale() looks at the
    # weight (power of 10000) of the first non-zero digit and that digit's value.
    if value == 0:
        return 0, 0
    value = abs(value)
    exponent10 = value.adjusted()  # power of ten of the leading decimal digit
    weight = exponent10 // 4
    first = int(value.scaleb(-4 * weight)) % 10000
    return weight, first


def _dscale(value: decimal.Decimal) -> int:
    exponent = value.as_tuple().exponent
    assert isinstance(exponent, int)
    return max(0, -exponent)


def pg_numeric_div(num: decimal.Decimal, den: decimal.Decimal) -> decimal.Decimal:
    """``num / den`` exactly as PostgreSQL's ``numeric_div`` computes it.

    PostgreSQL's AVG over integer and numeric columns is ``numeric_div(sum, count)``;
    the result scale comes from ``select_div_scale()`` (at least 16 significant digits,
    never fewer decimals than either input) and the last digit is rounded half away
    from zero.
    """
    w1, f1 = _pg_weight_and_first_digit(num)
    w2, f2 = _pg_weight_and_first_digit(den)
    qweight = w1 - w2
    if f1 <= f2:
        qweight -= 1
    rscale = 16 - qweight * 4
    rscale = max(rscale, _dscale(num), _dscale(den), 0)
    rscale = min(rscale, 1000)
    digits = max(num.adjusted() - den.adjusted(), 0) + rscale + 30
    # Truncate the intermediate quotient, then round once: no double rounding.
    ctx = decimal.Context(prec=digits, rounding=decimal.ROUND_DOWN)
    quotient = ctx.divide(num, den)
    return quotient.quantize(decimal.Decimal(1).scaleb(-rscale), rounding=decimal.ROUND_HALF_UP)


def finalize_avg(total: Any, count: int, dialect: str) -> Any:
    """AVG from the merged SUM and COUNT, typed and rounded as ``dialect``'s AVG would be.

    * floating point sums: ``total / count`` as a float on every backend;
    * PostgreSQL: :func:`pg_numeric_div` (a ``Decimal``);
    * MySQL/MariaDB: a ``Decimal`` with 4 more decimals than the sum
      (``div_precision_increment`` at its default of 4), rounded half up;
    * SQLite: a float.

    :raises UnsupportedQueryError: another dialect (its AVG rules are not modelled).
    """
    if count == 0 or total is None:
        return None
    if isinstance(total, float):
        return total / count
    rule = rules_for(dialect).avg_rule  # the per-dialect table (_dialect.DIALECTS)
    if rule == "postgresql":
        return pg_numeric_div(decimal.Decimal(total), decimal.Decimal(count))
    if rule == "mysql":
        dec = decimal.Decimal(total)
        scale = _dscale(dec) + 4
        ctx = decimal.Context(prec=max(dec.adjusted(), 0) + scale + 30, rounding=decimal.ROUND_DOWN)
        quotient = ctx.divide(dec, decimal.Decimal(count))
        return quotient.quantize(decimal.Decimal(1).scaleb(-scale), rounding=decimal.ROUND_HALF_UP)
    if rule == "sqlite":
        return float(total) / count if isinstance(total, decimal.Decimal) else total / count
    raise UnsupportedQueryError(
        f"AVG across shards is not modelled for the {dialect} dialect",
        construct="AVG",
    )
