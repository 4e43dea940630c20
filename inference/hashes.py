"""Content hashes in events: `sha256` of a regular file's bytes at the consistency point (issue 14).

File-integrity users (osquery file_events, Wazuh syscheck, AIDE) compare content hashes; the engine has the
point's bytes in hand when it emits the point's events, and nowhere later has them so cheaply (the blocks may be
reused a second later). So each batch a file-system handler returns is hashed before the engine takes the next
record, through the same read path the view uses (inference/view.py EngineView.read: the replica with the bytes of
data writes no point has taken yet put back), so a hash is of exactly the bytes a reader of the view got.

Cost: a file's hash is kept until its content changes (a create, modify or truncate event), so renames and
attribute changes cost nothing; only with a scope (data not attributed everywhere, so a content change may go
without a modify event) is every hash taken afresh.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable

from inference.events import Mutation

DEFAULT_HASH_LIMIT = 64 << 20  # --hash-limit: larger files get hash_skipped instead of sha256
CHUNK = 8 << 20
CONTENT_KINDS = frozenset(("create", "modify", "truncate"))
NO_HASH_KINDS = frozenset(("delete", "error"))
MAX_CACHED = 1 << 20  # inodes whose hash is kept (~150 bytes each); past it the cache starts again

Read = Callable[[int, int, int], bytes]  # (ino, offset, size) -> bytes, short where the file ends


class Hasher:
    """Stamps `sha256` (or `hash_skipped`) on one file system's events. `limit` None: hashing is off."""

    def __init__(self, read: Read, limit: int | None = DEFAULT_HASH_LIMIT) -> None:
        self.read, self.limit = read, limit
        self.cache: dict[int, tuple[int, str]] = {}  # ino -> (size, hex digest) as of its last content event
        self.hashed_bytes = self.hashed_files = 0
        self.seconds = 0.0  # spent reading and hashing (the benchmark's numerator)

    def stamp(self, events: list[Mutation], *, cache: bool = True) -> None:
        if self.limit is None:
            return
        fresh: set[int] = set()  # hashed in this batch: one point's bytes, whatever the kinds of its events
        for ev in events:
            if ev.type != "file" or ev.kind in NO_HASH_KINDS or ev.size is None:
                if ev.kind in ("delete", "rmdir") and ev.links == 0:
                    self.cache.pop(ev.ino, None)
                continue
            if ev.size > self.limit:
                ev.hash_skipped = True
                continue
            known = self.cache.get(ev.ino) if cache else None
            stale = ev.kind in CONTENT_KINDS and ev.ino not in fresh
            if stale or known is None or known[0] != ev.size:
                digest = self._hash(ev.ino, ev.size)
                if digest is None:
                    continue  # the engine's file is shorter than the event says (cannot happen): no claim
                if len(self.cache) >= MAX_CACHED:
                    self.cache.clear()
                self.cache[ev.ino] = known = (ev.size, digest)
                fresh.add(ev.ino)
            ev.sha256 = known[1]

    def _hash(self, ino: int, size: int) -> str | None:
        t0 = time.perf_counter()
        try:
            return self._digest(ino, size)
        finally:
            self.seconds += time.perf_counter() - t0

    def _digest(self, ino: int, size: int) -> str | None:
        h = hashlib.sha256()
        pos = 0
        while pos < size:
            data = self.read(ino, pos, min(CHUNK, size - pos))
            if not data:
                return None
            h.update(data)
            pos += len(data)
        self.hashed_bytes += size
        self.hashed_files += 1
        return h.hexdigest()
