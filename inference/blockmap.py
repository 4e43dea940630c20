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

    def __getstate__(self) -> dict:
        """For the index file: the ranges by start, whatever order they were added in (the same map pickles the
        same, however it was built: inference/ext/bulkindex.py writes it in one go)."""
        info = self._info
        return {"_starts": self._starts, "_info": {s: info[s] for s in self._starts}}

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
        """Replace one inode's ranges: the old ones leave first (they may be reused by the new).

        Small maps are edited in place; a large one (a file of many extents) is merged into the map in one
        pass, O(map + k log k), where k inserts and removes each shifting the list would be O(k x map)."""
        old, new = list(old), list(new)
        if len(old) + len(new) > BULK:
            self._replace_bulk(ino, old, new)
            return
        for _logical, physical, length, _ in old:
            for p, n, owner, _l in list(self.owners(physical, length)):
                if owner == ino:
                    self.remove(p, n)
        for logical, physical, length, _ in new:
            self.add(physical, length, ino, logical)

    def _replace_bulk(self, ino: int, old: list[tuple[int, int, int, bool]],
                      new: list[tuple[int, int, int, bool]]) -> None:
        drop = _union((p, p + n) for _lg, p, n, _u in old if n > 0)       # ino's old ranges leave
        adds: list[tuple[int, int, int]] = []                               # (physical, length, logical)
        pos = -1
        for p, n, lg in sorted((p, n, lg) for lg, p, n, _u in new if n > 0):
            if p + n <= pos:
                continue  # hostile: wholly inside an earlier new range (the first one keeps it)
            if p < pos:
                p, n, lg = pos, n - (pos - p), lg + (pos - p)
            adds.append((p, n, lg))
            pos = p + n
        cover = _union((p, p + n) for p, n, _lg in adds)                    # everybody's ranges under the new leave
        bounds = [iv for iv in (drop[0] if drop else None, cover[0] if cover else None) if iv is not None]
        if not bounds:
            return
        lo = min(b[0] for b in bounds)
        hi = max(iv[-1][1] for iv in (drop, cover) if iv)
        starts, info = self._starts, self._info
        i = max(bisect_right(starts, lo) - 1, 0)
        j = bisect_right(starts, hi)
        window: list[tuple[int, int, int, int]] = []
        for start in starts[i:j]:
            length, owner, logical = info.pop(start)
            pieces = [(start, start + length)]
            if owner == ino:
                pieces = _subtract(pieces, drop)
            for a, b in _subtract(pieces, cover):
                window.append((a, b - a, owner, logical + (a - start)))
        window.extend((p, n, ino, lg) for p, n, lg in adds)
        window.sort()
        for start, length, owner, logical in window:
            info[start] = (length, owner, logical)
        starts[i:j] = [w[0] for w in window]


BULK = 64  # extents above which set_extents merges instead of editing in place


def _union(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, merged [a, b) intervals."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            if b > out[-1][1]:
                out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def _subtract(pieces: list[tuple[int, int]], holes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """pieces minus the sorted, merged `holes`, found by bisection: O(log holes + overlaps) per piece."""
    if not holes:
        return pieces
    out: list[tuple[int, int]] = []
    for a, b in pieces:
        k = max(bisect_right(holes, (a, a)) - 1, 0)
        while k < len(holes) and holes[k][0] < b and a < b:
            ha, hb = holes[k]
            if hb > a:
                if ha > a:
                    out.append((a, ha))
                a = max(a, hb)
            k += 1
        if a < b:
            out.append((a, b))
    return out
