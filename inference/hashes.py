"""Content hashes in events: `sha256` of a regular file's bytes at the consistency point (issue 14).

File-integrity users (osquery file_events, Wazuh syscheck, AIDE) compare content hashes; the engine has the
point's bytes in hand when it emits the point's events, and nowhere later has them so cheaply (the blocks may be
reused a second later). So each batch a file-system handler returns is hashed before the engine takes the next
record, through the same read path the view uses (inference/view.py EngineView.read: the replica with the bytes of
data writes no point has taken yet put back), so a hash is of exactly the bytes a reader of the view got.

Cost: a file's hash is kept until its content changes (a create, modify or truncate event), so renames and
attribute changes cost nothing; only with a scope (data not attributed everywhere, so a content change may go
without a modify event) is every hash taken afresh.

Diffs (`--diff`): a modify or truncate event carries `old_sha256`, the sha256 of the file's previous event (the
kept hash, or an earlier event's at the same point: a create and a modify at one point chain too); and with a store
(inference/blobs.py) the bytes of each small file hashed are kept under their hash. A file nobody hashed since
recording began (on the base image, untouched) is hashed when a data write first reaches one of its blocks
(`before_change`, called before the write reaches the replica): its old bytes are gone after.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from inference.events import Mutation

if TYPE_CHECKING:
    from inference.blobs import BlobStore

DEFAULT_HASH_LIMIT = 64 << 20  # --hash-limit: larger files get hash_skipped instead of sha256
CHUNK = 8 << 20
CONTENT_KINDS = frozenset(("create", "modify", "truncate"))
CHANGE_KINDS = frozenset(("modify", "truncate"))  # what carries old_sha256: a change of content that was there
NO_HASH_KINDS = frozenset(("delete", "error"))
MAX_CACHED = 1 << 20  # inodes whose hash is kept (~150 bytes each); past it the cache starts again

Read = Callable[[int, int, int], bytes]  # (ino, offset, size) -> bytes, short where the file ends


class Hasher:
    """Stamps `sha256` (or `hash_skipped`) on one file system's events. `limit` None: hashing is off."""

    def __init__(self, read: Read, limit: int | None = DEFAULT_HASH_LIMIT, store: BlobStore | None = None) -> None:
        self.read, self.limit, self.store = read, limit, store
        self.cache: dict[int, tuple[int, str]] = {}  # ino -> (size, hex digest) as of its last content event
        self.hashed_bytes = self.hashed_files = 0
        self.seconds = 0.0  # spent reading and hashing (the benchmark's numerator)
        self.cpu_seconds = 0.0  # the same in CPU time: what a busy machine's preemption does not inflate

    def stamp(self, events: list[Mutation], *, cache: bool = True) -> None:
        if self.limit is None:
            return
        fresh: set[int] = set()  # hashed in this batch: one point's bytes, whatever the kinds of its events
        last: dict[int, str | None] = {}  # the sha256 of each file's previous event in this batch
        for ev in events:
            if ev.type != "file" or ev.kind in NO_HASH_KINDS or ev.size is None:
                if ev.kind in ("delete", "rmdir") and ev.links == 0:
                    self.cache.pop(ev.ino, None)
                continue
            known = self.cache.get(ev.ino)
            if ev.kind in CHANGE_KINDS:  # old_sha256: the sha256 of the file's previous event, when it had one
                ev.old_sha256 = last[ev.ino] if ev.ino in last else known[1] if known is not None else None
            if ev.size > self.limit:
                ev.hash_skipped = True
                last[ev.ino] = None
                if ev.kind in CONTENT_KINDS:
                    self.cache.pop(ev.ino, None)  # not the content before the next change any more
                continue
            known = known if cache else None
            stale = ev.kind in CONTENT_KINDS and ev.ino not in fresh
            if stale or known is None or known[0] != ev.size:
                digest = self._hash(ev.ino, ev.size)
                if digest is None:
                    self.cache.pop(ev.ino, None)
                    last[ev.ino] = None
                    continue  # the engine's file is shorter than the event says (cannot happen): no claim
                if len(self.cache) >= MAX_CACHED:
                    self.cache.clear()
                self.cache[ev.ino] = known = (ev.size, digest)
                fresh.add(ev.ino)
            ev.sha256 = last[ev.ino] = known[1]

    def before_change(self, ino: int, size: int | None) -> None:
        """A data write is about to reach file `ino` (`size`: as shown now): hash its content now, while the
        replica still holds it, unless its hash is kept already. Only for files the store would keep."""
        if self.limit is None or self.store is None or ino in self.cache or size is None \
                or size > min(self.limit, self.store.file_limit):
            return
        digest = self._hash(ino, size)
        if digest is not None:
            if len(self.cache) >= MAX_CACHED:
                self.cache.clear()
            self.cache[ino] = (size, digest)

    def _hash(self, ino: int, size: int) -> str | None:
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return self._digest(ino, size)
        finally:
            self.seconds += time.perf_counter() - t0
            self.cpu_seconds += time.thread_time() - c0

    def _digest(self, ino: int, size: int) -> str | None:
        h = hashlib.sha256()
        keep = self.store is not None and size <= self.store.file_limit
        parts: list[bytes] = []
        pos = 0
        while pos < size:
            data = self.read(ino, pos, min(CHUNK, size - pos))
            if not data:
                return None
            h.update(data)
            if keep:
                parts.append(data)
            pos += len(data)
        self.hashed_bytes += size
        self.hashed_files += 1
        digest = h.hexdigest()
        if keep:
            self.store.keep(digest, parts[0] if len(parts) == 1 else b"".join(parts))
        return digest
