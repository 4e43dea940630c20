"""What the views (FUSE mount, tools) may ask the engine, without knowing any on-disk layout.

A view keeps its own tree, built from `snapshot()` and then from the Mutation stream; it comes here
only for file content, link targets, xattrs and file-system totals, by (file system, inode).
"""

from __future__ import annotations

import stat
from collections.abc import Iterator
from dataclasses import dataclass

from inference.engine import Engine
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


@dataclass(frozen=True, slots=True)
class StatFs:
    block_size: int
    blocks: int
    blocks_free: int
    files: int
    files_free: int
    name_max: int = 255


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
        yield _entry(b"/", tree.nodes[ROOT_INO])
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

    def read(self, fs: str, ino: int, offset: int, size: int) -> bytes:
        """File content as the replica holds it now (holes and unwritten extents read as zeros)."""
        handler = self._handler(fs)
        node = handler.tree.nodes.get(ino)
        if node is None or node.type != "file" or offset >= node.size or size <= 0:
            return b""
        size = min(size, node.size - offset, MAX_READ)
        bs = handler.geo.block_size
        out = bytearray(size)
        first, last = offset // bs, (offset + size - 1) // bs
        for logical, physical, length, uninit in node.extents:
            lo, hi = max(first, logical), min(last + 1, logical + length)
            if lo >= hi or uninit:
                continue
            data = handler.read_home((physical + lo - logical) * bs, (hi - lo) * bs)
            start = lo * bs - offset
            a, b = max(start, 0), min(start + len(data), size)
            if a < b:
                out[a:b] = data[a - start:b - start]
        return bytes(out)

    def statfs(self, fs: str) -> StatFs:
        h = self._handler(fs)
        raw = h.read_view(1024, 1024)
        free_blocks = int.from_bytes(raw[12:16], "little") | (int.from_bytes(raw[0x158:0x15C], "little") << 32
                                                               if h.geo.is_64bit else 0)
        return StatFs(block_size=h.geo.block_size, blocks=h.geo.blocks_count, blocks_free=free_blocks,
                      files=h.geo.inodes_count, files_free=int.from_bytes(raw[16:20], "little"))


def _entry(path: bytes, node: Node) -> Entry:
    return Entry(path=path, ino=node.ino, type=node.type, mode=node.mode or stat.S_IFDIR, uid=node.uid, gid=node.gid,
                 size=node.size, mtime_ns=node.mtime_ns, ctime_ns=node.ctime_ns, links=node.links, rdev=node.rdev,
                 target=node.target, xattrs=dict(node.xattrs) if node.xattrs else None)
