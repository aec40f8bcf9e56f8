"""Tenant-owned mappers: which they are, their tenant key, and the filter on it."""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy.orm import Mapper, class_mapper

from ..exc import ConfigurationError, TenantError
from ..routing.placement import Placement
from ..routing.pruning import key_python_type
from ..routing.strategies import Follows
from ._sharding import TenantSharding

__all__ = ["TenantMapper", "criterion", "tenant_mappers", "text_of", "typed_key"]


class TenantMapper:
    """A tenant-owned mapper: the attribute(s) carrying its tenant key, and its rule."""

    __slots__ = ("attrs", "columns", "mapper", "rule")

    def __init__(
        self, mapper: Mapper[Any], rule: TenantSharding, attrs: tuple[str, ...],
        columns: tuple[Any, ...],
    ) -> None:
        self.mapper = mapper
        self.rule = rule
        self.attrs = attrs
        self.columns = columns


def tenant_mappers(placement: Placement) -> dict[Mapper[Any], TenantMapper]:
    """Every mapper placed by a :class:`TenantSharding` directly or by following one
    through a foreign key that carries the tenant key (cached on the placement).

    :raises ConfigurationError: a mapper follows a tenant-owned parent through a
        foreign key without the tenant key (its rows could not be filtered by tenant),
        or two directories place tenants.
    """
    found: dict[Mapper[Any], TenantMapper] | None = placement.cache.get("tenant_mappers")
    if found is not None:
        return found
    found = {}
    directories = {id(r.directory) for r in placement.tenant_rules()}
    if len(directories) > 1:
        raise ConfigurationError("every TenantSharding of a placement must share one directory")
    registries = {}
    for target in placement.targets():
        if isinstance(target, type):
            mapper_of: Mapper[Any] = class_mapper(target)
            registries[id(mapper_of.registry)] = mapper_of.registry
    # (every mapper of those registries: a mapper without a rule of its own may follow a
    # tenant-owned parent implicitly)
    for registry in registries.values():
        for mapper in registry.mappers:
            try:
                r = placement.resolve(mapper)
            except ConfigurationError:
                continue  # not placed: not a tenant's
            if isinstance(r.strategy, TenantSharding):
                found[mapper] = TenantMapper(mapper, r.strategy, r.attrs, r.columns)
            elif isinstance(r.rule, Follows) and _follows_tenant(placement, r):
                raise ConfigurationError(
                    f"{mapper.class_.__name__} follows a tenant-owned parent but its foreign "
                    "key does not carry the tenant key: add the tenant column to it (a "
                    "composite foreign key (tenant_id, parent_id)) so its rows can be "
                    "filtered by tenant"
                )
    placement.cache["tenant_mappers"] = found
    return found


def _follows_tenant(placement: Placement, r: Any) -> bool:
    for prop in r.parent_props:
        parent = placement.resolve(prop.mapper)
        if isinstance(parent.strategy, TenantSharding):
            return True
    return False


#: attribute names -> a function making the criterion lambda for one tenant value
_makers: dict[tuple[str, ...], Any] = {}


def criterion(attrs: tuple[str, ...], value: Any) -> Any:
    """``lambda cls: cls.<attr> == value`` (every attr), as a lambda SQLAlchemy can
    adapt to each alias of the entity (a joined eager load's, ``aliased()``) and cache
    with ``value`` as a bound parameter. The attribute names are written into the
    lambda's code (a closure variable holding a name is not cacheable), one code object
    per set of names."""
    make = _makers.get(attrs)
    if make is None:
        for a in attrs:
            if not a.isidentifier():
                raise ConfigurationError(f"a tenant key attribute must be an identifier: {a!r}")
        body = " & ".join(f"(cls.{a} == value)" for a in attrs)
        ns: dict[str, Any] = {}
        exec(f"def make(value):\n    return lambda cls: {body}\n", ns)
        make = _makers[attrs] = ns["make"]
    return make(value)


def typed_key(tm: TenantMapper, tenant: str) -> Any:
    """The tenant key as the column's Python type (an int column gets an int).

    :raises TenantError: an int column and a tenant whose text is not the canonical
        text of an integer (``"042"``, ``"4_2"``, ``"acme"``: ``int()`` would make some of
        them another tenant's key).
    """
    if key_python_type(tm.columns[0]) is int:
        if _CANONICAL_INT.fullmatch(tenant) and str(int(tenant)) == tenant:
            return int(tenant)
        raise TenantError(
            f"tenant {tenant!r} is not an integer in canonical form, and the tenant key of "
            f"{tm.mapper.class_.__name__} is an integer column",
            tenant=tenant,
        )
    return tenant


#: ASCII digits with an optional minus sign (``str(int(x)) == x`` is checked too)
_CANONICAL_INT = re.compile(r"-?[0-9]+")


def text_of(value: Any) -> str:
    """A tenant key value as the directory's text."""
    return value if type(value) is str else str(value)
