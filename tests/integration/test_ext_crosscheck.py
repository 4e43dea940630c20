"""Our ext parser and The Sleuth Kit (pytsk3) agree on every path, inode and block run of the test images.

TSK reports a file's (directory's, slow symlink's) data in its default attribute, where holes appear as runs
flagged SPARSE or FILLER (address 0), and the mapping's own blocks in a separate attribute: UNIX_INDIR (indirect
blocks, ext2/3) or UNIX_EXTENT (extent-tree blocks, ext4), whose holes are flagged the same way. We compare non-hole
blocks as sets: data blocks with our extents, mapping blocks with our metadata list. TSK also lists a virtual
$OrphanFiles directory (inode past the last real one), which is skipped. No root, no QEMU: the images are files.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from images.build import artifact
from inference.errors import CorruptMetadata
from inference.ext.reader import ExtReader, file_map, parse_superblock
from tests.support import require

try:
    import pytsk3
except ImportError:  # pragma: no cover - the test says why it cannot run
    pytsk3 = None

HOLE = 0x01 | 0x02  # TSK_FS_ATTR_RUN_FLAG_FILLER | TSK_FS_ATTR_RUN_FLAG_SPARSE
ATTR_DEFAULT, ATTR_INDIR, ATTR_EXTENT = 0x01, 0x1001, 0x1002
MAPPED = {int(pytsk3.TSK_FS_META_TYPE_REG), int(pytsk3.TSK_FS_META_TYPE_DIR), int(pytsk3.TSK_FS_META_TYPE_LNK)} \
    if pytsk3 else set()


def tsk_runs(f: pytsk3.File) -> tuple[set[int], set[int]]:
    """(data blocks, mapping blocks) TSK reports for one file, holes left out."""
    data: set[int] = set()
    maps: set[int] = set()
    for attr in f:
        target = {ATTR_DEFAULT: data, ATTR_INDIR: maps, ATTR_EXTENT: maps}.get(int(attr.info.type))
        for run in attr if target is not None else ():
            if not int(run.flags) & HOLE:
                target.update(range(run.addr, run.addr + run.len))
    return data, maps


def tsk_walk(fs: pytsk3.FS_Info) -> dict[bytes, tuple[int, int, set[int], set[int]]]:
    """path -> (inode, TSK meta type, data blocks, mapping blocks) for the root and every entry under it."""
    root = fs.open(path="/")
    out = {b"/": (root.info.meta.addr, int(root.info.meta.type), *tsk_runs(root))}
    stack, seen = [(b"", root.info.meta.addr)], set()
    while stack:
        path, addr = stack.pop()
        if addr in seen:
            continue
        seen.add(addr)
        for entry in fs.open_dir(inode=addr):
            name, meta = entry.info.name.name, entry.info.meta
            if name in (b".", b"..") or meta is None or meta.addr > fs.info.last_inum - 1:  # $OrphanFiles is virtual
                continue
            runs = tsk_runs(entry) if int(meta.type) in MAPPED else (set(), set())
            out[path + b"/" + name] = (meta.addr, int(meta.type), *runs)
            if int(meta.type) == int(pytsk3.TSK_FS_META_TYPE_DIR):
                stack.append((path + b"/" + name, meta.addr))
    return out


def crosscheck(img_path: Path, offset: int = 0) -> int:
    """Assert both views agree on one file system at `offset`; returns how many paths were compared."""
    fd = os.open(img_path, os.O_RDONLY)
    try:
        r = ExtReader(lambda off, n: os.pread(fd, n, offset + off))
        ours = {path: ino for path, ino in r.walk()}
        theirs = tsk_walk(pytsk3.FS_Info(pytsk3.Img_Info(str(img_path)), offset=offset))
        assert {p: i.ino for p, i in ours.items()} == {p: t[0] for p, t in theirs.items()}
        mapped = with_meta = 0
        for path, ino in ours.items():
            if ino.type not in ("file", "dir", "symlink"):
                continue
            data, meta = file_map(ino, r.geo, r.read_block)
            blocks = {e.physical + i for e in data for i in range(e.length)}
            _, _, tsk_data, tsk_maps = theirs[path]
            assert blocks == tsk_data, path
            assert set(meta) == tsk_maps, path
            mapped, with_meta = mapped + bool(blocks), with_meta + bool(meta)
        assert mapped > (500 if len(ours) > 5000 else 1) and (with_meta or len(ours) < 5000)
        return len(ours)
    finally:
        os.close(fd)


@pytest.mark.parametrize("name", ["ext2.img", "ext3.img", "ext4.img", "ext4-1k.img"])
def test_fs_image_agrees_with_tsk(name: str) -> None:
    require(pytsk3 is not None, "pytsk3 not installed")
    assert crosscheck(artifact(name)) > 5000


@pytest.mark.parametrize("name, expect", [("mbr.img", ["mbr-p1", "mbr-p2", "mbr-p5"]),
                                          ("gpt.img", ["gpt-p1", "gpt-p2"])])
def test_partitions_agree_with_tsk(name: str, expect: list[str]) -> None:
    """Every allocated partition that holds an ext file system (not the swap, not the extended container)."""
    require(pytsk3 is not None, "pytsk3 not installed")
    path = artifact(name)
    vol = pytsk3.Volume_Info(pytsk3.Img_Info(str(path)))
    labels = []
    with open(path, "rb") as f:
        for part in vol:
            if not int(part.flags) & int(pytsk3.TSK_VS_PART_FLAG_ALLOC):
                continue
            offset = part.start * vol.info.block_size
            f.seek(offset + 1024)
            try:
                geo = parse_superblock(f.read(1024))
            except CorruptMetadata:
                continue  # swap, extended partition table
            labels.append(geo.label)
            assert crosscheck(path, offset) >= (5000 if geo.label.endswith("p1") else 5)
    assert labels == expect
