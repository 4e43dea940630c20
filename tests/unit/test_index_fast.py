"""The index's fast inode path (ExtHandler._load_fast) builds what the general path (_load) builds.

Both paths index each test image (ext2/3/4, 1 KiB blocks, MBR, GPT, LVM), a no-checksum image holding hostile
names, and copies of ext4.img whose inode tables were damaged at random (checksums off, so the damage reaches the
parsers): the pickled handlers (shadow tree, block maps, notes, refused names) must be byte-identical, or both paths
must fail with the same error. The images are files: no root, no QEMU.
"""

from __future__ import annotations

import pickle
import random
import shutil
from pathlib import Path

import pytest

from images.build import artifact
from inference.engine import volume_reader
from inference.ext import reader as R
from inference.ext.handler import ExtHandler
from inference.shadow import ROOT_INO
from inference.volume import VolumeMap
from tests.hostile import apply_changes, hostile_name_changes, make_image


def _index(image: Path, fast: bool, monkeypatch: pytest.MonkeyPatch, *, verify: bool = True) -> list:
    # (the bulk index: test_index_bulk.py)
    return index_with(image, {"fast_index": fast, "bulk_index": False}, monkeypatch, verify=verify)


def index_with(image: Path, attrs: dict, monkeypatch: pytest.MonkeyPatch, *, verify: bool = True) -> list:
    """Per ext volume: the pickled handler indexed with ExtHandler's class attributes `attrs`, or the error
    indexing it raised."""
    for k, v in attrs.items():
        monkeypatch.setattr(ExtHandler, k, v)
    data = image.read_bytes()

    def read(off: int, n: int) -> bytes:
        return data[off:off + n].ljust(n, b"\0")

    vmap = VolumeMap(read, len(data))
    vmap.scan()
    out = []
    for vol in vmap.volumes:
        if vol.kind != "ext":
            continue
        h = ExtHandler(volume_reader(vol, read), name=vol.name)
        h.reader.verify = verify
        try:
            h.index()
        except Exception as exc:  # noqa: BLE001 - compared between the paths
            out.append((type(exc).__name__, str(exc)))
            continue
        h.reader.verify = True
        out.append(pickle.dumps(h, protocol=pickle.HIGHEST_PROTOCOL))
    assert out, f"{image}: no ext volume"
    return out


def _same(image: Path, monkeypatch: pytest.MonkeyPatch, **kw: bool) -> list:
    slow, fast = _index(image, False, monkeypatch, **kw), _index(image, True, monkeypatch, **kw)
    assert fast == slow
    return fast


@pytest.mark.parametrize("name", ["ext2.img", "ext3.img", "ext4.img", "ext4-1k.img", "mbr.img", "gpt.img",
                                  "lvm.img"])
def test_test_images(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    built = _same(artifact(name), monkeypatch)
    assert all(isinstance(b, bytes) for b in built)


def test_fast_path_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    """ext4.img's files go through the fast path (else the comparison above proves nothing about it)."""
    calls = {"slow": 0}
    load = ExtHandler._load

    def counting(self: ExtHandler, ino: int):  # noqa: ANN202
        calls["slow"] += 1
        return load(self, ino)

    monkeypatch.setattr(ExtHandler, "_load", counting)
    monkeypatch.setattr(ExtHandler, "bulk_index", False)
    vmap_data = artifact("ext4.img").read_bytes()
    h = ExtHandler(lambda off, n: vmap_data[off:off + n].ljust(n, b"\0"))
    h.index()
    assert len(h.tree) > 1000 and calls["slow"] < len(h.tree) / 2


def test_hostile_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    img = make_image(tmp_path / "bad.img")
    apply_changes(img, hostile_name_changes(img, tmp_path / "work"))
    _same(img, monkeypatch)


def _ext4_copy(tmp_path: Path):
    """A copy of the ext4 test image to damage: its path, its bytes, its superblock and group descriptors."""
    img = tmp_path / "ext4.img"
    shutil.copyfile(artifact("ext4.img"), img)
    raw = bytearray(img.read_bytes())
    geo = R.parse_superblock(bytes(raw[1024:2048]))
    descs = R.parse_group_descs(b"".join(bytes(raw[b * geo.block_size:(b + 1) * geo.block_size])
                                         for b in R.gdt_blocks(geo)), geo)
    return img, raw, geo, descs


@pytest.mark.parametrize("seed", range(12))
def test_damaged_inode_tables(seed: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Random bytes of used inode records replaced (mode, sizes, flags, extent headers and leaves, i_extra_isize,
    xattr magic): the fast path must refuse what the general path refuses and take what it takes."""
    img, raw, geo, descs = _ext4_copy(tmp_path)
    rng = random.Random(seed)
    used = []
    for ino in range(geo.first_ino, min(geo.inodes_count, 3000)):
        block, off = R.inode_location(ino, geo, descs)
        pos = block * geo.block_size + off
        if raw[pos:pos + 2] != b"\0\0":
            used.append(pos)
    # offsets that steer the fast path: mode, size_hi, flags, i_block header/leaves, file_acl, extra, xattr magic
    hot = [0, 1, 0x20, 0x21, 0x22, 0x23, 0x28, 0x2A, 0x2C, 0x2E, 0x34, 0x36, 0x3A, 0x3C, 0x6C, 0x6F, 0x68,
           0x80, 0x81, 0xA0, 0xA3]
    for pos in rng.sample(used, rng.randint(1, 2)):  # (the index stops at the first broken inode)
        for _ in range(rng.randint(1, 2)):
            raw[pos + rng.choice(hot)] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)])
    img.write_bytes(raw)
    _same(img, monkeypatch, verify=False)
    _same(img, monkeypatch)


def test_far_future_ctime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ctime past 2262 (epoch bits 2-3 of i_ctime_extra: legal, a guest clock far ahead) is past a signed 64-bit
    count of ns: the handler's signature of the record must still take it (it raised OverflowError)."""
    img, raw, geo, descs = _ext4_copy(tmp_path)
    where = {}
    for ino in [ROOT_INO, *range(geo.first_ino, geo.inodes_count)]:  # the root (general path) and a file (fast)
        block, off = R.inode_location(ino, geo, descs)
        pos = block * geo.block_size + off
        if ino == ROOT_INO or int.from_bytes(raw[pos:pos + 2], "little") & 0xF000 == 0x8000:
            where[ino] = pos
            if len(where) == 2:
                break
    for pos in where.values():
        raw[pos + 0x84] |= 3  # i_ctime_extra
    img.write_bytes(raw)
    built = _same(img, monkeypatch, verify=False)
    tree = pickle.loads(built[0]).tree
    assert all(tree.peek(ino).ctime_ns > 1 << 63 for ino in where)
