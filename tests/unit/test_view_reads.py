"""Reads of the FUSE view at the view's own consistency point (mirrorfs.view.reads): EIO and a counter where the engine
lacks bytes the view shows (never NUL padding), a read waits while its file's events are emitted but not applied
or while the engine holds unreported data writes to its range, and gets the version the view shows then."""

from __future__ import annotations

import errno
import stat
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pyfuse3
import trio

from inference.events import Mutation
from inference.view import Entry
from mirrorfs.stream.metrics import EngineMetrics
from mirrorfs.view.ops import Stage, ViewOps
from mirrorfs.view.reads import PointReads, changed
from mirrorfs.view.tree import ViewTree

FILE = 12


class FakeEngine:
    """What PointReads asks of inference.view.EngineView: file content now, and unreported data writes."""

    def __init__(self, content: bytes) -> None:
        self.content = content
        self.pending: list[tuple[int, int]] = []
        self.reads = 0

    def read(self, fs: str, ino: int, off: int, size: int) -> bytes:
        self.reads += 1
        return self.content[off:off + size]

    def writing(self, fs: str, ino: int, start: int, end: int) -> bool:
        return any(a < end and b > start for a, b in self.pending)


def _entry(path: bytes, ino: int, type_: str, size: int = 0) -> Entry:
    return Entry(path=path, ino=ino, type=type_, mode=(stat.S_IFDIR if type_ == "dir" else stat.S_IFREG) | 0o644,
                 uid=0, gid=0, size=size, mtime_ns=1, ctime_ns=1, links=1, rdev=0, target=None, xattrs=None)


def _view(shown: bytes, engine_has: bytes, wait: float = 5.0):
    tree = ViewTree(["disk"])
    tree.load("disk", [_entry(b"/", 2, "dir"), _entry(b"/log", FILE, "file", len(shown))])
    engine = FakeEngine(engine_has)
    reads = PointReads(threading.Lock(), engine, tree.nodes.get, wait=wait)
    ops = ViewOps(tree, Stage(), reads.read, lambda: pyfuse3.StatvfsData(), reads.applied)
    return tree, engine, reads, ops


def _modify(size: int, ranges: list[tuple[int, int]], kind: str = "modify") -> Mutation:
    return Mutation(seq=7, time=1.0, kind=kind, path="/log", fs="disk", ino=FILE, type="file", size=size,
                    ranges=ranges if kind == "modify" else None)


def _read(ops: ViewOps, off: int, size: int) -> bytes | int:
    async def go():
        return await ops.read(FILE, off, size)
    try:
        return trio.run(go)
    except pyfuse3.FUSEError as exc:
        return exc.errno


def _metrics(tmp_path: Path, reads: PointReads) -> str:
    from inference.engine import EngineStats

    stats = EngineStats(**{f: 0 for f in EngineStats.__slots__})
    engine = SimpleNamespace(stats=lambda: stats)
    m = EngineMetrics(tmp_path, engine, SimpleNamespace(position=(0, 0)))
    m.reads = reads
    return m.render()


def test_a_short_read_from_the_engine_is_eio_and_counted_never_padding(tmp_path):
    # the view shows 100 bytes; the engine has only 60 of them (its file is shorter, nothing pending explains it)
    tree, engine, reads, ops = _view(b"x" * 100, b"y" * 60)
    assert 'mirrorfs_view_read_errors_total{reason="short"} 0' in _metrics(tmp_path, reads)
    assert _read(ops, 0, 4096) == errno.EIO
    assert _read(ops, 50, 10) == b"y" * 10          # a range the engine does hold is served as it is
    assert _read(ops, 100, 4096) == b""             # at the view's end: end of file, not an error
    assert reads.errors["short"] == 1
    assert 'mirrorfs_view_read_errors_total{reason="short"} 1' in _metrics(tmp_path, reads)
    # a node the engine no longer has at all: EIO too, not a file of NULs
    engine.content = b""
    assert _read(ops, 0, 10) == errno.EIO and reads.errors["short"] == 2


