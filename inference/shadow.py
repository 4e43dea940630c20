"""The shadow tree: what the engine believes a file system holds, inode by inode and name by name.

File-system agnostic: handlers fill it from their own layouts. Paths are bytes as the guest wrote them.
"""

from __future__ import annotations

import gc
import operator
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

ROOT_INO = 2
MAX_DEPTH = 4096  # a path deeper than this means a cycle (hostile metadata)


@contextmanager
def gc_paused(*, freeze: bool = False) -> Iterator[None]:
    """Build or load a whole tree without the cyclic collector: it makes ~10 container objects per inode and no
    garbage cycles (keep it so: a cycle made in here waits for the next collection), and collections scanning
    the growing heap for none took 3/4 of loading an index (100k inodes: 0.9 -> 0.22 s of CPU). `freeze`: what
    exists at the end is long-lived (a process that just loaded its index): move it out of the collector's
    generations, so no later collection walks it (the first one after a load took ~0.2 s per 100k inodes).
    Frozen objects are still freed by refcounting, but a cycle among them never is."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if freeze:
            gc.freeze()
        if was:
            gc.enable()


@dataclass(slots=True)
class Node:
    ino: int
    type: str
    mode: int = 0            # full st_mode
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    links: int = 0
    rdev: int = 0
    atime_ns: int = 0
    blocks: int = 0          # i_blocks in 512-byte units (st_blocks), huge_file already applied
    flags: int = 0           # i_flags as the guest's FS_IOC_GETFLAGS gives them (immutable, append-only, ...)
    target: bytes | None = None                     # symlinks
    xattrs: dict[str, bytes] | None = None
    extents: tuple[tuple[int, int, int, bool], ...] = ()  # (logical, physical, length, uninit)
    meta_blocks: tuple[int, ...] = ()                # blocks of the mapping itself (extent tree, indirect)
    xattr_block: int = 0
    gen: int = 0            # changes when the inode number is reused for a new file
    name_ctime_ns: int = 0  # ctime when its names last changed: a later rename must move it
    entries_changed: bool = False  # a directory whose entries changed since its mtime was last reported
    sig: int = 0            # the handler's checksum of what else it compares cheaply (e.g. the block-map root)
    names: tuple[tuple[int, bytes], ...] = ()  # (parent ino, name); a tuple: 48 B for one name, a list 88

    @property
    def perm(self) -> int:
        return stat.S_IMODE(self.mode)


_FIELDS = Node.__slots__
_SHARED = ("type", "mode", "uid", "gid", "links", "flags", "rdev")  # few distinct values: one object per value
_SAME_AS_CTIME = ("mtime_ns", "atime_ns", "name_ctime_ns")  # often equal to ctime_ns: then the same int object


class ShadowTree:
    """Inodes and directory entries; `path()` walks names up to the root."""

    def __init__(self) -> None:
        self.nodes: dict[int, Node] = {}
        self.children: dict[int, dict[bytes, int]] = {}

    def __len__(self) -> int:
        return len(self.nodes)

    def __getstate__(self) -> dict:
        """For the index file: nodes as one list per field (columns). They pickle 5x and load 2.4x faster than
        slotted objects (measured on 100k nodes), and unlike one tuple per node (rows) leave nothing per node
        to free after the load: rows kept ~240 B per inode of RSS (the peak) in a loaded process."""
        nodes = list(self.nodes.values())
        cols = {f: list(map(operator.attrgetter(f), nodes)) for f in _FIELDS}
        return {"columns": cols, "children": self.children}

    def __setstate__(self, state: dict) -> None:
        cols = state["columns"]
        # Equal values as one object (each int here costs 28-36 B): map over dict methods runs in C.
        for f in _SHARED:
            pool: dict = {}
            cols[f] = list(map(pool.setdefault, cols[f], cols[f]))
        ctime = cols["ctime_ns"]
        for f in _SAME_AS_CTIME:
            cols[f] = [c if v == c else v for v, c in zip(cols[f], ctime, strict=True)]
        self.nodes = dict(zip(cols["ino"], map(Node, *(cols[f] for f in _FIELDS)), strict=True))
        self.children = state["children"]

    def add_node(self, node: Node) -> None:
        self.nodes[node.ino] = node
        if node.type == "dir":
            self.children.setdefault(node.ino, {})

    def drop_node(self, ino: int) -> Node | None:
        node = self.nodes.pop(ino, None)
        self.children.pop(ino, None)
        return node

    def add_name(self, parent: int, name: bytes, ino: int) -> None:
        self.children.setdefault(parent, {})[name] = ino
        node = self.nodes.get(ino)
        if node is not None and (parent, name) not in node.names:
            node.names += ((parent, name),)

    def remove_name(self, parent: int, name: bytes) -> int | None:
        ino = self.children.get(parent, {}).pop(name, None)
        if ino is not None and (node := self.nodes.get(ino)) is not None and (parent, name) in node.names:
            i = node.names.index((parent, name))
            node.names = node.names[:i] + node.names[i + 1:]
        return ino

    def lookup(self, parent: int, name: bytes) -> int | None:
        return self.children.get(parent, {}).get(name)

    def path(self, ino: int) -> bytes | None:
        """The first path of an inode, or None if it is not reachable from the root."""
        parts: list[bytes] = []
        seen: set[int] = set()
        while ino != ROOT_INO:
            node = self.nodes.get(ino)
            if node is None or not node.names or ino in seen or len(parts) > MAX_DEPTH:
                return None
            seen.add(ino)
            parent, name = node.names[0]
            parts.append(name)
            ino = parent
        return b"/" + b"/".join(reversed(parts))

    def name_path(self, parent: int, name: bytes) -> bytes | None:
        base = self.path(parent)
        if base is None:
            return None
        return (base.rstrip(b"/") or b"") + b"/" + name

