"""The read fast path (PointReads.try_read, answered in the trio thread) serves only what read() would serve at
once, and hands everything else to read() (which waits or answers EIO); EngineView.read's one-extent pread."""

from __future__ import annotations

import threading
from types import SimpleNamespace

from inference.view import EngineView
from tests.unit.test_view_reads import FILE, _modify, _view


def test_try_read_serves_a_clear_range_clipped_to_the_view():
    tree, engine, reads, _ = _view(b"a" * 100, b"a" * 100 + b"b" * 50)
    nid = tree.nid("disk", FILE)
    assert reads.try_read(nid, 0, 4096) == b"a" * 100   # clipped to the size the view shows, not the engine's
    assert reads.try_read(nid, 100, 10) == b""


def test_try_read_leaves_to_read_what_must_wait_or_fail():
    tree, engine, reads, _ = _view(b"a" * 100, b"a" * 100)
    nid = tree.nid("disk", FILE)
    reads.noted([_modify(100, [(10, 20)])])               # an event the view has not applied: read() waits
    assert reads.try_read(nid, 0, 50) is None
    assert reads.try_read(nid, 50, 50) == b"a" * 50       # outside its range: served
    reads.applied(_modify(100, [(10, 20)]))
    engine.pending.append((60, 70))                       # unreported data writes: read() waits
    assert reads.try_read(nid, 0, 100) is None
    engine.pending.clear()
    engine.content = b"a" * 40                            # the engine lacks bytes the view shows: read() says EIO
    assert reads.try_read(nid, 0, 100) is None
    assert reads.errors == {}                             # counted by read(), not here
    engine.content = b"a" * 100
    with reads.lock:                                      # the engine is busy: never wait in the trio thread
        assert reads.try_read(nid, 0, 100) is None
    assert reads.try_read(nid, 0, 100) == b"a" * 100


def test_one_extent_read_is_one_pread_and_equals_the_walk():
    bs, data = 1024, bytes(range(256)) * 64               # 16 KiB of "disk" at physical block 0
    reads_done = []

    def read_data(off: int, n: int) -> bytes:
        reads_done.append((off, n))
        return data[off:off + n]

    node = SimpleNamespace(type="file", size=6 * bs, extents=[(0, 4, 6, False)])
    handler = SimpleNamespace(tree=SimpleNamespace(peek={5: node}.get), read_data=read_data,
                              geo=SimpleNamespace(block_size=bs, inline_data=False))
    view = EngineView(SimpleNamespace(filesystems={"disk": SimpleNamespace(handler=handler)}, lock=threading.RLock()))
    got = view.read("disk", 5, 1500, 3000)
    assert got == data[4 * bs + 1500:4 * bs + 4500]
    assert reads_done == [(4 * bs + 1500, 3000)]
    node.extents = [(0, 4, 2, False), (2, 10, 4, False)]  # two extents: the walk, same bytes where they map
    assert view.read("disk", 5, 0, 6 * bs) == data[4 * bs:6 * bs] + data[10 * bs:14 * bs]
    node.extents = [(0, 4, 6, True)]                      # unwritten: zeros, as the guest's kernel reads them
    assert view.read("disk", 5, 0, 100) == bytes(100)
