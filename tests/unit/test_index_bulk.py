"""The index in bulk (inference/ext/bulkindex.py) builds what the general path builds.

Every test image (ext2/3/4, 1 KiB blocks, metadata_csum on and off, MBR, GPT, LVM), the hostile-names image and
damaged copies of ext4.img are indexed by the general path (ExtHandler._load for every inode, _entries for every
directory) and in bulk: the pickled handlers (shadow tree, block maps, notes, refused names) must be byte-identical,
or both must fail with the same error. Hostile numbers (sizes of 2^64-1, extents past the file system, a directory
of a million entries, overlapping extents, lying group descriptors) must make the bulk path fall back, never differ.
"""

from __future__ import annotations

import pickle
import random
import struct
from pathlib import Path

import numpy as np
import pytest

from images.build import artifact
from inference.ext import bulkindex as B
from inference.ext import layout as L
from inference.ext import reader as R
from inference.ext.handler import ExtHandler
from tests.hostile import apply_changes, hostile_name_changes, make_image
from tests.unit.test_index_fast import _ext4_copy, index_with

MODES = {"general": dict(fast_index=False, bulk_index=False), "bulk": dict(fast_index=True, bulk_index=True),
         "bulk-inodes": dict(fast_index=True, bulk_index=True, bulk_listings=False)}


def _index(image: Path, mode: str, monkeypatch: pytest.MonkeyPatch, *, verify: bool = True) -> list:
    return index_with(image, {"bulk_listings": True, "bulk_min_inodes": 0, **MODES[mode]}, monkeypatch,
                      verify=verify)


def _same(image: Path, monkeypatch: pytest.MonkeyPatch, **kw: bool) -> list:
    general = _index(image, "general", monkeypatch, **kw)
    assert _index(image, "bulk-inodes", monkeypatch, **kw) == general
    bulk = _index(image, "bulk", monkeypatch, **kw)
    assert bulk == general
    return bulk


@pytest.mark.parametrize("name", ["ext2.img", "ext3.img", "ext4.img", "ext4-1k.img", "mbr.img", "gpt.img",
                                  "lvm.img"])
