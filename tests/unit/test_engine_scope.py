"""Layered filtering at the engine (issue 5): with a scope, data writes outside it are not attributed, while
metadata stays exact everywhere (a rename into the scope is reported, and the file's data counts from then on).

No QEMU: records are made here over the real ext4 test image, as the tap would log them. The rename is made by
debugfs on a copy of the disk (home locations, as a checkpoint writes them) and logged as the blocks it changed.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from inference.engine import Engine
from inference.ext.handler import DATA_WAIT_NS
from tap.writelog import KIND_WRITE, Record
from tests.support import require_tools

SCOPE = ("/small",)


class Disk:
    """A copy of the ext4 test image; writes to it become the records the engine gets."""

    def __init__(self, tmp: Path) -> None:
        from images.build import artifact

        self.base = tmp / "base.raw"
        shutil.copyfile(artifact("ext4.img"), self.base)
        self.disk = tmp / "disk.raw"
        shutil.copyfile(self.base, self.disk)
        self.seq, self.t0 = 0, time.time_ns()

    def _record(self, offset: int, data: bytes) -> Record:
        self.seq += 1
        return Record(self.seq, self.t0 + self.seq * 1_000_000, KIND_WRITE, offset, len(data), data)

    def write(self, offset: int, data: bytes) -> list[Record]:
        with open(self.disk, "r+b") as f:
            f.seek(offset)
            f.write(data)
        return [self._record(offset, data)]

    def debugfs(self, *commands: str, block_size: int) -> list[Record]:
        """Run debugfs -w on the disk; the blocks it changed, as records."""
        before = self.disk.read_bytes()
        for cmd in commands:
            subprocess.run(["debugfs", "-w", "-R", cmd, str(self.disk)], check=True, capture_output=True)
        after = self.disk.read_bytes()
        return [self._record(off, after[off:off + block_size]) for off in range(0, len(after), block_size)
                if before[off:off + block_size] != after[off:off + block_size]]


def _engine(tmp: Path, disk: Disk, scope: tuple[str, ...] | None) -> Engine:
    engine = Engine(tmp / f"engine-{bool(scope)}", disk.base.stat().st_size, base=disk.base)
    engine.set_scope(scope)
    return engine


def _block(engine: Engine, path: bytes) -> tuple[int, int]:
    """(disk offset of the file's first data block, block size)"""
    handler = next(iter(engine.filesystems.values())).handler
    ino = 2
    for part in path.strip(b"/").split(b"/"):
        ino = handler.tree.lookup(ino, part)
    bs = handler.geo.block_size
    return handler.tree.nodes[ino].extents[0][1] * bs, bs


def _modified(events) -> set[str]:
    return {e.path for e in events if e.kind == "modify"}


def test_data_outside_the_scope_is_not_attributed_and_a_rename_into_it_is(tmp_path):
    require_tools("debugfs")
    disk = Disk(tmp_path)
    engines = {"all": _engine(tmp_path, disk, None), "scoped": _engine(tmp_path, disk, SCOPE)}
    try:
        readme, bs = _block(engines["all"], b"/README")
        inside, _ = _block(engines["all"], b"/small/file00.bin")
        # 1. data writes: one outside the scope, one inside
        records = disk.write(readme, b"changed outside\n") + disk.write(inside + 100, b"changed inside")
        got = {k: e.process(records) + e.tick(records[-1].time_ns + DATA_WAIT_NS) for k, e in engines.items()}
        assert _modified(got["all"]) == {"/README", "/small/file00.bin"}
        assert _modified(got["scoped"]) == {"/small/file00.bin"}
        assert engines["scoped"].filesystems["disk"].handler.stats.skipped_data >= 1
        # 2. a rename from outside into the scope: reported exactly, and the file's data counts from then on
        records = disk.debugfs("link /README /small/README", "unlink /README",  # a rename, as a checkpoint
                               "set_inode_field /small/README ctime 20260101000000", block_size=bs)
        got = {k: e.process(records) + e.tick(records[-1].time_ns + DATA_WAIT_NS) for k, e in engines.items()}
        for events in got.values():
            renames = [(e.old_path, e.path) for e in events if e.kind == "rename"]
            assert renames == [("/README", "/small/README")], events
            assert not [e for e in events if e.kind in ("error", "delete", "create")], events
        # metadata outside the scope stays exact: the same events with and without the scope
        assert [(e.id, e.kind, e.path) for e in got["scoped"]] == [(e.id, e.kind, e.path) for e in got["all"]]
        records = disk.write(readme + 4, b"then inside")
        got = {k: e.process(records) + e.finish() for k, e in engines.items()}
        assert _modified(got["scoped"]) == _modified(got["all"]) == {"/small/README"}
    finally:
        for e in engines.values():
            e.close()


@pytest.mark.parametrize("globs,prefixes", [(["/etc/**"], ("/etc",)), (["/etc/**", "/var/log/*.log"],
                                                                          ("/etc", "/var/log")), (["/**"], None)])
def test_scope_globs_become_prefixes(globs, prefixes):
    from mirrorfs.cli.main import scope_prefixes

    assert scope_prefixes(globs) == prefixes
