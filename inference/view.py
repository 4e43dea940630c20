"""What the views (FUSE mount, tools) may ask the engine, without knowing any on-disk layout.

A view keeps its own tree, built from `snapshot()` and then from the Mutation stream; it comes here
only for file content, link targets, xattrs and file-system totals, by (file system, inode).
"""

from __future__ import annotations

import dataclasses
import stat
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from inference.engine import Engine
from inference.errors import CorruptMetadata
from inference.ext import layout as L
from inference.ext import reader as R
from inference.shadow import ROOT_INO, Node

MAX_READ = 32 << 20


@dataclass(frozen=True, slots=True)
class Entry:
    """One name of the snapshot, parents before children."""

    path: bytes
    ino: int
    type: str
    mode: int        # full st_mode
    uid: int
    gid: int
    size: int
    mtime_ns: int
    ctime_ns: int
    links: int
    rdev: int
    target: bytes | None
    xattrs: dict[str, bytes] | None
    atime_ns: int = 0
    blocks: int = 0      # st_blocks (i_blocks in 512-byte units)
    flags: int = 0       # i_flags (FS_IOC_GETFLAGS values)
    blksize: int = 0     # the root's entry only: the file system's block size (st_blksize)


@dataclass(frozen=True, slots=True)
class StatFs:
    """As ext4's statfs reports it: `blocks` less the metadata overhead, `blocks_avail` less the root-reserved
    blocks and the kernel's own reserve (2% up to 4096 clusters, extent file systems only)."""

    block_size: int
    blocks: int
    blocks_free: int
    files: int
    files_free: int
    name_max: int = 255
    blocks_avail: int | None = None  # None: same as blocks_free


@dataclass(frozen=True, slots=True)
class Identity:
    """What /etc/fstab may name a file system by."""

    name: str        # the engine's name: disk, pN, or the LV name
    label: str       # file-system label (LABEL=)
    uuid: str        # file-system UUID, lower-case dashed (UUID=)
    partuuid: str    # GPT partition GUID, or MBR disk signature-NN (PARTUUID=)
    partlabel: str   # GPT partition name (PARTLABEL=)


