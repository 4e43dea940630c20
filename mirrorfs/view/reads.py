"""Reads of the view served from the view's own consistency point: exactly the bytes of the version it shows.

The view's tree lags the engine by the poke queue, and the engine's replica takes a data write at once, before
the consistency point that reports it. So the engine can hold bytes (and sizes) that the view does not show yet;
served as they are, a read could mix two versions of a file rewritten in place, or meet the end of a file the
view still shows longer (which used to be padded with NULs).

The rule, per read of [off, end) of a node (end clipped to the node's size as the view shows it):
- the engine has emitted a content event for the node (modify ranges, truncate from its new size, create,
  delete, attrib) that the view has not applied yet, overlapping the range; or
- the engine has taken data writes to the range that no event has reported yet (EngineView.writing);
then the bytes in the replica are not the view's. The read waits (woken, never polling) until the view has
applied those events, re-clips to the node's size then, and is served from the engine under its lock in one
piece: no event can land for the node while the lock is held, so the bytes are the ones of the view's point.
A read past READ_WAIT still not clear is EIO ("behind"), and so at once is one still waiting for a later
event while the helper is inside the syscall of an earlier one that resized the file (the kernel's drop of the
file's pages at its end waits for this very read: the helper would never get to the later event). A range
the engine cannot fill (its file is shorter than the view's node, its node is gone, its record is torn) is EIO
("short"), never padding. Both are counted for the metrics (mirrorfs_view_read_errors_total).

Keeping old versions' bytes instead (copy-on-write per file until the view catches up) would serve a read at
once, but costs memory in proportion to what the guest rewrites in place; waiting for the view costs the
reader the poke helper's lag (milliseconds) only when the file is changing under it.

Threads: `noted` runs in the engine thread under the engine lock (right after the engine emitted the events,
before anyone else can apply them); `applied` wherever the view takes an event (the trio thread, or the poke
helper when it gives up on one); `read` in trio's worker threads. Lock order: engine lock, then `cond`.
"""

from __future__ import annotations

import collections
import errno
import logging
import threading
import time
from collections.abc import Callable, Iterable

from inference.events import Mutation

log = logging.getLogger("mirrorfs.reads")

READ_WAIT = 30.0   # seconds a read waits for the view to apply its file's events (longer than any poke burst)
WHOLE = (0, None)  # the whole file, whatever its size
CONTENT_KINDS = ("modify", "truncate", "create", "mknod", "delete", "attrib")  # attrib: inline-data rewrites


class ReadError(OSError):
    """A read the view cannot serve with bytes of its own point (EIO)."""


def changed(m: Mutation) -> list[tuple[int, int | None]]:
    """The byte ranges of the file whose content `m` changes ([start, end), end None: to any size)."""
    if m.kind == "modify":
        return [(a, b) for a, b in m.ranges] if m.ranges else [WHOLE]
    if m.kind == "truncate":
        return [(max(m.size or 0, 0), None)]
    return [WHOLE] if m.kind in CONTENT_KINDS else []


