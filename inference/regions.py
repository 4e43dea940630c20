"""The disk's bytes the engine trusts without seeing them written: what `attach --verify metadata` compares.

An attach with a base image starts the engine on the base's tree; a base that is not the disk makes every later
event wrong. The engine believes the partition tables and LVM metadata (VolumeMap), and on each ext file system
the superblock, the group descriptors, the bitmaps, the inode tables, the directories (their blocks and mapping
blocks), every inode's mapping and xattr blocks (which file a data write lands in) and the journal. If all of
those equal the disk's, so does the tree: every directory and inode is reached through them.

Sans-I/O like the rest of `inference`: everything is read through `read(offset, length)` over the base (or the
replica made from it), and the regions are disk byte ranges with a name a user can act on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from inference.errors import CorruptMetadata
from inference.ext import layout as L
from inference.ext.reader import ExtReader, Inode, MapTooBig, file_map, gdt_blocks, iter_inode_table
from inference.volume.map import SIGNATURE_SPAN, Volume, VolumeMap

ReadFn = Callable[[int, int], bytes]
SCAN_CHUNK = 4 << 20  # inode tables are read in pieces of this size to find directories and mapping blocks


@dataclass(frozen=True, slots=True)
class Region:
    offset: int  # disk bytes
    length: int
    what: str  # "inode table of group 3 (sda1)"


def _to_disk(vol: Volume, off: int, length: int) -> Iterator[tuple[int, int]]:
    """Disk (offset, length) pieces of a volume byte range, through its segments."""
    for disk_off, vol_off, seg_len in vol.segments:
        lo, hi = max(off, vol_off), min(off + length, vol_off + seg_len)
        if lo < hi:
            yield disk_off + lo - vol_off, hi - lo


def _has_map_blocks(inode: Inode) -> bool:
    """Whether an inode's block map has blocks of its own: an extent tree deeper than the inode, or indirect
    blocks (i_block slots 12-14)."""
    if inode.flags & L.EXTENTS_FL:
        return int.from_bytes(inode.i_block[6:8], "little") > 0
    return inode.i_block[48:60] != bytes(12)


def _ext_regions(vol: Volume, read: ReadFn) -> Iterator[tuple[int, int, str]]:
    """(volume offset, length, what) of one ext file system's trusted metadata."""
    fs = ExtReader(read, verify=False)
    geo, bs = fs.geo, fs.geo.block_size
    yield 1024, 1024, "superblock"
    for b in gdt_blocks(geo):
        yield b * bs, bs, "group descriptor table"
    itable_bytes = geo.inodes_per_group * geo.inode_size
    for g, d in enumerate(fs.descs):
        yield d.block_bitmap * bs, bs, f"block bitmap of group {g}"
        yield d.inode_bitmap * bs, bs, f"inode bitmap of group {g}"
        yield d.inode_table * bs, itable_bytes, f"inode table of group {g}"
    for g, d in enumerate(fs.descs):
        for start in range(0, itable_bytes, SCAN_CHUNK):
            raw = read(d.inode_table * bs + start, min(SCAN_CHUNK, itable_bytes - start))
            first = g * geo.inodes_per_group + 1 + start // geo.inode_size
            for inode in iter_inode_table(raw, first, geo):
                if inode.links == 0 and inode.ino != geo.journal_inum:
                    continue
                if inode.file_acl:
                    yield inode.file_acl * bs, bs, f"xattr block of inode {inode.ino}"
                listed = inode.type == "dir" or inode.ino == geo.journal_inum
                if not listed and not _has_map_blocks(inode):
                    continue  # its whole map is in the inode (compared with the inode table): skip the parse
                try:
                    extents, meta = file_map(inode, geo, fs.read_block, verify=False)
                except MapTooBig as exc:
                    extents, meta = [], exc.meta
                except CorruptMetadata:
                    continue  # the engine refuses it too; its inode-table bytes are compared all the same
                for b in meta:
                    yield b * bs, bs, f"mapping block of inode {inode.ino}"
                if inode.type == "dir" or inode.ino == geo.journal_inum:
                    what = "journal" if inode.ino == geo.journal_inum else f"directory inode {inode.ino}"
                    for e in extents:
                        yield e.physical * bs, e.length * bs, what


def metadata_regions(read: ReadFn, size: int) -> list[Region]:
    """Every trusted region of a disk, sorted by disk offset; a file system that cannot be read contributes its
    first 4 KiB only (the engine would not index it either)."""
    vmap = VolumeMap(read, size)
    vmap.scan()
    layout = [Region(start, end - start, "partition table, LVM metadata or volume signature")
              for start, end in vmap.layout_regions()]
    # where the disk's own partition table or whole-disk file system would begin, even if the base has neither:
    # a blank base must not pass against a disk that holds a file system
    layout.append(Region(0, min(SIGNATURE_SPAN, size), "partition table or whole-disk file system signature"))
    out: list[Region] = []
    for vol in vmap.volumes:
        if vol.kind != "ext":
            continue
        name = vol.name

        def vread(off: int, n: int, vol: Volume = vol) -> bytes:
            return b"".join(read(d, ln) for d, ln in _to_disk(vol, off, n))

        try:
            pieces = list(_ext_regions(vol, vread))
        except CorruptMetadata:
            pieces = [(0, 4096, "superblock")]
        for off, length, what in pieces:
            for d, ln in _to_disk(vol, off, length):
                out.append(Region(d, ln, f"{what} ({name})"))
    return sorted(_subtract(layout, out), key=lambda r: (r.offset, r.length))


def _subtract(layout: list[Region], specific: list[Region]) -> list[Region]:
    """The layout regions less what a file system region names more precisely (a whole-disk file system's
    superblock sits inside the first 4 KiB the layout checks for signatures), then the rest."""
    spans = sorted((r.offset, r.offset + r.length) for r in specific)
    out = list(specific)
    for r in layout:
        pos, end = r.offset, r.offset + r.length
        for s, e in spans:
            if e <= pos or s >= end:
                continue
            if s > pos:
                out.append(Region(pos, s - pos, r.what))
            pos = max(pos, e)
        if pos < end:
            out.append(Region(pos, end - pos, r.what))
    return out
