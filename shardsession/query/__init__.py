"""Cross-shard queries that return what one database holding all rows would return.

:func:`execute_on_shards` is called by :class:`shardsession.ShardedSession` for every
statement that targets more than one shard.  It runs the statement on the shards in
parallel and merges the results exactly (ORDER BY, LIMIT/OFFSET, COUNT/SUM/MIN/MAX/AVG,
GROUP BY, HAVING, DISTINCT), or raises :class:`~shardsession.exc.UnsupportedQueryError`
naming the construct it cannot merge.  docs/queries.md has the support matrix.

Per-statement execution options (``stmt.execution_options(...)`` or
``session.execute(..., execution_options=...)``):

``shardsession_merge`` (bool)
    ``False`` returns SQLAlchemy's ``horizontal_shard`` behaviour: the shards' results
    concatenated, unmerged (still fetched in parallel).
``shardsession_timeout`` (float, seconds)
    deadline of the fan-out; :class:`~shardsession.exc.FanoutTimeoutError` when passed.
``shardsession_max_workers`` (int)
    how many shards are queried at once.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy.engine import Result
from sqlalchemy.orm import ORMExecuteState
from sqlalchemy.sql import Select, operators, visitors
from sqlalchemy.sql.elements import ClauseElement, TextClause
from sqlalchemy.sql.selectable import CompoundSelect
from sqlalchemy.sql.util import find_tables

from .. import _compat
from ..exc import (
    ConfigurationError,
    NoShardChosenError,
    UnsupportedQueryError,
    warn_colocation,
)
from ._cache import LRUCache
from ._checks import (
    CheckContext,
    QueryPlacement,
    check_select,
    check_write,
)
from ._compound import CompoundSelectAny, plan_compound
from ._computed import Evaluator
from ._derived import counted_inner_select
from ._fanout import ShardCall, run_on_shards
from ._merge import merge_aggregate, merge_compound, merge_rows
from ._model import StatementModel, model_select
from ._nodes import MERGEABLE_AGGREGATES, OTHER_AGGREGATES, global_construct
from ._null_order import explicit_nulls_in_subqueries, nulls_low_on_one_shard
from ._oneshard import one_shard_colocation
from ._paginate import Page, paginate
from ._plan import PLAN_CACHE, AggregatePlan, plan_select
from ._semantics import apply_semantics, check_having, compound_sort_keys
from ._twopass import resolve_uncorrelated
from ._union_from import union_rows_distinct

__all__ = [
    "CHECK_CACHE",
    "MAX_WORKERS_OPTION",
    "MERGE_OPTION",
    "PLAN_CACHE",
    "TIMEOUT_OPTION",
    "FanoutOptions",
    "Page",
    "QueryPlacement",
    "execute_on_shards",
    "one_shard_statement",
    "paginate",
]

log = logging.getLogger(__name__)

MERGE_OPTION = "shardsession_merge"
TIMEOUT_OPTION = "shardsession_timeout"
MAX_WORKERS_OPTION = "shardsession_max_workers"
#: internal: per-shard bound parameters (used by :func:`paginate`)
SHARD_PARAMS_OPTION = "shardsession_shard_params"


# Words in textual SQL whose answer over several shards is not the concatenation of the
# shards' answers; finding one refuses the statement (a false alarm refuses, never lies).
# The aggregate names are the query engine's own lists (one source of truth).
_UNMERGEABLE_TEXT = re.compile(
    r"\b(order\s+by|limit|offset|fetch|top|group\s+by|having|distinct|union|intersect|except"
    r"|over|window|"
    + "|".join(sorted(MERGEABLE_AGGREGATES | OTHER_AGGREGATES))
    + r")\b",
    re.IGNORECASE,
)

# The tables a plain textual SELECT names (after FROM / JOIN), and its FROM clause.
_TEXT_TABLE = re.compile(r"\b(?:from|join)\s+([A-Za-z_][\w.]*|\"[^\"]+\"|`[^`]+`)", re.I)
_TEXT_FROM = re.compile(
    r"\bfrom\b(.*?)(?=\bwhere\b|\bgroup\b|\border\b|\blimit\b|\bhaving\b|$)",
    re.IGNORECASE | re.DOTALL,
)


def _text_reads_replicated_only(sql: str, placement: QueryPlacement | None) -> bool:
    """Whether the textual statement ``sql`` is a SELECT reading only tables that
    ``placement`` replicates (Broadcast): one shard's answer is then the answer.

    Conservative (text is opaque): a single statement starting with SELECT, whose FROM
    and JOIN name tables (no subquery, no comma list), every one of them a placed table
    that is replicated, and that names no other placed table anywhere.  Anything else
    goes to every shard as before."""
    targets = getattr(placement, "targets", None)
    if placement is None or targets is None:
        return False
    if not re.match(r"\s*select\b", sql, re.IGNORECASE) or ";" in sql.strip().rstrip(";"):
        return False
    tables: dict[str, Any] = {}
    for target in targets():
        table = getattr(target, "__table__", target)
        name = getattr(table, "name", None)
        if isinstance(name, str):
            tables[name.lower()] = table
            fullname = getattr(table, "fullname", None)
            if isinstance(fullname, str):
                tables[fullname.lower()] = table
    named = [m.strip('"`').lower() for m in _TEXT_TABLE.findall(sql)]
    if not named or any(n not in tables or not placement.is_replicated(tables[n]) for n in named):
        return False
    if any("," in clause or "(" in clause for clause in _TEXT_FROM.findall(sql)):
        return False
    words = {w.lower() for w in re.findall(r"[A-Za-z_][\w.]*", sql)}
    return not any(
        n in words and not placement.is_replicated(t) for n, t in tables.items()
    )


@dataclass(frozen=True)
class FanoutOptions:
    """Session-wide defaults of a fan-out; execution options override them per statement.

    :param max_workers: bound on shards queried at once (``None``: all).
    :param timeout: per-query deadline in seconds (``None``: none).
    :param merge: ``False`` gives SQLAlchemy's unmerged concatenation.
    :param placement: answers whether tables are replicated and whether joined tables
        are co-located; ``None`` accepts joins as evaluated on each shard.
    """

    max_workers: int | None = None
    timeout: float | None = None
    merge: bool = True
    placement: QueryPlacement | None = None


def _resolve(options: FanoutOptions, execution_options: Any) -> FanoutOptions:
    merge = execution_options.get(MERGE_OPTION, options.merge)
    timeout = execution_options.get(TIMEOUT_OPTION, options.timeout)
    max_workers = execution_options.get(MAX_WORKERS_OPTION, options.max_workers)
    if not isinstance(merge, bool):
        raise ConfigurationError(f"{MERGE_OPTION} must be True or False, not {merge!r}")
    if timeout is not None and (not isinstance(timeout, int | float) or timeout <= 0):
        raise ConfigurationError(f"{TIMEOUT_OPTION} must be a positive number, not {timeout!r}")
    if max_workers is not None and (not isinstance(max_workers, int) or max_workers < 1):
        raise ConfigurationError(f"{MAX_WORKERS_OPTION} must be an int >= 1")
    return replace(options, merge=merge, timeout=timeout, max_workers=max_workers)


#: verdicts of :func:`check_select` by (placement, statement cache key): ``(placement,
#: model)``, the model ``None`` for a statement that reads no sharded table.  Only
#: statements that passed are stored (a refusal is computed again, and raised again,
#: every time).
CHECK_CACHE: LRUCache[tuple[QueryPlacement | None, StatementModel | None]] = LRUCache(1024)


def _check(statement: Select[Any], placement: QueryPlacement | None) -> StatementModel | None:
    ctx = CheckContext(placement)
    if not check_select(statement, ctx):
        return None  # one shard answers it: its select list is not merged
    return model_select(statement, "; ".join(ctx.unplaced) or None)


def _reads_sharded_tables(
    statement: Select[Any], placement: QueryPlacement | None
) -> StatementModel | None:
    """The model of ``statement`` when it reads a sharded table (``None``: it does not);
    raise if it cannot be merged.

    The verdict depends only on the statement's structure and the placement's answers,
    not on bound values, so it is cached by the statement's structural cache key (the
    placement's answers for a table must not change, see :class:`QueryPlacement`).
    """
    key = _compat.statement_cache_key(statement)
    if key is None:
        return _check(statement, placement)
    cache_key = (id(placement), key)
    hit = CHECK_CACHE.get(cache_key)
    if hit is not None and hit[0] is placement:
        return hit[1]
    verdict = _check(statement, placement)
    # The entry keeps ``placement`` alive, so its id cannot be reused by another object.
    CHECK_CACHE.put(cache_key, (placement, verdict))
    return verdict


def _dialect_of(orm_context: ORMExecuteState, shard_id: Any) -> str:
    bind = orm_context.session.get_bind(shard_id=shard_id)
    return str(bind.dialect.name)


#: pattern matching operators (LIKE, ILIKE and the startswith/endswith/contains family
#: SQLAlchemy renders as LIKE): each backend matches under its own rules
_LIKE_OPERATORS = frozenset(
    op
    for name in (
        "like_op", "not_like_op", "notlike_op", "ilike_op", "not_ilike_op", "notilike_op",
        "startswith_op", "not_startswith_op", "endswith_op", "not_endswith_op",
        "contains_op", "not_contains_op", "istartswith_op", "not_istartswith_op",
        "iendswith_op", "not_iendswith_op", "icontains_op", "not_icontains_op",
    )
    if (op := getattr(operators, name, None)) is not None
)  # fmt: skip


def _refuse_like_on_mixed_backends(
    orm_context: ORMExecuteState, shard_ids: Sequence[Any], statement: Any
) -> None:
    """Refuse LIKE/ILIKE on shards of different backends: SQLite's LIKE ignores ASCII
    case, PostgreSQL's does not, MySQL/MariaDB's follows the column's collation (and
    ILIKE is lower() LIKE lower() outside PostgreSQL), so one statement would match
    different rows on different shards, unlike any one database.

    :raises UnsupportedQueryError: before any shard is asked."""
    if not isinstance(statement, ClauseElement) or len(shard_ids) < 2:
        return
    if len({_dialect_of(orm_context, s) for s in shard_ids}) < 2:
        return
    for node in visitors.iterate(statement):
        if getattr(node, "operator", None) in _LIKE_OPERATORS:
            raise UnsupportedQueryError(
                "LIKE/ILIKE (and startswith/endswith/contains) match under each backend's "
                "own rules (case, collation): not run across shards of different "
                "backends; compare lower() values with == or filter in Python",
                construct="LIKE on mixed backends",
            )


def _is_shard(binds: Any, shard_id: Any) -> bool:
    """Whether ``shard_id`` names one of ``binds`` (an unhashable id names none)."""
    try:
        return shard_id in binds
    except TypeError:
        return False


def _evaluator(orm_context: ORMExecuteState, shard_id: Any) -> Evaluator:
    """Runs a FROM-less SELECT (:mod:`._computed`) on ``shard_id``'s connection of the
    session's transaction, in the calling thread, after the fan-out."""

    def run(stmt: Select[Any]) -> Sequence[Any]:
        conn = orm_context.session.connection(bind_arguments={"shard_id": shard_id})
        return conn.execute(stmt).all()

    return run


