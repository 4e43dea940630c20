"""The FUSE view's own tree: built once from `EngineView.snapshot()`, then changed ONLY by Mutations.

Sans-I/O on purpose: the FUSE handlers apply a mutation here at the moment the poke helper's syscall
for it lands (docs/ARCHITECTURE.md "Poke": the kernel raises inotify events only for its own requests), so the tree
the kernel sees and the tree we answer from never disagree. Keeping it separate from the engine's shadow
tree also means the view lags the engine by exactly the poke queue, and never needs the engine's lock.

Layouts:
- one file system: it is the root of the view;
- several: each gets a directory of the root, named by the caller (mount.fs_dir_names: label, UUID or pN);
- assembled (`--assemble`): one file system (the one whose /etc/fstab says so) is the root and the others are
  mounted on directories inside it with `mount(fs, path)`, as the guest mounts them: the directory below is
  covered (its name leads to the mounted root; what is under it is hidden, as on a real mount).

Names: every path component must be a name a directory can hold (not empty, `.` or `..`, no `/` or NUL). The
engine's name policy keeps other names out; this tree checks again, because a bad component would alias another
entry or make readdir answer a different name than lookup takes: a snapshot entry with one is left out (and
logged), and a mutation with one is a ViewError, so a hostile base image still gives a working view.

Node ids: the file system at the root has node id = guest inode number (its root, guest inode 2, is FUSE's
node 1 but reports st_ino 2). Every other file system k (k = 1, 2, ... in name order) has `k << 32 | ino`, so
ids stay unique; their st_ino is that id, whose low 32 bits are the guest's.
"""

from __future__ import annotations

import logging
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from inference.events import CHATTR_MASK, Mutation, flag_bits, path_bytes
from inference.names import bad_name_reason

ROOT_ID = 1
GUEST_ROOT_INO = 2
IFMT = {"file": stat.S_IFREG, "dir": stat.S_IFDIR, "symlink": stat.S_IFLNK, "chardev": stat.S_IFCHR,
        "blockdev": stat.S_IFBLK, "fifo": stat.S_IFIFO, "socket": stat.S_IFSOCK}
MAX_DEPTH = 4096
MAX_SKIP_LOGS = 20  # snapshot entries named in the log when left out; the rest are counted

log = logging.getLogger("mirrorfs.viewtree")


@dataclass(slots=True)
class VNode:
    """One inode of the view. `names` are its (parent id, name) links; an unlinked node lives on while
    the kernel still holds a reference to it (lookup count), so fstat of an open deleted file works."""

    nid: int
    fs: str
    ino: int
    type: str
    mode: int                     # full st_mode
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    links: int = 1
    rdev: int = 0
    target: bytes | None = None
    xattrs: dict[str, bytes] = field(default_factory=dict)
    seq: int = 0                  # seq of the last mutation applied (0: as the snapshot had it)
    mut_time: float = 0.0         # host time of that mutation
    generation: int = 0
    names: list[tuple[int, bytes]] = field(default_factory=list)
    children: dict[bytes, int] | None = None
    atime_ns: int = 0
    blocks: int = 0               # st_blocks, the guest's i_blocks in 512-byte units
    flags: int = 0                # the guest's inode flags (FS_IOC_GETFLAGS values)
    opened: bool = False          # opened for reading at some time: the kernel may hold pages of it to drop

    @property
    def st_ino(self) -> int:
        return GUEST_ROOT_INO if self.nid == ROOT_ID and self.fs else self.nid


@dataclass(slots=True)
class Applied:
    """What a mutation changed, for cache invalidation by whoever did not go through the kernel."""

    entries: list[tuple[int, bytes]] = field(default_factory=list)  # (parent id, name) changed
    nodes: list[int] = field(default_factory=list)                  # attributes/content changed


class ViewError(Exception):
    """A mutation that does not fit the view (a missing parent, say): the view and the stream disagree."""


