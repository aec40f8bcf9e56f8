"""The object and row checks of tenant-scoped sessions (each raises before anything
is sent to a database or returned to the caller)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import inspect
from sqlalchemy.orm import ORMExecuteState

from ..exc import TenantIsolationError
from ._mappers import TenantMapper, tenant_mappers, text_of, typed_key

__all__ = [
    "check_bulk_rows", "check_loaded", "check_new", "check_state", "deleted_states", "own_new",
]


def own_new(state: Any, tm: TenantMapper, tenant: str) -> None:
    obj = state.obj()
    for attr in tm.attrs:
        value = state.dict.get(attr)
        if value is None:
            setattr(obj, attr, typed_key(tm, tenant))
        elif text_of(value) != tenant:
            raise TenantIsolationError(
                f"a new {state.mapper.class_.__name__} of tenant {text_of(value)!r} cannot be "
                f"written by a session of tenant {tenant!r}",
                tenant=tenant,
                other_tenant=text_of(value),
            )


def check_state(state: Any, tm: TenantMapper, tenant: str) -> None:
    for attr in tm.attrs:
        value = state.dict.get(attr)
        if value is not None and text_of(value) != tenant:
            raise TenantIsolationError(
                f"{state.mapper.class_.__name__} belongs to tenant {text_of(value)!r}, not to "
                f"this session's tenant {tenant!r}",
                tenant=tenant,
                other_tenant=text_of(value),
            )


def deleted_states(session: Any) -> Iterable[Any]:
    return list(session._deleted)


def check_loaded(session: Any, instance: Any) -> None:
    state = inspect(instance)
    owned = tenant_mappers(session._placement)
    tm = owned.get(state.mapper)
    if tm is None:
        return
    try:
        check_state(state, tm, session._tenant)
    except TenantIsolationError:
        session.expunge(instance)
        raise


def check_new(session: Any, instance: Any) -> None:
    state = inspect(instance)
    tm = tenant_mappers(session._placement).get(state.mapper)
    if tm is not None:
        for attr in tm.attrs:
            value = state.dict.get(attr)
            if value is not None and text_of(value) != session._tenant:
                session.expunge(instance)  # (it is in the session already: take it out)
                raise TenantIsolationError(
                    f"a {state.mapper.class_.__name__} of tenant {text_of(value)!r} cannot be "
                    f"added to a session of tenant {session._tenant!r}",
                    tenant=session._tenant,
                    other_tenant=text_of(value),
                )


def check_bulk_rows(
    orm_context: ORMExecuteState, touched: list[TenantMapper], tenant: str
) -> None:
    params = orm_context.parameters
    if not isinstance(params, list):  # (one parameter set: not a bulk write by rows;
        return  # the ORM statement itself is filtered)
    rows = params
    for tm in touched:
        for row in rows:
            for attr, col in zip(tm.attrs, tm.columns, strict=True):
                for name in (attr, col.key):
                    if name in row and row[name] is not None and text_of(row[name]) != tenant:
                        raise TenantIsolationError(
                            f"a bulk write of {tm.mapper.class_.__name__} rows of tenant "
                            f"{text_of(row[name])!r} in a session of tenant {tenant!r}",
                            tenant=tenant,
                            other_tenant=text_of(row[name]),
                        )
        if orm_context.is_update:
            pk = [c.key for c in tm.mapper.primary_key]
            if set(tm.attrs) - set(pk):
                raise TenantIsolationError(
                    "a bulk UPDATE by primary key of tenant-owned "
                    f"{tm.mapper.class_.__name__} cannot be filtered by tenant (its primary "
                    "key does not contain the tenant key): use update(...).where(...) or "
                    "the ORM unit of work",
                    tenant=tenant,
                )
        elif orm_context.is_insert:
            for row in rows:
                for attr in tm.attrs:
                    if row.get(attr) is None:
                        row[attr] = typed_key(tm, tenant)