def _concatenate(results: Sequence[tuple[Any, Result[Any]]]) -> Result[Any]:
    # Exactly horizontal_shard's answer: Result.merge (CursorResult.merge sums rowcount).
    first = results[0][1]
    return first.merge(*[r for _, r in results[1:]])


def execute_on_shards(
    orm_context: ORMExecuteState, shard_ids: Sequence[Any], options: FanoutOptions
) -> Result[Any]:
    """Run ``orm_context``'s statement on each shard and return one Result.

    SELECTs are merged as one database holding all rows would answer them; UPDATE and
    DELETE run on every shard and the result's ``rowcount`` is the sum (for a replicated
    table, one copy's count).

    Failure semantics: an :class:`~shardsession.exc.UnsupportedQueryError` is raised
    before the statement is sent to any shard (or, for an ORDER BY the database collates
    differently from Python, while the rows are read; nothing was changed); only the
    read-only first pass of an uncorrelated subquery (:mod:`._twopass`) may have run.
    A driver error on one shard is re-raised unchanged after the other shards'
    statements finished; their results are discarded; for UPDATE/DELETE the other
    shards' changes stay in the session's open transaction (roll back to undo them;
    :class:`~shardsession.ShardedSession` runs a multi-shard UPDATE/DELETE inside a
    SAVEPOINT per shard and undoes them itself, see ``_bulk.all_or_nothing``).
    A deadline raises
    :class:`~shardsession.exc.FanoutTimeoutError`; roll the session back afterwards.
    """
    shard_ids = list(dict.fromkeys(shard_ids))
    if not shard_ids:
        raise NoShardChosenError("no shard to run the statement on", shard_id=None)
    opts = _resolve(options, orm_context.execution_options)
    shard_params = orm_context.execution_options.get(SHARD_PARAMS_OPTION)
    statement = orm_context.statement
    call = ShardCall(
        statement=statement,
        max_workers=opts.max_workers,
        timeout=opts.timeout,
        shard_params=shard_params,
    )

    if (
        orm_context.is_update
        and orm_context.is_orm_statement
        and isinstance(orm_context.parameters, list)
    ):
        # SQLAlchemy's bulk UPDATE by primary key refuses a session that places objects
        # per instance (NotImplementedError); say so in the library's terms.
        raise UnsupportedQueryError(
            "ORM bulk UPDATE by primary key (a list of parameter dicts) is not supported "
            "by a sharded session; update the objects, or run update() per shard",
            construct="ORM bulk UPDATE by primary key",
        )
    if len(shard_ids) == 1:
        # One shard needs no merge: only the deadline (when one is set) applies, and the
        # cluster's NULL order (as for any one-shard SELECT, see _execute._single).
        session: Any = orm_context.session
        binds = getattr(session, "_shards", None)
        if binds and _is_shard(binds, shard_ids[0]) and orm_context.is_select:
            one = nulls_low_on_one_shard(
                statement,
                binds[shard_ids[0]].dialect.name,
                (b.dialect.name for b in binds.values()),
            )
            call = replace(call, statement=one)
        return _concatenate(run_on_shards(orm_context, shard_ids, call))

    if opts.merge or not orm_context.is_select:
        _refuse_like_on_mixed_backends(orm_context, shard_ids, statement)

    if orm_context.is_insert:
        if len(shard_ids) > 1:
            raise UnsupportedQueryError(
                "an INSERT sent to several shards would store each row several times",
                construct="INSERT",
            )
        return _concatenate(run_on_shards(orm_context, shard_ids, call))

    if orm_context.is_update or orm_context.is_delete:
        if opts.placement is None:
            # (with a placement the session's router checked it, for one shard or many)
            ctx = CheckContext(None)
            check_write(statement, ctx)
            if ctx.unplaced:
                warn_colocation(
                    f"{'; '.join(ctx.unplaced)}: evaluated on each shard, exact only if "
                    "the rows it relates are on the same shard (the session has no "
                    "placement to check it)"
                )
        sync = orm_context.execution_options.get("synchronize_session", "auto")
        # synchronize_session updates objects in the identity map per shard: keep that
        # in the calling thread.
        parallel = (not orm_context.is_orm_statement) or sync is False
        dialects = [str(orm_context.session.get_bind(shard_id=s).dialect.name) for s in shard_ids]
        # an ORDER BY ... LIMIT in a subquery must pick the same rows on every shard
        written_statement = (
            explicit_nulls_in_subqueries(statement, dialects)
            if isinstance(statement, ClauseElement)
            else statement
        )
        written = run_on_shards(
            orm_context,
            shard_ids,
            replace(call, parallel=parallel, statement=written_statement),
        )
        merged = _concatenate(written)
        table = getattr(statement, "table", None)
        if opts.placement is not None and table is not None and opts.placement.is_replicated(
            table
        ):
            # A replicated (broadcast) table's copies changed alike: one database would
            # count its rows once, not once per copy.
            merged.rowcount = getattr(written[0][1], "rowcount", -1)  # type: ignore[attr-defined]
        return merged

    if not opts.merge:
        return _concatenate(run_on_shards(orm_context, shard_ids, call))

    if isinstance(statement, TextClause):
        if _text_reads_replicated_only(statement.text, opts.placement):
            # every shard holds the same rows: ask one, as one database would answer
            return _concatenate(run_on_shards(orm_context, shard_ids[:1], call))
        found = _UNMERGEABLE_TEXT.search(statement.text)
        if found is None:
            # Plain textual SQL (a filter-only SELECT, or a write the chooser sends to
            # every shard): each shard's answer is part of the whole, as horizontal_shard
            # concatenates them.
            return _concatenate(run_on_shards(orm_context, shard_ids, call))
        raise UnsupportedQueryError(
            f"textual SQL with {found.group(1).upper()!r} cannot be merged across shards: "
            f"write it with select(), or pass execution_options({MERGE_OPTION}=False) for "
            "SQLAlchemy's concatenation",
            construct="text()",
        )

    if isinstance(statement, CompoundSelect) and not orm_context.is_from_statement:
        return _merge_compound(orm_context, shard_ids, call, opts, statement)

    if not isinstance(statement, Select):
        construct = "UNION/INTERSECT/EXCEPT" if orm_context.is_select else "statement"
        if orm_context.is_from_statement or not orm_context.is_select:
            construct = "text()/from_statement()"
        raise UnsupportedQueryError(
            f"{type(statement).__name__} cannot be merged across shards; pass "
            f"execution_options({MERGE_OPTION}=False) for SQLAlchemy's concatenation",
            construct=construct,
        )

    statement = _first_pass(orm_context, statement, opts)
    # Query.union(): each shard's UNION removes its own duplicates, the merge's DISTINCT
    # those across shards (see _compound.union_rows_distinct)
    statement = _deduplicated_union(statement)
    inner = counted_inner_select(statement)
    if inner is not None:
        inner = _deduplicated_union(inner)
    if inner is not None and global_construct(inner) is not None:
        # count(*) over rows that need the merge (query.distinct().count(), ...): the
        # merged inner SELECT, counted.
        _check_counted_keys(orm_context, shard_ids, inner)
        counted = _merge_select(orm_context, shard_ids, call, opts, inner)
        if counted is None:
            return _concatenate(run_on_shards(orm_context, shard_ids[:1], call))
        n = sum(1 for _ in counted)
        return _compat.one_row_result(statement.selected_columns.keys(), (n,))
    answer = _merge_select(orm_context, shard_ids, call, opts, statement)
    if answer is None:
        # Only replicated tables (or none): every shard has the same answer.
        log.debug("statement reads no sharded table; asking shard %r only", shard_ids[0])
        return _concatenate(run_on_shards(orm_context, shard_ids[:1], call))
    return answer


