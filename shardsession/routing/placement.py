"""Placement: which rule places each mapper's rows, and the answers the session needs.

A :class:`Placement` maps classes (or tables) to rules from
:mod:`shardsession.routing.strategies` and answers three questions for the session:
the shard of an instance, the shards a primary key may be on, and the shards a statement
must visit. It knows nothing of connections or transactions.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import String, Table, inspect
from sqlalchemy.orm import Mapper, RelationshipProperty
from sqlalchemy.orm.interfaces import MANYTOONE
from sqlalchemy.orm.state import InstanceState
from sqlalchemy.sql.elements import ColumnElement

from .._compat import identity_token_of
from ..exc import ConfigurationError, RoutingError, ShardKeyMissingError
from ._keys import compares_bytewise
from .colocation import CoLocation
from .pruning import key_python_type, key_values
from .strategies import Broadcast, Follows, KeyStrategy, Pinned, Rule

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["Placement", "ResolvedRule", "naming_mapper", "place_by_key"]


def place_by_key(strategy: KeyStrategy, value: Any, mapper: Mapper[Any]) -> str:
    """The shard of a key value, with a strategy's :class:`RoutingError` naming the mapper.

    :raises RoutingError: the strategy cannot place the value.
    """
    try:
        return strategy.shard_for(value)
    except RoutingError as e:
        raise naming_mapper(e, mapper) from e


def naming_mapper(error: RoutingError, mapper: Mapper[Any]) -> RoutingError:
    """A strategy's :class:`RoutingError`, again, with the mapper's class name in front."""
    return type(error)(f"{mapper.class_.__name__}: {error.message}", shard_id=error.shard_id)


@dataclass(frozen=True)
class ResolvedRule:
    """A rule resolved against one mapper (or table).

    ``strategy`` places by the values of ``columns`` (for a :class:`Follows` rule whose
    foreign key points at the parent's shard key these are the local foreign key columns
    and the parent's strategy); ``attrs`` are the matching attribute keys on the mapper.
    """

    rule: Rule
    strategy: KeyStrategy | None = None
    columns: tuple[ColumnElement[Any], ...] = ()
    attrs: tuple[str, ...] = ()
    parent_props: tuple[RelationshipProperty[Any], ...] = ()
    pk_is_key: bool = False
    key_in_pk: tuple[int, ...] = ()


class Placement(CoLocation):
    """Where each mapped class's rows live.

    ::

        placement = Placement({
            User: HashSharding(User.id),
            Order: Follows(Order.user),      # orders live with their user
            Country: Broadcast(),            # reference table on every shard
            AuditLog: Pinned("archive"),     # vertical partitioning
        })

    :param rules: ``{class, mapper or Table: rule}``. A subclass uses its base class's
        rule unless it has its own.
    :param default: rule for mappers without one; ``None`` makes a mapper without a rule
        follow a placed parent through a many-to-one relationship if it has exactly such
        parents, and otherwise raise :class:`~shardsession.exc.ConfigurationError` when
        it is first used.
    """

    def __init__(
        self, rules: Mapping[Any, Rule] | None = None, *, default: Rule | None = None
    ) -> None:
        self._rules: dict[Any, Rule] = {}
        self._default = default
        #: whether any rule (or the default) is :class:`Broadcast` (read after every
        #: flush: a plain attribute, kept by :meth:`add`)
        self.has_broadcast = isinstance(default, Broadcast)
        self._shards: tuple[str, ...] | None = None
        self._resolved: dict[Any, ResolvedRule] = {}
        self._lock = threading.Lock()
        #: derived per-mapper data other modules cache here; cleared when rules change
        self.cache: dict[str, Any] = {}
        for target, rule in (rules or {}).items():
            self.add(target, rule)

    # -- configuration ---------------------------------------------------------------

    def add(self, target: type[Any] | Mapper[Any] | Table, rule: Rule) -> Self:
        """Place ``target`` (a mapped class, mapper or Table) by ``rule``; returns self.

        :raises ConfigurationError: not a rule, or the target already has one.
        """
        if not isinstance(rule, Rule):
            raise ConfigurationError(f"placement of {target!r} must be a Rule, not {rule!r}")
        key = target if isinstance(target, Table) else self._class_of(target)
        if key in self._rules:
            raise ConfigurationError(f"{target!r} already has a placement rule")
        self._rules[key] = rule
        if isinstance(rule, Broadcast):
            self.has_broadcast = True
        if self._shards is not None:
            rule.bind(self._shards)
        self._resolved.clear()
        self.cache.clear()
        return self

    @staticmethod
    def _class_of(target: Any) -> Any:
        if isinstance(target, Mapper):
            return target.class_
        if isinstance(target, type):
            return target
        raise ConfigurationError(
            f"placement targets are mapped classes, mappers or Tables, not {target!r}"
        )

    def bind(self, shard_ids: Sequence[str]) -> None:
        """Validate every rule against the cluster's shard ids.

        :raises ConfigurationError: a rule names an unknown shard, or the placement was
            already bound to a different set of shards.
        """
        shards = tuple(sorted(shard_ids))
        if shards == self._shards:
            return  # already bound to these shards (every session of a sessionmaker)
        if not shards:
            raise ConfigurationError("a sharded session needs at least one shard")
        with self._lock:
            if self._shards is not None:
                if self._shards != shards:
                    raise ConfigurationError(
                        f"this Placement is bound to shards {list(self._shards)}; "
                        f"create another Placement for shards {list(shards)}"
                    )
                return
            for rule in self._rules.values():
                rule.bind(shards)
            if self._default is not None:
                self._default.bind(shards)
            self._shards = shards

    def bind_engines(self, engines: Mapping[str, Any]) -> None:
        """Hand the session's ``{shard id: Engine}`` to every rule (see
        :meth:`Rule.bind_engines`)."""
        for rule in (*self._rules.values(), *((self._default,) if self._default else ())):
            rule.bind_engines(engines)

    def targets(self) -> list[Any]:
        """The classes and Tables that have a rule of their own."""
        return list(self._rules)

    def tenant_rules(self) -> list[Any]:
        """The rules that place rows by tenant (they carry a ``directory``); cached."""
        found: list[Any] | None = self.cache.get("tenant_rules")
        if found is None:
            found = self.cache["tenant_rules"] = [
                r for r in self._rules.values() if getattr(r, "directory", None) is not None
            ]
        return found

    @property
    def shards(self) -> tuple[str, ...]:
        if self._shards is None:
            raise ConfigurationError("the Placement is not attached to a session yet")
        return self._shards

    # -- resolution --------------------------------------------------------------------

    def _rule_of(self, mapper: Mapper[Any]) -> Rule | None:
        for m in mapper.iterate_to_root():
            rule = self._rules.get(m.class_)
            if rule is not None:
                return rule
        for table in mapper.tables:
            rule = self._rules.get(table)
            if rule is not None:
                return rule
        return None

    def mappers_for_tables(self, tables: Sequence[Any]) -> list[Mapper[Any]]:
        """The placed mappers whose tables appear in ``tables`` (for Core statements)."""
        by_table: dict[Any, Mapper[Any]] = {}
        for target in self._rules:
            if isinstance(target, type):
                mapper: Any = inspect(target, raiseerr=False)
                if isinstance(mapper, Mapper):
                    by_table.setdefault(mapper.local_table, mapper)
        found: dict[Mapper[Any], None] = {}
        for t in tables:
            base = getattr(t, "element", t)  # an Alias of a table
            m = by_table.get(base)
            if m is not None:
                found[m] = None
        return list(found)

    # -- what the query engine asks (shardsession.query.QueryPlacement) --------------------

    def is_replicated(self, table: Any) -> bool:
        """Whether every shard holds all rows of ``table`` (a :class:`Broadcast` table)."""
        mappers = self.mappers_for_tables([table])
        return bool(mappers) and all(isinstance(self.resolve(m).rule, Broadcast) for m in mappers)

    def key_columns_of(self, table: Any) -> tuple[Any, ...]:
        """The columns of ``table`` whose values place its rows (its shard key, or the
        foreign key to the parent it follows); empty when no key places them."""
        mappers = self.mappers_for_tables([table])
        if not mappers:
            return ()
        r = self.resolve(mappers[0])
        return r.columns if r.strategy is not None else ()

    def is_placed(self, mapper: Mapper[Any]) -> bool:
        placed: dict[Any, bool] = self.cache.setdefault("is_placed", {})
        found = placed.get(mapper)
        if found is None:
            found = placed[mapper] = (
                self._rule_of(mapper) is not None or self._default is not None
            )
        return found

    def resolve(self, mapper: Mapper[Any]) -> ResolvedRule:
        """Return the resolved rule for ``mapper`` (cached).

        :raises ConfigurationError: no rule applies, or the rule does not fit the mapper.
        """
        found = self._resolved.get(mapper)
        if found is not None:
            return found
        rule = self._rule_of(mapper) or self._default
        if rule is None:
            parents = self._placed_parents(mapper, None) or self._collection_parents(mapper)
            if not parents:
                raise ConfigurationError(
                    f"no placement rule for {mapper.class_.__name__}: add one to the Placement "
                    "(HashSharding, RangeSharding, DirectorySharding, Pinned, Broadcast or "
                    "Follows) or give the Placement a default"
                )
            rule = Follows()
        resolved = self._resolve_rule(mapper, rule)
        self._resolved[mapper] = resolved
        return resolved

    def _placed_parents(
        self, mapper: Mapper[Any], name: str | None
    ) -> list[RelationshipProperty[Any]]:
        props = []
        for prop in mapper.relationships:
            if prop.viewonly or prop.direction is not MANYTOONE:
                continue
            if name is not None and prop.key != name:
                continue
            if prop.mapper is not mapper and self._rule_of(prop.mapper) is not None:
                props.append(prop)
        return props

    def _collection_parents(self, mapper: Mapper[Any]) -> list[RelationshipProperty[Any]]:
        """One-to-many relationships of placed classes whose targets are ``mapper``."""
        found: list[RelationshipProperty[Any]] = []
        for target in self._rules:
            parent = inspect(target, raiseerr=False) if isinstance(target, type) else None
            if not isinstance(parent, Mapper):
                continue
            for prop in parent.relationships:
                if (
                    not prop.viewonly
                    and prop.direction.name == "ONETOMANY"
                    and mapper.isa(prop.mapper)
                ):
                    found.append(prop)
        return found

    def _resolve_rule(self, mapper: Mapper[Any], rule: Rule) -> ResolvedRule:
        if isinstance(rule, KeyStrategy):
            cols = []
            for attr in rule.key:
                prop = mapper.attrs.get(attr)
                if prop is None or not hasattr(prop, "columns"):
                    raise ConfigurationError(
                        f"{rule!r}: {mapper.class_.__name__} has no column attribute {attr!r}"
                    )
                cols.append(prop.columns[0])
            self._check_key_collations(mapper, rule, cols)
            if len(cols) == 1 and key_python_type(cols[0]) is int and rule.normalize is None:
                rule.integer_key = True
            return self._key_rule(mapper, rule, rule, tuple(cols), rule.key)
        if isinstance(rule, Follows):
            props = self._placed_parents(mapper, rule.relationship)
            if rule.relationship is not None and not props:
                raise ConfigurationError(
                    f"{rule!r}: {mapper.class_.__name__}.{rule.relationship} is not a many-to-one "
                    "relationship to a placed class"
                )
            if not props and not self._collection_parents(mapper):
                raise ConfigurationError(
                    f"{mapper.class_.__name__} follows its parent but is reached by no "
                    "relationship of a placed class"
                )
            # Prune by the foreign key when it carries the parent's shard key.
            for prop in props:
                parent = self.resolve(prop.mapper)
                if parent.strategy is None:
                    continue
                local_for_remote = {r: loc for loc, r in prop.local_remote_pairs or ()}
                try:
                    local_cols = tuple(local_for_remote[c] for c in parent.columns)
                except KeyError:
                    continue
                attrs = []
                for c in local_cols:
                    p = mapper.get_property_by_column(c)
                    attrs.append(p.key)
                return self._key_rule(
                    mapper, rule, parent.strategy, local_cols, tuple(attrs), tuple(props)
                )
            return ResolvedRule(rule=rule, parent_props=tuple(props))
        return ResolvedRule(rule=rule)

    @staticmethod
    def _check_key_collations(
        mapper: Mapper[Any], rule: KeyStrategy, cols: Sequence[ColumnElement[Any]]
    ) -> None:
        """Refuse a string key column whose declared collation finds a key by more than
        its exact value, unless the rule normalises keys: ``'bob@x.com'`` would be
        placed apart from the ``'Bob@X.com'`` the database finds."""
        if rule.normalize is not None:
            return
        for col in cols:
            collation = getattr(col.type, "collation", None)
            if isinstance(col.type, String) and not compares_bytewise(collation):
                raise ConfigurationError(
                    f"{rule!r}: {mapper.class_.__name__}.{col.key} is declared COLLATE "
                    f"{collation!r}, under which the database finds a key by other values "
                    "than itself (case, accents or trailing spaces), but the key is placed "
                    "by its exact value; store normalised keys and use a binary collation, "
                    "or pass normalize= to the strategy (shardsession.routing.nocase for "
                    "SQLite NOCASE)"
                )

    @staticmethod
    def _key_rule(
        mapper: Mapper[Any],
        rule: Rule,
        strategy: KeyStrategy,
        cols: tuple[ColumnElement[Any], ...],
        attrs: tuple[str, ...],
        parent_props: tuple[RelationshipProperty[Any], ...] = (),
    ) -> ResolvedRule:
        pk: list[ColumnElement[Any]] = list(mapper.primary_key)
        key_in_pk = tuple(pk.index(c) for c in cols if c in pk)
        return ResolvedRule(
            rule=rule,
            strategy=strategy,
            columns=cols,
            attrs=attrs,
            parent_props=parent_props,
            pk_is_key=len(key_in_pk) == len(cols),
            key_in_pk=key_in_pk if len(key_in_pk) == len(cols) else (),
        )

    # -- answers ----------------------------------------------------------------------------

    def all_candidates(self, mapper: Mapper[Any]) -> list[str]:
        """Every shard that may hold rows of ``mapper``."""
        r = self.resolve(mapper)
        if isinstance(r.rule, Pinned):
            return [r.rule.shard_id]
        if isinstance(r.rule, Broadcast):
            return [r.rule.read_from] if r.rule.read_from else list(self.shards)
        if r.strategy is not None:
            return list(r.strategy.candidate_shards())
        return list(self.shards)

    def shard_for_instance(
        self, mapper: Mapper[Any], state: InstanceState[Any], _depth: int = 0
    ) -> str:
        """The shard a new object goes to.

        :raises ShardKeyMissingError: the object has no shard key value (or no parent).
        :raises RoutingError: the strategy cannot place the value.
        """
        token = identity_token_of(state)
        if token is not None:
            return str(token)
        r = self.resolve(mapper)
        rule = r.rule
        if isinstance(rule, Pinned):
            return rule.shard_id
        if isinstance(rule, Broadcast):
            assert rule.read_from is not None
            return rule.read_from
        if isinstance(rule, Follows):
            for prop in r.parent_props:
                parent = state.dict.get(prop.key)
                if parent is not None and _depth < 50:
                    pstate = inspect(parent)
                    return self.shard_for_instance(pstate.mapper, pstate, _depth + 1)
        if r.strategy is not None:
            values = tuple(state.dict.get(a) for a in r.attrs)
            if any(v is None for v in values):
                missing = [a for a, v in zip(r.attrs, values, strict=True) if v is None]
                raise ShardKeyMissingError(
                    f"cannot place new {mapper.class_.__name__}: shard key "
                    f"{', '.join(missing)} is not set"
                    + (" and it has no parent object" if isinstance(rule, Follows) else ""),
                    shard_id=None,
                    mapper=mapper.class_.__name__,
                    key=tuple(missing),
                )
            value = values[0] if len(values) == 1 else values
            return place_by_key(r.strategy, value, mapper)
        raise ShardKeyMissingError(
            f"cannot place new {mapper.class_.__name__}: it follows a parent through "
            f"{', '.join(p.key for p in r.parent_props)} but none is set",
            shard_id=None,
            mapper=mapper.class_.__name__,
            key=tuple(p.key for p in r.parent_props),
        )

    def shards_for_identity(self, mapper: Mapper[Any], primary_key: Sequence[Any]) -> list[str]:
        """The shards a primary key may be on (one when the key determines the shard)."""
        r = self.resolve(mapper)
        if r.strategy is not None and r.pk_is_key:
            values = tuple(primary_key[i] for i in r.key_in_pk)
            if all(v is not None for v in values):
                try:
                    return [r.strategy.shard_for(values[0] if len(values) == 1 else values)]
                except RoutingError:
                    return []
        return self.all_candidates(mapper)

    def shards_for_clause(
        self,
        mapper: Mapper[Any],
        where: Any,
        params: Mapping[str, Any] | None = None,
        *,
        for_write: bool = False,
    ) -> list[str]:
        """The shards a statement on ``mapper`` with this WHERE clause must visit.

        ``for_write`` sends writes to a broadcast table to every shard.
        """
        r = self.resolve(mapper)
        if isinstance(r.rule, Broadcast) and for_write:
            return list(self.shards)
        if r.strategy is None:
            return self.all_candidates(mapper)
        keys = key_values(where, r.columns, params)
        if keys is None:
            return self.all_candidates(mapper)
        shards: dict[str, None] = {}
        for k in keys:
            try:
                shards[r.strategy.shard_for(k[0] if len(k) == 1 else k)] = None
            except RoutingError:
                continue  # a key no range holds matches no row
        return list(shards)
