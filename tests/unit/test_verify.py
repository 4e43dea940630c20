"""tap.verify's comparison rules and inference.regions' list, without QEMU (tests/integration/test_attach_verify.py
has the real thing)."""

from __future__ import annotations

import os

import pytest
import trio
import trio.testing

from tap.replica import BlockReplica
from tap.verify import Verifier, WriteTracker, _batches, _diff_runs

SIZE = 1 << 20


def test_tracker_merges_and_covers():
    t = WriteTracker()
    t.add(4096, 4096)
    t.add(12288, 512)
    assert t.covers(4096, 4096) and not t.covers(4096, 4097) and not t.covers(0, 512)
    t.add(8192, 4096)  # bridges the two: one range 4096..12800
    assert t.covers(4096, 12800 - 4096) and t.writes == 3
    t.mark()
    t.add(100_000, 10)
    assert t.written_since_mark(99_995, 10) and not t.written_since_mark(0, 4096)


def test_diff_runs_and_batches():
    a, b = bytearray(16384), bytearray(16384)
    b[5000] = b[9000] = b[15000] = 1
    assert _diff_runs(bytes(a), bytes(b), 1 << 20, 4096) == [((1 << 20) + 4096, 12288)]  # adjacent pieces: one run
    b[9000] = 0
    assert _diff_runs(bytes(a), bytes(b), 1 << 20, 4096) == [((1 << 20) + 4096, 4096), ((1 << 20) + 12288, 4096)]
    assert _diff_runs(bytes(a), bytes(b), 0, 512) == [(4608, 512), (14848, 512)]
    regions = [(0, 1024, "a"), (8192, 4096, "b"), (10 << 20, 3 << 20, "big")]
    batches = list(_batches(regions))
    assert batches[0][:2] == (0, 12288) and [r[2] for r in batches[0][2]] == ["a", "b"]  # near: one read
    assert all(hi - lo <= 1 << 20 for lo, hi, _ in batches) and sum(len(b[2]) for b in batches) == 5


class FakeDisk:
    """QEMU's export as a bytearray; `on_read` may change it (a guest writing while the check reads)."""

    def __init__(self, data: bytearray) -> None:
        self.data = data
        self.on_read = None

    async def read(self, offset: int, length: int) -> bytes:
        await trio.sleep(0)
        out = bytes(self.data[offset:offset + length])
        if self.on_read is not None:
            self.on_read(offset, length)
        return out

    async def read_ahead(self, ranges):
        for offset, length in ranges:
            yield await self.read(offset, length)


def _setup(tmp_path, diffs: list[int]) -> tuple[FakeDisk, BlockReplica]:
    base = tmp_path / "base.raw"
    data = bytearray(os.urandom(SIZE))
    base.write_bytes(data)
    for at in diffs:
        data[at] ^= 0xFF
    return FakeDisk(data), BlockReplica(tmp_path / "replica.img", SIZE, base=base)


def _run(coro_fn):
    return trio.run(coro_fn, clock=trio.testing.MockClock(autojump_threshold=0))


def test_lasting_uncovered_difference_is_the_bases(tmp_path):
    disk, replica = _setup(tmp_path, [70_000, 300_000])
    out = _run(lambda: Verifier(disk, replica, WriteTracker()).run([(0, SIZE, "disk")]))
    assert out.mismatches == [(69_632, 512, "disk")]  # the first only: enough to refuse


def test_difference_a_logged_write_covers_is_carried_not_a_mismatch(tmp_path):
    disk, replica = _setup(tmp_path, [70_000])
    tracker = WriteTracker()
    tracker.add(69_632, 512)  # the mirror job wrote that sector; the disk moved on again since
    out = _run(lambda: Verifier(disk, replica, tracker).run([(0, SIZE, "disk")]))
    assert out.mismatches == [] and out.carried == 512


def test_write_in_flight_settles(tmp_path):
    """The export shows a write the tap has not received yet; it arrives during the recheck: no mismatch."""
    disk, replica = _setup(tmp_path, [])
    tracker = WriteTracker()
    disk.data[200_000:200_010] = b"x" * 10  # on the disk, the target write still in flight

    def arrive(offset: int, length: int) -> None:
        if offset <= 200_000 < offset + length and disk.on_read is not None:
            disk.on_read = None
            replica.write(200_000, b"x" * 10)
            tracker.add(200_000, 10)

    disk.on_read = arrive
    out = _run(lambda: Verifier(disk, replica, tracker).run([(0, SIZE, "disk")]))
    assert out.mismatches == [] and out.writes_during == 1


def test_repair_copies_only_what_no_write_set(tmp_path):
    disk, replica = _setup(tmp_path, [1000, 600_000])
    into = BlockReplica(tmp_path / "base2.img", SIZE, base=tmp_path / "base.raw")
    out = _run(lambda: Verifier(disk, replica, WriteTracker(), repair=True, repair_into=into)
               .run([(0, 4096, "superblock"), (598_016, 8192, "inode table")]))
    assert [m[2] for m in out.mismatches] == ["superblock", "inode table"] and out.repaired == 1024
    assert replica.read(0, SIZE) == bytes(disk.data) == into.read(0, SIZE)


def test_metadata_regions_name_what_the_engine_trusts():
    from images.build import artifact
    from inference.regions import metadata_regions

    path = artifact("ext4.img")
    size = path.stat().st_size
    with open(path, "rb") as f:
        regions = metadata_regions(lambda off, n: os.pread(f.fileno(), n, off), size)
    names = {r.what.split(" (")[0].rsplit(" of ", 1)[0] for r in regions}
    assert {"superblock", "group descriptor table", "block bitmap", "inode bitmap", "inode table", "journal"} <= names
    assert any(r.what.startswith("directory inode 2 ") for r in regions)  # the root directory's blocks
    assert all(0 <= r.offset and r.offset + r.length <= size and r.length > 0 for r in regions)
    first = min(regions, key=lambda r: (r.offset, r.length))
    assert first.offset == 0 and first.length == 1024  # the signature span less the superblock, named apart
    assert [r.what for r in regions if r.offset == 1024] == ["superblock (disk)"]


@pytest.mark.parametrize("image", ["mbr.img", "lvm.img"])
def test_metadata_regions_through_partitions_and_lvm(image):
    from images.build import artifact
    from inference.regions import metadata_regions

    path = artifact(image)
    with open(path, "rb") as f:
        regions = metadata_regions(lambda off, n: os.pread(f.fileno(), n, off), path.stat().st_size)
    assert regions[0].offset == 0 and "partition table" in regions[0].what
    assert sum(r.what.startswith("inode table") for r in regions) >= 2  # more than one file system


def test_blank_base_still_compares_where_a_whole_disk_file_system_begins():
    from inference.regions import metadata_regions

    regions = metadata_regions(lambda off, n: bytes(n), 64 << 20)  # no table, no file system on the base
    assert any(r.offset <= 1024 and r.offset + r.length >= 2048 for r in regions)  # the disk's superblock