def one_shard_statement(
    orm_context: ORMExecuteState, opts: FanoutOptions, shard_count: int
) -> Any:
    """The statement to send to the one shard (of ``shard_count``) a drop-in session's
    chooser picked: its uncorrelated scalar and EXISTS subqueries over sharded tables
    computed first, as a fan-out does; without a placement, warning about subqueries
    whose co-location nothing can check (see :mod:`._oneshard`; under a placement the
    session's router checked them).  For one shard in all, the statement unchanged.

    Failure semantics: read-only; only the first pass may have run when it raises.

    :raises UnsupportedQueryError: a nested subquery one shard cannot answer alone.
    """
    statement = orm_context.statement
    opts = _resolve(opts, orm_context.execution_options)
    if (
        not opts.merge
        or shard_count < 2
        or not isinstance(statement, Select)
        or orm_context.is_from_statement
    ):
        return statement
    statement = _first_pass(orm_context, statement, opts)
    if opts.placement is not None:
        return statement  # (the session's router checked the other subqueries)
    unplaced = one_shard_colocation(statement)
    if unplaced is not None:
        warn_colocation(
            f"{unplaced}: evaluated on the one shard the statement runs on, exact only if "
            "the rows it relates are on that shard (the session has no placement to "
            "check it)"
        )
    return statement


