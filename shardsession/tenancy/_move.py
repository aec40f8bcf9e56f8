"""Moving a tenant from one shard to another while the application runs.

Three phases:

1. **Copy**: the tenant's rows are copied from the source shard to the target in batches,
   table by table in foreign-key order (parents first). The target does not own the tenant
   yet (no owner row there), so tenant-scoped sessions never see these rows.
2. **Catch up**: the rows written on the source during the copy are brought over by
   comparing the two copies table by table (inserts, updates, deletes), still without a
   lock.
3. **Switch**: one atomic transaction over the source, the target and the directory
   (the session's commit protocol: two-phase commit where the shards can prepare) takes
   the source owner row ``FOR UPDATE`` (waiting for the tenant's transactions that
   checked it, and making new ones wait), brings over what changed since the catch-up,
   writes the owner row on the target with the next version, deletes the tenant's rows
   and owner row on the source, and moves the directory row to the target with the next
   version (a compare-and-set on the old version).

Writers of the tenant that wait on the owner row during the switch then find that the
source no longer owns the tenant and get the retryable
:class:`~shardsession.exc.StaleTenantDirectoryError` (their directory cache is refreshed);
none writes to the source after the switch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Table, and_, delete, insert, or_, select, tuple_, update
from sqlalchemy.engine import Connection

from ..exc import ConfigurationError, TenantError
from ._directory import TenantDirectory, tenant_key, tenant_owners, tenants_table
from ._mappers import TenantMapper, tenant_mappers

__all__ = ["MoveReport", "move_tenant"]

log = logging.getLogger(__name__)

#: progress callback: (phase, table name, rows so far in that table)
Progress = Callable[[str, str, int], None]


@dataclass
class MoveReport:
    """What :func:`move_tenant` did."""

    tenant: str
    source: str
    target: str
    version: int
    #: rows per table copied in the copy phase
    copied: dict[str, int] = field(default_factory=dict)
    #: rows inserted, updated or deleted on the target by the catch-up and the switch
    caught_up: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class _TablePlan:
    table: Table
    tenant_columns: tuple[Any, ...]
    pk: tuple[Any, ...]


def move_tenant(
    sessionmaker: Any,
    tenant: Any,
    to_shard: str,
    *,
    batch_size: int = 1000,
    progress: Progress | None = None,
) -> MoveReport:
    """Move ``tenant``'s rows to ``to_shard`` and switch the directory to it.

    :param sessionmaker: a ``sessionmaker`` of :class:`~shardsession.ShardedSession` with
        the placement that places the tenant-owned mappers (its directory is the one
        switched).
    :param batch_size: rows per INSERT batch of the copy.
    :param progress: called with ``(phase, table, rows)`` after each batch.
    :returns: a :class:`MoveReport`.
    :raises TenantError: the tenant is unknown, already on ``to_shard``, or its directory
        version changed during the move (another move won; nothing switched).
    :raises ConfigurationError: no tenant-owned mappers, or a tenant-owned table without
        a tenant key column or a primary key.

    Failure semantics: until the switch commits, the tenant stays complete on the
    source and tenant-scoped sessions use only the source; the rows already copied stay
    on the target, owned by nobody (they are invisible to tenant-scoped sessions, but a
    session without a tenant reading across shards sees them twice) and the next move of
    the tenant to that shard deletes them first. The switch is one atomic transaction of
    the commit protocol: a crash during it is settled by recovery, leaving the tenant
    complete on exactly one shard. The switch transaction holds the source owner row
    while it compares the tenant's rows on both shards, so its length grows with the
    tenant's size.
    """
    if batch_size < 1:
        raise ConfigurationError("batch_size must be >= 1")
    probe = sessionmaker()
    try:
        placement = probe.placement
        shards = dict(probe.shards)
    finally:
        probe.close()
    if placement is None:
        raise ConfigurationError("move_tenant needs a sessionmaker with a placement")
    owned = tenant_mappers(placement)
    if not owned:
        raise ConfigurationError("the placement has no TenantSharding rules")
    directory: TenantDirectory = next(iter(owned.values())).rule.directory
    key = tenant_key(tenant)
    if to_shard not in shards:
        raise ConfigurationError(f"unknown shard {to_shard!r}; shards are {sorted(shards)}")
    directory.refresh(key)
    source, version = directory.entry(key)
    if source == to_shard:
        raise TenantError(f"tenant {key!r} is already on shard {to_shard!r}", tenant=key)
    plans = _plans(owned)
    report = MoveReport(key, source, to_shard, version + 1)
    src, dst = shards[source], shards[to_shard]

    with dst.begin() as conn:  # leftovers of an earlier, interrupted move
        if conn.execute(select(tenant_owners.c.version).where(
                tenant_owners.c.tenant == key)).first() is not None:
            raise TenantError(
                f"shard {to_shard!r} has an owner row for tenant {key!r} although the "
                f"directory places it on {source!r}: inconsistent, not moving", tenant=key)
        for plan in reversed(plans):
            conn.execute(delete(plan.table).where(_of(plan, key)))

    for plan in plans:  # 1. copy
        n = 0
        last: tuple[Any, ...] | None = None
        while True:
            stmt = select(plan.table).where(_of(plan, key))
            if last is not None:
                stmt = stmt.where(tuple_(*plan.pk) > tuple_(*last) if len(plan.pk) > 1
                                  else plan.pk[0] > last[0])
            stmt = stmt.order_by(*plan.pk).limit(batch_size)
            with src.connect() as c:
                rows = [dict(r._mapping) for r in c.execute(stmt)]
            if not rows:
                break
            with dst.begin() as c:
                c.execute(insert(plan.table), rows)
            n += len(rows)
            last = tuple(rows[-1][col.key] for col in plan.pk)
            if progress is not None:
                progress("copy", plan.table.name, n)
        report.copied[plan.table.name] = n

    with src.connect() as s_conn, dst.begin() as d_conn:  # 2. catch up, unlocked
        report.caught_up = _sync_all(plans, key, s_conn, d_conn, progress)

    session = sessionmaker()  # 3. switch, atomically
    try:
        s_conn = session.connection(bind_arguments={"shard_id": source})
        d_conn = session.connection(bind_arguments={"shard_id": to_shard})
        owner = s_conn.execute(
            select(tenant_owners.c.version).where(tenant_owners.c.tenant == key)
            .with_for_update()).scalar()
        if owner != version:
            raise TenantError(
                f"tenant {key!r} changed during the move (owner version {owner} on "
                f"{source!r}, expected {version}): not switched", tenant=key)
        for name, n in _sync_all(plans, key, s_conn, d_conn, progress).items():
            report.caught_up[name] += n
        d_conn.execute(insert(tenant_owners).values(tenant=key, version=version + 1))
        for plan in reversed(plans):
            s_conn.execute(delete(plan.table).where(_of(plan, key)))
        s_conn.execute(delete(tenant_owners).where(tenant_owners.c.tenant == key))
        dir_shard = _shard_of_engine(shards, directory.engine)
        dir_conn = session.connection(bind_arguments={"shard_id": dir_shard})
        moved = dir_conn.execute(
            update(tenants_table)
            .where(and_(tenants_table.c.tenant == key, tenants_table.c.version == version))
            .values(shard=to_shard, version=version + 1))
        if moved.rowcount != 1:
            raise TenantError(
                f"the directory row of tenant {key!r} changed during the move: not switched",
                tenant=key)
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
        directory.refresh(key)
    log.info("moved tenant %r from %s to %s (version %d)", key, source, to_shard, version + 1)
    return report


def _plans(owned: Mapping[Any, TenantMapper]) -> list[_TablePlan]:
    found: dict[Table, _TablePlan] = {}
    metadata = None
    for tm in owned.values():
        table = tm.mapper.local_table
        if not isinstance(table, Table):
            raise ConfigurationError(f"{tm.mapper.class_.__name__}: not mapped to a Table")
        cols = tuple(table.c[c.key] for c in tm.columns if c.key in table.c)
        if len(cols) != len(tm.columns):
            raise ConfigurationError(
                f"{table.name}: the tenant key columns are not all in this table "
                "(joined-table inheritance is not supported by move_tenant)")
        pk = tuple(table.primary_key.columns)
        if not pk:
            raise ConfigurationError(f"{table.name} has no primary key")
        found[table] = _TablePlan(table, cols, pk)
        metadata = table.metadata
    order = {t: i for i, t in enumerate(metadata.sorted_tables)} if metadata else {}
    return sorted(found.values(), key=lambda p: order.get(p.table, len(order)))


def _of(plan: _TablePlan, key: str) -> Any:
    return and_(*[col == _typed(col, key) for col in plan.tenant_columns])


def _typed(col: Any, key: str) -> Any:
    try:
        if col.type.python_type is int:
            return int(key)
    except (NotImplementedError, ValueError):
        pass
    return key


def _sync_all(plans: Sequence[_TablePlan], key: str, src: Connection, dst: Connection,
              progress: Progress | None) -> dict[str, int]:
    """Make the target's rows of the tenant equal the source's, every table: deletes
    first, children before parents, then inserts and updates, parents before children
    (so foreign keys hold at every statement). Returns the rows changed per table."""
    diffs = [_diff(plan, key, src, dst) for plan in plans]
    counts = {plan.table.name: 0 for plan in plans}
    for plan, (gone, _new, _changed) in zip(reversed(plans), reversed(diffs), strict=True):
        for chunk in _chunks(gone, 500):
            dst.execute(delete(plan.table).where(or_(*[
                and_(*[c == v for c, v in zip(plan.pk, k, strict=True)]) for k in chunk])))
        counts[plan.table.name] += len(gone)
    for plan, (_gone, new, changed) in zip(plans, diffs, strict=True):
        if new:
            dst.execute(insert(plan.table), new)
        pk_names = {c.key for c in plan.pk}
        for row in changed:
            dst.execute(update(plan.table).where(and_(*[c == row[c.key] for c in plan.pk]))
                        .values({n: v for n, v in row.items() if n not in pk_names}))
        counts[plan.table.name] += len(new) + len(changed)
        if progress is not None and counts[plan.table.name]:
            progress("catch-up", plan.table.name, counts[plan.table.name])
    return counts


def _diff(plan: _TablePlan, key: str, src: Connection, dst: Connection
          ) -> tuple[list[tuple[Any, ...]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(primary keys only on the target, rows only on the source, rows that differ)."""
    pk_names = [c.key for c in plan.pk]

    def read(conn: Connection) -> dict[tuple[Any, ...], dict[str, Any]]:
        rows = conn.execute(select(plan.table).where(_of(plan, key)))
        return {tuple(r._mapping[k] for k in pk_names): dict(r._mapping) for r in rows}

    want, have = read(src), read(dst)
    gone = [k for k in have if k not in want]
    new = [want[k] for k in want if k not in have]
    changed = [want[k] for k in want if k in have and want[k] != have[k]]
    return gone, new, changed


def _chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _shard_of_engine(shards: Mapping[str, Any], engine: Any) -> str:
    for name, bind in shards.items():
        if getattr(bind, "engine", bind) is engine:
            return name
    raise ConfigurationError("the tenant directory's engine is not one of the session's shards")

