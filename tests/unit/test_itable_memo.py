"""The inode-table memo (ExtHandler._changed_inodes): a block written again with the bytes it had when its inodes
matched the tree parses none of them, and a memo hit never hides a change, of the bytes or of the tree's node.

No QEMU: records over the real ext4 test image (tests/unit/test_engine_scope.Disk); debugfs makes the change.
"""

from __future__ import annotations

import inference.ext.handler as H
import inference.ext.reader as R
from inference.engine import Engine
from tests.support import require_tools
from tests.unit.test_engine_scope import Disk


def _point(engine: Engine, records) -> list:
    return engine.process(records) + engine.tick(records[-1].time_ns + H.SETTLE_NS)


def test_unchanged_inodes_of_a_changed_block_are_not_parsed_and_a_changed_node_is_still_seen(tmp_path, monkeypatch):
    require_tools("debugfs")
    disk = Disk(tmp_path)
    engine = Engine(tmp_path / "engine", disk.base.stat().st_size, base=disk.base)
    handler = next(iter(engine.filesystems.values())).handler
    bs = handler.geo.block_size
    readme, deep = handler.tree.children[2][b"README"], handler.tree.children[2][b"deep"]
    per_block = bs // handler.geo.inode_size
    assert (readme - 1) // per_block == (deep - 1) // per_block, "both in one inode-table block"
    events = _point(engine, disk.debugfs("sif /README mode 0100600", block_size=bs))
    assert [(e.kind, e.path, e.mode, e.old_mode) for e in events] == [("attrib", "/README", 0o600, 0o644)]

    parsed: list[int] = []
    parse = R.parse_inode
    monkeypatch.setattr(R, "parse_inode", lambda raw, i, geo: parsed.append(i) or parse(raw, i, geo))
    events = _point(engine, disk.debugfs("sif /deep mode 040700", block_size=bs))
    assert [(e.kind, e.path, e.mode) for e in events] == [("attrib", "/deep", 0o700)]
    assert readme not in parsed and deep in parsed, "README's bytes and node are as they matched: not parsed"

    # README's node no longer what its bytes say (as a held size is): its bytes are compared, not trusted.
    handler.tree.nodes[readme].mode = 0o100644
    parsed.clear()
    events = _point(engine, disk.debugfs("sif /deep mode 040750", block_size=bs))
    assert [(e.kind, e.path, e.mode, e.old_mode) for e in events] == [
        ("attrib", "/README", 0o600, 0o644), ("attrib", "/deep", 0o750, 0o700)]
    assert readme in parsed
    engine.close()


def test_the_memo_is_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(H, "ITABLE_MEMO_BYTES", 1)
    require_tools("debugfs")
    disk = Disk(tmp_path)
    engine = Engine(tmp_path / "engine", disk.base.stat().st_size, base=disk.base)
    handler = next(iter(engine.filesystems.values())).handler
    writes = disk.debugfs("sif /README mode 0100600", block_size=handler.geo.block_size)
    assert [e.kind for e in _point(engine, writes)] == ["attrib"]
    assert handler._memo_bytes <= 1 and not handler._itable_memo
    engine.close()