def _deduplicated_union(statement: Select[Any]) -> Select[Any]:
    if union_rows_distinct(statement) and not _compat.select_parts(statement).distinct:
        return statement.distinct()
    return statement


#: statement cache keys of fan-out SELECTs that have no subquery for the first pass
#: (most statements: the search is not repeated for them)
NO_FIRST_PASS: LRUCache[bool] = LRUCache(1024)


def _first_pass(
    orm_context: ORMExecuteState, statement: Select[Any], opts: FanoutOptions
) -> Select[Any]:
    """``statement`` with its uncorrelated scalar and EXISTS subqueries over sharded
    tables replaced by their values, each computed first through the session (routed
    and merged like any statement; see :mod:`._twopass`)."""
    key = _compat.statement_cache_key(statement)
    cache_key = None if key is None else (id(opts.placement), key)
    if cache_key is not None and NO_FIRST_PASS.get(cache_key):
        return statement
    forwarded = {
        k: v
        for k, v in orm_context.execution_options.items()
        if k in (TIMEOUT_OPTION, MAX_WORKERS_OPTION)
    }

    def run(sub: Select[Any]) -> Sequence[Any]:
        return orm_context.session.execute(sub, execution_options=forwarded).all()

    resolved = resolve_uncorrelated(statement, opts.placement, run)
    if resolved is statement and cache_key is not None:
        NO_FIRST_PASS.put(cache_key, True)
    return resolved


