"""Co-location: whether the rows a statement relates are stored on one shard.

A mixin of :class:`~shardsession.routing.placement.Placement` (kept apart so the placement
module stays about where rows go): tables pinned to one shard, or a keyed table and the
children that follow it, are co-located; a join or subquery over them is exact when it
relates rows along the placement relationships (see :mod:`.joins`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Mapper, RelationshipProperty

from .joins import ColumnKey, placement_pairs, unrelated_tables
from .strategies import Broadcast, Follows, Pinned

if TYPE_CHECKING:
    from .placement import ResolvedRule

__all__ = ["CoLocation"]


class CoLocation:
    """The co-location questions a :class:`Placement` answers.

    The four methods below are the placement's own (resolution of mappers and tables);
    they are declared here so this mixin type-checks on its own.
    """

    cache: dict[str, Any]

    def resolve(self, mapper: Mapper[Any]) -> ResolvedRule:
        raise NotImplementedError

    def mappers_for_tables(self, tables: Sequence[Any]) -> list[Mapper[Any]]:
        raise NotImplementedError

    def is_replicated(self, table: Any) -> bool:
        raise NotImplementedError

    def _collection_parents(self, mapper: Mapper[Any]) -> list[RelationshipProperty[Any]]:
        raise NotImplementedError

    def _group_of(self, mapper: Mapper[Any], depth: int = 0) -> Any:
        """What decides a mapper's shard: its own pin or key rule, or its parent's."""
        r = self.resolve(mapper)
        if isinstance(r.rule, Pinned):
            return ("pinned", r.rule.shard_id)
        if isinstance(r.rule, Follows) and depth < 50:
            roots = {self._group_of(p.mapper, depth + 1) for p in r.parent_props}
            for prop in self._collection_parents(mapper):
                roots.add(self._group_of(prop.parent, depth + 1))
            return roots.pop() if len(roots) == 1 else ("mixed", id(mapper))
        return ("own", id(mapper.base_mapper))

    def colocated(self, tables: Sequence[Any]) -> bool:
        """Whether rows of ``tables`` related by a join are always on the same shard.

        True when every table is pinned to the same shard, or when the tables are
        distinct and all follow (directly or through parents) one keyed parent, so that a
        join along the placement relationship finds its rows on one shard. A table joined
        with itself (other than pinned) is not co-located: its rows may be anywhere.
        Joins must be along the placement relationship (the foreign key); a join of
        co-located tables on unrelated columns is not detected.
        """
        sharded = [t for t in tables if not self.is_replicated(t)]
        bases = [getattr(t, "element", t) for t in sharded]
        mappers = self.mappers_for_tables(sharded)
        if len(mappers) != len({id(b) for b in bases}):
            return False  # a table the placement does not know
        groups = {self._group_of(m) for m in mappers}
        if len(groups) != 1:
            return False
        (group,) = groups
        if group[0] == "pinned":
            return True
        return len(bases) == len({id(b) for b in bases})

    def joined_apart(
        self, mappers: Sequence[Mapper[Any]], froms: Iterable[Any], where: Any
    ) -> list[list[str]]:
        """For the co-located ``mappers`` of one statement (see :meth:`colocated`): the
        groups of their tables that its JOIN conditions and WHERE clause do not relate
        along the placement (a child's foreign key to its parent); ``[]`` when they all
        are, or when they are pinned to one shard (any join is then exact)."""
        if all(self._group_of(m)[0] == "pinned" for m in mappers):
            return []
        return unrelated_tables(
            [m.local_table for m in mappers], froms, where, self._join_pairs(mappers))

    def tables_joined_apart(
        self,
        outer: Sequence[Any],
        inner: Sequence[Any],
        froms: Iterable[Any],
        conditions: list[Any],
    ) -> list[list[str]]:
        """For a subquery over the co-located tables ``inner`` inside a statement over
        ``outer`` (correlated, or ``outer_column IN (subquery)`` with that equality among
        ``conditions``): the groups its FROM list and conditions leave unrelated along the
        placement; ``[]`` when every inner table is related to the outer ones."""
        mappers = [m for m in self.mappers_for_tables([*outer, *inner])
                   if not isinstance(self.resolve(m).rule, Broadcast)]
        if len(mappers) < 2 or all(self._group_of(m)[0] == "pinned" for m in mappers):
            return []
        return unrelated_tables(inner, froms, conditions, self._join_pairs(mappers),
                                connected=outer)

    def _join_pairs(self, mappers: Iterable[Mapper[Any]]) -> set[frozenset[ColumnKey]]:
        cache: dict[Mapper[Any], set[frozenset[ColumnKey]]] = self.cache.setdefault(
            "join_pairs", {})
        allowed: set[frozenset[ColumnKey]] = set()
        for m in mappers:
            pairs = cache.get(m)
            if pairs is None:
                parents = [*self.resolve(m).parent_props, *self._collection_parents(m)]
                pairs = cache[m] = placement_pairs(m, parents)
            allowed |= pairs
        return allowed
