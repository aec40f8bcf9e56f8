"""A grammar of SQLAlchemy 2.0 ``select()`` statements for the query fuzzer.

Written from SQLAlchemy's user-facing API, not from the planner: it generates what the
planner merges *and* what it does not know (functions around aggregates, expressions in
every clause, DISTINCT forms, subqueries at depth, ``text()``/``literal_column()``,
unions, joins on non-key columns, windows, FETCH, CASE, cast, ``Query`` forms).

Every generated node carries the Python source that builds it, so a failure prints a
statement one can paste (``p2`` is ``aliased(Parent, name="p2")``, the self-join's other
side; ``pc`` is ``aliased(Parent, name="pc")``, a correlated subquery's own copy).
A :class:`Case` says how its result may be compared: as a multiset, as a list ordered by
some of its columns (ties compared as multisets, and at a LIMIT/OFFSET boundary only the
sort keys), or as a subset (LIMIT without ORDER BY).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    Float,
    Numeric,
    String,
    and_,
    case,
    cast,
    delete,
    distinct,
    except_,
    exists,
    func,
    literal,
    literal_column,
    not_,
    null,
    or_,
    select,
    text,
    union,
    union_all,
    update,
)
from sqlalchemy.orm import Session, aliased

from ._fuzz_schema import Apart, Child, Country, Parent

# kinds of scalar values: int, real, dec (NUMERIC), str, bool


@dataclass
class X:
    """An SQL expression, the Python source that builds it, its kind and features."""

    expr: Any
    src: str
    kind: str
    agg: bool = False
    tags: frozenset[str] = frozenset()

    def with_(self, expr: Any, src: str, kind: str | None = None, *tags: str,
              agg: bool | None = None) -> X:
        return X(expr, src, kind or self.kind, self.agg if agg is None else agg,
                 self.tags | frozenset(tags))


def _merge_tags(*xs: X) -> frozenset[str]:
    out: frozenset[str] = frozenset()
    for x in xs:
        out |= x.tags
    return out


@dataclass
class Case:
    """One generated statement and how to compare its answer with the oracle's."""

    src: str
    run: Callable[[Session], list[Any]]
    #: result column indexes of the ORDER BY keys, or None when the order is unspecified
    order_idx: list[int] | None = None
    #: LIMIT/OFFSET/FETCH present (ties at the boundary are undetermined)
    limited: bool = False
    #: runs the statement without its LIMIT/OFFSET (for LIMIT without ORDER BY)
    run_unlimited: Callable[[Session], list[Any]] | None = None
    #: the answer depends on where related rows live (joins / subqueries relating tables
    #: on non-key columns): under the drop-in constructor, SQLAlchemy's per-shard
    #: semantics apply and a warning is the documented outcome
    colocation: bool = False
    tags: set[str] = field(default_factory=set)
    #: result columns compared under a case-insensitive collation (any member of a group
    #: of equal values may represent it, and such values tie in ORDER BY)
    ci_idx: set[int] = field(default_factory=set)


def _runner(stmt: Any) -> Callable[[Session], list[Any]]:
    return lambda session: list(session.execute(stmt).all())


def _select_src(sel: Sequence[X]) -> str:
    return "select(" + ", ".join(f"{x.src}.label('c{i}')" for i, x in enumerate(sel)) + ")"


def _col(attr: Any, src: str, kind: str) -> X:
    return X(attr, src, kind)


PARENT_COLS = [
    _col(Parent.id, "Parent.id", "int"),
    _col(Parent.score, "Parent.score", "int"),
    _col(Parent.score, "Parent.score", "int"),
    _col(Parent.ratio, "Parent.ratio", "real"),
    _col(Parent.amount, "Parent.amount", "dec"),
    _col(Parent.name, "Parent.name", "str"),
    _col(Parent.grp, "Parent.grp", "str"),
    _col(Parent.grp, "Parent.grp", "str"),
    _col(Parent.flag, "Parent.flag", "bool"),
    X(Parent.nick, "Parent.nick", "str", tags=frozenset({"ci"})),
]
CHILD_COLS = [
    _col(Child.qty, "Child.qty", "int"),
    _col(Child.amount, "Child.amount", "dec"),
    _col(Child.label, "Child.label", "str"),
    _col(Child.parent_id, "Child.parent_id", "int"),
]
COUNTRY_COLS = [
    _col(Country.rate, "Country.rate", "int"),
    _col(Country.name, "Country.name", "str"),
    _col(Country.code, "Country.code", "str"),
]
APART_COLS = [
    _col(Apart.val, "Apart.val", "int"),
    _col(Apart.ref, "Apart.ref", "int"),
    _col(Apart.tag, "Apart.tag", "str"),
]

#: Parent joined to itself
P2 = aliased(Parent, name="p2")
P2_COLS = [
    _col(P2.score, "p2.score", "int"),
    _col(P2.grp, "p2.grp", "str"),
    _col(P2.amount, "p2.amount", "dec"),
]

LIT: dict[str, list[tuple[Any, str]]] = {
    "int": [(-1, "-1"), (0, "0"), (2, "2"), (3, "3"), (7, "7")],
    "real": [(0.0, "0.0"), (1.5, "1.5"), (-2.0, "-2.0")],
    "dec": [(0, "0"), (1, "1"), (-1, "-1")],
    "str": [("b", "'b'"), ("Bob", "'Bob'"), ("bob", "'bob'"), ("a", "'a'"), ("zz", "'zz'")],
}


@dataclass
class Ctx:
    """What the statement being built can refer to."""

    cols: list[X]
    dialect: str  # sqlite | postgresql | mysql | mixed


