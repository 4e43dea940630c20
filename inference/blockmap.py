"""Which inode owns a block: the reverse of every extent map, kept current as files grow, shrink and die.

Blocks are reused quickly after a delete, so a freed range leaves the map the moment its owner's
mapping changes; a write to a block nobody owns is data waiting for its allocation to commit.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Iterator


class BlockMap:
    """Disjoint physical ranges → (inode, logical block of the range start); lookups by bisection."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._info: dict[int, tuple[int, int, int]] = {}  # start -> (length, ino, logical)

    def __len__(self) -> int:
        return len(self._starts)

    def add(self, physical: int, length: int, ino: int, logical: int) -> None:
        """Own [physical, physical+length); whatever overlapped it before is dropped (a hostile or stale map)."""
        if length <= 0:
            return
        self.remove(physical, length)
        i = bisect_right(self._starts, physical)
        self._starts.insert(i, physical)
        self._info[physical] = (length, ino, logical)

    def remove(self, physical: int, length: int) -> None:
        """Forget ownership of [physical, physical+length), splitting ranges that stick out."""
        end = physical + length
        i = max(bisect_right(self._starts, physical) - 1, 0)
        while i < len(self._starts):
            start = self._starts[i]
            if start >= end:
                break
            rlen, ino, logical = self._info[start]
            rend = start + rlen
            if rend <= physical:
                i += 1
                continue
            del self._starts[i]
            del self._info[start]
            if start < physical:
                self._starts.insert(i, start)
                self._info[start] = (physical - start, ino, logical)
                i += 1
            if rend > end:
                self._starts.insert(i, end)
                self._info[end] = (rend - end, ino, logical + (end - start))
                i += 1

    def lookup(self, block: int) -> tuple[int, int] | None:
        """(ino, logical block) owning `block`, or None."""
        i = bisect_right(self._starts, block) - 1
        if i < 0:
            return None
        start = self._starts[i]
        length, ino, logical = self._info[start]
        if block >= start + length:
            return None
        return ino, logical + (block - start)

    def owners(self, first: int, count: int) -> Iterator[tuple[int, int, int, int]]:
        """(physical, length, ino, logical) pieces of [first, first+count) that some inode owns."""
        end = first + count
        i = max(bisect_right(self._starts, first) - 1, 0)
        while i < len(self._starts):
            start = self._starts[i]
            if start >= end:
                break
            length, ino, logical = self._info[start]
            lo, hi = max(start, first), min(start + length, end)
            if lo < hi:
                yield lo, hi - lo, ino, logical + (lo - start)
            i += 1

    def set_extents(self, ino: int, old: Iterable[tuple[int, int, int, bool]],
                    new: Iterable[tuple[int, int, int, bool]]) -> None:
        """Replace one inode's ranges: the old ones leave first (they may be reused by the new)."""
        for _logical, physical, length, _ in old:
            for p, n, owner, _l in list(self.owners(physical, length)):
                if owner == ino:
                    self.remove(p, n)
        for logical, physical, length, _ in new:
            self.add(physical, length, ino, logical)
