"""More of SQLAlchemy's user-facing API for the query fuzzer (session 6).

Constructs ``_fuzz_grammar`` does not generate: window functions inside subqueries, CTEs
(recursive too), LATERAL, JSON functions, CASE in GROUP BY, ORDER BY a string
concatenation, DISTINCT ON (PostgreSQL), tuple IN (a list and a subquery), EXISTS in the
select list, a scalar subquery in ORDER BY, an uncorrelated ``IN (SELECT aggregate)`` and
``Query.union``.  Each must equal the oracle or be refused, like the rest of the grammar.
Statement seeds from :data:`FIRST_SEED` on (within a data set) come from here.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from sqlalchemy import (
    String,
    case,
    cast,
    desc,
    exists,
    func,
    literal,
    select,
    true,
    tuple_,
)
from sqlalchemy.orm import Session, aliased

from . import _fuzz_grammar as fg
from ._fuzz_schema import Child, Parent

#: statement seeds whose index within a data set is at least this come from here
FIRST_SEED = 50_000


def _rows(stmt: Any) -> Callable[[Session], list[Any]]:
    return lambda s: list(s.execute(stmt).all())


def _case(src: str, run: Callable[[Session], list[Any]], order_idx: list[int] | None = None,
          limited: bool = False, unlimited: Callable[[Session], list[Any]] | None = None, *,
          tags: set[str]) -> fg.Case:
    """A case whose co-location mark follows its tags (a predicate may bring one)."""
    return fg.Case(src, run, order_idx, limited, unlimited, "colocation" in tags, tags)


class More:
    """One statement of the constructs above (one instance per statement, seeded)."""

    def __init__(self, rng: random.Random, dialect: str) -> None:
        self.g = fg.Grammar(rng, dialect)
        self.r = rng
        self.dialect = dialect

    def case(self) -> fg.Case:
        forms: list[Callable[[], fg.Case]] = [
            self.window_in_subquery, self.cte, self.recursive_cte, self.lateral,
            self.json_function, self.case_in_group_by, self.concat_order,
            self.distinct_on, self.tuple_in, self.exists_in_select_list,
            self.subquery_in_order_by, self.in_aggregate, self.query_union,
            self.entity_by_hidden_subquery, self.concat_group_by, self.cte_self_join,
        ]
        return self.r.choice(forms)()

    def _pred(self) -> fg.X:
        return self.g.predicate(fg.Ctx(fg.PARENT_COLS, self.dialect))

    def _group_col(self) -> tuple[Any, str]:
        return self.r.choice([(Parent.grp, "Parent.grp"), (Parent.score, "Parent.score"),
                              (Parent.flag, "Parent.flag")])

    # -- forms -------------------------------------------------------------------------

    def window_in_subquery(self) -> fg.Case:
        w = self._pred()
        rn = func.row_number().over(partition_by=Parent.grp, order_by=Parent.id)
        sq = select(Parent.id, rn.label("rn")).where(w.expr).subquery("sq")
        if self.r.random() < 0.5:
            stmt = select(sq.c.id).where(sq.c.rn <= 2)
            src = (f"sq = select(Parent.id, func.row_number().over(partition_by=Parent.grp, "
                   f"order_by=Parent.id).label('rn')).where({w.src}).subquery('sq'); "
                   "select(sq.c.id).where(sq.c.rn <= 2)")
            return _case(src, _rows(stmt), tags=set(w.tags) | {"window_in_from"})
        mx = select(func.max(Child.qty).over()).where(Child.parent_id == Parent.id).limit(1)
        stmt = select(Parent.id, mx.scalar_subquery().label("m")).where(w.expr)
        src = (f"select(Parent.id, select(func.max(Child.qty).over()).where(Child.parent_id "
               f"== Parent.id).limit(1).scalar_subquery().label('m')).where({w.src})")
        return _case(src, _rows(stmt), tags=set(w.tags) | {"window_in_scalar_sub"})

    def cte(self) -> fg.Case:
        w = self._pred()
        col, csrc = self._group_col()
        k = self.r.randrange(3)
        if k == 0:
            c = select(col.label("k"), Parent.score).where(w.expr).cte("c")
            stmt: Any = select(c.c.k, func.count(), func.sum(c.c.score)).group_by(c.c.k)
            src = (f"c = select({csrc}.label('k'), Parent.score).where({w.src}).cte('c'); "
                   "select(c.c.k, func.count(), func.sum(c.c.score)).group_by(c.c.k)")
            tags = {"cte_plain"}
        elif k == 1:
            c = select(col.label("k"), func.count().label("n")).group_by(col).cte("c")
            stmt = select(c.c.k, c.c.n)
            src = (f"c = select({csrc}.label('k'), func.count().label('n'))"
                   f".group_by({csrc}).cte('c'); select(c.c.k, c.c.n)")
            tags = {"cte_group"}
        else:
            c = select(Parent.id).where(w.expr).cte("c")
            stmt = select(Parent.id, Parent.score).where(Parent.id.in_(select(c.c.id)))
            src = (f"c = select(Parent.id).where({w.src}).cte('c'); "
                   "select(Parent.id, Parent.score).where(Parent.id.in_(select(c.c.id)))")
            tags = {"cte_in_key"}
        return _case(src, _rows(stmt), tags=set(w.tags) | tags)

    def recursive_cte(self) -> fg.Case:
        r = select(literal(1).label("n")).cte("r", recursive=True)
        r = r.union_all(select(r.c.n + 1).where(r.c.n < 4))
        if self.r.random() < 0.5:
            stmt: Any = select(Parent.id, Parent.score).where(Parent.score.in_(select(r.c.n)))
            src = ("r = select(literal(1).label('n')).cte('r', recursive=True); r = "
                   "r.union_all(select(r.c.n + 1).where(r.c.n < 4)); "
                   "select(Parent.id, Parent.score).where(Parent.score.in_(select(r.c.n)))")
        else:
            stmt = select(r.c.n, func.count(Parent.id)).select_from(r).join(
                Parent, Parent.score == r.c.n, isouter=True).group_by(r.c.n)
            src = ("r = ... (1..4, recursive); select(r.c.n, func.count(Parent.id))"
                   ".select_from(r).join(Parent, Parent.score == r.c.n, isouter=True)"
                   ".group_by(r.c.n)")
        return _case(src, _rows(stmt), tags={"recursive_cte"})

    def lateral(self) -> fg.Case:
        top = (select(Child.qty).where(Child.parent_id == Parent.id)
               .order_by(Child.qty.desc(), Child.id).limit(1).lateral("l"))
        stmt = select(Parent.id, top.c.qty).select_from(Parent).join(top, true())
        src = ("l = select(Child.qty).where(Child.parent_id == Parent.id).order_by("
               "Child.qty.desc(), Child.id).limit(1).lateral('l'); "
               "select(Parent.id, l.c.qty).select_from(Parent).join(l, true())")
        return _case(src, _rows(stmt), tags={"lateral"})

    def json_function(self) -> fg.Case:
        name = "json_build_array" if self.dialect == "postgresql" else "json_array"
        fn = getattr(func, name)
        w = self._pred()
        k = self.r.randrange(3)
        if k == 0:  # row-level, in the select list
            stmt: Any = select(Parent.id, fn(Parent.id, Parent.score).label("j")).where(w.expr)
            src = f"select(Parent.id, func.{name}(Parent.id, Parent.score).label('j'))"
        elif k == 1:  # row-level, in WHERE
            stmt = select(Parent.id).where(
                func.length(cast(fn(Parent.score), String(40))) > 4)
            src = (f"select(Parent.id).where(func.length(cast(func.{name}(Parent.score), "
                   "String(40))) > 4)")
        else:  # an aggregate of JSON
            agg = {"postgresql": "json_agg", "mysql": "json_arrayagg"}.get(
                self.dialect, "json_group_array")
            stmt = select(Parent.grp, getattr(func, agg)(Parent.id)).group_by(Parent.grp)
            src = f"select(Parent.grp, func.{agg}(Parent.id)).group_by(Parent.grp)"
        return _case(f"{src}.where({w.src})" if k == 0 else src, _rows(stmt),
                       tags=({"json"} | set(w.tags)) if k == 0 else {"json"})

    def case_in_group_by(self) -> fg.Case:
        w = self._pred()
        k = case((Parent.score > 2, "hi"), (Parent.score.is_(None), "none"), else_="lo")
        stmt = (select(k.label("k"), func.count(), func.max(Parent.amount))
                .where(w.expr).group_by(k).order_by(k))
        src = ("k = case((Parent.score > 2, 'hi'), (Parent.score.is_(None), 'none'), "
               "else_='lo'); select(k.label('k'), func.count(), func.max(Parent.amount))"
               f".where({w.src}).group_by(k).order_by(k)")
        return _case(src, _rows(stmt), [0], tags=set(w.tags) | {"case_group_by"})

    def concat_order(self) -> fg.Case:
        joined = func.coalesce(Parent.grp, "") + "-" + func.coalesce(Parent.name, "")
        desc_ = self.r.random() < 0.5
        key = joined.desc() if desc_ else joined
        n = self.r.randint(1, 8)
        stmt = select(joined.label("c"), Parent.id).order_by(key, Parent.id).limit(n)
        src = ("j = func.coalesce(Parent.grp, '') + '-' + func.coalesce(Parent.name, ''); "
               f"select(j.label('c'), Parent.id).order_by(j{'.desc()' if desc_ else ''}, "
               f"Parent.id).limit({n})")
        return _case(src, _rows(stmt), [0, 1], True, _rows(stmt.limit(None)),
                       tags={"concat_order"})

    def distinct_on(self) -> fg.Case:
        if self.dialect != "postgresql":
            return self.tuple_in()
        stmt = (select(Parent.grp, Parent.id).distinct(Parent.grp)
                .order_by(Parent.grp, Parent.id))
        src = "select(Parent.grp, Parent.id).distinct(Parent.grp).order_by(Parent.grp, Parent.id)"
        return _case(src, _rows(stmt), [0, 1], tags={"distinct_on"})

    def tuple_in(self) -> fg.Case:
        if self.r.random() < 0.5:
            pairs = [("a", 1), ("b", 2), ("A", 3), (None, 0), ("c", -1)]
            stmt: Any = select(Parent.id).where(tuple_(Parent.grp, Parent.score).in_(pairs))
            src = f"select(Parent.id).where(tuple_(Parent.grp, Parent.score).in_({pairs!r}))"
            return _case(src, _rows(stmt), tags={"tuple_in_list"})
        sub = select(Child.parent_id, Child.qty)
        stmt = select(Parent.id, Parent.score).where(
            tuple_(Parent.id, Parent.score).in_(sub))
        src = ("select(Parent.id, Parent.score).where(tuple_(Parent.id, Parent.score)"
               ".in_(select(Child.parent_id, Child.qty)))")
        # (the pair holds the placement key: each parent's children are on its shard, but
        # no check can tell a tuple IN from one on other columns)
        return _case(src, _rows(stmt), tags={"tuple_in_sub", "colocation"})

    def exists_in_select_list(self) -> fg.Case:
        w = self._pred()
        if self.r.random() < 0.5:
            e = exists().where(Child.parent_id == Parent.id, Child.qty > 1)
            src = "exists().where(Child.parent_id == Parent.id, Child.qty > 1)"
            tags = {"exists_col_corr"}
        else:
            e = exists().where(Child.qty > 5)
            src = "exists().where(Child.qty > 5)"
            tags = {"exists_col_global"}
        stmt = select(Parent.id, e.label("e")).where(w.expr)
        return _case(f"select(Parent.id, {src}.label('e')).where({w.src})", _rows(stmt),
                       tags=set(w.tags) | tags)

    def subquery_in_order_by(self) -> fg.Case:
        n_children = (select(func.count(Child.id)).where(Child.parent_id == Parent.id)
                      .scalar_subquery())
        limit = self.r.randint(1, 10)
        stmt = (select(Parent.id, n_children.label("n"))
                .order_by(desc("n"), Parent.id).limit(limit))
        src = ("n = select(func.count(Child.id)).where(Child.parent_id == Parent.id)"
               ".scalar_subquery(); select(Parent.id, n.label('n')).order_by(desc('n'), "
               f"Parent.id).limit({limit})")
        return _case(src, _rows(stmt), [1, 0], True, _rows(stmt.limit(None)),
                       tags={"subquery_order_by"})

    def in_aggregate(self) -> fg.Case:
        w = self._pred()
        col, csrc = self._group_col()
        pc = aliased(Parent, name="pc")
        sub = select(func.max(pc.score)).where(pc.score < 6).group_by(getattr(pc, col.key))
        neg = self.r.random() < 0.4
        cond = Parent.score.not_in(sub) if neg else Parent.score.in_(sub)
        stmt = select(Parent.id, Parent.score).where(cond, w.expr)
        src = (f"select(Parent.id, Parent.score).where(Parent.score."
               f"{'not_in' if neg else 'in_'}(select(func.max(pc.score)).where(pc.score < 6)"
               f".group_by(pc.{col.key})), {w.src})  # ({csrc})")
        return _case(src, _rows(stmt), tags=set(w.tags) | {"in_aggregate"})

    def query_union(self) -> fg.Case:
        w1, w2 = self._pred(), self._pred()
        entity = self.r.random() < 0.3
        all_ = self.r.random() < 0.3
        ordered = self.r.random() < 0.5

        def run(s: Session) -> list[Any]:
            cols: tuple[Any, ...] = (Parent,) if entity else (Parent.grp, Parent.score)
            q1 = s.query(*cols).filter(w1.expr)
            q2 = s.query(*cols).filter(w2.expr)
            q = q1.union_all(q2) if all_ else q1.union(q2)
            if ordered:
                q = q.order_by(Parent.id if entity else Parent.score, Parent.grp)
            rows = q.all()
            if entity:
                return [(p.id, p.score) for p in rows]
            return [tuple(r) for r in rows]

        cols_src = "Parent" if entity else "Parent.grp, Parent.score"
        src = (f"session.query({cols_src}).filter({w1.src}).{'union_all' if all_ else 'union'}"
               f"(session.query({cols_src}).filter({w2.src}))"
               + (".order_by(...)" if ordered else "") + ".all()")
        order_idx = ([0] if entity else [1]) if ordered else None
        return _case(src, run, order_idx, tags=set(w1.tags) | set(w2.tags)
                       | {"query_union"})


    def entity_by_hidden_subquery(self) -> fg.Case:
        n_children = (select(func.count(Child.id)).where(Child.parent_id == Parent.id)
                      .scalar_subquery())
        limit = self.r.randint(1, 10)
        stmt = select(Parent).order_by(n_children.desc(), Parent.id).limit(limit)

        def run(s: Session) -> list[Any]:
            return [(p.id,) for p in s.scalars(stmt)]

        src = ("n = select(func.count(Child.id)).where(Child.parent_id == Parent.id)"
               f".scalar_subquery(); select(Parent).order_by(n.desc(), Parent.id)"
               f".limit({limit})  # ids")
        # (a total order: the ids must come back in the oracle's order)
        return _case(src, run, [0], tags={"entity_hidden_subquery_order"})

    def concat_group_by(self) -> fg.Case:
        w = self._pred()
        joined = func.coalesce(Parent.grp, "?") + "/" + func.coalesce(Parent.ccode, "?")
        stmt = (select(joined.label("k"), func.count(), func.min(Parent.score))
                .where(w.expr).group_by(joined))
        src = ("k = func.coalesce(Parent.grp, '?') + '/' + func.coalesce(Parent.ccode, '?'); "
               f"select(k.label('k'), func.count(), func.min(Parent.score)).where({w.src})"
               ".group_by(k)")
        return _case(src, _rows(stmt), tags=set(w.tags) | {"concat_group_by"})

    def cte_self_join(self) -> fg.Case:
        c = select(Parent.id, Parent.grp, Parent.score).cte("c")
        c2 = c.alias("c2")
        stmt = (select(c.c.id, func.count(c2.c.id)).select_from(c)
                .join(c2, c2.c.grp == c.c.grp).group_by(c.c.id))
        src = ("c = select(Parent.id, Parent.grp, Parent.score).cte('c'); c2 = c.alias('c2'); "
               "select(c.c.id, func.count(c2.c.id)).select_from(c).join(c2, c2.c.grp == "
               "c.c.grp).group_by(c.c.id)")
        return _case(src, _rows(stmt), tags={"cte_self_join", "colocation"})


def generate(rng: random.Random, dialect: str) -> fg.Case:
    return More(rng, dialect).case()