class Grammar:
    """Random statements; one instance per statement (seeded)."""

    def __init__(self, rng: random.Random, dialect: str) -> None:
        self.r = rng
        self.dialect = dialect

    # -- helpers -----------------------------------------------------------------------

    def p(self, prob: float) -> bool:
        return self.r.random() < prob

    def pick(self, seq: Sequence[Any]) -> Any:
        return self.r.choice(list(seq))

    def lit(self, kind: str) -> X:
        if kind == "bool":
            v = self.p(0.5)
            return X(literal(v), f"literal({v})", "bool")
        value, src = self.pick(LIT[kind])
        return X(literal(value) if self.p(0.3) else value, src, kind)

    def cols_of(self, ctx: Ctx, kinds: Sequence[str]) -> list[X]:
        # A mixed cluster has no one-database answer for the case-insensitive column:
        # SQLite drops NOCASE in most expressions, PostgreSQL keeps the ICU collation.
        return [c for c in ctx.cols if c.kind in kinds
                and not (self.dialect == "mixed" and "ci" in c.tags)]

    # -- row-level scalars -------------------------------------------------------------

    def scalar(self, ctx: Ctx, kinds: Sequence[str], depth: int = 0) -> X:
        """A row-level expression of one of ``kinds`` (no aggregate)."""
        for _ in range(8):
            x = self._scalar(ctx, kinds, depth)
            if x.kind in kinds:
                return x
        cols = self.cols_of(ctx, kinds)
        return self.pick(cols) if cols else self.lit(
            self.pick([k for k in kinds if k != "bool"] or ["int"]))

    def _scalar(self, ctx: Ctx, kinds: Sequence[str], depth: int = 0) -> X:
        cols = self.cols_of(ctx, kinds)
        if not cols or depth >= 2 or self.p(0.55):
            if not cols:
                return self.lit(self.pick([k for k in kinds if k != "bool"] or ["int"]))
            col: X = self.pick(cols)
            return col
        kind = self.pick(sorted({c.kind for c in cols}))
        a = self.scalar(ctx, [kind], depth + 1)
        kind = a.kind
        choice = self.r.randrange(11)
        if kind in ("int", "dec", "real"):
            if choice == 0:
                b = self.lit(kind)
                return a.with_(a.expr + b.expr, f"({a.src} + {b.src})", None, "arith")
            if choice == 1:
                return a.with_(-a.expr, f"-({a.src})", None, "arith")
            if choice == 2:
                return a.with_(func.abs(a.expr), f"func.abs({a.src})", None, "fn")
            if choice == 3:
                b = self.lit(kind)
                return a.with_(func.coalesce(a.expr, b.expr),
                               f"func.coalesce({a.src}, {b.src})", None, "fn")
            if choice == 4 and kind == "int":
                return a.with_(a.expr % 3, f"({a.src} % 3)", None, "arith")
            if choice == 5:
                b = self.lit(kind)
                return a.with_(a.expr * b.expr, f"({a.src} * {b.src})", None, "arith")
            if choice == 6:
                return a.with_(case((a.expr > 0, "pos"), (a.expr < 0, "neg"), else_="zero"),
                               f"case(({a.src} > 0, 'pos'), ({a.src} < 0, 'neg'), "
                               f"else_='zero')", "str", "case")
            if choice == 7 and kind != "real" and self.dialect != "mixed":
                # (not on a mixed cluster: each dialect spells a number its own way)
                return a.with_(cast(a.expr, String(20)), f"cast({a.src}, String(20))", "str",
                               "cast")
            if choice == 8 and kind == "int":
                return a.with_(cast(a.expr, Numeric(10, 2)), f"cast({a.src}, Numeric(10, 2))",
                               "dec", "cast")
        if kind == "str":
            if choice in (0, 1):
                return a.with_(func.lower(a.expr), f"func.lower({a.src})", None, "fn")
            if choice == 2:
                return a.with_(func.upper(a.expr), f"func.upper({a.src})", None, "fn")
            if choice == 3:
                return a.with_(func.coalesce(a.expr, "-"), f"func.coalesce({a.src}, '-')",
                               None, "fn")
            if choice == 4:
                return a.with_(func.length(a.expr), f"func.length({a.src})", "int", "fn")
            if choice == 5:
                return a.with_(func.trim(a.expr), f"func.trim({a.src})", None, "fn")
            if choice == 6:
                return a.with_(a.expr + "!", f"({a.src} + '!')", None, "concat")
            if choice == 7:
                return a.with_(func.substr(a.expr, 1, 1), f"func.substr({a.src}, 1, 1)",
                               None, "fn")
        if kind == "bool":
            return a.with_(case((a.expr, 1), else_=0), f"case(({a.src}, 1), else_=0)", "int",
                           "case")
        return a

    def predicate(self, ctx: Ctx, depth: int = 0) -> X:
        """A row-level boolean condition."""
        choice = self.r.randrange(12)
        if choice <= 3 or depth >= 2:
            kind = self.pick(["int", "int", "str", "dec", "real"])
            a = self.scalar(ctx, [kind])
            b = self.lit(a.kind if a.kind != "bool" else "int")
            op = self.pick(["==", "!=", "<", ">=", ">"])
            ops: dict[str, Callable[[Any, Any], Any]] = {
                "==": lambda x, y: x == y, "!=": lambda x, y: x != y,
                "<": lambda x, y: x < y, ">=": lambda x, y: x >= y, ">": lambda x, y: x > y}
            return X(ops[op](a.expr, b.expr), f"{a.src} {op} {b.src}", "bool",
                     tags=a.tags | {"cmp"})
        if choice == 4:
            a = self.scalar(ctx, ["int", "str", "real", "dec"])
            if self.p(0.5):
                return X(a.expr.is_(None), f"{a.src}.is_(None)", "bool", tags=a.tags)
            return X(a.expr.is_not(None), f"{a.src}.is_not(None)", "bool", tags=a.tags)
        if choice == 5:
            a = self.scalar(ctx, ["int", "str"])
            vals = [self.lit(a.kind) for _ in range(self.r.randint(1, 3))]
            return X(a.expr.in_([v.expr for v in vals]),
                     f"{a.src}.in_([{', '.join(v.src for v in vals)}])", "bool",
                     tags=a.tags | {"in_list"})
        if choice == 6 and self.dialect != "mixed":
            # (not on a mixed cluster: LIKE is case-insensitive on SQLite only)
            a = self.scalar(ctx, ["str"])
            pat = self.pick(["b%", "%b", "B%", "%e%", "_"])
            return X(a.expr.like(pat), f"{a.src}.like({pat!r})", "bool", tags=a.tags | {"like"})
        if choice == 7:
            a = self.predicate(ctx, depth + 1)
            b = self.predicate(ctx, depth + 1)
            if self.p(0.5):
                return X(and_(a.expr, b.expr), f"and_({a.src}, {b.src})", "bool",
                         tags=_merge_tags(a, b))
            return X(or_(a.expr, b.expr), f"or_({a.src}, {b.src})", "bool",
                     tags=_merge_tags(a, b) | {"or"})
        if choice == 8:
            a = self.predicate(ctx, depth + 1)
            return X(not_(a.expr), f"not_({a.src})", "bool", tags=a.tags | {"not"})
        if choice == 9:
            bools = self.cols_of(ctx, ["bool"])
            if bools:
                b = self.pick(bools)
                return X(b.expr.is_(True) if self.p(0.5) else b.expr,
                         b.src, "bool", tags=frozenset({"bool_col"}))
            return self.predicate(ctx, depth + 1)
        if choice == 10 and any(c.src.startswith("Parent.") for c in ctx.cols):
            return self.subquery_predicate(ctx, depth)
        if choice == 11 and depth == 0 and any(c.src.startswith("Parent.") for c in ctx.cols):
            # (only at the top: SQLAlchemy cannot negate a text() fragment)
            col = self.pick(["score", "id"])
            v = self.pick([0, 1, 2])
            return X(text(f"fz_parent.{col} > {v}"), f'text("fz_parent.{col} > {v}")', "bool",
                     tags=frozenset({"text_where"}))
        a = self.scalar(ctx, ["int"])
        return X(a.expr.between(-1, 3), f"{a.src}.between(-1, 3)", "bool", tags=a.tags)

    # -- subqueries ------------------------------------------------------------------------

    def subquery_predicate(self, ctx: Ctx, depth: int) -> X:
        """IN / EXISTS / scalar-subquery conditions, correlated and not."""
        choice = self.r.randrange(12)
        if choice == 9:  # depth 2: a global aggregate inside an IN on the key
            return X(Parent.id.in_(select(Child.parent_id).where(
                Child.qty > select(func.avg(Child.qty)).scalar_subquery())),
                "Parent.id.in_(select(Child.parent_id).where(Child.qty > "
                "select(func.avg(Child.qty)).scalar_subquery()))", "bool",
                tags=frozenset({"nested_global_sub"}))
        if choice == 10:  # depth 2: the pinned table inside a correlated EXISTS
            return X(exists().where(Child.parent_id == Parent.id,
                                    Child.qty.in_(select(Apart.val))),
                     "exists().where(Child.parent_id == Parent.id, "
                     "Child.qty.in_(select(Apart.val)))", "bool",
                     tags=frozenset({"nested_pinned_sub", "colocation"}))
        if choice == 11:  # depth 2: correlated EXISTS inside an IN on the key
            return X(Parent.id.in_(select(Child.parent_id).where(
                ~exists().where(Country.code == Parent.ccode, Country.rate > Child.qty))),
                "Parent.id.in_(select(Child.parent_id).where(~exists().where("
                "Country.code == Parent.ccode, Country.rate > Child.qty)))", "bool",
                tags=frozenset({"nested_broadcast_sub"}))
        if choice == 0:  # IN (SELECT key ...) on the placement key: exact per shard
            w = self.predicate(Ctx(CHILD_COLS, ctx.dialect), depth + 1)
            return X(Parent.id.in_(select(Child.parent_id).where(w.expr)),
                     f"Parent.id.in_(select(Child.parent_id).where({w.src}))", "bool",
                     tags=w.tags | {"in_sub_key"})
        if choice == 1:  # IN on a non-key column
            return X(Parent.score.in_(select(Child.qty)),
                     "Parent.score.in_(select(Child.qty))", "bool",
                     tags=frozenset({"in_sub_nonkey", "colocation"}))
        if choice == 2:  # correlated EXISTS on the key
            w = self.predicate(Ctx(CHILD_COLS, ctx.dialect), depth + 1)
            return X(exists().where(Child.parent_id == Parent.id, w.expr),
                     f"exists().where(Child.parent_id == Parent.id, {w.src})", "bool",
                     tags=w.tags | {"exists_corr"})
        if choice == 3:  # relationship any()
            return X(Parent.children.any(Child.qty > 0), "Parent.children.any(Child.qty > 0)",
                     "bool", tags=frozenset({"any"}))
        if choice == 4:  # uncorrelated EXISTS over a sharded table
            return X(exists(select(Child.id).where(Child.qty > 5)),
                     "exists(select(Child.id).where(Child.qty > 5))", "bool",
                     tags=frozenset({"exists_uncorr", "global_sub"}))
        if choice == 5:  # global scalar aggregate
            agg = self.pick([("avg", func.avg), ("max", func.max), ("min", func.min)])
            return X(Parent.score > select(agg[1](Parent.score)).scalar_subquery(),
                     f"Parent.score > select(func.{agg[0]}(Parent.score)).scalar_subquery()",
                     "bool", tags=frozenset({"scalar_sub_global"}))
        if choice == 6:  # correlated scalar aggregate through the key
            return X(select(func.count(Child.id)).where(Child.parent_id == Parent.id)
                     .scalar_subquery() >= 1,
                     "select(func.count(Child.id)).where(Child.parent_id == Parent.id)"
                     ".scalar_subquery() >= 1", "bool", tags=frozenset({"scalar_sub_corr"}))
        if choice == 7:  # correlated through an alias on a non-key column
            pc = aliased(Parent, name="pc")
            return X(select(func.count()).select_from(pc).where(pc.grp == Parent.grp)
                     .scalar_subquery() > 1,
                     "select(func.count()).select_from(pc).where(pc.grp == Parent.grp)"
                     ".scalar_subquery() > 1", "bool",
                     tags=frozenset({"alias_corr_nonkey", "colocation"}))
        # a broadcast-table subquery: every shard has the whole table
        return X(Parent.ccode.in_(select(Country.code).where(Country.rate > 0)),
                 "Parent.ccode.in_(select(Country.code).where(Country.rate > 0))", "bool",
                 tags=frozenset({"in_sub_broadcast"}))

    def scalar_subquery_col(self) -> X:
        choice = self.r.randrange(4)
        if choice == 0:
            return X(select(func.count(Child.id)).where(Child.parent_id == Parent.id)
                     .scalar_subquery(),
                     "select(func.count(Child.id)).where(Child.parent_id == Parent.id)"
                     ".scalar_subquery()", "int", tags=frozenset({"scalar_sub_corr_col"}))
        if choice == 1:
            return X(func.coalesce(select(func.max(Parent.score)).scalar_subquery(), 0),
                     "func.coalesce(select(func.max(Parent.score)).scalar_subquery(), 0)",
                     "int", tags=frozenset({"scalar_sub_global", "fn_wraps_sub"}))
        if choice == 2:
            return X(select(Country.rate).where(Country.code == Parent.ccode)
                     .scalar_subquery(),
                     "select(Country.rate).where(Country.code == Parent.ccode)"
                     ".scalar_subquery()", "int", tags=frozenset({"scalar_sub_broadcast"}))
        return X(literal_column("(select max(score) from fz_parent)"),
                 'literal_column("(select max(score) from fz_parent)")', "int",
                 tags=frozenset({"literal_column_sub"}))

    # -- aggregates --------------------------------------------------------------------

    def aggregate(self, ctx: Ctx, depth: int = 0) -> X:
        """An aggregate expression, possibly wrapped in functions/arithmetic/CASE/cast."""
        base = self._bare_aggregate(ctx)
        if depth >= 1 or self.p(0.5):
            return base
        choice = self.r.randrange(10)
        num = base.kind in ("int", "dec", "real")
        if choice == 0 and num:
            return base.with_(func.coalesce(base.expr, 0), f"func.coalesce({base.src}, 0)",
                              None, "fn_wraps_agg")
        if choice == 1 and num and base.kind != "real":
            return base.with_(func.round(base.expr, 2), f"func.round({base.src}, 2)", "dec",
                              "fn_wraps_agg")
        if choice == 2 and num:
            return base.with_(func.abs(base.expr), f"func.abs({base.src})", None,
                              "fn_wraps_agg")
        if choice == 3 and num:
            return base.with_(base.expr + 1, f"({base.src} + 1)", None, "arith_agg")
        if choice == 4 and num:
            other = self._bare_aggregate(ctx, ["int"])
            return X(base.expr - other.expr, f"({base.src} - {other.src})", base.kind, True,
                     _merge_tags(base, other) | {"arith_agg"})
        if choice == 5 and num:
            return base.with_(case((base.expr > 0, "pos"), else_="nonpos"),
                              f"case(({base.src} > 0, 'pos'), else_='nonpos')", "str",
                              "case_agg")
        if choice == 6 and num and base.kind != "real":
            return base.with_(cast(base.expr, Numeric(12, 2)),
                              f"cast({base.src}, Numeric(12, 2))", "dec", "cast_agg")
        if choice == 7 and num:
            return base.with_(func.nullif(base.expr, 0), f"func.nullif({base.src}, 0)", None,
                              "fn_wraps_agg")
        if choice == 8 and base.kind == "str":
            return base.with_(func.lower(base.expr), f"func.lower({base.src})", None,
                              "fn_wraps_agg")
        if choice == 9 and num:
            return base.with_(cast(base.expr, Float), f"cast({base.src}, Float)", "real",
                              "cast_agg")
        return base

    def _bare_aggregate(self, ctx: Ctx, kinds: Sequence[str] | None = None) -> X:
        choice = self.r.randrange(14)
        if kinds == ["int"]:
            choice = self.pick([0, 1, 2])
        if choice == 0:
            return X(func.count(), "func.count()", "int", True, frozenset({"count_star"}))
        if choice == 1:
            a = self.scalar(ctx, ["int", "str", "real", "dec", "bool"])
            return X(func.count(a.expr), f"func.count({a.src})", "int", True, a.tags)
        if choice == 2:
            a = self.scalar(ctx, ["int", "str", "dec"])
            if self.p(0.5):
                return X(func.count(distinct(a.expr)), f"func.count(distinct({a.src}))", "int",
                         True, a.tags | {"count_distinct"})
            return X(func.count(a.expr.distinct()), f"func.count({a.src}.distinct())", "int",
                     True, a.tags | {"count_distinct"})
        if choice in (3, 4):
            a = self.scalar(ctx, ["int", "dec", "real"])
            return X(func.sum(a.expr), f"func.sum({a.src})", a.kind, True,
                     a.tags | {"sum"} | ({"real_agg"} if a.kind == "real" else set()))
        if choice in (5, 6):
            a = self.scalar(ctx, ["int", "dec", "real", "str"])
            fn = self.pick(["min", "max"])
            return X(getattr(func, fn)(a.expr), f"func.{fn}({a.src})", a.kind, True,
                     a.tags | {"minmax"} | ({"real_agg"} if a.kind == "real" else set()))
        if choice in (7, 8):
            a = self.scalar(ctx, ["int", "dec", "real"])
            return X(func.avg(a.expr), f"func.avg({a.src})",
                     "real" if a.kind == "real" else "dec", True, a.tags | {"avg"})
        if choice == 9:
            a = self.scalar(ctx, ["int", "dec"])
            return X(func.sum(distinct(a.expr)), f"func.sum(distinct({a.src}))", a.kind, True,
                     a.tags | {"sum_distinct"})
        if choice == 10:
            p = self.predicate(ctx, 1)
            return X(func.count().filter(p.expr), f"func.count().filter({p.src})", "int", True,
                     p.tags | {"filter"})
        if choice == 11:
            p = self.predicate(ctx, 1)
            return X(func.sum(case((p.expr, 1), else_=0)),
                     f"func.sum(case(({p.src}, 1), else_=0))", "int", True,
                     p.tags | {"sum_case"})
        if choice == 12:
            text_agg = self.pick(["count(*)", "max(score)", "sum(score)", "min(grp)"])
            if not any(c.src.startswith("Parent.") for c in ctx.cols) and text_agg != "count(*)":
                text_agg = "count(*)"
            return X(literal_column(text_agg), f"literal_column({text_agg!r})",
                     "str" if "grp" in text_agg else "int", True,
                     frozenset({"literal_column_agg"}))
        a = self.scalar(ctx, ["int", "dec", "real", "str"])
        fn = self.pick(["min", "max"])
        return X(getattr(func, fn)(distinct(a.expr)), f"func.{fn}(distinct({a.src}))", a.kind,
                 True, a.tags | {"minmax_distinct"})

    def window(self, ctx: Ctx) -> X:
        part = self.pick(self.cols_of(ctx, ["str", "bool"]) or self.cols_of(ctx, ["int"]))
        choice = self.r.randrange(4)
        if choice == 0:
            return X(func.row_number().over(order_by=Parent.id),
                     "func.row_number().over(order_by=Parent.id)", "int",
                     tags=frozenset({"window"}))
        if choice == 1:
            return X(func.rank().over(order_by=Parent.score.desc()),
                     "func.rank().over(order_by=Parent.score.desc())", "int",
                     tags=frozenset({"window"}))
        if choice == 2:
            return X(func.count().over(partition_by=part.expr),
                     f"func.count().over(partition_by={part.src})", "int",
                     tags=frozenset({"window"}))
        return X(func.coalesce(func.sum(Parent.score).over(partition_by=part.expr), 0),
                 f"func.coalesce(func.sum(Parent.score).over(partition_by={part.src}), 0)",
                 "int", tags=frozenset({"window", "fn_wraps_window"}))

    # -- FROM --------------------------------------------------------------------------

    def from_clause(self) -> tuple[list[X], Callable[[Any], Any], str, set[str], bool]:
        """(columns, apply(select) -> select, source suffix, tags, colocation-dependent)."""
        choice = self.r.randrange(14)
        if choice == 12:  # self-join on the shard key: both sides on one shard
            return (PARENT_COLS + P2_COLS, lambda s: s.select_from(Parent).join(
                P2, P2.id == Parent.id),
                ".select_from(Parent).join(p2, p2.id == Parent.id)",
                {"self_join_key"}, False)
        if choice == 13:  # self-join on another column: pairs rows of different shards
            return (PARENT_COLS + P2_COLS, lambda s: s.select_from(Parent).join(
                P2, P2.grp == Parent.grp),
                ".select_from(Parent).join(p2, p2.grp == Parent.grp)",
                {"self_join_nonkey", "colocation"}, True)
        if choice <= 4:
            return PARENT_COLS, lambda s: s.select_from(Parent), ".select_from(Parent)", set(), \
                False
        if choice == 5:
            return (PARENT_COLS + CHILD_COLS, lambda s: s.select_from(Parent).join(
                Parent.children), ".select_from(Parent).join(Parent.children)",
                {"join_key"}, False)
        if choice == 6:
            return (PARENT_COLS + CHILD_COLS, lambda s: s.select_from(Parent).outerjoin(
                Child, Child.parent_id == Parent.id),
                ".select_from(Parent).outerjoin(Child, Child.parent_id == Parent.id)",
                {"outerjoin_key"}, False)
        if choice == 7:
            return (PARENT_COLS + CHILD_COLS, lambda s: s.select_from(Parent).join(
                Child, Child.qty == Parent.score),
                ".select_from(Parent).join(Child, Child.qty == Parent.score)",
                {"join_nonkey", "colocation"}, True)
        if choice == 8:
            return (PARENT_COLS + COUNTRY_COLS, lambda s: s.select_from(Parent).join(
                Country, Country.code == Parent.ccode),
                ".select_from(Parent).join(Country, Country.code == Parent.ccode)",
                {"join_broadcast"}, False)
        if choice == 9:
            return (PARENT_COLS + APART_COLS, lambda s: s.select_from(Parent).join(
                Apart, Apart.ref == Parent.score),
                ".select_from(Parent).join(Apart, Apart.ref == Parent.score)",
                {"join_pinned", "colocation"}, True)
        if choice == 10:
            return CHILD_COLS, lambda s: s.select_from(Child), ".select_from(Child)", set(), \
                False
        return COUNTRY_COLS, lambda s: s.select_from(Country), ".select_from(Country)", \
            {"broadcast_only"}, False

    # -- statements --------------------------------------------------------------------

    def case(self) -> Case:
        choice = self.r.randrange(100)
        if choice < 30:
            return self.row_select()
        if choice < 45:
            return self.aggregate_select()
        if choice < 68:
            return self.group_select()
        if choice < 74:
            return self.entity_select()
        if choice < 80:
            return self.union_select()
        if choice < 86:
            return self.from_subquery()
        if choice < 91:
            return self.query_api()
        if choice < 95:
            return self.paginated()
        return self.text_forms()

    def paginated(self) -> Case:
        """Every page of ``shardsession.query.paginate`` vs the one ordered statement."""
        from shardsession import ShardedSession
        from shardsession.query import paginate

        ctx = Ctx(PARENT_COLS, self.dialect)
        key = self.pick([c for c in self.cols_of(ctx, ["int", "real", "dec", "str", "bool"])
                         if c.src != "Parent.id"])
        desc = self.p(0.5)
        stmt: Any = select(Parent)
        src = "select(Parent)"
        tags = {"paginate"}
        if self.p(0.4):
            w = self.predicate(ctx)
            stmt = stmt.where(w.expr)
            src += f".where({w.src})"
            tags |= w.tags
        stmt = stmt.order_by(key.expr.desc() if desc else key.expr)
        src += f".order_by({key.src}{'.desc()' if desc else ''})"
        size = self.r.randint(1, 7)

        def run(session: Session) -> list[Any]:
            if not isinstance(session, ShardedSession):
                # paginate's documented total order: the ORDER BY, then the primary key
                return list(session.execute(stmt.order_by(Parent.id)).all())
            rows: list[Any] = []
            token = None
            for _ in range(200):
                page = paginate(session, stmt, page_size=size, token=token)
                rows.extend(page.rows)
                token = page.next_token
                if token is None:
                    break
            return rows

        return Case(f"paginate(session, {src}, page_size={size}) (all pages)", run, [0], False,
                    None, "colocation" in tags, tags)

    def _where(self, ctx: Ctx) -> tuple[list[Any], str, set[str]]:
        exprs: list[Any] = []
        srcs: list[str] = []
        tags: set[str] = set()
        for _ in range(self.pick([0, 0, 1, 1, 2])):
            w = self.predicate(ctx)
            exprs.append(w.expr)
            srcs.append(w.src)
            tags |= w.tags
        src = f".where({', '.join(srcs)})" if srcs else ""
        return exprs, src, tags

    def _finish(self, stmt: Any, src: str, tags: set[str], colocation: bool,
                order_idx: list[int] | None, order_exprs: list[tuple[Any, str]],
                allow_limit: bool = True, sel: Sequence[X] = ()) -> Case:
        if order_exprs:
            stmt = stmt.order_by(*[e for e, _ in order_exprs])
            src += f".order_by({', '.join(s for _, s in order_exprs)})"
        limited = False
        run_unlimited: Callable[[Session], list[Any]] | None = None
        if allow_limit and self.p(0.4):
            limited = True
            unlimited = stmt
            if self.p(0.15):
                n = self.r.randint(1, 6)
                stmt = stmt.fetch(n)
                src += f".fetch({n})"
                tags.add("fetch")
            else:
                n = self.r.randint(1, 6)
                stmt = stmt.limit(n)
                src += f".limit({n})"
                if self.p(0.4):
                    o = self.r.randint(1, 4)
                    stmt = stmt.offset(o)
                    src += f".offset({o})"
                    tags.add("offset")
                tags.add("limit")
            run_unlimited = _runner(unlimited)
        final = stmt
        return Case(src, lambda s: list(s.execute(final).all()),
                    order_idx if order_exprs else None, limited,
                    run_unlimited if not order_exprs else None, colocation, tags,
                    {i for i, x in enumerate(sel) if "ci" in x.tags})

    def _order(self, cols: list[X]) -> tuple[list[int], list[tuple[Any, str]], set[str]]:
        """ORDER BY some selected columns (so the keys are visible to the comparison)."""
        if not cols or self.p(0.45):
            return [], [], set()
        idx = self.r.sample(range(len(cols)), k=self.r.randint(1, min(2, len(cols))))
        out, tags = [], set()
        for i in idx:
            c = cols[i]
            e, s = c.expr, c.src
            # (MariaDB has no NULLS FIRST/LAST: such statements would only be skipped)
            d = self.r.randrange(6) if self.dialect != "mysql" else self.pick([0, 1, 4, 5])
            if d == 1:
                e, s = e.desc(), f"{s}.desc()"
            elif d == 2:
                e, s = e.asc().nulls_first(), f"{s}.asc().nulls_first()"
                tags.add("nulls_first")
            elif d == 3:
                e, s = e.desc().nulls_last(), f"{s}.desc().nulls_last()"
                tags.add("nulls_last")
            out.append((e, s))
        return idx, out, tags

    def row_select(self) -> Case:
        cols, apply, from_src, tags, coloc = self.from_clause()
        ctx = Ctx(cols, self.dialect)
        sel: list[X] = []
        for _ in range(self.r.randint(1, 3)):
            k = self.r.randrange(10)
            parent = any(c.src.startswith("Parent.") for c in cols)
            if k == 0 and parent:
                sel.append(self.window(ctx))
            elif k == 1 and parent:
                sel.append(self.scalar_subquery_col())
            elif k == 2 and parent:
                sel.append(X(literal_column("fz_parent.score"),
                             'literal_column("fz_parent.score")', "int",
                             tags=frozenset({"literal_column"})))
            else:
                sel.append(self.scalar(ctx, ["int", "str", "real", "dec", "bool"]))
        for x in sel:
            tags |= x.tags
        labelled = [x.expr.label(f"c{i}") for i, x in enumerate(sel)]
        stmt = apply(select(*labelled))
        src = _select_src(sel)
        src += from_src
        w, wsrc, wtags = self._where(ctx)
        if w:
            stmt = stmt.where(*w)
        src += wsrc
        tags |= wtags
        dk = self.r.randrange(8)
        if dk == 0:
            stmt = stmt.distinct()
            src += ".distinct()"
            tags.add("distinct")
        if self.p(0.12):
            # ORDER BY an expression that is not selected (a hidden sort key); without the
            # key in the result only the multiset can be compared, so no LIMIT
            hidden = self.scalar(ctx, ["int", "str", "dec", "real"])
            tags |= hidden.tags | {"order_hidden"}
            coloc = coloc or "colocation" in tags
            return self._finish(stmt, src, tags, coloc, None, [(hidden.expr.desc(),
                                f"{hidden.src}.desc()")], allow_limit=False, sel=sel)
        idx, order, otags = self._order(sel)
        tags |= otags
        coloc = coloc or "colocation" in tags
        return self._finish(stmt, src, tags, coloc, idx, order, sel=sel)

    def aggregate_select(self) -> Case:
        cols, apply, from_src, tags, coloc = self.from_clause()
        ctx = Ctx(cols, self.dialect)
        sel = [self.aggregate(ctx) for _ in range(self.r.randint(1, 3))]
        if self.p(0.1):
            c = self.pick(self.cols_of(ctx, ["str", "int"]))
            # (keeps the column's tags: a case-insensitive column's DISTINCT may answer
            # with any of its case variants, compared by their fold)
            sel = [X(distinct(c.expr), f"distinct({c.src})", c.kind,
                     tags=frozenset({"distinct_col"}) | c.tags)]
        for x in sel:
            tags |= x.tags
        if "distinct_col" in tags:
            stmt = apply(select(sel[0].expr))
            src = f"select({sel[0].src})"
        else:
            stmt = apply(select(*[x.expr.label(f"c{i}") for i, x in enumerate(sel)]))
            src = _select_src(sel)
        src += from_src
        w, wsrc, wtags = self._where(ctx)
        if w:
            stmt = stmt.where(*w)
        src += wsrc
        tags |= wtags
        coloc = coloc or "colocation" in tags
        return self._finish(stmt, src, tags, coloc, None, [], allow_limit=self.p(0.2), sel=sel)

    def group_key(self, ctx: Ctx) -> X:
        k = self.r.randrange(6)
        if k <= 2:
            return self.scalar(ctx, ["str", "int", "bool"])
        if k == 3:
            return self.scalar(ctx, ["str"], depth=1) if self.p(0.5) else self.scalar(ctx, [
                "int"], depth=1)
        strs = self.cols_of(ctx, ["str"])
        if strs:
            c: X = self.pick(strs)
            return c.with_(func.lower(c.expr), f"func.lower({c.src})", None, "group_fn")
        return self.scalar(ctx, ["int"])

    def group_select(self) -> Case:
        cols, apply, from_src, tags, coloc = self.from_clause()
        ctx = Ctx(cols, self.dialect)
        keys = [self.group_key(ctx) for _ in range(self.r.randint(1, 2))]
        shown = [k for k in keys if self.p(0.85)] or keys[:1]
        aggs = [self.aggregate(ctx) for _ in range(self.r.randint(1, 2))]
        sel = shown + aggs
        for x in keys + aggs:
            tags |= x.tags
        tags.add("group_by")
        stmt = apply(select(*[x.expr.label(f"c{i}") for i, x in enumerate(sel)]))
        src = _select_src(sel)
        src += from_src
        w, wsrc, wtags = self._where(ctx)
        if w:
            stmt = stmt.where(*w)
        src += wsrc
        tags |= wtags
        stmt = stmt.group_by(*[k.expr for k in keys])
        src += f".group_by({', '.join(k.src for k in keys)})"
        if self.p(0.35):
            h = self.aggregate(ctx)
            tags |= h.tags | {"having"}
            if h.kind in ("int", "dec", "real"):
                v = self.pick([0, 1, 2])
                stmt = stmt.having(h.expr > v)
                src += f".having({h.src} > {v})"
            elif h.kind == "str":
                stmt = stmt.having(h.expr >= "b")
                src += f".having({h.src} >= 'b')"
        if self.p(0.15):
            # HAVING on a grouping expression, possibly OR-ed with an aggregate condition
            k = self.pick(keys)
            bound = self.lit(k.kind if k.kind in LIT else "int")
            cond = k.expr.is_not(None) if k.kind == "bool" else k.expr >= bound.expr
            csrc = (f"{k.src}.is_not(None)" if k.kind == "bool" else
                    f"{k.src} >= {bound.src}")
            if self.p(0.5):
                cond = or_(cond, func.count() > 2)
                csrc = f"or_({csrc}, func.count() > 2)"
            stmt = stmt.having(cond)
            src += f".having({csrc})"
            tags |= k.tags | {"having_key"}
        if self.p(0.1):
            stmt = stmt.distinct()
            src += ".distinct()"
            tags.add("distinct")
        if self.p(0.12):
            hidden = self.aggregate(ctx)
            tags |= hidden.tags | {"order_hidden"}
            coloc = coloc or "colocation" in tags
            return self._finish(stmt, src, tags, coloc, None, [(hidden.expr, hidden.src)],
                                allow_limit=False, sel=sel)
        idx, order, otags = self._order(sel)
        tags |= otags
        coloc = coloc or "colocation" in tags
        return self._finish(stmt, src, tags, coloc, idx, order, sel=sel)

    def entity_select(self) -> Case:
        ctx = Ctx(PARENT_COLS, self.dialect)
        stmt: Any = select(Parent)
        src = "select(Parent)"
        tags = {"entity"}
        w, wsrc, wtags = self._where(ctx)
        if w:
            stmt = stmt.where(*w)
        src += wsrc
        tags |= wtags
        coloc = "colocation" in tags
        if self.p(0.5):
            # ORDER BY a non-selected expression, then the key: a total order
            key = self.scalar(ctx, ["int", "str", "dec", "real"])
            tags |= key.tags
            desc = self.p(0.5)
            e = key.expr.desc() if desc else key.expr
            stmt = stmt.order_by(e, Parent.id)
            src += f".order_by({key.src}{'.desc()' if desc else ''}, Parent.id)"
            if self.p(0.5):
                n = self.r.randint(1, 6)
                stmt = stmt.limit(n)
                src += f".limit({n})"
                if self.p(0.3):
                    stmt = stmt.offset(2)
                    src += ".offset(2)"
                tags.add("limit")
            final = stmt
            return Case(src, lambda s: list(s.execute(final).all()), [0], False, None, coloc,
                        tags)
        final = stmt
        return Case(src, lambda s: list(s.execute(final).all()), None, False, None, coloc, tags)

    def union_select(self) -> Case:
        ctx = Ctx(PARENT_COLS, self.dialect)
        col = self.pick(self.cols_of(ctx, ["str", "int"]))
        w1 = self.predicate(ctx)
        w2 = self.predicate(ctx)
        s1 = select(col.expr.label("c0")).where(w1.expr)
        s2 = select(col.expr.label("c0")).where(w2.expr)
        kind = self.r.randrange(4)
        fn, name = [(union, "union"), (union_all, "union_all"), (except_, "except_"),
                    (union, "union")][kind]
        stmt: Any = fn(s1, s2)
        src = (f"{name}(select({col.src}.label('c0')).where({w1.src}), "
               f"select({col.src}.label('c0')).where({w2.src}))")
        tags = {"union", name} | w1.tags | w2.tags
        order_idx: list[int] | None = None
        if self.p(0.4):
            stmt = stmt.order_by(literal_column("c0"))
            src += ".order_by(literal_column('c0'))"
            order_idx = [0]
            if self.p(0.5):
                stmt = stmt.limit(3)
                src += ".limit(3)"
                tags.add("limit")
        final = stmt
        return Case(src, lambda s: list(s.execute(final).all()), order_idx, "limit" in tags,
                    None, "colocation" in tags, tags, {0} if "ci" in col.tags else set())

    def from_subquery(self) -> Case:
        ctx = Ctx(PARENT_COLS, self.dialect)
        w = self.predicate(ctx)
        inner: Any = select(Parent.grp, Parent.score, Parent.id).where(w.expr)
        isrc = f"select(Parent.grp, Parent.score, Parent.id).where({w.src})"
        tags = {"from_subquery"} | set(w.tags)
        k = self.r.randrange(5)
        if k == 1:
            inner = inner.distinct()
            isrc += ".distinct()"
            tags.add("sub_distinct")
        elif k == 2:
            inner = inner.order_by(Parent.id).limit(5)
            isrc += ".order_by(Parent.id).limit(5)"
            tags.add("sub_limit")
        elif k == 3:
            inner = select(Parent.grp, func.max(Parent.score).label("score"),
                           func.min(Parent.id).label("id")).group_by(Parent.grp)
            isrc = ("select(Parent.grp, func.max(Parent.score).label('score'), "
                    "func.min(Parent.id).label('id')).group_by(Parent.grp)")
            tags = {"from_subquery", "sub_group"}  # (the predicate is not used)
        sq = inner.subquery("sq")
        outer = self.r.randrange(4)
        if outer == 0:
            stmt: Any = select(func.count()).select_from(sq)
            osrc = "select(func.count()).select_from(sq)"
            order_idx = None
        elif outer == 1:
            stmt = select(func.coalesce(func.sum(sq.c.score), 0))
            osrc = "select(func.coalesce(func.sum(sq.c.score), 0))"
            order_idx = None
        elif outer == 2:
            stmt = select(sq.c.grp, func.count()).group_by(sq.c.grp)
            osrc = "select(sq.c.grp, func.count()).group_by(sq.c.grp)"
            order_idx = None
        else:
            stmt = select(sq.c.score, sq.c.id).order_by(sq.c.score.desc(), sq.c.id).limit(4)
            osrc = "select(sq.c.score, sq.c.id).order_by(sq.c.score.desc(), sq.c.id).limit(4)"
            order_idx = [0, 1]
        final = stmt
        return Case(f"sq = {isrc}.subquery('sq'); {osrc}",
                    lambda s: list(s.execute(final).all()), order_idx, False, None,
                    "colocation" in tags, tags)

    def query_api(self) -> Case:
        k = self.r.randrange(7)
        w = self.predicate(Ctx(PARENT_COLS, self.dialect))
        tags = {"query_api"} | set(w.tags)
        coloc = "colocation" in tags
        we = w.expr
        if k == 0:
            return Case(f"session.query(Parent).filter({w.src}).count()",
                        lambda s: [(s.query(Parent).filter(we).count(),)], None, False, None,
                        coloc, tags | {"q_count"})
        if k == 1:
            return Case(f"session.query(Parent.grp).filter({w.src}).distinct().count()",
                        lambda s: [(s.query(Parent.grp).filter(we).distinct().count(),)],
                        None, False, None, coloc, tags | {"q_distinct_count"})
        if k == 2:
            return Case("session.query(Parent.grp).group_by(Parent.grp).count()",
                        lambda s: [(s.query(Parent.grp).group_by(Parent.grp).count(),)],
                        None, False, None, False, {"query_api", "q_group_count"})
        if k == 3:
            return Case("session.query(Parent).order_by(Parent.id).limit(3).count()",
                        lambda s: [(s.query(Parent).order_by(Parent.id).limit(3).count(),)],
                        None, False, None, False, {"query_api", "q_limit_count"})
        if k == 4:
            return Case(f"session.query(Parent.grp).filter({w.src}).union("
                        "session.query(Parent.grp).filter(Parent.score > 1)).all()",
                        lambda s: list(s.query(Parent.grp).filter(we).union(
                            s.query(Parent.grp).filter(Parent.score > 1)).all()),
                        None, False, None, coloc, tags | {"q_union"})
        if k == 5:
            return Case(f"session.query(func.count(Parent.id)).filter({w.src}).scalar()",
                        lambda s: [(s.query(func.count(Parent.id)).filter(we).scalar(),)],
                        None, False, None, coloc, tags | {"q_scalar"})
        return Case(f"session.query(Parent).filter({w.src}).order_by(Parent.id).first()",
                    lambda s: [(s.query(Parent).filter(we).order_by(Parent.id).first(),)],
                    [0], False, None, coloc, tags | {"q_first"})

    def text_forms(self) -> Case:
        forms: list[tuple[str, Any, list[int] | None, set[str]]] = [
            ("text('SELECT count(*) FROM fz_parent')",
             text("SELECT count(*) FROM fz_parent"), None, {"text_agg"}),
            ("text('SELECT grp FROM fz_parent WHERE score > 0')",
             text("SELECT grp FROM fz_parent WHERE score > 0"), None, {"text_filter"}),
            ("text('SELECT max(score) AS m FROM fz_parent')",
             text("SELECT max(score) AS m FROM fz_parent"), None, {"text_agg"}),
            ("select(literal_column('count(*)')).select_from(Parent)",
             select(literal_column("count(*)")).select_from(Parent), None,
             {"literal_column_agg"}),
            ("select(Parent.id, Parent.score).order_by(text('score DESC'), Parent.id).limit(4)",
             select(Parent.id, Parent.score).order_by(text("score DESC"), Parent.id).limit(4),
             [1, 0], {"text_order"}),
            ("select(Parent.score, Parent.id).where(text('score > 1'))",
             select(Parent.score, Parent.id).where(text("score > 1")), None,
             {"text_where"}),
            ("select(func.count()).select_from(Parent).join(Child, Child.amount == "
             "Parent.amount)",
             select(func.count()).select_from(Parent).join(Child,
                                                           Child.amount == Parent.amount),
             None, {"join_nonkey_count", "colocation"}),
            ("select(null(), func.count()).select_from(Parent)",
             select(null(), func.count()).select_from(Parent), None, {"null_const"}),
            ("select(literal(1).label('one'), Parent.grp).distinct()",
             select(literal(1).label("one"), Parent.grp).distinct(), None, {"distinct_lit"}),
        ]
        src, stmt, order_idx, tags = self.pick(forms)
        final = stmt
        return Case(src, lambda s: list(s.execute(final).all()), order_idx, "limit" in src,
                    None, "colocation" in tags, tags)

    # -- writes ------------------------------------------------------------------------

    def write(self, existing_ids: Sequence[int]) -> WriteCase:
        """An UPDATE or DELETE (Core or ORM-enabled), run with ``session.execute``."""
        ctx = Ctx(PARENT_COLS, self.dialect)
        cctx = Ctx(CHILD_COLS, self.dialect)
        choice = self.r.randrange(10)
        w = self.predicate(ctx)
        cw = self.predicate(cctx)
        if choice == 0:
            stmt: Any = update(Parent).where(w.expr).values(score=Parent.score + 1)
            src = f"update(Parent).where({w.src}).values(score=Parent.score + 1)"
            return WriteCase(src, stmt, set(w.tags), "colocation" in w.tags)
        if choice == 1:
            v = self.pick(["a", "B", "zz", None])
            stmt = update(Parent).where(w.expr).values(grp=v)
            return WriteCase(f"update(Parent).where({w.src}).values(grp={v!r})", stmt,
                             set(w.tags), "colocation" in w.tags)
        if choice == 2:  # a global scalar subquery in SET: each shard would use its own
            fn = self.pick(["max", "min", "count"])
            agg = func.count(Parent.id) if fn == "count" else getattr(func, fn)(Parent.score)
            arg = "Parent.id" if fn == "count" else "Parent.score"
            stmt = update(Parent).where(w.expr).values(score=select(agg).scalar_subquery())
            return WriteCase(f"update(Parent).where({w.src}).values(score=select(func.{fn}"
                             f"({arg})).scalar_subquery())", stmt,
                             set(w.tags) | {"set_global_sub"}, "colocation" in w.tags)
        if choice == 3:  # correlated through the key: exact per shard
            stmt = update(Parent).where(w.expr).values(score=select(func.count(Child.id)).where(
                Child.parent_id == Parent.id).scalar_subquery())
            return WriteCase(f"update(Parent).where({w.src}).values(score=select(func.count("
                             "Child.id)).where(Child.parent_id == Parent.id).scalar_subquery())",
                             stmt, set(w.tags) | {"set_corr_sub"}, "colocation" in w.tags)
        if choice == 4:
            stmt = update(Child).where(Child.parent_id.in_(select(Parent.id).where(
                w.expr))).values(qty=Child.qty * 2)
            return WriteCase(f"update(Child).where(Child.parent_id.in_(select(Parent.id)"
                             f".where({w.src}))).values(qty=Child.qty * 2)", stmt,
                             set(w.tags) | {"in_sub_key"}, "colocation" in w.tags)
        if choice == 5:  # IN on a non-key column
            stmt = update(Child).where(Child.qty.in_(select(Parent.score))).values(label="z")
            return WriteCase("update(Child).where(Child.qty.in_(select(Parent.score)))"
                             ".values(label='z')", stmt, {"in_sub_nonkey"}, True)
        if choice == 6:
            stmt = delete(Child).where(cw.expr)
            return WriteCase(f"delete(Child).where({cw.src})", stmt, set(cw.tags),
                             "colocation" in cw.tags)
        if choice == 7:
            stmt = delete(Parent).where(~Parent.children.any(), w.expr)
            return WriteCase(f"delete(Parent).where(~Parent.children.any(), {w.src})", stmt,
                             set(w.tags), "colocation" in w.tags)
        if choice == 8 and existing_ids:  # ORM bulk UPDATE by primary key
            ids = self.r.sample(list(existing_ids), k=min(3, len(existing_ids)))
            params = [{"id": i, "score": self.r.randint(-3, 3)} for i in ids]
            return WriteCase(f"session.execute(update(Parent), {params!r})", update(Parent),
                             {"bulk_pk"}, False, params)
        stmt = update(Country).where(Country.rate.is_not(None)).values(rate=Country.rate + 1)
        return WriteCase("update(Country).where(Country.rate.is_not(None))"
                         ".values(rate=Country.rate + 1)", stmt, {"broadcast_write"}, False)


@dataclass
class WriteCase:
    """One generated UPDATE/DELETE."""

    src: str
    stmt: Any
    tags: set[str]
    #: the outcome depends on co-location the drop-in constructor cannot know
    colocation: bool
    #: parameter sets of an ORM bulk UPDATE by primary key
    params: list[dict[str, Any]] | None = None

