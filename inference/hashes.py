"""Content hashes in events: `sha256` of a regular file's bytes at the consistency point (issue 14).

File-integrity users (osquery file_events, Wazuh syscheck, AIDE) compare content hashes; the engine has the
point's bytes in hand when it emits the point's events, and nowhere later has them so cheaply (the blocks may be
reused a second later). So the bytes of each batch a file-system handler returns are read before the engine takes
the next record, through the same read path the view uses (inference/view.py EngineView.read: the replica with the
bytes of data writes no point has taken yet put back), so a hash is of exactly the bytes a reader of the view got.

Cost: a file's hash is kept until its content changes (a create, modify or truncate event), so renames and
attribute changes cost nothing; only with a scope (data not attributed everywhere, so a content change may go
without a modify event) is every hash taken afresh. SHA-256 itself (~1.7 GB/s with SHA-NI) was most of what was
left, ~10% of a replay of the untar log, so the engine's hashers copy the point's bytes and take the digests on a
worker thread (hashlib lets go of the GIL: a second core hashes while the engine's Python goes on), and the events
get them before the engine returns them (`resolve`): the same events, in the same order (BENCHMARKS.md "History").

Diffs (`--diff`): a modify or truncate event carries `old_sha256`, the sha256 of the file's previous event (the
kept hash, or an earlier event's at the same point: a create and a modify at one point chain too); and with a store
(inference/blobs.py) the bytes of each small file hashed are kept under their hash. A file nobody hashed since
recording began (on the base image, untouched) is hashed when a data write first reaches one of its blocks
(`before_change`, called before the write reaches the replica): its old bytes are gone after.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from inference.events import Mutation

if TYPE_CHECKING:
    from inference.blobs import BlobStore

DEFAULT_HASH_LIMIT = 64 << 20  # --hash-limit: larger files get hash_skipped instead of sha256
CHUNK = 8 << 20  # read size; a file larger than this is hashed as it is read, on the engine's thread
CONTENT_KINDS = frozenset(("create", "modify", "truncate"))
CHANGE_KINDS = frozenset(("modify", "truncate"))  # what carries old_sha256: a change of content that was there
NO_HASH_KINDS = frozenset(("delete", "error"))
MAX_CACHED = 1 << 20  # inodes whose hash is kept (~150 bytes each); past it the cache starts again
BATCH = 1 << 20  # copies handed to the worker together: one wake-up and lock round per batch, not per file
AHEAD = 32 << 20  # copies handed over and not hashed yet, at most: past it the engine's thread hashes one too

Read = Callable[[int, int, int], bytes]  # (ino, offset, size) -> bytes, short where the file ends


class Pending:
    """A digest of bytes copied at the point, taken later (by `resolve`): `hex` once taken."""

    __slots__ = ("data", "keep", "hex")

    def __init__(self, data: bytes, keep: bool) -> None:
        self.data: bytes | None = data
        self.keep, self.hex = keep, ""


Digest = str | Pending


class _Batch:
    __slots__ = ("items", "size", "done")

    def __init__(self) -> None:
        self.items: list[Pending] = []
        self.size = 0
        self.done = False


class Hasher:
    """Stamps `sha256` (or `hash_skipped`) on one file system's events. `limit` None: hashing is off.

    `defer`: digests are taken on a worker thread (hashlib lets go of the GIL, so on a second core beside the
    engine's Python) and the events' fields are filled in by `resolve`, which the engine calls before it returns
    the events; without it every digest is taken in line, before `stamp` or `before_change` returns. Only the
    copy of the point's bytes is made at once: the next record may overwrite them. The store keeps versions in
    the order they were read, so its rows (and what it evicts first) are what they would be in line."""

    def __init__(self, read: Read, limit: int | None = DEFAULT_HASH_LIMIT, store: BlobStore | None = None, *,
                 defer: bool = False) -> None:
        self.read, self.limit, self.store, self.defer = read, limit, store, defer
        self.cache: dict[int, tuple[int, Digest]] = {}  # ino -> (size, digest) as of its last content event
        self.hashed_bytes = self.hashed_files = 0
        self.seconds = 0.0  # the engine's thread: reading, hashing, waiting for the worker (the benchmark's numerator)
        self.cpu_seconds = 0.0  # the engine's thread's CPU time in them (not waiting, nor preempted)
        self.worker_seconds = self.worker_cpu_seconds = 0.0  # the worker's: hashing, keeping
        self._unset: list[tuple[Mutation, str, Pending]] = []  # events' fields that wait for their digest
        self._open: list[tuple[int, Pending]] = []  # cache entries that do
        self._batch = _Batch()  # being filled
        self._batches: list[_Batch] = []  # handed over since the last resolve, in order (the order of keeping)
        self._todo: deque[_Batch] = deque()  # handed over, not taken by either thread yet
        self._queued = 0  # bytes in _todo
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._kept = 0  # batches the worker has kept (or let go of) in order
        self._closing = False
        self._error: BaseException | None = None
        self._dead = False

    def stamp(self, events: list[Mutation], *, cache: bool = True) -> None:
        if self.limit is None:
            return
        fresh: set[int] = set()  # hashed in this batch: one point's bytes, whatever the kinds of its events
        last: dict[int, Digest | None] = {}  # the sha256 of each file's previous event in this batch
        for ev in events:
            if ev.type != "file" or ev.kind in NO_HASH_KINDS or ev.size is None:
                if ev.kind in ("delete", "rmdir") and ev.links == 0:
                    self.cache.pop(ev.ino, None)
                continue
            known = self.cache.get(ev.ino)
            if ev.kind in CHANGE_KINDS:  # old_sha256: the sha256 of the file's previous event, when it had one
                self._put(ev, "old_sha256",
                          last[ev.ino] if ev.ino in last else known[1] if known is not None else None)
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
                known = self._cache(ev.ino, ev.size, digest)
                fresh.add(ev.ino)
            self._put(ev, "sha256", known[1])
            last[ev.ino] = known[1]

    def before_change(self, ino: int, size: int | None) -> None:
        """A data write is about to reach file `ino` (`size`: as shown now): copy its content now, while the
        replica still holds it, unless its hash is kept already. Only for files the store would keep."""
        if self.limit is None or self.store is None or ino in self.cache or size is None \
                or size > min(self.limit, self.store.file_limit):
            return
        digest = self._hash(ino, size)
        if digest is not None:
            self._cache(ino, size, digest)

    def _put(self, ev: Mutation, field: str, digest: Digest | None) -> None:
        if type(digest) is Pending:
            self._unset.append((ev, field, digest))
        else:
            setattr(ev, field, digest)

    def _cache(self, ino: int, size: int, digest: Digest) -> tuple[int, Digest]:
        if len(self.cache) >= MAX_CACHED:
            self.cache.clear()
        entry = self.cache[ino] = (size, digest)
        if type(digest) is Pending:
            self._open.append((ino, digest))
        return entry

    def _hash(self, ino: int, size: int) -> Digest | None:
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return self._copy(ino, size)
        finally:
            self.seconds += time.perf_counter() - t0
            self.cpu_seconds += time.thread_time() - c0

    def _copy(self, ino: int, size: int) -> Digest | None:
        """The point's bytes handed over to be hashed (a Pending); in line without `defer`, or for a file larger
        than a read (never kept: blobs.MAX_FILE_LIMIT is smaller), so memory stays a read's."""
        if not self.defer or size > CHUNK:
            return self._digest(ino, size)
        keep = self.store is not None and size <= self.store.file_limit
        parts: list[bytes] = []
        pos = 0
        while pos < size:
            data = self.read(ino, pos, size - pos)
            if not data:
                return None
            parts.append(data)
            pos += len(data)
        self.hashed_bytes += size
        self.hashed_files += 1
        digest = Pending(parts[0] if len(parts) == 1 else b"".join(parts), keep)
        batch = self._batch
        batch.items.append(digest)
        batch.size += size
        if batch.size >= BATCH:
            self._hand_over()
        return digest

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

    # -- the worker

    def _hand_over(self) -> None:
        batch, self._batch = self._batch, _Batch()
        with self._cond:
            self._batches.append(batch)
            self._todo.append(batch)
            self._queued += batch.size
            self._cond.notify_all()
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="mirrorfs-hash", daemon=True)
            self._thread.start()
        while self._queued > AHEAD and self._help():
            pass

    def _help(self) -> bool:
        """Hash the last batch nobody took yet on this thread (the worker keeps it, in order)."""
        with self._cond:
            if not self._todo:
                return False
            batch = self._todo.pop()
            self._queued -= batch.size
        _take(batch)
        with self._cond:
            batch.done = True
            self._cond.notify_all()
        return True

    def _work(self) -> None:
        k = 0
        try:
            while True:
                with self._cond:
                    while True:
                        if k < len(self._batches) and self._batches[k].done:
                            batch, take = self._batches[k], False
                            break
                        if self._todo:
                            batch, take = self._todo.popleft(), True
                            self._queued -= batch.size
                            break
                        if self._closing and k == len(self._batches):
                            return
                        self._cond.wait()
                t0, c0 = time.perf_counter(), time.thread_time()
                if take:
                    _take(batch)
                    with self._cond:
                        batch.done = True
                else:
                    self._keep(batch)
                    k += 1
                    with self._cond:
                        self._kept = k
                        self._cond.notify_all()
                self.worker_seconds += time.perf_counter() - t0
                self.worker_cpu_seconds += time.thread_time() - c0
        except BaseException as exc:  # noqa: BLE001 - resolve() raises it on the engine's thread
            self._error = exc
        finally:
            with self._cond:
                self._dead = True
                self._cond.notify_all()

    def _keep(self, batch: _Batch) -> None:
        for item in batch.items:
            if item.keep and self.store is not None:
                self.store.keep(item.hex, item.data)
            item.data = None

    def resolve(self) -> None:
        """Take every digest handed over (the worker's and this thread's), keep the versions in order, and fill
        in the events' and the cache's fields. The engine calls it before its events leave it."""
        if not self._batch.items and not self._batches and not self._unset and not self._open:
            return
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            if self._thread is None and not self._batches:
                batch, self._batch = self._batch, _Batch()
                _take(batch)
                self._keep(batch)
            else:
                if self._batch.items:
                    self._hand_over()
                with self._cond:
                    self._closing = True
                    self._cond.notify_all()
                while self._help():
                    pass
                with self._cond:
                    self._cond.wait_for(lambda: self._kept == len(self._batches) or self._dead)
                self._thread.join()
                error = self._error
                self._thread, self._batches, self._kept, self._closing, self._dead, self._error = \
                    None, [], 0, False, False, None
                if error is not None:
                    raise error
            for ev, field, digest in self._unset:
                setattr(ev, field, digest.hex)
            for ino, digest in self._open:
                entry = self.cache.get(ino)
                if entry is not None and entry[1] is digest:
                    self.cache[ino] = (entry[0], digest.hex)
        finally:
            self._unset, self._open = [], []
            self.seconds += time.perf_counter() - t0
            self.cpu_seconds += time.thread_time() - c0


def _take(batch: _Batch) -> None:
    for item in batch.items:
        item.hex = hashlib.sha256(item.data).hexdigest()
        if not item.keep:
            item.data = None