def test_test_images(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    built = _same(artifact(name), monkeypatch)
    assert all(isinstance(b, bytes) for b in built)


def test_bulk_path_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    """On ext4.img (metadata_csum) and its 1 KiB-block twin nearly every inode and directory comes from the
    tables (else the comparisons above prove nothing about the bulk path)."""
    load, entries = ExtHandler._load, ExtHandler._entries
    for name in ("ext4.img", "ext4-1k.img"):
        calls = {"load": 0, "entries": 0}

        def counting_load(self: ExtHandler, ino: int, calls: dict = calls):  # noqa: ANN202
            calls["load"] += 1
            return load(self, ino)

        def counting_entries(self: ExtHandler, d: int, calls: dict = calls):  # noqa: ANN202
            calls["entries"] += 1
            return entries(self, d)

        monkeypatch.setattr(ExtHandler, "_load", counting_load)
        monkeypatch.setattr(ExtHandler, "_entries", counting_entries)
        data = artifact(name).read_bytes()
        h = ExtHandler(lambda off, n, data=data: data[off:off + n].ljust(n, b"\0"))
        assert B.index(h)
        dirs = sum(1 for ino in h.tree.children)
        assert len(h.tree) > 1000 and calls["load"] < len(h.tree) / 20, calls
        assert dirs > 10 and calls["entries"] < dirs / 5, (calls, dirs)


def test_small_file_systems_skip_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Below bulk_min_inodes inodes in use, index() takes the per-inode path (no numpy import for a fresh disk);
    at or above it, the bulk path."""
    data = artifact("ext4.img").read_bytes()
    taken = []
    index = B.index

    def spy(h, progress=None):  # noqa: ANN001, ANN202
        taken.append(True)
        return index(h, progress)

    monkeypatch.setattr(B, "index", spy)
    h = ExtHandler(lambda off, n: data[off:off + n].ljust(n, b"\0"))
    used = h.geo.inodes_count - h._free_inodes()
    monkeypatch.setattr(ExtHandler, "bulk_min_inodes", used + 1)
    h.index()
    assert not taken
    monkeypatch.setattr(ExtHandler, "bulk_min_inodes", used)
    ExtHandler(lambda off, n: data[off:off + n].ljust(n, b"\0")).index()
    assert taken


def test_dtype_matches_construct() -> None:
    """The numpy dtype is derived from the construct declaration: same fields, offsets and values on real
    inodes (every used inode of ext4.img parsed by construct, struct and numpy)."""
    dt = L.numpy_dtype(L.inode_large, 256)
    st, names = L.fixed_struct(L.inode_large)
    assert dt.names == names and dt.itemsize == 256
    offset = 0
    for sc in L.inode_large.subcons:
        assert dt.fields[sc.name][1] == offset
        offset += sc.sizeof()
    img, raw, geo, descs = _ext4_copy_ro()
    block, _ = R.inode_location(1, geo, descs)
    table = bytes(raw[block * geo.block_size:block * geo.block_size + geo.inodes_per_group * 256])
    arr = np.frombuffer(table, dt)
    seen = 0
    for i in range(len(arr)):
        rec = table[i * 256:(i + 1) * 256]
        if rec[:2] == b"\0\0":
            continue
        parsed = L.inode_large.parse(rec)
        for k, v in zip(names, st.unpack_from(rec), strict=True):
            got = arr[i][k]
            assert (bytes(got) if isinstance(v, bytes) else int(got)) == v == (
                bytes(parsed[k]) if isinstance(v, bytes) else parsed[k])
        seen += 1
    assert seen > 1000
    assert L.numpy_dtype(L.extent_leaf).itemsize == L.EXTENT_LEAF_ST.size == 12


def _ext4_copy_ro():  # noqa: ANN202
    data = bytearray(artifact("ext4.img").read_bytes())
    geo = R.parse_superblock(bytes(data[1024:2048]))
    descs = R.parse_group_descs(b"".join(bytes(data[b * geo.block_size:(b + 1) * geo.block_size])
                                         for b in R.gdt_blocks(geo)), geo)
    return None, data, geo, descs


def test_hostile_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`../PWNED`, `SLASH/XX`, NUL, extra '.' and '..', an empty name: their directories go to _entries."""
    img = make_image(tmp_path / "bad.img")
    apply_changes(img, hostile_name_changes(img, tmp_path / "work"))
    _same(img, monkeypatch)


def _used(raw: bytearray, geo: R.Geometry, descs: list, kind: int | None = None, limit: int = 3000) -> list[int]:
    """Byte positions of used inode records (of one type: 0x8000 file, 0x4000 directory)."""
    out = []
    for ino in range(geo.first_ino, min(geo.inodes_count, limit)):
        block, off = R.inode_location(ino, geo, descs)
        pos = block * geo.block_size + off
        mode = int.from_bytes(raw[pos:pos + 2], "little")
        if mode and (kind is None or mode & 0xF000 == kind):
            out.append(pos)
    return out


@pytest.mark.parametrize("seed", range(8))
def test_damaged_inode_tables(seed: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Random bytes of used inode records replaced, the checksums then wrong or (verify off) not checked."""
    img, raw, geo, descs = _ext4_copy(tmp_path)
    rng = random.Random(seed)
    hot = [0, 1, 0x1A, 0x20, 0x21, 0x23, 0x28, 0x2A, 0x2C, 0x2E, 0x30, 0x34, 0x36, 0x38, 0x3A, 0x3C, 0x6C, 0x6F,
           0x68, 0x6B, 0x80, 0x81, 0x84, 0x87, 0x8C, 0x90, 0xA0, 0xA3]
    for pos in rng.sample(_used(raw, geo, descs), rng.randint(1, 3)):
        for _ in range(rng.randint(1, 3)):
            raw[pos + rng.choice(hot)] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)])
    img.write_bytes(raw)
    _same(img, monkeypatch, verify=False)
    _same(img, monkeypatch)


def _dir_blocks(raw: bytearray, geo: R.Geometry, descs: list, limit: int = 50) -> list[int]:
    """Byte positions of the first data block of some directories (depth-0 extent trees)."""
    out = []
    for pos in _used(raw, geo, descs, 0x4000)[:limit]:
        i_block = bytes(raw[pos + 0x28:pos + 0x64])
        if i_block[:2] == L.EXT4_EXT_MAGIC.to_bytes(2, "little") and i_block[2:4] != b"\0\0":
            _lg, _ln, hi, lo = struct.unpack_from("<IHHI", i_block, 12)
            out.append((lo | hi << 32) * geo.block_size)
    return out


@pytest.mark.parametrize("seed", range(8))
def test_damaged_directory_blocks(seed: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Random bytes of directory blocks replaced (entry inodes, rec_len, name_len, names: '/', NUL, '.'):
    bulk listings must refuse what read_dir refuses, and leave the name policy to _entries."""
    img, raw, geo, descs = _ext4_copy(tmp_path)
    rng = random.Random(seed)
    for at in rng.sample(_dir_blocks(raw, geo, descs), 2):
        for _ in range(rng.randint(1, 3)):
            off = rng.choice([0, 4, 5, 6, 8, 12, 16, 17, 18, 20, 21, 24, 28, 32, 36, 40, rng.randrange(4096)])
            raw[at + off] = rng.choice([0, 1, 0x2E, 0x2F, 0x0C, 0xFF, rng.randrange(256)])
    img.write_bytes(raw)
    _same(img, monkeypatch, verify=False)
    _same(img, monkeypatch)


def test_hostile_numbers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """i_size 2^64-1 (a file and a directory), i_blocks all ones, an extent start of 2^48-1 and a length past the
    file system, times at the end of ext4's range, an inode count in a directory entry of 2^32-1: checksums off."""
    img, raw, geo, descs = _ext4_copy(tmp_path)
    files, dirs = _used(raw, geo, descs, 0x8000), _used(raw, geo, descs, 0x4000)
    for pos in (files[0], dirs[3]):
        raw[pos + 0x04:pos + 0x08] = b"\xff" * 4
        raw[pos + 0x6C:pos + 0x70] = b"\xff" * 4          # i_size_high
    raw[files[1] + 0x1C:files[1] + 0x20] = b"\xff" * 4    # i_blocks_lo
    raw[files[1] + 0x74:files[1] + 0x76] = b"\xff" * 2    # i_blocks_high
    raw[files[2] + 0x28 + 12 + 6:files[2] + 0x28 + 12 + 12] = b"\xff" * 6   # ee_start_hi, ee_start_lo
    raw[files[3] + 0x28 + 12 + 4:files[3] + 0x28 + 12 + 6] = b"\xff\x7f"      # ee_len 32767
    for pos in files[4:8]:
        raw[pos + 0x84:pos + 0x90] = b"\xff" * 12          # ctime, mtime, atime extra: epoch 3, ns all ones
        raw[pos + 0x08:pos + 0x14] = b"\xff\xff\xff\x7f" * 3
    at = _dir_blocks(raw, geo, descs)[5]
    raw[at + 12:at + 16] = b"\xff" * 4                     # '..' of a directory: inode 2^32-1
    img.write_bytes(raw)
    _same(img, monkeypatch, verify=False)
    _same(img, monkeypatch)


def test_overlapping_extents_fall_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two files whose extents share blocks: who keeps a block depends on the order of registration, so the bulk
    path gives up (index returns False, the handler as it was) and the general path indexes the file system."""
    img, raw, geo, descs = _ext4_copy(tmp_path)
    with_data = [p for p in _used(raw, geo, descs, 0x8000) if raw[p + 0x2A] != 0]  # eh_entries > 0
    a, b = with_data[0], with_data[1]
    raw[b + 0x28 + 12 + 6:b + 0x28 + 12 + 12] = raw[a + 0x28 + 12 + 6:a + 0x28 + 12 + 12]  # same start
    img.write_bytes(raw)
    gave_up = []
    index = B.index

    def spy(h, progress=None):  # noqa: ANN001, ANN202
        ok = index(h, progress)
        gave_up.append(not ok)
        return ok

    monkeypatch.setattr(B, "index", spy)
    _same(img, monkeypatch, verify=False)
    assert gave_up and all(gave_up)


def test_lying_itable_unused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """bg_itable_unused says every inode of the group is unused (and the bitmap is cleared), yet directories point
    into the table: the bulk scan takes nothing there, the crawl loads them one by one, the same tree."""
    img, raw, geo, descs = _ext4_copy(tmp_path)
    desc_at = R.gdt_blocks(geo)[0] * geo.block_size
    raw[desc_at + 0x1C:desc_at + 0x1E] = geo.inodes_per_group.to_bytes(2, "little")  # bg_itable_unused_lo
    bitmap = descs[0].inode_bitmap * geo.block_size
    raw[bitmap:bitmap + geo.block_size] = bytes(geo.block_size)
    img.write_bytes(raw)
    built = _same(img, monkeypatch, verify=False)
    assert len(pickle.loads(built[0]).tree) > 1000


def test_million_entry_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A directory of 2^20 entries (16 MiB of blocks, one extent): too large for a bulk batch, it is read by
    _entries as before; both paths hold every name."""
    img = make_image(tmp_path / "big.img", size_mb=64)
    raw = bytearray(img.read_bytes())
    geo = R.parse_superblock(bytes(raw[1024:2048]))
    descs = R.parse_group_descs(b"".join(bytes(raw[b * geo.block_size:(b + 1) * geo.block_size])
                                         for b in R.gdt_blocks(geo)), geo)
    h = ExtHandler(lambda off, n: bytes(raw[off:off + n]).ljust(n, b"\0"))
    d = R.read_dir(h.reader.inode(2), geo, h.reader.read_block)
    d_ino = next(e.ino for e in d if e.name == b"d")
    keep = next(e.ino for e in R.read_dir(h.reader.inode(d_ino), geo, h.reader.read_block) if e.name == b"keep.txt")
    count, per = 1 << 20, geo.block_size // 16
    nblocks = count // per + 1
    start = geo.blocks_count - nblocks - 8
    block0 = bytearray(geo.block_size)
    block0[0:12] = struct.pack("<IHBB", d_ino, 12, 1, 2) + b".\0\0\0"
    block0[12:24] = struct.pack("<IHBB", 2, geo.block_size - 12, 2, 2) + b"..\0\0"
    raw[start * geo.block_size:(start + 1) * geo.block_size] = block0
    one = b"".join(struct.pack("<IHBB", keep, 16, 8, 1) + f"{i:08x}".encode() for i in range(per))
    for b in range(1, nblocks):
        chunk = bytearray(one)
        for j in range(per):  # distinct names: the block number and the slot
            chunk[j * 16 + 8:j * 16 + 16] = f"{b:05x}{j:03x}".encode()
        raw[(start + b) * geo.block_size:(start + b + 1) * geo.block_size] = chunk
    block, off = R.inode_location(d_ino, geo, descs)
    pos = block * geo.block_size + off
    raw[pos + 0x04:pos + 0x08] = (nblocks * geo.block_size).to_bytes(4, "little")
    raw[pos + 0x28:pos + 0x28 + 24] = struct.pack("<HHHHI", L.EXT4_EXT_MAGIC, 1, 4, 0, 0) + struct.pack(
        "<IHHI", 0, nblocks, 0, start)
    img.write_bytes(raw)
    built = _same(img, monkeypatch)
    tree = pickle.loads(built[0]).tree
    assert len(tree.entries(d_ino)) == (nblocks - 1) * per


@pytest.mark.parametrize("name", ["ext4.img", "ext4-1k.img"])
def test_small_batches(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Inode tables read a few records at a time and directories parsed a few blocks per batch (what bounds the
    bulk path's memory on a large or hostile geometry): the same index."""
    monkeypatch.setattr(B, "BATCH_BYTES", 8 * 256 + 1)
    monkeypatch.setattr(B, "LIST_BATCH_BYTES", 4096)
    _same(artifact(name), monkeypatch)
