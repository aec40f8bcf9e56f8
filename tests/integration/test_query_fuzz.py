"""Grammar-based query fuzzer with an independent oracle (issue 10).

Statements from ``_fuzz_grammar`` (SQLAlchemy's user-facing API, including what the
planner does not support) run through a :class:`shardsession.ShardedSession` and, as the
oracle, on ONE database of the same dialect holding every row (SQLite for the mixed
SQLite+PostgreSQL cluster).  The rule: every statement returns what the oracle returns or
raises :class:`shardsession.exc.UnsupportedQueryError`.  Any other exception, or another
answer, is a failure.  Under the drop-in constructor (``shard_chooser`` /
``identity_chooser`` / ``execute_chooser``), statements whose answer depends on co-location
the library cannot know (joins and subqueries relating tables on non-key columns, a table
pinned apart) follow SQLAlchemy's per-shard semantics and must emit a shardsession
warning instead.

Clusters: SQLite (3 files), PostgreSQL (2 servers), MariaDB (2 databases), mixed
(SQLite + PostgreSQL); each with the drop-in constructor and with a ``Placement``.

What "equal" means: a multiset of rows when the statement has no ORDER BY; with ORDER BY
(the sort keys are selected) the keys must match row by row and the rows within a tie
group as a multiset, except the tie groups cut by LIMIT/OFFSET, of which only the keys are
determined; LIMIT without ORDER BY: as many rows as the oracle, all from the unlimited
answer.  Floats compare with a relative tolerance of 1e-9 (1e-5 for sums and extremes of
PostgreSQL REAL, which one database also computes in single precision), NaN equals NaN.
Strings under a case-insensitive collation (every MariaDB column; ``Parent.nick``) are
compared by their fold: one database may answer a DISTINCT, GROUP BY or MIN/MAX with any
member of a group of equal values.  A statement the oracle's database rejects is skipped
(counted as "invalid for the oracle"); so is a driver error on a mixed cluster when one
shard's database rejects the statement on its own.

Environment:

* ``SHARDSESSION_FUZZ_COUNT`` statements per data set (default 60; 3 data sets per
  cluster and API, so 360 statements per cluster type);
* ``SHARDSESSION_FUZZ_MORE_COUNT`` statements per data set from ``_fuzz_more`` (CTEs,
  LATERAL, windows in subqueries, tuple IN, ...; default a third of the count);
* ``SHARDSESSION_FUZZ_DATASETS`` data sets per cluster and API (default 3);
* ``SHARDSESSION_FUZZ_WRITES`` UPDATE/DELETE statements per data set (default 12; 2 data
  sets per cluster and API);
* ``SHARDSESSION_FUZZ_BASE`` base seed (default fixed, so a run is reproducible);
* ``SHARDSESSION_FUZZ_SEED=D:S`` runs only statement seed S over data seed D (both are
  printed with every failure);
* ``SHARDSESSION_FUZZ_LOG=path`` appends one line per failure (``SHARDSESSION_FUZZ_LOG_REFUSED=1``:
  also per refusal), ``SHARDSESSION_FUZZ_TRACE=n`` shows n traceback entries.
"""

from __future__ import annotations

import math
import os
import random
import traceback
import unicodedata
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import pytest
from harness.servers import DEFAULT_XID_PREFIXES, clear_prepared  # (tests/conftest.py path)
from sqlalchemy import Engine, Table, create_engine, delete, insert, inspect, select
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.orm import Session
from sqlalchemy.sql import visitors

import shardsession
from shardsession import (
    Broadcast,
    Follows,
    HashSharding,
    Pinned,
    Placement,
    ShardedSession,
)
from shardsession.exc import NonAtomicCommitWarning, UnsupportedQueryError

from . import _fuzz_grammar as fg
from . import _fuzz_more as fm
from . import _fuzz_schema as fs
from .conftest import _Databases

