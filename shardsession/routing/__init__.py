"""Where data lives: placement strategies, the Placement map and WHERE-clause pruning."""

from __future__ import annotations

from ._keys import nocase
from .placement import Placement
from .pruning import key_values
from .strategies import (
    Broadcast,
    DirectorySharding,
    Follows,
    HashSharding,
    KeyStrategy,
    Pinned,
    RangeSharding,
    Rule,
)

__all__ = [
    "Broadcast",
    "DirectorySharding",
    "Follows",
    "HashSharding",
    "KeyStrategy",
    "Pinned",
    "Placement",
    "RangeSharding",
    "Rule",
    "key_values",
    "nocase",
]
