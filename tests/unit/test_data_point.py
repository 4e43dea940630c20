"""File data with no commit after it is not a consistency point yet (issue 10): the view's reads get the bytes of
the last point, and the data becomes one event with its commit, or on its own after DATA_WAIT_NS.

No QEMU: records over the real ext4 test image, made here as the tap would log them (tests/unit/test_engine_scope).
"""

from __future__ import annotations

import inference.ext.handler as H
from inference.engine import Engine
from inference.ext.handler import DATA_WAIT_NS
from inference.view import EngineView
from tests.unit.test_engine_scope import Disk, _block


def _setup(tmp_path):
    disk = Disk(tmp_path)
    engine = Engine(tmp_path / "engine", disk.base.stat().st_size, base=disk.base)
    (fs, entry), = engine.filesystems.items()
    handler = entry.handler
    ino = handler.tree.children[2][b"README"]
    return disk, engine, fs, handler, ino


def test_data_waits_for_its_commit_and_reads_get_the_last_points_bytes(tmp_path):
    disk, engine, fs, handler, ino = _setup(tmp_path)
    view = EngineView(engine)
    size = handler.tree.nodes[ino].size
    before = view.read(fs, ino, 0, size)
    at, _bs = _block(engine, b"/README")
    records = disk.write(at, b"NEW BYTES")
    assert engine.process(records) == []
    assert engine.tick(records[-1].time_ns + H.SETTLE_NS) == []  # a burst's quiet is not enough for data
    assert view.read(fs, ino, 0, size) == before, "a read before the point gets the last point's bytes"
    assert not view.writing(fs, ino, 0, size), "so it need not wait"
    assert engine.deadline_ns() == records[0].time_ns + DATA_WAIT_NS
    # an idle follower sleeps exactly until then (no polling), and not at all once it is due
    assert engine.idle_wait_s(records[0].time_ns) == DATA_WAIT_NS / 1e9
    assert engine.idle_wait_s(records[0].time_ns + 2 * DATA_WAIT_NS) == 0
    events = engine.tick(records[0].time_ns + DATA_WAIT_NS)
    assert [(e.kind, e.path, e.ranges) for e in events] == [("modify", "/README", [(0, 9)])]
    assert view.read(fs, ino, 0, size) == b"NEW BYTES" + before[9:]
    assert handler.preimage == {} and engine.deadline_ns() == float("inf")
    assert engine.idle_wait_s(records[0].time_ns) is None, "nothing waits: sleep until records come"
    engine.close()


def test_a_later_write_of_the_same_block_keeps_the_first_preimage(tmp_path):
    disk, engine, fs, handler, ino = _setup(tmp_path)
    view = EngineView(engine)
    size = handler.tree.nodes[ino].size
    before = view.read(fs, ino, 0, size)
    at, _bs = _block(engine, b"/README")
    engine.process(disk.write(at, b"first") + disk.write(at + 2, b"second"))
    assert view.read(fs, ino, 0, size) == before
    engine.finish()
    assert view.read(fs, ino, 0, size) == b"fisecond" + before[8:]
    engine.close()


def test_past_the_preimage_bound_the_write_is_a_point_at_once(tmp_path, monkeypatch):
    """Memory is bounded: no room to keep the replaced bytes means no waiting."""
    monkeypatch.setattr(H, "MAX_PREIMAGE", 1)
    disk, engine, fs, handler, ino = _setup(tmp_path)
    at, _bs = _block(engine, b"/README")
    records = disk.write(at, b"NEW") + disk.write(at + 100, b"more")
    events = engine.process(records)
    assert [(e.kind, e.path) for e in events] == [("modify", "/README")]
    assert handler.preimage_bytes == 0
    engine.close()


def test_a_write_outside_any_file_keeps_nothing(tmp_path):
    disk, engine, fs, handler, ino = _setup(tmp_path)
    free = (handler.geo.blocks_count - 1) * handler.geo.block_size  # the last block: free in the test image
    engine.process(disk.write(free, b"x" * 10))
    assert handler.preimage == {}
    engine.close()



def test_a_new_blocks_bytes_past_the_committed_size_are_counted_as_written(tmp_path):
    """ExtHandler._mapped_data: a newly mapped block holding the end of the file is real up to its last nonzero
    byte, which may lie past the size committed with it (writeback zeroes a page past i_size, so whatever else
    the block holds the file wrote; seen: `>` then `dd` at offset 11 rewrote the block before the commit that
    mapped it with the size 100)."""
    disk, engine, fs, handler, ino = _setup(tmp_path)
    bs = handler.geo.block_size
    at, _ = _block(engine, b"/README")
    block = b"y" * 3000 + bytes(bs - 3000)
    engine.replica.write(at, block)  # what the data write before the commit left in the block
    node = handler.tree.nodes[ino]
    node.size = 100
    assert handler._mapped_data(node, [(0, 1)]) == [(0, 3000)]
    node.size = 5000  # the end in a later block: this one is whole
    assert handler._mapped_data(node, [(0, 1)]) == [(0, bs)]
    engine.close()