COUNT = int(os.environ.get("SHARDSESSION_FUZZ_COUNT", "60"))
#: statements per data set of the constructs of _fuzz_more (session 6)
MORE_COUNT = int(os.environ.get("SHARDSESSION_FUZZ_MORE_COUNT", str(max(COUNT // 3, 1))))
WRITE_COUNT = int(os.environ.get("SHARDSESSION_FUZZ_WRITES", "12"))
DATASETS = int(os.environ.get("SHARDSESSION_FUZZ_DATASETS", "3"))
BASE = int(os.environ.get("SHARDSESSION_FUZZ_BASE", "7310"))
ONLY = os.environ.get("SHARDSESSION_FUZZ_SEED")
#: write every failure (one JSON-ish line each) to this file, for triage of long runs
LOG = os.environ.get("SHARDSESSION_FUZZ_LOG")
#: also log refusals (with their message), to review what is refused
LOG_REFUSED = bool(os.environ.get("SHARDSESSION_FUZZ_LOG_REFUSED"))
#: how many traceback entries a failure shows
TRACE = int(os.environ.get("SHARDSESSION_FUZZ_TRACE", "4"))


@dataclass
class FuzzCluster:
    kind: str  # sqlite | postgresql | mysql | mixed
    engines: dict[str, Engine]
    oracle: Engine

    @property
    def shard_ids(self) -> list[str]:
        return sorted(self.engines)

    @property
    def apart_shard(self) -> str:
        return self.shard_ids[-1]


def _make(kind: str, urls: dict[str, str], oracle_url: str) -> FuzzCluster:
    engines = {name: create_engine(url) for name, url in urls.items()}
    oracle = create_engine(oracle_url)
    for e in [*engines.values(), oracle]:
        if e.dialect.name == "postgresql":
            with e.begin() as conn:
                conn.exec_driver_sql(
                    f"CREATE COLLATION IF NOT EXISTS {fs.PG_CI_COLLATION} (provider = icu, "
                    "locale = 'und-u-ks-level2', deterministic = false)")
        fs.FBase.metadata.drop_all(e)
        fs.FBase.metadata.create_all(e)
    return FuzzCluster(kind, engines, oracle)


@pytest.fixture(scope="module")
def fuzz_cluster(request: Any, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[FuzzCluster]:
    # one cluster per kind for the module: every test loads its own rows first
    kind = request.param
    tmp_path = tmp_path_factory.mktemp(f"fuzz-{kind}")
    dbs = _Databases()
    if kind == "sqlite":
        urls = {f"s{i}": f"sqlite:///{tmp_path}/s{i}.db" for i in range(3)}
        cluster = _make(kind, urls, f"sqlite:///{tmp_path}/oracle.db")
    elif kind == "postgresql":
        a = request.getfixturevalue("pg_server_a")
        b = request.getfixturevalue("pg_server_b")
        cluster = _make(kind, {"p0": dbs.new(a), "p1": dbs.new(b)}, dbs.new(a))
    elif kind == "mysql":
        m = request.getfixturevalue("mariadb_server")
        cluster = _make(kind, {"m0": dbs.new(m), "m1": dbs.new(m)}, dbs.new(m))
    else:
        a = request.getfixturevalue("pg_server_a")
        cluster = _make(kind, {"a_pg": dbs.new(a), "b_sqlite": f"sqlite:///{tmp_path}/b.db"},
                        f"sqlite:///{tmp_path}/oracle.db")
    yield cluster
    for e in [*cluster.engines.values(), cluster.oracle]:
        e.dispose()
        # a write test stopped inside a two-phase commit leaves prepared branches that
        # would keep the database from being dropped (our own database on PostgreSQL;
        # only our xids on the shared MariaDB server)
        if e.dialect.name in ("postgresql", "mysql"):
            clear_prepared(e.url.render_as_string(hide_password=False),
                           None if e.dialect.name == "postgresql" else DEFAULT_XID_PREFIXES)
    dbs.drop()


# ---------------------------------------------------------------------------------------
# the two ways a user builds the session


def _tables_of(statement: Any) -> set[str]:
    found: set[str] = set()
    for elem in visitors.iterate(statement):
        name = getattr(elem, "name", None)
        if getattr(elem, "__visit_name__", None) == "table" and isinstance(name, str):
            found.add(name)
    return found


def dropin_session(cluster: FuzzCluster, placement: dict[int, str]) -> ShardedSession:
    """As a ``horizontal_shard`` program writes it (see test_dropin.py)."""
    shards = cluster.shard_ids

    def shard_chooser(mapper: Any, instance: Any, clause: Any = None) -> str:
        if isinstance(instance, fs.Parent):
            return placement.get(instance.id) or fs.hash_shard(instance.id, shards)
        if isinstance(instance, fs.Child):
            return placement.get(instance.parent_id) or fs.hash_shard(instance.parent_id,
                                                                      shards)
        if isinstance(instance, fs.Apart):
            return cluster.apart_shard
        return shards[0]

    def identity_chooser(mapper: Any, primary_key: Any, *, lazy_loaded_from: Any,
                         **kw: Any) -> Any:
        if lazy_loaded_from:
            return [lazy_loaded_from.identity_token]
        return shards

    def execute_chooser(context: Any) -> list[str]:
        tables = _tables_of(context.statement)
        if tables and tables <= {"fz_country"}:
            # the reference table is copied everywhere: read one copy, write all of them
            return shards[:1] if context.is_select else shards
        if tables == {"fz_apart"}:
            return [cluster.apart_shard]
        return shards

    return ShardedSession(shard_chooser=shard_chooser, identity_chooser=identity_chooser,
                          execute_chooser=execute_chooser, shards=cluster.engines)


def make_placement(cluster: FuzzCluster) -> Placement:
    return Placement({
        fs.Parent: HashSharding(fs.Parent.id),
        fs.Child: Follows(fs.Child.parent),
        fs.Country: Broadcast(),
        fs.Apart: Pinned(cluster.apart_shard),
    })


# ---------------------------------------------------------------------------------------
# data


def _wipe_and_insert(engine: Engine, rows: dict[str, list[dict[str, Any]]]) -> None:
    with engine.begin() as conn:
        for table in reversed(fs.TABLES):
            conn.execute(delete(table))
        for table in fs.TABLES:
            if rows.get(table.name):
                conn.execute(insert(table), rows[table.name])


def load(cluster: FuzzCluster, api: str, data_seed: int) -> tuple[dict[int, str], Any]:
    """Fresh rows everywhere; returns the drop-in placement map and the Placement."""
    rng = random.Random(data_seed)
    shards = cluster.shard_ids
    placement = make_placement(cluster) if api == "placement" else None
    strategy = HashSharding(fs.Parent.id)
    strategy.bind(shards)
    # every other data set leaves one shard without any parent (nor child)
    empty = shards[data_seed % len(shards)] if data_seed % 2 == 0 else None

    def where(key: int) -> str:
        return strategy.shard_for(key) if api == "placement" else fs.hash_shard(key, shards)

    rows = fs.make_rows(rng, nan=cluster.kind in ("postgresql", "sqlite"),
                        exact_reals=cluster.kind == "mixed",
                        allowed_ids=(lambda k: where(k) != empty) if empty else None)
    _wipe_and_insert(cluster.oracle, rows)
    by_parent = {p["id"]: where(p["id"]) for p in rows["fz_parent"]}
    if api == "placement":
        # written through the session, as an application would
        for engine in cluster.engines.values():
            _wipe_and_insert(engine, {})
        s = ShardedSession(shards=cluster.engines, placement=placement, atomic="best_effort")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NonAtomicCommitWarning)
            with s.begin():
                s.add_all([fs.Country(**r) for r in rows["fz_country"]])
                s.add_all([fs.Apart(**r) for r in rows["fz_apart"]])
                s.add_all([fs.Parent(**r) for r in rows["fz_parent"]])
                s.flush()
                s.add_all([fs.Child(**r) for r in rows["fz_child"]])
        s.close()
        return by_parent, placement
    for name, engine in cluster.engines.items():
        mine = {
            "fz_parent": [r for r in rows["fz_parent"] if by_parent[r["id"]] == name],
            "fz_child": [r for r in rows["fz_child"] if by_parent[r["parent_id"]] == name],
            "fz_country": rows["fz_country"],
            "fz_apart": rows["fz_apart"] if name == cluster.apart_shard else [],
        }
        _wipe_and_insert(engine, mine)
    return by_parent, None


# ---------------------------------------------------------------------------------------
# comparison


def _norm_row(row: Any) -> tuple[Any, ...]:
    out: list[Any] = []
    for v in row:
        state = None
        try:
            state = inspect(v, raiseerr=False)
        except Exception:
            state = None
        if state is not None and hasattr(state, "mapper"):
            out.append(tuple(getattr(v, a.key) for a in state.mapper.column_attrs))
        else:
            out.append(v)
    return tuple(out)


def _close(a: Any, b: Any, tol: float) -> bool:
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b, strict=True))
    if a is None or b is None:
        return a is None and b is None
    num = (int, float, Decimal)
    if isinstance(a, num) and isinstance(b, num):
        if isinstance(a, bool) != isinstance(b, bool) and not (
                isinstance(a, int) and isinstance(b, int)):
            return False
        if isinstance(a, float) or isinstance(b, float):
            fa, fb = float(a), float(b)
            if math.isnan(fa) or math.isnan(fb):
                return math.isnan(fa) and math.isnan(fb)
            return math.isclose(fa, fb, rel_tol=tol, abs_tol=tol)
        return bool(a == b)
    return bool(type(a) is type(b) and a == b) or (
        isinstance(a, str) and isinstance(b, str) and a == b)


def _multiset_equal(exp: list[tuple[Any, ...]], got: list[tuple[Any, ...]], tol: float) -> bool:
    if len(exp) != len(got):
        return False
    left = list(got)
    for e in exp:
        for i, g in enumerate(left):
            if _close(e, g, tol):
                del left[i]
                break
        else:
            return False
    return True


def _key(row: tuple[Any, ...], idx: list[int]) -> tuple[Any, ...]:
    return tuple(row[i] for i in idx)


def _groups(rows: list[tuple[Any, ...]], idx: list[int], tol: float) -> list[list[Any]]:
    out: list[list[Any]] = []
    for r in rows:
        if out and _close(_key(out[-1][0], idx), _key(r, idx), tol):
            out[-1].append(r)
        else:
            out.append([r])
    return out


def compare(case: fg.Case, exp: list[tuple[Any, ...]], got: list[tuple[Any, ...]],
            tol: float, full: list[tuple[Any, ...]] | None) -> str | None:
    """None when ``got`` is an answer one database could give; else why not."""
    if case.run_unlimited is not None and full is not None:
        # LIMIT without ORDER BY: any rows of the full answer, as many as the oracle gave
        if len(got) != len(exp):
            return f"{len(got)} rows, expected {len(exp)}"
        remaining = list(full)
        for g in got:
            for i, f in enumerate(remaining):
                if _close(f, g, tol):
                    del remaining[i]
                    break
            else:
                return f"row {g!r} is not in the full answer"
        return None
    if case.order_idx is None:
        return None if _multiset_equal(exp, got, tol) else "different multiset"
    if len(exp) != len(got):
        return f"{len(got)} rows, expected {len(exp)}"
    for i, (e, g) in enumerate(zip(exp, got, strict=True)):
        if not _close(_key(e, case.order_idx), _key(g, case.order_idx), tol):
            return f"sort keys differ at row {i}: expected {e!r}, got {g!r}"
    ge, gg = _groups(exp, case.order_idx, tol), _groups(got, case.order_idx, tol)
    for n, (a, b) in enumerate(zip(ge, gg, strict=True)):
        boundary = case.limited and (n == len(ge) - 1 or (n == 0 and "offset" in case.tags))
        if not boundary and not _multiset_equal(a, b, tol):
            return f"tie group {n} differs: expected {a!r}, got {b!r}"
    return None


def _fold_mariadb(value: str) -> str:
    # utf8mb4_general_ci: case- and accent-insensitive, trailing spaces ignored
    plain = "".join(c for c in unicodedata.normalize("NFKD", value)
                    if not unicodedata.combining(c))
    return plain.casefold().rstrip(" ")


def _fold_ascii(value: str) -> str:
    # SQLite NOCASE folds ASCII letters only; the PostgreSQL ICU column holds ASCII values
    return value.translate(_ASCII_LOWER)


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def fold(cluster: FuzzCluster, case: fg.Case, rows: list[tuple[Any, ...]]
         ) -> list[tuple[Any, ...]]:
    """Rows with every case-insensitively compared string replaced by its fold.

    One database answers a DISTINCT, GROUP BY, MIN/MAX or ORDER BY over such a column with
    any member of a group of equal values, so only the group can be compared.
    """
    if cluster.kind == "mysql":  # every string column has the server's default collation
        def deep(v: Any) -> Any:
            if isinstance(v, str):
                return _fold_mariadb(v)
            if isinstance(v, tuple):
                return tuple(deep(x) for x in v)
            return v
        return [tuple(deep(v) for v in row) for row in rows]
    if not case.ci_idx:
        return rows
    return [tuple(_fold_ascii(v) if i in case.ci_idx and isinstance(v, str) else v
                  for i, v in enumerate(row)) for row in rows]


def _types(rows: list[tuple[Any, ...]]) -> list[set[str]]:
    width = max((len(r) for r in rows), default=0)
    out: list[set[str]] = [set() for _ in range(width)]
    for row in rows:
        for i, v in enumerate(row):
            if isinstance(v, tuple):
                out[i].add(repr(tuple(type(x).__name__ for x in v if x is not None)))
            elif v is not None:
                out[i].add(type(v).__name__)
    return out


def type_difference(exp: list[tuple[Any, ...]], got: list[tuple[Any, ...]]) -> str | None:
    """Which column's Python types differ from one database's (None when alike)."""
    for i, (a, b) in enumerate(zip(_types(exp), _types(got), strict=False)):
        if a and b and a != b:
            return f"column {i}: one database returns {sorted(a)}, the merge {sorted(b)}"
    return None


def tolerance(cluster: FuzzCluster, case: fg.Case) -> float:
    if "real_agg" in case.tags and cluster.kind in ("postgresql", "mixed"):
        return 1e-5  # float4 arithmetic: one database's own sum order is arbitrary too
    if cluster.kind == "mixed" and any("real" in t for t in case.tags):
        return 1e-6
    return 1e-9


# ---------------------------------------------------------------------------------------
# one statement


@dataclass
class Finding:
    seeds: str
    outcome: str
    src: str
    detail: str
    tags: set[str]


def _shardsession_warning(caught: list[warnings.WarningMessage]) -> bool:
    for w in caught:
        cat = w.category
        if cat is NonAtomicCommitWarning:
            continue
        if cat.__module__.startswith("shardsession"):
            return True
    return False


def _invalid_on_a_shard(cluster: FuzzCluster, case: fg.Case) -> bool:
    """Whether some shard's database rejects the statement run on it alone."""
    for engine in cluster.engines.values():
        with Session(engine) as plain, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                case.run(plain)
            except SQLAlchemyError:
                return True
    return False


def _generate(stmt_seed: int, kind: str) -> fg.Case:
    rng = random.Random(stmt_seed)
    if stmt_seed % 100_000 >= fm.FIRST_SEED:
        return fm.generate(rng, kind)
    return fg.Grammar(rng, kind).case()


def run_one(cluster: FuzzCluster, api: str, data_seed: int, stmt_seed: int,
            by_parent: dict[int, str], placement: Any, stats: Counter[str]) -> Finding | None:
    case = _generate(stmt_seed, cluster.kind)
    seeds = f"{data_seed}:{stmt_seed}"
    with Session(cluster.oracle) as o, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            exp = [_norm_row(r) for r in case.run(o)]
            full = ([_norm_row(r) for r in case.run_unlimited(o)]
                    if case.run_unlimited is not None else None)
        except (SQLAlchemyError, NotImplementedError):
            stats["invalid for the oracle"] += 1
            return None  # not a valid statement for this dialect: nothing to compare
    session = (dropin_session(cluster, by_parent) if placement is None
               else ShardedSession(shards=cluster.engines, placement=placement))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            got = [_norm_row(r) for r in case.run(session)]
        except UnsupportedQueryError as exc:
            stats["refused"] += 1
            if LOG and LOG_REFUSED:
                _log(cluster.kind, "placement" if placement else "dropin",
                     Finding(seeds, "refused", case.src, str(exc)[:300], case.tags))
            return None
        except Exception as exc:
            if isinstance(exc, DBAPIError) and _invalid_on_a_shard(cluster, case):
                stats["invalid on a shard"] += 1
                return None  # (mixed cluster) valid for the oracle's dialect only
            stats["failed"] += 1
            return Finding(seeds, f"exception {type(exc).__module__}.{type(exc).__name__}",
                           case.src, f"{str(exc)[:300]}\n" + "".join(
                               traceback.format_exception(exc)[-TRACE:])[-300 * TRACE:],
                           case.tags)
        finally:
            session.close()
    why = compare(case, fold(cluster, case, exp), fold(cluster, case, got),
                  tolerance(cluster, case), None if full is None else fold(cluster, case, full))
    if why is None and cluster.kind != "mixed":
        # same values, but a program also sees their types (mixed clusters: documented
        # to return each shard's driver types)
        why = type_difference(exp, got)
    if why is None:
        stats["equal"] += 1
        return None
    if placement is None and case.colocation and _shardsession_warning(caught):
        stats["differs, warned (drop-in co-location)"] += 1
        return None  # the documented drop-in co-location class
    stats["failed"] += 1
    return Finding(seeds, "wrong answer", case.src,
                   f"{why}\n  expected ({len(exp)}): {exp[:8]!r}\n  got ({len(got)}): "
                   f"{got[:8]!r}", case.tags)


def _log(kind: str, api: str, f: Finding) -> None:
    assert LOG
    with open(LOG, "a") as fh:
        fh.write(repr({"cluster": kind, "api": api, "seeds": f.seeds, "outcome": f.outcome,
                       "src": f.src, "tags": sorted(f.tags), "detail": f.detail}) + "\n")


def _report(kind: str, api: str, findings: list[Finding], stats: Counter[str]) -> str:
    classes = Counter(f.outcome for f in findings)
    lines = [f"{len(findings)} of {sum(stats.values())} statements failed on {kind}/{api}: "
             f"{dict(classes)}; all outcomes: {dict(stats)}",
             "reproduce one with SHARDSESSION_FUZZ_SEED=<data seed>:<statement seed>"]
    for f in sorted(findings, key=lambda f: len(f.src))[:25]:
        lines.append(f"- [{f.seeds}] {f.outcome}: {f.src}\n    {f.detail}")
    return "\n".join(lines)


# the mixed cluster's id names no server: mark it for the PostgreSQL shard it needs
CLUSTERS = ["sqlite", "postgresql", "mysql",
            pytest.param("mixed", marks=(pytest.mark.postgresql, pytest.mark.sqlite))]


@pytest.mark.parametrize("api", ["dropin", "placement"])
@pytest.mark.parametrize("fuzz_cluster", CLUSTERS, indirect=True)
def test_fuzz_matches_one_database(fuzz_cluster: FuzzCluster, api: str) -> None:
    """Every generated statement equals the oracle or raises UnsupportedQueryError."""
    if ONLY:
        d, s = (int(x) for x in ONLY.split(":"))
        plan = [(d, [s])]
    else:
        plan = [
            (BASE * 100 + d, [(BASE * 100 + d) * 100_000 + i for i in range(COUNT)]
             + [(BASE * 100 + d) * 100_000 + fm.FIRST_SEED + i for i in range(MORE_COUNT)])
            for d in range(DATASETS)
        ]
    findings: list[Finding] = []
    stats: Counter[str] = Counter()
    for data_seed, stmt_seeds in plan:
        by_parent, placement = load(fuzz_cluster, api, data_seed)
        for stmt_seed in stmt_seeds:
            f = run_one(fuzz_cluster, api, data_seed, stmt_seed, by_parent, placement, stats)
            if f is not None:
                findings.append(f)
                if LOG:
                    _log(fuzz_cluster.kind, api, f)
    print(f"{fuzz_cluster.kind}/{api}: {dict(stats)}")
    assert not findings, _report(fuzz_cluster.kind, api, findings, stats)
    # a fuzzer that compares nothing proves nothing: most statements must get an answer
    # (the rest are refusals and statements the oracle's dialect rejects)
    assert stats["equal"] >= sum(stats.values()) // 4, dict(stats)


def test_oracle_comparison_detects_differences() -> None:
    """The comparison itself can fail: ties, LIMIT boundaries, NaN, floats, subsets."""
    case = fg.Case("x", lambda s: [], order_idx=[0], limited=True)
    exp = [(1, "a"), (2, "b"), (2, "c"), (3, "d"), (3, "e")]
    assert compare(case, exp, [(1, "a"), (2, "c"), (2, "b"), (3, "x"), (3, "y")], 1e-9,
                   None) is None  # the last tie group is cut by the LIMIT
    assert compare(case, exp, [(1, "a"), (2, "c"), (2, "x"), (3, "d"), (3, "e")], 1e-9,
                   None) is not None
    assert compare(case, exp, exp[:4], 1e-9, None) is not None
    plain = fg.Case("x", lambda s: [])
    assert compare(plain, [(float("nan"),)], [(float("nan"),)], 1e-9, None) is None
    assert compare(plain, [(1.0,)], [(1.0000001,)], 1e-9, None) is not None
    assert compare(plain, [(Decimal("1.50"),)], [(Decimal("1.5"),)], 1e-9, None) is None
    assert compare(plain, [(1,), (1,)], [(1,)], 1e-9, None) is not None
    assert compare(plain, [(None,)], [(0,)], 1e-9, None) is not None
    sub = fg.Case("x", lambda s: [], run_unlimited=lambda s: [])
    assert compare(sub, [(1,), (2,)], [(3,), (2,)], 1e-9, [(1,), (2,), (3,)]) is None
    assert compare(sub, [(1,), (2,)], [(4,), (2,)], 1e-9, [(1,), (2,), (3,)]) is not None
    # case-insensitive comparison: any member of a group of equal values may answer
    maria = FuzzCluster("mysql", {}, None)  # type: ignore[arg-type]
    lite = FuzzCluster("sqlite", {}, None)  # type: ignore[arg-type]
    assert compare(plain, fold(maria, plain, [("Bob ",), ("ä",)]),
                   fold(maria, plain, [("bob",), ("A",)]), 1e-9, None) is None
    assert compare(plain, fold(maria, plain, [("bob",)]),
                   fold(maria, plain, [("bob",), ("Bob",)]), 1e-9, None) is not None
    ci = fg.Case("x", lambda s: [], ci_idx={0})
    assert compare(ci, fold(lite, ci, [("Bob", "a")]), fold(lite, ci, [("bOB", "a")]), 1e-9,
                   None) is None
    assert compare(ci, fold(lite, ci, [("Bob", "a")]), fold(lite, ci, [("Bob", "A")]), 1e-9,
                   None) is not None
    assert compare(ci, fold(lite, ci, [("bob ",)]), fold(lite, ci, [("bob",)]), 1e-9,
                   None) is not None  # NOCASE keeps trailing spaces significant
    assert type_difference([(1, Decimal("1.5"))], [(1, Decimal("1.5"))]) is None
    assert type_difference([(1,)], [(Decimal(1),)]) is not None
    assert type_difference([(None,)], [(1.0,)]) is None
    assert shardsession.UnsupportedQueryError is UnsupportedQueryError


# ---------------------------------------------------------------------------------------
# writes: UPDATE / DELETE, compared by the tables' contents afterwards


def _nan_free(row: Any) -> tuple[Any, ...]:
    # NaN is not equal to itself; a stored NaN must still compare equal to the oracle's
    return tuple("NaN" if isinstance(v, float) and math.isnan(v) else v for v in row)


def _snapshot(engines: list[Engine]) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the sharded tables over all ``engines``, sorted."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    for table in (fs.Parent.__table__, fs.Child.__table__):
        assert isinstance(table, Table)
        rows: list[tuple[Any, ...]] = []
        for e in engines:
            with e.connect() as conn:
                rows.extend(_nan_free(r) for r in conn.execute(select(table)))
        out[table.name] = sorted(rows, key=repr)
    return out


def _copies(engine: Engine) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        return sorted((_nan_free(r) for r in conn.execute(select(fs.Country.__table__))),
                      key=repr)


def _write_session(cluster: FuzzCluster, by_parent: dict[int, str], placement: Any
                   ) -> ShardedSession:
    if placement is None:
        return dropin_session(cluster, by_parent)
    # several SQLite shards cannot commit one write atomically: best effort, as documented
    return ShardedSession(shards=cluster.engines, placement=placement, atomic="best_effort")


def write_one(cluster: FuzzCluster, api: str, data_seed: int, seed: int,
              by_parent: dict[int, str], placement: Any, stats: Counter[str]
              ) -> Finding | None:
    with Session(cluster.oracle) as o:
        ids = [r[0] for r in o.execute(select(fs.Parent.id).order_by(fs.Parent.id))]
    case = fg.Grammar(random.Random(seed), cluster.kind).write(ids)
    seeds = f"{data_seed}:{seed}"
    with Session(cluster.oracle) as o, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            res: Any = (o.execute(case.stmt, case.params) if case.params
                        else o.execute(case.stmt))
            # a drop-in program's own chooser writes every copy of the reference table,
            # and SQLAlchemy's rowcount adds them up: only a placement knows it is one table
            exp_count = (None if case.params or (placement is None and "broadcast_write"
                                                 in case.tags) else res.rowcount)
        except (SQLAlchemyError, NotImplementedError):
            stats["invalid for the oracle"] += 1
            return None
        session = _write_session(cluster, by_parent, placement)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                got_res: Any = (session.execute(case.stmt, case.params) if case.params
                                else session.execute(case.stmt))
                got_count = None if case.params else got_res.rowcount
                session.commit()
            except UnsupportedQueryError:
                stats["refused"] += 1
                session.rollback()
                return None
            except Exception as exc:
                stats["failed"] += 1
                session.rollback()
                return Finding(seeds, f"exception {type(exc).__module__}.{type(exc).__name__}",
                               case.src, f"{str(exc)[:300]}\n" + "".join(
                                   traceback.format_exception(exc)[-TRACE:])[-300 * TRACE:],
                               case.tags)
            finally:
                session.close()
        o.commit()
    want, have = _snapshot([cluster.oracle]), _snapshot(list(cluster.engines.values()))
    why = None
    if want != have:
        why = "tables differ after the write: " + "; ".join(
            f"{t}: expected {sorted(set(want[t]) - set(have[t]), key=repr)[:4]!r} "
            f"got {sorted(set(have[t]) - set(want[t]), key=repr)[:4]!r}"
            for t in want if want[t] != have[t])
    elif any(_copies(e) != _copies(cluster.oracle) for e in cluster.engines.values()):
        why = "a copy of the broadcast table differs from the oracle's"
    elif exp_count is not None and got_count != exp_count:
        why = f"rowcount {got_count}, expected {exp_count}"
    if why is None:
        stats["equal"] += 1
        return None
    if placement is None and case.colocation and _shardsession_warning(caught):
        stats["differs, warned (drop-in co-location)"] += 1
        return Finding(seeds, "resync", case.src, why, case.tags)
    stats["failed"] += 1
    return Finding(seeds, "wrong result", case.src, why, case.tags)


@pytest.mark.parametrize("api", ["dropin", "placement"])
@pytest.mark.parametrize("fuzz_cluster", CLUSTERS, indirect=True)
def test_fuzz_writes_match_one_database(fuzz_cluster: FuzzCluster, api: str) -> None:
    """Every UPDATE/DELETE leaves the tables as on one database, or raises
    UnsupportedQueryError before anything is written."""
    if ONLY:
        # writes change the rows: replay the data set's earlier writes first
        d, s = (int(x) for x in ONLY.split(":"))
        plan = [(d, list(range(d * 100_000, s + 1)))]
    else:
        plan = [
            (BASE * 100 + 50 + d, [(BASE * 100 + 50 + d) * 100_000 + i
                                   for i in range(WRITE_COUNT)])
            for d in range(2)
        ]
    findings: list[Finding] = []
    stats: Counter[str] = Counter()
    for data_seed, seeds in plan:
        by_parent, placement = load(fuzz_cluster, api, data_seed)
        for seed in seeds:
            f = write_one(fuzz_cluster, api, data_seed, seed, by_parent, placement, stats)
            if f is None:
                continue
            # the shards no longer hold the oracle's rows: start the data set again
            by_parent, placement = load(fuzz_cluster, api, data_seed)
            if f.outcome == "resync":
                continue
            findings.append(f)
            if LOG:
                _log(fuzz_cluster.kind, api + "-write", f)
    print(f"{fuzz_cluster.kind}/{api} writes: {dict(stats)}")
    assert not findings, _report(fuzz_cluster.kind, api + " (writes)", findings, stats)
    assert stats["equal"] >= sum(stats.values()) // 4, dict(stats)



@pytest.mark.parametrize("kind", ["sqlite", "postgresql", "mysql", "mixed"])
def test_grammar_marks_every_colocation_case(kind: str) -> None:
    """A statement tagged as depending on co-location is one the drop-in API may answer
    per shard with a warning; a case that loses the mark would report the documented
    drop-in outcome as a wrong answer (as ``from_subquery`` did)."""
    for seed in range(3000):
        case = _generate(seed if seed % 2 else fm.FIRST_SEED + seed, kind)
        assert case.colocation == ("colocation" in case.tags), (seed, case.src)