def test_a_read_waits_for_the_view_to_apply_its_files_event_and_gets_one_version():
    # version 1 (100 bytes of "1") is what the view shows; the engine has already moved to version 2 (40 bytes
    # of "2": truncated and rewritten) and emitted its events, which the poke helper has not applied yet
    tree, engine, reads, ops = _view(b"1" * 100, b"2" * 40)
    trunc, mod = _modify(40, [], "truncate"), _modify(40, [(0, 40)])
    reads.noted([trunc, mod])
    got: list = []
    reader = threading.Thread(target=lambda: got.append(_read(ops, 0, 4096)))
    reader.start()
    time.sleep(0.3)
    assert reader.is_alive() and engine.reads == 0   # not served from the engine's later version
    tree.apply(trunc)                                  # as the FUSE handler applies the helper's ftruncate
    reads.applied(trunc)
    # the node now shows that point (the modify of the same point only adds an inotify event): served, without
    # waiting for it (the kernel's truncate of the page cache after the truncate's reply waits for this read)
    reader.join(5)
    assert got == [b"2" * 40] and reads.waits == 1 and reads.pending() == 0


def test_a_later_points_event_still_holds_the_read():
    tree, engine, reads, ops = _view(b"1" * 100, b"3" * 100)
    first, later = _modify(100, [(0, 100)]), _modify(100, [(0, 100)])
    later.seq = 9                                      # a later consistency point of the same file
    reads.noted([first, later])
    tree.apply(first)
    reads.applied(first)
    assert reads.pending() == 1
    got: list = []
    reader = threading.Thread(target=lambda: got.append(_read(ops, 0, 4096)))
    reader.start()
    time.sleep(0.3)
    assert reader.is_alive()
    tree.apply(later)
    reads.applied(later)
    reader.join(5)
    assert got == [b"3" * 100]


def test_an_unapplied_append_does_not_hold_a_read_of_what_the_view_shows():
    tree, engine, reads, ops = _view(b"a" * 100, b"a" * 100 + b"b" * 50)
    reads.noted([_modify(150, [(100, 150)])])          # appended bytes the view does not show yet
    assert _read(ops, 0, 4096) == b"a" * 100 and reads.waits == 0


def test_unreported_data_writes_hold_a_read_until_the_engines_point():
    tree, engine, reads, ops = _view(b"1" * 100, b"2" * 60 + b"1" * 40)
    engine.pending = [(0, 60)]                         # half of version 2 is in the replica, no event yet
    got: list = []
    reader = threading.Thread(target=lambda: got.append(_read(ops, 0, 4096)))
    reader.start()
    time.sleep(0.3)
    assert reader.is_alive() and engine.reads == 0
    engine.content, engine.pending = b"2" * 100, []    # the rest arrived; the point emits the event
    m = _modify(100, [(0, 100)])
    reads.noted([m])
    time.sleep(0.1)
    assert reader.is_alive()                           # still: the view has not taken it
    tree.apply(m)
    reads.applied(m)
    reader.join(5)
    assert got == [b"2" * 100]


def test_a_view_that_never_catches_up_is_eio_behind_not_stale_bytes(tmp_path):
    tree, engine, reads, ops = _view(b"1" * 100, b"2" * 100, wait=0.3)
    reads.noted([_modify(100, [(0, 100)])])
    assert _read(ops, 0, 4096) == errno.EIO
    assert reads.errors["behind"] == 1 and engine.reads == 0
    assert 'mirrorfs_view_read_errors_total{reason="behind"} 1' in _metrics(tmp_path, reads)


def test_what_each_event_kind_holds():
    assert changed(_modify(10, [(2, 5)])) == [(2, 5)]
    assert changed(_modify(10, [], "truncate")) == [(10, None)]
    assert changed(Mutation(seq=1, time=0, kind="delete", path="/x")) == [(0, None)]
    assert changed(Mutation(seq=1, time=0, kind="xattr", path="/x")) == []
    assert changed(Mutation(seq=1, time=0, kind="rename", path="/x", old_path="/y")) == []



def test_a_read_the_helpers_resize_waits_for_is_eio_at_once_not_a_deadlock():
    """The helper is inside the syscall of an event that resized the file (the kernel will drop the file's pages,
    waiting for this read's): a read that still waits for a later event of the file gives up at once."""
    tree, engine, reads, ops = _view(b"1" * 100, b"3" * 60, wait=30)
    reads.stuck = lambda fs, ino: (fs, ino) == ("disk", FILE)
    reads.noted([_modify(60, [(0, 60)])])
    t0 = time.monotonic()
    assert _read(ops, 0, 4096) == errno.EIO
    assert time.monotonic() - t0 < 5 and reads.errors["behind"] == 1 and engine.reads == 0