def _check_counted_keys(
    orm_context: ORMExecuteState, shard_ids: Sequence[Any], inner: Select[Any]
) -> None:
    """A count of distinct rows or groups counts what Python tells apart: refuse
    string keys a collation may fold (see :func:`~shardsession._compat.string_may_fold`)
    rather than count 'a' and 'A' twice."""
    parts = _compat.select_parts(inner)
    keys = list(parts.group_by) or (list(inner.selected_columns) if parts.distinct else [])
    dialects = [_dialect_of(orm_context, s) for s in shard_ids]
    if any(_compat.string_may_fold(getattr(k, "type", None), dialects) for k in keys):
        raise UnsupportedQueryError(
            "counting distinct rows or groups of strings whose collation may fold values "
            "(MySQL/MariaDB, or a collation of the column) is not merged",
            construct="count of DISTINCT/GROUP BY strings with a collation",
        )


def _sharded_froms(branch: Select[Any], placement: QueryPlacement) -> set[int]:
    """The sharded tables of ``branch``'s FROM list (joins flattened), by identity."""
    return {
        id(_compat.deannotated(t))
        for frm in _compat.final_froms_without_eager_joins(branch)
        for t in find_tables(frm, include_aliases=True)
        if not placement.is_replicated(_compat.deannotated(t))
    }