class EngineView:
    """Read access to the engine's file systems for the views."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def filesystems(self) -> list[str]:
        return sorted(self.engine.filesystems)

    def _handler(self, fs: str):
        entry = self.engine.filesystems.get(fs)
        if entry is None:
            raise KeyError(f"no file system {fs!r}")
        return entry.handler

    def snapshot(self, fs: str) -> Iterator[Entry]:
        """Every path of the shadow tree now, breadth first (a directory before what it holds)."""
        tree = self._handler(fs).tree
        queue = [(ROOT_INO, b"/")]
        seen = {ROOT_INO}
        yield dataclasses.replace(_entry(b"/", tree.nodes[ROOT_INO]), blksize=self._handler(fs).geo.block_size)
        while queue:
            d, path = queue.pop(0)
            for name, ino in sorted(tree.children.get(d, {}).items()):
                node = tree.nodes.get(ino)
                if node is None:
                    continue
                child = (path.rstrip(b"/") or b"") + b"/" + name
                yield _entry(child, node)
                if node.type == "dir" and ino not in seen:
                    seen.add(ino)
                    queue.append((ino, child))

    def stat(self, fs: str, ino: int) -> Entry | None:
        """One inode's attributes now (path left empty): for attributes no event carries, such as a
        directory's mtime, which moves with its entries."""
        node = self._handler(fs).tree.nodes.get(ino)
        return None if node is None else _entry(b"", node)

    def take_quiet(self, fs: str) -> list[Entry]:
        """The inodes (path left empty) whose atime, blocks or flags changed without an event since the last call,
        as they are now: a read in the guest moves atime and says nothing, and the view must still show it."""
        handler = self._handler(fs)
        inos, handler.reconciler.quiet = handler.reconciler.quiet or set(), set()
        nodes = handler.tree.nodes
        return [_entry(b"", nodes[ino]) for ino in sorted(inos) if ino in nodes]

    def read(self, fs: str, ino: int, offset: int, size: int) -> bytes:
        """File content as the replica holds it now (holes and unwritten extents read as zeros, as the guest's
        kernel reads them). Shorter than asked where the engine's file ends: the caller decides what that means
        (the FUSE view answers EIO, never padding). Inline-data files (ext4 inline_data) read the bytes kept in
        the inode, from the committed metadata."""
        handler = self._handler(fs)
        node = handler.tree.nodes.get(ino)
        if node is None or node.type != "file" or offset >= node.size or size <= 0:
            return b""
        size = min(size, node.size - offset, MAX_READ)
        if not node.extents and handler.geo.inline_data and node.size <= handler.geo.block_size:
            inline = self._inline(handler, ino, node.size)
            if inline is not None:
                return inline[offset:offset + size]
        bs = handler.geo.block_size
        first, last = offset // bs, (offset + size - 1) // bs
        for logical, physical, length, uninit in node.extents:
            if logical <= first and last < logical + length and not uninit:  # one written extent: one pread
                return handler.read_data((physical + first - logical) * bs + offset % bs, size)
        out = bytearray(size)
        for logical, physical, length, uninit in node.extents:
            lo, hi = max(first, logical), min(last + 1, logical + length)
            if lo >= hi or uninit:
                continue
            data = handler.read_data((physical + lo - logical) * bs, (hi - lo) * bs)
            start = lo * bs - offset
            a, b = max(start, 0), min(start + len(data), size)
            if a < b:
                out[a:b] = data[a - start:b - start]
        return bytes(out)

    @staticmethod
    def _inline(handler, ino: int, size: int) -> bytes | None:
        """An INLINE_DATA_FL inode's bytes up to `size` (past the inline bytes zeros, as ext4_readpage_inline
        reads them); None if the inode keeps no inline data, b"" if its record cannot be read now."""
        try:
            inode = handler.reader.inode(ino)
            if not inode.flags & L.INLINE_DATA_FL:
                return None
            return R.inline_data(inode, handler.geo)[:size].ljust(size, b"\0")
        except CorruptMetadata:
            return b""  # a torn or hostile record: a short read, so the view answers EIO

    def writing(self, fs: str, ino: int, start: int, end: int) -> bool:
        """Has the engine taken data writes to [start, end) of the file that no event has reported yet? Their
        bytes are in the replica already, so a reader at the view's point must wait for that event."""
        entry = self.engine.filesystems.get(fs)
        if entry is not None and entry.handler.journal is not None:
            return False  # the replaced bytes are kept until the point (ExtHandler.read_data)
        ranges = entry.handler.pending_data.get(ino) if entry is not None else None
        return bool(ranges) and any(lo < end and hi > start for lo, hi in ranges)

    def resolve(self, fs: str, path: bytes) -> int | None:
        """The inode at `path` now (no symlink followed), or None."""
        tree = self._handler(fs).tree
        ino = ROOT_INO
        for part in path.split(b"/"):
            if part:
                found = tree.children.get(ino, {}).get(part)
                if found is None:
                    return None
                ino = found
        return ino

    def identity(self, fs: str) -> Identity:
        entry = self.engine.filesystems.get(fs)
        if entry is None:
            raise KeyError(f"no file system {fs!r}")
        geo, vol = entry.handler.geo, entry.volume
        fs_uuid = str(uuid.UUID(bytes=geo.uuid)) if any(geo.uuid) else ""
        partuuid = vol.uuid.lower() if vol is not None else ""
        if not partuuid and vol is not None and self.engine.volumes.table == "dos" and fs[1:].isdigit():
            sig = int.from_bytes(self.engine.replica.read(440, 4), "little")  # MBR disk signature
            partuuid = f"{sig:08x}-{int(fs[1:]):02x}" if sig else ""
        return Identity(name=fs, label=geo.label, uuid=fs_uuid, partuuid=partuuid,
                        partlabel=vol.label if vol is not None else "")

    def statfs(self, fs: str) -> StatFs:
        """Totals as the guest kernel's statfs gives them: free counts summed over the group descriptors (what
        ext4 counts at mount and keeps), the metadata overhead and reserves subtracted as ext4_statfs does."""
        h = self._handler(fs)
        geo = h.geo
        sb = L.superblock.parse(h.read_view(1024, 1024))
        hi = geo.is_64bit
        free_blocks = sb.s_free_blocks_count_lo | (sb.s_free_blocks_count_hi << 32 if hi else 0)
        free_inodes = sb.s_free_inodes_count
        try:
            raw = b"".join(h.read_view(b * geo.block_size, geo.block_size) for b in R.gdt_blocks(geo))
            descs = R.parse_group_descs(raw, geo)
            free_blocks, free_inodes = sum(d.free_blocks for d in descs), sum(d.free_inodes for d in descs)
        except Exception:  # noqa: BLE001 - a torn table mid-commit: the superblock's counts will do
            pass
        reserved = sb.s_r_blocks_count_lo | (sb.s_r_blocks_count_hi << 32 if hi else 0)
        if geo.extents:  # ext4_calculate_resv_clusters
            reserved += min(geo.blocks_count // 50, 4096)
        overhead = sb.s_overhead_clusters or self._overhead(h)
        return StatFs(block_size=geo.block_size, blocks=max(geo.blocks_count - overhead, 0), blocks_free=free_blocks,
                      files=geo.inodes_count, files_free=free_inodes, blocks_avail=max(free_blocks - reserved, 0))

    @staticmethod
    def _overhead(h) -> int:
        """ext4_calculate_overhead: superblock and GDT copies, bitmaps, inode tables and the internal journal."""
        geo = h.geo
        per_block = geo.block_size // geo.desc_size
        gdt = -(-geo.groups // per_block)
        itable = -(-geo.inodes_per_group * geo.inode_size // geo.block_size)
        total = geo.first_data_block
        for g in range(geo.groups):
            has_super = R.group_has_super(g, geo)
            base = int(has_super)
            if not geo.meta_bg or g < geo.first_meta_bg * per_block:
                base += (gdt + geo.reserved_gdt_blocks) if has_super else 0
            elif g % per_block in (0, 1, per_block - 1):
                base += 1
            total += base + 2 + itable
        if geo.has_journal and not geo.journal_dev and getattr(h, "journal", None) is not None:
            total += h.journal.jsb.maxlen
        return total


def _entry(path: bytes, node: Node) -> Entry:
    return Entry(path=path, ino=node.ino, type=node.type, mode=node.mode or stat.S_IFDIR, uid=node.uid, gid=node.gid,
                 size=node.size, mtime_ns=node.mtime_ns, ctime_ns=node.ctime_ns, links=node.links, rdev=node.rdev,
                 target=node.target, xattrs=dict(node.xattrs) if node.xattrs else None, atime_ns=node.atime_ns,
                 blocks=node.blocks, flags=node.flags)