class PointReads:
    """The events the engine emitted that the view has not applied yet, per (fs, ino), and the read path."""

    def __init__(self, engine_lock: threading.Lock, view, node: Callable[[int], object | None],
                 wait: float = READ_WAIT, stuck: Callable[[str, int], bool] | None = None) -> None:
        """`stuck(fs, ino)`: is the view's helper inside a syscall that changed that file's size? The kernel then
        drops the file's pages, waiting for every page being read: a read must not wait for a later event."""
        self.lock, self.view, self.node, self.wait = engine_lock, view, node, wait
        self.stuck = stuck or (lambda fs, ino: False)
        self.cond = threading.Condition()
        self.unapplied: dict[tuple[str, int], list[tuple[Mutation, list[tuple[int, int | None]]]]] = {}
        self.version = 0   # moves with every noted batch and every applied event (what a waiting read waits on)
        self.waiting = 0
        self.errors: collections.Counter[str] = collections.Counter()  # reason -> reads answered EIO
        self.waits = 0     # reads that waited for the view

    # -- the engine thread (engine lock held)

    def noted(self, events: Iterable[Mutation]) -> None:
        with self.cond:
            for m in events:
                ranges = changed(m) if not m.is_error else []
                if ranges:
                    self.unapplied.setdefault((m.fs, m.ino), []).append((m, ranges))
            self.version += 1
            if self.waiting:
                self.cond.notify_all()

    # -- the view (trio thread, poke helper)

    def applied(self, m: Mutation) -> None:
        """The view has taken `m` (or will never take it): reads no longer wait for it, nor for the other events
        of the same file up to its seq. Every event carries the file's attributes as of its consistency point, so
        once one of a point's events (a truncate and its modify) is in the tree, the node shows that point, whose
        bytes the engine holds: the rest of that point only adds inotify events. (Waiting for those would also
        deadlock: the kernel's truncate of the page cache that follows the first one waits for the reader's
        pages.) Idempotent."""
        key = (m.fs, m.ino)
        with self.cond:
            pending = self.unapplied.get(key)
            if not pending:
                return
            left = [p for p in pending if p[0] is not m and p[0].seq > m.seq]
            if len(left) == len(pending):
                return
            if left:
                self.unapplied[key] = left
            else:
                del self.unapplied[key]
            self.version += 1
            if self.waiting:
                self.cond.notify_all()

    def pending(self) -> int:
        with self.cond:
            return sum(len(v) for v in self.unapplied.values())

    # -- reads (trio's worker threads)

    def _behind(self, fs: str, ino: int, start: int, end: int) -> bool:
        for _, ranges in self.unapplied.get((fs, ino), ()):
            for a, b in ranges:
                if a < end and (b is None or b > start):
                    return True
        return False

    def read(self, nid: int, off: int, size: int) -> bytes:
        """Bytes [off, off+size) of node `nid` as the view shows it (fewer only at the node's end)."""
        deadline = None
        try:
            while True:
                with self.lock:
                    node = self.node(nid)
                    if node is None:
                        raise ReadError(errno.ENOENT, "no such node")
                    end = min(node.size, off + size)
                    if off >= end:
                        return b""
                    with self.cond:
                        behind = self._behind(node.fs, node.ino, off, end)
                        version = self.version
                    # an event applied between reading the size and the check above changed it: look again
                    same = self.node(nid) is node and min(node.size, off + size) == end
                    if same and not behind and not self.view.writing(node.fs, node.ino, off, end):
                        data = self.view.read(node.fs, node.ino, off, end - off)
                        if len(data) != end - off:
                            self._error("short", f"{node.fs}:{node.ino}: the engine has {len(data)} of the "
                                                 f"{end - off} bytes at {off} the view shows")
                        return data
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.wait
                    self.waits += 1
                if now >= deadline:
                    self._error("behind", f"{node.fs}:{node.ino}: the view did not reach the engine's version of "
                                          f"bytes {off}-{end} within {self.wait:.0f} s")
                if behind and self.stuck(node.fs, node.ino):
                    self._error("behind", f"{node.fs}:{node.ino}: a later version of bytes {off}-{end} is on its "
                                          "way to the view, whose resize of the file waits for this read")
                with self.cond:
                    self.waiting += 1
                    try:
                        self.cond.wait_for(lambda v=version: self.version != v, deadline - now)
                    finally:
                        self.waiting -= 1
        except ReadError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever kept the engine from giving the bytes: not padding
            self._error("short", f"node {nid}: {exc!r}")

    def try_read(self, nid: int, off: int, size: int) -> bytes | None:
        """read() when it can be answered at once, for the trio thread (which must never wait): the engine lock
        free, the range clear of unapplied events and unreported writes, the engine holding every byte. None
        otherwise: the caller then calls read() from a worker thread, which waits or answers EIO. The tree
        changes only in the trio thread, so the node cannot change under this call there."""
        if not self.lock.acquire(blocking=False):
            return None
        try:
            node = self.node(nid)
            if node is None:
                return None
            end = min(node.size, off + size)
            if off >= end:
                return b""
            with self.cond:
                if self._behind(node.fs, node.ino, off, end):
                    return None
            if self.view.writing(node.fs, node.ino, off, end):
                return None
            data = self.view.read(node.fs, node.ino, off, end - off)
            return data if len(data) == end - off else None
        except Exception:  # noqa: BLE001 - read() will say what it is
            return None
        finally:
            self.lock.release()

    def _error(self, reason: str, message: str) -> None:
        self.errors[reason] += 1
        if self.errors[reason] <= 100:
            log.warning("read answered EIO (%s): %s", reason, message)
        raise ReadError(errno.EIO, message)