def _merge_compound(
    orm_context: ORMExecuteState,
    shard_ids: list[Any],
    call: ShardCall,
    opts: FanoutOptions,
    statement: CompoundSelectAny,
) -> Result[Any]:
    """A UNION / UNION ALL of row SELECTs (see :mod:`._compound`): each branch checked as
    a statement, the shards' answers concatenated, deduplicated for UNION, then sorted
    and sliced."""
    dialects = [_dialect_of(orm_context, s) for s in shard_ids]
    plan = plan_compound(statement, dialects)
    for branch in plan.branches:
        model = _reads_sharded_tables(branch, opts.placement)
        if model is None or model.aggregated or global_construct(branch) is not None:
            # A branch over replicated tables only would come back once per shard; one
            # that aggregates, groups, deduplicates or limits needs its own merge.
            raise UnsupportedQueryError(
                "a UNION is merged only when each branch is a plain row SELECT over "
                "sharded tables",
                construct="UNION branch",
            )
        if opts.placement is not None and len(_sharded_froms(branch, opts.placement)) > 1:
            # The session's router checks how a SELECT's tables are joined; it does not
            # look inside a UNION's branches.
            raise UnsupportedQueryError(
                "a UNION branch that joins sharded tables is not merged under a placement",
                construct="UNION branch with a join",
            )
        if model.colocation is not None:
            warn_colocation(
                f"{model.colocation}: evaluated on each shard, exact only if the rows it "
                "relates are on the same shard (the session has no placement to check it)"
            )
    if plan.sort_keys:
        shard_ids = sorted(shard_ids, key=str)

        def connection_for(shard_id: Any) -> Any:
            bind_arguments = dict(orm_context.bind_arguments)
            bind_arguments["shard_id"] = shard_id
            return orm_context.session.connection(bind_arguments=bind_arguments)

        # the strings sort under their collation on the shards, as a plain ORDER BY
        plan = replace(
            plan,
            sort_keys=compound_sort_keys(
                plan.sort_keys, plan.branches, shard_ids, dialects, connection_for
            ),
        )
    results = run_on_shards(orm_context, shard_ids, replace(call, statement=plan.statement))
    return merge_compound(plan, results)


