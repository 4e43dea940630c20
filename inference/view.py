"""What the views (FUSE mount, tools) may ask the engine, without knowing any on-disk layout.

A view keeps its own tree, built from `snapshot()` and then from the Mutation stream; it comes here
only for file content, link targets, xattrs and file-system totals, by (file system, inode).
"""

from __future__ import annotations

import dataclasses
import functools
import stat
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from inference.engine import Engine
from inference.ext.content import read_file
from inference.ext.statfs import StatFs
from inference.ext.statfs import statfs as ext_statfs
from inference.shadow import ROOT_INO, Node


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
class Identity:
    """What /etc/fstab may name a file system by."""

    name: str        # the engine's name: disk, pN, or the LV name
    label: str       # file-system label (LABEL=)
    uuid: str        # file-system UUID, lower-case dashed (UUID=)
    partuuid: str    # GPT partition GUID, or MBR disk signature-NN (PARTUUID=)
    partlabel: str   # GPT partition name (PARTLABEL=)


def _locked(method: Callable) -> Callable:
    @functools.wraps(method)
    def under_lock(self, *args):
        with self.engine.lock:
            return method(self, *args)
    return under_lock


class EngineView:
    """The engine's door for readers in other threads (the FUSE view, tools): each call is taken under the
    engine's lock (Engine.lock, reentrant: hold it around several calls for one consistent point)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @_locked
    def filesystems(self) -> list[str]:
        return sorted(self.engine.filesystems)

    def _handler(self, fs: str):
        entry = self.engine.filesystems.get(fs)
        if entry is None:
            raise KeyError(f"no file system {fs!r}")
        return entry.handler

    @_locked
    def snapshot(self, fs: str) -> list[Entry]:
        """Every path of the shadow tree now, breadth first (a directory before what it holds)."""
        return list(self._walk(fs))

    def _walk(self, fs: str) -> Iterator[Entry]:
        tree = self._handler(fs).tree
        queue = [(ROOT_INO, b"/")]
        seen = {ROOT_INO}
        root = tree.peek(ROOT_INO)
        if root is None:
            raise KeyError(ROOT_INO)
        yield dataclasses.replace(_entry(b"/", root), blksize=self._handler(fs).geo.block_size)
        while queue:
            d, path = queue.pop(0)
            for name, ino in sorted(tree.entries(d).items()):  # (peek, entries: nothing made resident)
                node = tree.peek(ino)
                if node is None:
                    continue
                child = (path.rstrip(b"/") or b"") + b"/" + name
                yield _entry(child, node)
                if node.type == "dir" and ino not in seen:
                    seen.add(ino)
                    queue.append((ino, child))

    @_locked
    def children(self, fs: str, ino: int) -> list[tuple[bytes, int]]:
        """A directory's names now, sorted, as (name, inode) pairs (stat each as needed: a directory may hold a
        million)."""
        return sorted(self._handler(fs).tree.entries(ino).items())

    @_locked
    def stat(self, fs: str, ino: int) -> Entry | None:
        """One inode's attributes now (path left empty): for attributes no event carries, such as a
        directory's mtime, which moves with its entries."""
        node = self._handler(fs).tree.peek(ino)
        return None if node is None else _entry(b"", node)

    @_locked
    def take_quiet(self, fs: str) -> list[Entry]:
        """The inodes (path left empty) whose atime, blocks or flags changed without an event since the last call,
        as they are now: a read in the guest moves atime and says nothing, and the view must still show it."""
        handler = self._handler(fs)
        inos, handler.reconciler.quiet = handler.reconciler.quiet or set(), set()
        peek = handler.tree.peek
        return [_entry(b"", node) for ino in sorted(inos) if (node := peek(ino)) is not None]

    @_locked
    def read(self, fs: str, ino: int, offset: int, size: int) -> bytes:
        """File content as the replica holds it now (holes and unwritten extents read as zeros, as the guest's
        kernel reads them). Shorter than asked where the engine's file ends: the caller decides what that means
        (the FUSE view answers EIO, never padding). Inline-data files (ext4 inline_data) read the bytes kept in
        the inode, from the committed metadata."""
        return read_file(self._handler(fs), ino, offset, size)

    @_locked
    def writing(self, fs: str, ino: int, start: int, end: int) -> bool:
        """Has the engine taken data writes to [start, end) of the file that no event has reported yet? Their
        bytes are in the replica already, so a reader at the view's point must wait for that event."""
        entry = self.engine.filesystems.get(fs)
        if entry is not None and entry.handler.journal is not None:
            return False  # the replaced bytes are kept until the point (ExtHandler.read_data)
        ranges = entry.handler.pending_data.get(ino) if entry is not None else None
        return bool(ranges) and any(lo < end and hi > start for lo, hi in ranges)

    @_locked
    def resolve(self, fs: str, path: bytes) -> int | None:
        """The inode at `path` now (no symlink followed), or None."""
        tree = self._handler(fs).tree
        ino = ROOT_INO
        for part in path.split(b"/"):
            if part:
                found = tree.entries(ino).get(part)
                if found is None:
                    return None
                ino = found
        return ino

    @_locked
    def identity(self, fs: str) -> Identity:
        entry = self.engine.filesystems.get(fs)
        if entry is None:
            raise KeyError(f"no file system {fs!r}")
        geo, vol = entry.handler.geo, entry.volume
        fs_uuid = str(uuid.UUID(bytes=geo.uuid)) if any(geo.uuid) else ""
        return Identity(name=fs, label=geo.label, uuid=fs_uuid, partuuid=self.engine.partuuid(fs),
                        partlabel=vol.label if vol is not None else "")

    @_locked
    def statfs(self, fs: str) -> StatFs:
        """Totals as the guest kernel's statfs gives them (inference.ext.statfs)."""
        return ext_statfs(self._handler(fs))


def _entry(path: bytes, node: Node) -> Entry:
    return Entry(path=path, ino=node.ino, type=node.type, mode=node.mode or stat.S_IFDIR, uid=node.uid, gid=node.gid,
                 size=node.size, mtime_ns=node.mtime_ns, ctime_ns=node.ctime_ns, links=node.links, rdev=node.rdev,
                 target=node.target, xattrs=dict(node.xattrs) if node.xattrs else None, atime_ns=node.atime_ns,
                 blocks=node.blocks, flags=node.flags)