class ViewTree:
    def __init__(self, filesystems: list[str], names: dict[str, bytes] | None = None,
                 root: str | None = None) -> None:
        """`root`: the file system at the root of the view (default: the only one, if there is one); the others
        get a directory each (`names`, default their engine names), or, with a root, wait for `mount()`."""
        self.filesystems = sorted(filesystems)
        if root is None and len(self.filesystems) == 1:
            root = self.filesystems[0]
        self.root_fs = root
        self.nodes: dict[int, VNode] = {}
        self.lookups: dict[int, int] = {}
        self.fs_root: dict[str, int] = {}
        self.prefixes: dict[str, bytes] = {}      # where each visible file system's root is, below the mount point
        self.covered: dict[int, int] = {}         # a directory mounted over -> the root of what is mounted there
        self.blksize: dict[str, int] = {}         # st_blksize of each file system, as the guest's stat gives it
        self._generation = 0
        self.changes = 0  # moves with every change of any node's attributes (the view's cache of them: fuse.py)
        others = [fs for fs in self.filesystems if fs != root]
        self._k = {fs: k for k, fs in enumerate(others, start=1)}
        for fs in others:
            self.fs_root[fs] = self.nid(fs, GUEST_ROOT_INO)
        if root is not None:
            self.fs_root[root] = ROOT_ID
            self.prefixes[root] = b""
        else:
            names = names or {fs: dir_name(fs) for fs in self.filesystems}
            if len(set(names.values())) != len(names):
                raise ValueError(f"directory names are not unique: {names}")
            self.nodes[ROOT_ID] = VNode(ROOT_ID, "", 1, "dir", stat.S_IFDIR | 0o555, links=2 + len(others),
                                        children={})
            for fs in others:
                self.nodes[ROOT_ID].children[names[fs]] = self.fs_root[fs]
                self.prefixes[fs] = names[fs]

    # -- ids and paths

    def nid(self, fs: str, ino: int) -> int:
        if fs == self.root_fs:
            return ROOT_ID if ino == GUEST_ROOT_INO else ino
        return (self._k[fs] << 32) | ino

    def fs_prefix(self, fs: str) -> bytes | None:
        """Where a file system's root is, relative to the mount point (b"" at the root); None: not shown."""
        return self.prefixes.get(fs)

    def mount(self, fs: str, path: bytes) -> str | None:
        """Lay `fs` (loaded) over the directory at `path` of the view as it is now; None, or why not."""
        nid = ROOT_ID
        for part in [p for p in path.split(b"/") if p][:MAX_DEPTH]:
            node = self.lookup(nid, part)
            if node is None or node.children is None:
                return f"{path.decode('utf-8', 'replace')} is not a directory of the view"
            nid = node.nid
        if nid == ROOT_ID or fs not in self.fs_root or fs == self.root_fs:
            return f"cannot mount {fs} on {path.decode('utf-8', 'replace')}"
        while nid in self.covered:   # mounted twice on one place: the last mount is the one seen
            nid = self.covered[nid]
        self.covered[nid] = self.fs_root[fs]
        self.changes += 1
        self.prefixes[fs] = b"/".join(p for p in path.split(b"/") if p)
        return None

    def hidden(self, fs: str, path: bytes) -> bool:
        """True if `fs`'s `path` cannot be seen in the view: the file system is not shown, or the path goes
        through (or is) a directory something else is mounted on."""
        if fs not in self.prefixes:
            return True
        return bool(self.covered) and any(nid in self.covered for nid in self._walk(fs, path) if nid is not None)

    def visible(self, nid: int) -> int:
        while nid in self.covered:
            nid = self.covered[nid]
        return nid

    def parent(self, nid: int) -> int:
        """The directory `..` leads to in the view."""
        node = self.nodes.get(nid)
        if node is None or nid == ROOT_ID:
            return ROOT_ID
        if node.names:
            return self.visible(node.names[0][0])
        below = next((d for d, top in self.covered.items() if top == nid), None)  # a mounted file system's root
        return self.parent(below) if below is not None else ROOT_ID

    def listing(self, nid: int) -> list[tuple[bytes, int]]:
        """A directory's entries as the view shows them (mount points lead to what is mounted), sorted."""
        node = self.nodes.get(nid)
        if node is None or node.children is None:
            return []
        return sorted((name, self.visible(child)) for name, child in node.children.items())

    def _walk(self, fs: str, path: bytes) -> Iterator[int | None]:
        """The node ids along `fs`'s `path`, one per component; None (and the end) where the path breaks."""
        nid: int | None = self.fs_root[fs]
        for part in path.split(b"/")[:MAX_DEPTH]:
            if not part:
                continue
            if part in (b".", b"..") or b"\0" in part:  # never a step: `..` would lead out of the parent
                yield None
                return
            node = self.nodes.get(nid)
            nid = node.children.get(part) if node is not None and node.children is not None else None
            yield nid
            if nid is None:
                return

    def resolve(self, fs: str, path: bytes) -> int | None:
        nid: int | None = self.fs_root[fs]
        for nid in self._walk(fs, path):
            if nid is None:
                return None
        return nid

    def lookup(self, parent: int, name: bytes) -> VNode | None:
        """A name as the view shows it (through mount points)."""
        node = self.nodes.get(parent)
        if node is None or node.children is None:
            return None
        nid = node.children.get(name)
        return self.nodes.get(self.visible(nid)) if nid is not None else None

    def _child(self, parent: int, name: bytes) -> VNode | None:
        """A name in its own file system (mount points not crossed): what mutations change."""
        nid = self.nodes[parent].children.get(name)
        return self.nodes.get(nid) if nid is not None else None

    def _parent_of(self, fs: str, path: bytes) -> tuple[int, bytes]:
        head, _, name = path.rstrip(b"/").rpartition(b"/")
        if bad_name_reason(name):
            raise ViewError(f"{fs}:{path!r}: not a name a directory can hold")
        parent = self.resolve(fs, head)
        if parent is None or self.nodes[parent].children is None:
            raise ViewError(f"{fs}:{path!r}: parent directory not in the view")
        return parent, name

    def entry_of(self, fs: str, path: bytes) -> tuple[int, bytes] | None:
        """(parent node id as the kernel knows it, name) of `fs`'s `path`; None if it cannot be in the view."""
        try:
            parent, name = self._parent_of(fs, path)
        except ViewError:
            return None
        return self.visible(parent), name

    def node_at(self, fs: str, path: bytes) -> int | None:
        """The node id the kernel knows for `fs`'s `path` (a mount point: what is mounted there), or None."""
        nid = self.resolve(fs, path)
        return self.visible(nid) if nid is not None and nid in self.nodes else None

    # -- building

    def load(self, fs: str, entries: Iterable) -> int:
        """Take a snapshot (EngineView.snapshot: parents first); returns the number of names. An entry whose path
        has a bad component, or whose parent is not in the view, is left out and logged, never fatal."""
        count = skipped = 0
        self.changes += 1
        for e in entries:
            if e.path == b"/":
                self.blksize[fs] = getattr(e, "blksize", 0) or 4096
                nid = self.fs_root[fs]
                self.nodes[nid] = self._node(fs, nid, e.ino, e.type, e.mode, e)
                self.nodes[nid].children = {}
                continue
            try:
                parent, name = self._parent_of(fs, e.path)
            except ViewError as exc:
                skipped += 1
                if skipped <= MAX_SKIP_LOGS:
                    log.warning("left out of the view: inode %d: %s", e.ino, exc)
                continue
            nid = self.nid(fs, e.ino)
            node = self.nodes.get(nid)
            if node is None:
                node = self.nodes[nid] = self._node(fs, nid, e.ino, e.type, e.mode, e)
            self._link(parent, name, node)
            count += 1
        if skipped:
            log.warning("%s: %d names of the snapshot left out of the view", fs, skipped)
        return count

    def _node(self, fs: str, nid: int, ino: int, type_: str, mode: int, e) -> VNode:
        self._generation += 1
        node = VNode(nid, fs, ino, type_, mode, e.uid, e.gid, e.size, e.mtime_ns, e.ctime_ns, e.links, e.rdev,
                     e.target, dict(e.xattrs or {}), generation=self._generation, atime_ns=e.atime_ns, blocks=e.blocks,
                     flags=e.flags)
        if type_ == "dir":
            node.children = {}
        return node

    def _link(self, parent: int, name: bytes, node: VNode) -> None:
        self.nodes[parent].children[name] = node.nid
        node.names.append((parent, name))

    def _unlink(self, parent: int, name: bytes) -> VNode | None:
        nid = self.nodes[parent].children.pop(name, None)
        node = self.nodes.get(nid) if nid is not None else None
        if node is not None:
            if (parent, name) in node.names:
                node.names.remove((parent, name))
            if not node.names:
                node.links = 0
                self._maybe_drop(node.nid)
        return node

    def _maybe_drop(self, nid: int) -> None:
        node = self.nodes.get(nid)
        if node is not None and not node.names and nid != ROOT_ID and nid not in self.fs_root.values() \
                and not self.lookups.get(nid):
            del self.nodes[nid]

    # -- the kernel's references

    def remember(self, nid: int) -> None:
        self.lookups[nid] = self.lookups.get(nid, 0) + 1

    def forget(self, nid: int, n: int) -> None:
        left = self.lookups.get(nid, 0) - n
        if left > 0:
            self.lookups[nid] = left
        else:
            self.lookups.pop(nid, None)
            self._maybe_drop(nid)

    # -- mutations

    def apply(self, m: Mutation) -> Applied:
        """Apply one mutation; raises ViewError when it does not fit (the caller resyncs or logs)."""
        out = Applied()
        self.changes += 1
        if m.is_error or m.fs not in self.fs_root:
            return out
        path = path_bytes(m.path)
        kind = m.kind
        if kind in ("create", "mkdir", "symlink", "mknod"):
            parent, name = self._parent_of(m.fs, path)
            if name in self.nodes[parent].children:
                self._unlink(parent, name)
            nid = self.nid(m.fs, m.ino)
            old = self.nodes.get(nid)
            type_ = m.type if m.type in IFMT else {"mkdir": "dir", "symlink": "symlink"}.get(kind, "file")
            self._generation += 1
            node = VNode(nid, m.fs, m.ino, type_, IFMT.get(type_, stat.S_IFREG), generation=self._generation,
                         links=1 if type_ != "dir" else 2)
            if type_ == "dir":
                node.children = {}
                self.nodes[parent].links += 1
            if old is not None:   # the guest reused an inode number the kernel still holds: a new generation
                node.opened = old.opened  # the kernel's inode of that number, and its pages, may be the old one's
                for p, n in list(old.names):
                    self.nodes[p].children.pop(n, None)
            self.nodes[nid] = node
            self._link(parent, name, node)
            self._take(node, m)
            out.entries.append((parent, name))
            out.nodes += [nid, parent]
        elif kind == "link":
            parent, name = self._parent_of(m.fs, path)
            nid = self.nid(m.fs, m.ino)
            node = self.nodes.get(nid)
            if node is None and m.target is not None:
                src = self.resolve(m.fs, path_bytes(m.target))
                node = self.nodes.get(src) if src is not None else None
            if node is None:
                raise ViewError(f"{m.fs}:{m.path}: link to an inode not in the view")
            if name in self.nodes[parent].children:
                self._unlink(parent, name)
            self._link(parent, name, node)
            self._take(node, m)
            out.entries.append((parent, name))
            out.nodes += [node.nid, parent]
        elif kind in ("delete", "rmdir"):
            parent, name = self._parent_of(m.fs, path)
            node = self._child(parent, name)
            if node is None:
                raise ViewError(f"{m.fs}:{m.path}: {kind} of a name not in the view")
            if node.children:
                raise ViewError(f"{m.fs}:{m.path}: rmdir of a directory that is not empty in the view")
            self._unlink(parent, name)
            if node.type == "dir":
                self.nodes[parent].links = max(self.nodes[parent].links - 1, 2)
            if node.names:
                self._take(node, m)
            out.entries.append((parent, name))
            out.nodes += [node.nid, parent]
        elif kind == "rename":
            if m.old_path is None:
                raise ViewError(f"{m.fs}:{m.path}: rename without old_path")
            op, on = self._parent_of(m.fs, path_bytes(m.old_path))
            np_, nn = self._parent_of(m.fs, path)
            node = self._child(op, on)
            if node is None:
                raise ViewError(f"{m.fs}:{m.old_path}: rename of a name not in the view")
            if np_ == node.nid or self._is_ancestor(node.nid, np_):
                raise ViewError(f"{m.fs}:{m.path}: rename of a directory into itself")
            if (op, on) == (np_, nn):
                return out  # nothing moved (and no directory changed with it)
            replaced = self._child(np_, nn)
            if replaced is not None:
                if replaced.children:
                    raise ViewError(f"{m.fs}:{m.path}: rename over a directory that is not empty in the view")
                self._unlink(np_, nn)
                out.nodes.append(replaced.nid)
            self.nodes[op].children.pop(on, None)
            node.names.remove((op, on))
            self._link(np_, nn, node)
            if node.type == "dir" and op != np_:
                self.nodes[op].links = max(self.nodes[op].links - 1, 2)
                self.nodes[np_].links += 1
            self._take(node, m)
            out.entries += [(op, on), (np_, nn)]
            out.nodes += [node.nid, op, np_]
        elif kind in ("modify", "truncate", "attrib", "xattr"):
            nid = self.resolve(m.fs, path)
            node = self.nodes.get(nid) if nid is not None else None
            if node is None:
                raise ViewError(f"{m.fs}:{m.path}: {kind} of a name not in the view")
            self._take(node, m)
            out.nodes.append(node.nid)
        for attrs in (m.parent, m.old_parent):
            if attrs and (nid := self._take_dir(m.fs, attrs)) is not None:
                out.nodes.append(nid)
        return out

    def _take_dir(self, fs: str, attrs: dict[str, int]) -> int | None:
        """An entry event's directory as it is at the event's consistency point (Mutation.parent): its size,
        blocks, link count and times, which no event of their own carries. Its node id, if it is in the view."""
        nid = self.nid(fs, attrs["ino"])
        node = self.nodes.get(nid)
        if node is None or node.children is None:
            return None
        for name in ("size", "blocks", "links", "mtime_ns", "ctime_ns", "atime_ns"):
            if (value := attrs.get(name)) is not None:
                setattr(node, name, value)
        return nid

    def _is_ancestor(self, anc: int, nid: int) -> bool:
        for _ in range(MAX_DEPTH):
            node = self.nodes.get(nid)
            if node is None or not node.names:
                return False
            nid = node.names[0][0]
            if nid == anc:
                return True
        return False

    def _take(self, node: VNode, m: Mutation) -> None:
        """Attributes after the change, as the event carries them."""
        if m.mode is not None:
            node.mode = stat.S_IFMT(node.mode) | stat.S_IMODE(m.mode)
        for name in ("size", "uid", "gid", "mtime_ns", "ctime_ns", "atime_ns", "blocks", "rdev"):
            value = getattr(m, name)
            if value is not None:
                setattr(node, name, value)
        if m.links is not None:
            node.links = m.links
        if m.flags is not None:  # the chattr flags; the ones the file system sets itself stay as they were
            node.flags = (node.flags & ~CHATTR_MASK) | flag_bits(m.flags)
        elif m.kind in ("create", "mkdir", "symlink", "mknod"):
            node.flags &= ~CHATTR_MASK  # an event names every chattr flag set, when any is
        if m.target is not None and m.kind == "symlink":
            node.target = path_bytes(m.target)
        if m.xattr:
            for key, value in m.xattr.items():
                if value is None:
                    node.xattrs.pop(key, None)
                else:
                    node.xattrs[key] = bytes.fromhex(value)
        node.seq, node.mut_time = m.seq, m.time

    def set_attrs(self, nid: int, e) -> bool:
        """Take attributes from the engine directly (a directory record that reached the disk after its entries'
        events, which carried it as it was then; a file's atime moves with a read); True if anything changed. A
        file's size is never taken here: it moves with its events only."""
        node = self.nodes.get(nid)
        if node is None:
            return False
        if node.children is None:  # anything else moves with its events; only these may change without one
            if (node.atime_ns, node.blocks, node.flags) == (e.atime_ns, e.blocks, e.flags):
                return False
            node.atime_ns, node.blocks, node.flags = e.atime_ns, e.blocks, e.flags
            self.changes += 1
            return True
        new = (e.mode, e.uid, e.gid, e.mtime_ns, e.ctime_ns, e.atime_ns, e.links, e.size, e.blocks, e.flags)
        if (node.mode, node.uid, node.gid, node.mtime_ns, node.ctime_ns, node.atime_ns, node.links, node.size,
                node.blocks, node.flags) == new:
            return False
        (node.mode, node.uid, node.gid, node.mtime_ns, node.ctime_ns, node.atime_ns, node.links, node.size,
         node.blocks, node.flags) = new
        self.changes += 1
        return True


def dir_name(fs: str) -> bytes:
    """A file system's directory name: its engine name, made safe as one path component."""
    name = fs.replace("/", "_").encode("utf-8", "surrogateescape")
    return b"_" + name if name in (b"", b".", b"..") else name