def _merge_select(
    orm_context: ORMExecuteState,
    shard_ids: list[Any],
    call: ShardCall,
    opts: FanoutOptions,
    statement: Select[Any],
) -> Result[Any] | None:
    """Check, plan, run and merge ``statement`` on ``shard_ids``; ``None`` when it reads
    no sharded table (one shard answers it)."""
    # Canonical shard order for ORDER BY: ties of the merge come out in this order, which
    # keeps keyset pagination stable whatever order the chooser returned.  Without ORDER BY
    # keep the chooser's order: rows (and load events) come out as horizontal_shard's do.
    if _compat.select_parts(statement).order_by:
        shard_ids = sorted(shard_ids, key=str)
    model = _reads_sharded_tables(statement, opts.placement)
    if model is None:
        return None
    if model.colocation is not None:
        warn_colocation(
            f"{model.colocation}: evaluated on each shard, exact only if the rows it "
            "relates are on the same shard (the session has no placement to check it)"
        )
    binds = [orm_context.session.get_bind(shard_id=s) for s in shard_ids]
    dialects = [str(b.dialect.name) for b in binds]
    plan = plan_select(
        statement,
        dialects=dialects,
        is_orm=orm_context.is_orm_statement,
        wants_tuples=_compat.wants_tuples(orm_context),
        model=model,
        # memoized on the statement by _reads_sharded_tables()
        cache_key=_compat.statement_cache_key(statement),
    )
    def connection_for(shard_id: Any) -> Any:
        bind_arguments = dict(orm_context.bind_arguments)
        bind_arguments["shard_id"] = shard_id
        return orm_context.session.connection(bind_arguments=bind_arguments)

    # How values compare (collations, NaN) and where NULLs go in subqueries depend on
    # the shards' backends: the plan gets those semantics before any shard is asked.
    plan, semantics = apply_semantics(
        plan,
        shard_ids,
        dialects,
        connection_for,
        cache_key=_compat.statement_cache_key(statement),
        engines=binds,
    )
    if isinstance(plan, AggregatePlan):
        check_having(statement, shard_ids, dialects, connection_for)
    per_shard = explicit_nulls_in_subqueries(plan.statement, dialects)
    results = run_on_shards(orm_context, shard_ids, replace(call, statement=per_shard))
    if isinstance(plan, AggregatePlan):
        return merge_aggregate(
            plan,
            results,
            avg_dialect=dialects[0],
            group_keys=semantics.group_keys if semantics else (),
            distinct_keys=semantics.distinct_keys if semantics else (),
            evaluate=_evaluator(orm_context, shard_ids[0]),
        )
    return merge_rows(plan, results, semantics.distinct_keys if semantics else ())
