"""A bounded mapping shared fairly between owners (uids): what one uid fills, it empties first."""

from __future__ import annotations

from collections import Counter, OrderedDict
from typing import Any, Hashable, Iterator


class FairMap:
    """At most ``limit`` entries, each held by an owner.  Past the limit the oldest entry of the owner
    holding the most goes: an owner that adds by the thousand pushes out its own once it holds more
    than any other, and another's only down to an equal share.  ``touch`` makes an entry the newest
    (a cache's hit).  Owners sit in buckets by their number of entries, so finding the one holding the
    most takes no scan.  (Not thread-safe: its user's lock guards it.)
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.held: Counter[int] = Counter()  # owner -> its entries
        self._entries: dict[Hashable, tuple[int, Any]] = {}  # key -> (owner, value)
        self._by_owner: dict[int, OrderedDict[Hashable, None]] = {}  # each owner's keys, oldest first
        self._owners_holding: dict[int, dict[int, None]] = {}  # a number of entries -> the owners holding that many
        self._most = 0  # the largest number of entries an owner holds

    def put(self, owner: int, key: Hashable, value: Any) -> None:
        """Add or replace ``key`` (the newest of ``owner``'s), then drop what is past the limit."""
        self.pop(key)
        self._entries[key] = (owner, value)
        self._by_owner.setdefault(owner, OrderedDict())[key] = None
        self._recount(owner, self.held[owner], self.held[owner] + 1)
        if len(self._entries) > self.limit:
            most = next(iter(self._owners_holding[self._most]))
            self.pop(next(iter(self._by_owner[most])))

    def get(self, key: Hashable, default: Any = None) -> Any:
        entry = self._entries.get(key)
        return default if entry is None else entry[1]

    def touch(self, key: Hashable) -> None:
        """Make ``key`` its owner's newest entry."""
        self._by_owner[self._entries[key][0]].move_to_end(key)

    def pop(self, key: Hashable, default: Any = None) -> Any:
        entry = self._entries.pop(key, None)
        if entry is None:
            return default
        owner, value = entry
        keys = self._by_owner[owner]
        del keys[key]
        if not keys:
            del self._by_owner[owner]
        self._recount(owner, self.held[owner], self.held[owner] - 1)
        return value

    def values(self) -> list[Any]:
        return [value for _owner, value in self._entries.values()]

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def _recount(self, owner: int, was: int, now: int) -> None:
        """Move ``owner`` from the bucket of ``was`` entries to that of ``now`` (one more or one fewer)."""
        if was:
            bucket = self._owners_holding[was]
            del bucket[owner]
            if not bucket:
                del self._owners_holding[was]
        if now:
            self._owners_holding.setdefault(now, {})[owner] = None
            self.held[owner] = now
        else:
            del self.held[owner]
        if now > self._most or was == self._most and was not in self._owners_holding:
            self._most = now  # (a count moves by one: the bucket below an emptied top holds this owner)
