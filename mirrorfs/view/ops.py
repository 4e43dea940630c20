"""The read-only FUSE view (pyfuse3 + trio) over a ViewTree, content from the engine's replica.

Read-only for everyone, root included: every modifying request fails with EROFS unless it comes from the
poke helper's thread (`ctx.pid` is the caller's thread id). The helper's requests are how the view changes:
the helper stages a Mutation and issues the matching syscall on the mount; the handler applies the staged
mutation to the tree and answers with the real attributes, so the kernel raises the inotify events itself
(docs/ARCHITECTURE.md "Poke": invalidation alone raises none). Handlers never make a syscall on the mount and never
wait on the engine in the trio thread (statfs, and content reads that must wait, go through trio.to_thread; a
read with nothing to wait for is answered in place, a pread of the replica).

Even the helper may change only what is staged: a request must name the staged mutation's own parent inode and
name (both pairs for a rename; the source inode and the new pair for a link) or its own inode; anything else is
refused with EPERM and logged, so a confused or subverted helper cannot change the rest of the view. Every
attribute is clamped to what the kernel's types hold (a guest's i_size of 2^64-1 is not an off_t), and any
unexpected exception in a handler becomes EIO for that request: nothing the guest writes ends the daemon.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass

import pyfuse3
import trio

from inference.events import CHATTR_MASK, Mutation, path_bytes
from mirrorfs.view.tree import IFMT, ROOT_ID, ViewError, ViewTree, VNode

log = logging.getLogger("mirrorfs.fuse")

TIMEOUT = 1.0            # attribute cache; every change is followed by a reply or an invalidation
# How long the kernel may keep a name -> node answer. Names change only by the helper's own syscalls (the kernel
# updates its dentries itself) or by a change applied directly, which invalidates the entries it touched
# (serve._invalidate), so the cache is never wrong for longer than that. With 1 s, the modify of a file created
# more than a second before (the live benchmark: the creates at one commit, their sizes at the next, seconds later)
# cost one LOOKUP each to revalidate the name.
ENTRY_TIMEOUT = 300.0
XATTR_PREFIX = "user.mirrorfs."  # mirrorfs's own facts: readable by name (getxattr), never listed
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT

# what the kernel's types hold (off_t, nlink as FUSE sends it, uid_t, dev_t, time_t seconds as nanoseconds)
S64, U32, U64 = (1 << 63) - 1, (1 << 32) - 1, (1 << 64) - 1
LIMITS = {"st_size": (0, S64), "st_nlink": (0, U32), "st_uid": (0, U32), "st_gid": (0, U32), "st_rdev": (0, U64),
          "st_blocks": (0, S64), "st_mtime_ns": (-(1 << 63) * 10**9, S64 * 10**9),
          "st_ctime_ns": (-(1 << 63) * 10**9, S64 * 10**9), "st_atime_ns": (-(1 << 63) * 10**9, S64 * 10**9)}
TIME_MIN, TIME_MAX = LIMITS["st_mtime_ns"]
MAX_CLAMP_LOGS = 1000  # nodes named in the log; beyond that only the count grows

# which requests of the helper apply which kind of staged mutation (the first one that arrives applies it;
# the others, such as the open before an ftruncate, only answer)
APPLIES = {"create": "create", "mkdir": "mkdir", "symlink": "symlink", "mknod": "mknod", "link": "link",
           "delete": "unlink", "rmdir": "rmdir", "rename": "rename", "modify": "setattr", "truncate": "setattr",
           "attrib": "setattr", "xattr": "xattr"}
ANSWERS = {"modify": {"open"}, "truncate": {"open"}}  # requests that only answer (the open before the ftruncate)


@dataclass
class Scope:
    """What the helper's requests for one staged mutation may name, as the kernel names it (node ids)."""

    entry: tuple[int, bytes] | None = None  # (parent, name) of the mutation's path
    old: tuple[int, bytes] | None = None    # (parent, name) of a rename's old path
    inode: int | None = None                # the node changed in place, or a link's source


@dataclass
class Staged:
    mutation: Mutation
    applied: bool = False
    error: str | None = None
    scope: Scope | None = None  # taken from the tree at the first request, before anything is applied
    resized: bool = False       # applied, and it changed its file's size: the kernel drops the file's pages
    # when the helper's syscall returns, and waits for every page being read to do so (mirrorfs.view.reads)


class Stage:
    """The one change in flight between the poke helper and the handlers (the helper is serial)."""

    def __init__(self) -> None:
        self.tid = -1
        self.current: Staged | None = None
        self.lock = threading.Lock()


def _guarded(fn: Callable) -> Callable:
    """A handler whose unexpected exception fails only its own request (EIO, logged): in pyfuse3 it would end
    the FUSE loop, and with it the view."""
    @functools.wraps(fn)
    async def handler(self, *args):
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except Exception:  # noqa: BLE001 - the daemon must outlive any one request
            log.exception("%s%r failed", fn.__name__, args[:2])
            raise pyfuse3.FUSEError(errno.EIO) from None
    return handler


class ViewOps(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, tree: ViewTree, stage: Stage, read: Callable[[int, int, int], bytes],
                 statfs: Callable[[], pyfuse3.StatvfsData],
                 on_applied: Callable[[Mutation], None] | None = None,
                 try_read: Callable[[int, int, int], bytes | None] | None = None) -> None:
        """`read(node id, offset, size)` runs in a worker thread: the bytes, fewer only at the node's end, or
        OSError (mirrorfs.view.reads.PointReads.read). `try_read`, in the trio thread, answers at once or None
        (PointReads.try_read). `on_applied` hears of every mutation the tree has taken."""
        super().__init__()
        self.tree, self.stage = tree, stage
        self._read, self._statfs, self._try_read = read, statfs, try_read
        self.on_applied = on_applied
        self._dirs: dict[int, list[tuple[bytes, int]]] = {}
        self._listings: dict[int, list[tuple[bytes, int]]] = {}  # per directory, as of tree.changes == _attrs_at
        self._next_fh = 1
        self.applied = 0
        self.refused = 0                  # helper requests outside the staged mutation's scope
        self.clamped: set[int] = set()    # nodes whose attributes did not fit (logged once each)
        self.clamps = 0
        self._attrs: dict[int, tuple[VNode, pyfuse3.EntryAttributes]] = {}  # as of tree.changes == _attrs_at
        self._attrs_at = -1

    # -- helpers

    def _node(self, nid: int) -> VNode:
        node = self.tree.nodes.get(nid)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def attrs(self, node: VNode) -> pyfuse3.EntryAttributes:
        """The node's attributes as the kernel can hold them: a guest's number that does not fit (an i_size of
        2^64-1, a time past year 2^63 s) is clamped and logged, never an OverflowError. Kept until the tree
        next changes (ViewTree.changes): a listing of an unchanged tree (`find -ls`, `ls -l` again: readdirplus
        sends every entry's attributes) builds none. Callers must not change what they get."""
        self._fresh()
        cached = self._attrs.get(node.nid)
        if cached is not None and cached[0] is node:
            return cached[1]
        a = self._attrs_of(node)
        self._attrs[node.nid] = (node, a)
        return a

    def _fresh(self) -> None:
        """Forget the cached attributes and listings once the tree has changed since they were made."""
        if self._attrs_at != self.tree.changes:
            self._attrs.clear()
            self._listings.clear()
            self._attrs_at = self.tree.changes

    def _attrs_of(self, node: VNode) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.st_ino if node.nid == ROOT_ID else node.nid
        a.generation = node.generation & U64
        a.entry_timeout, a.attr_timeout = ENTRY_TIMEOUT, TIMEOUT
        fmt = IFMT.get(node.type, stat.S_IFMT(node.mode))  # the type is the node's, whatever the mode bits say
        a.st_mode = (fmt if fmt in IFMT.values() else stat.S_IFREG) | stat.S_IMODE(node.mode)
        size = node.size if node.type in ("file", "dir", "symlink") else 0
        links, uid, gid, rdev, blocks = node.links, node.uid, node.gid, node.rdev, node.blocks
        mtime, ctime, atime = node.mtime_ns, node.ctime_ns, node.atime_ns
        if (type(size) is int and type(links) is int and type(uid) is int and type(gid) is int  # noqa: E721
                and type(rdev) is int and type(mtime) is int and type(ctime) is int  # noqa: E721
                and type(atime) is int and type(blocks) is int  # noqa: E721
                and 0 <= size <= S64 and 0 <= links <= U32 and 0 <= uid <= U32 and 0 <= gid <= U32
                and 0 <= rdev <= U64 and 0 <= blocks <= S64 and TIME_MIN <= mtime <= TIME_MAX
                and TIME_MIN <= ctime <= TIME_MAX and TIME_MIN <= atime <= TIME_MAX):
            # the common case, once per entry of a `find -ls` or `ls -l`: every value fits, nothing to clamp
            a.st_size, a.st_nlink, a.st_uid, a.st_gid, a.st_rdev = size, links, uid, gid, rdev
            a.st_mtime_ns, a.st_ctime_ns, a.st_atime_ns, a.st_blocks = mtime, ctime, atime, blocks
        else:
            values = {"st_size": size, "st_nlink": links, "st_uid": uid, "st_gid": gid, "st_rdev": rdev,
                      "st_blocks": blocks, "st_mtime_ns": mtime, "st_ctime_ns": ctime, "st_atime_ns": atime}
            for field, value in values.items():
                lo, hi = LIMITS[field]
                if not isinstance(value, int) or not lo <= value <= hi:
                    value = self._clamp(node, field, value, lo, hi)
                setattr(a, field, value)
        a.st_blksize = self.tree.blksize.get(node.fs, 4096)
        return a

    def _clamp(self, node: VNode, field: str, value: object, lo: int, hi: int) -> int:
        clamped = min(max(value, lo), hi) if isinstance(value, int) else lo
        if node.nid not in self.clamped and len(self.clamped) < MAX_CLAMP_LOGS:
            log.warning("%s:%d: %s %r does not fit the kernel's type; shown as %d", node.fs, node.ino, field,
                        value, clamped)
            self.clamped.add(node.nid)
        self.clamps += 1
        return clamped

    def _entry(self, node: VNode) -> pyfuse3.EntryAttributes:
        self.tree.remember(node.nid)
        return self.attrs(node)

    def _scope(self, m: Mutation) -> Scope:
        """Which parent+name pairs and which inode the staged mutation's syscall may name."""
        scope = Scope()
        if m.fs not in self.tree.fs_root:
            return scope
        path = path_bytes(m.path)
        if m.kind in ("modify", "truncate", "attrib", "xattr"):
            scope.inode = self.tree.node_at(m.fs, path)
            return scope
        scope.entry = self.tree.entry_of(m.fs, path)
        if m.kind == "rename" and m.old_path is not None:
            scope.old = self.tree.entry_of(m.fs, path_bytes(m.old_path))
        elif m.kind == "link" and m.target is not None:
            scope.inode = self.tree.node_at(m.fs, path_bytes(m.target))
        return scope

    def _helper(self, ctx: pyfuse3.RequestContext, op: str, *, entry: tuple[int, bytes] | None = None,
                old: tuple[int, bytes] | None = None, inode: int | None = None) -> Staged | None:
        """The staged change this request applies (None: it only answers); EROFS for everyone else, EPERM for
        a helper request that names anything but the staged mutation's own entries or inode."""
        if ctx.pid != self.stage.tid or self.stage.tid < 0:
            raise pyfuse3.FUSEError(errno.EROFS)
        staged = self.stage.current
        if staged is None:
            self._refuse(op, entry, old, inode, None, "nothing is staged")
        if staged.scope is None:
            staged.scope = self._scope(staged.mutation)
        scope = staged.scope
        for asked, allowed, what in ((entry, scope.entry, "entry"), (old, scope.old, "old entry"),
                                     (inode, scope.inode, "inode")):
            if asked is not None and asked != allowed:
                self._refuse(op, entry, old, inode, staged, f"{what} {asked!r} is not the staged one {allowed!r}")
        kind = staged.mutation.kind
        if op != APPLIES.get(kind) and op not in ANSWERS.get(kind, ()):
            self._refuse(op, entry, old, inode, staged, f"not a request {kind} makes")
        if staged.applied or op != APPLIES.get(kind):
            return None
        staged.applied = True
        changed = self.tree.nodes.get(scope.inode) if scope.inode is not None else None
        size = changed.size if changed is not None else None
        try:
            self.tree.apply(staged.mutation)
            self.applied += 1
        except ViewError as exc:
            staged.error = str(exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            staged.resized = changed is not None and changed.size != size
            if self.on_applied is not None:
                self.on_applied(staged.mutation)  # before the reply: a read waiting for it must not hold the
                # kernel's truncate of the page cache that follows this request (it waits on the read's pages)
        return staged

    def _refuse(self, op: str, entry: object, old: object, inode: object, staged: Staged | None, why: str):
        self.refused += 1
        m = staged.mutation if staged is not None else None
        log.warning("refused the helper's %s (entry %r, old %r, inode %r) for %s: %s", op, entry, old, inode,
                    f"{m.kind} {m.fs}:{m.path!r}" if m is not None else "nothing", why)
        if staged is not None:
            staged.error = f"refused {op}: {why}"
        raise pyfuse3.FUSEError(errno.EPERM)

    def _made(self, parent: int, name: bytes) -> pyfuse3.EntryAttributes:
        node = self.tree.lookup(parent, name)
        if node is None:
            raise pyfuse3.FUSEError(errno.EIO)
        return self._entry(node)

    # -- reading

    async def lookup(self, parent_inode, name, ctx):
        node = self.tree.lookup(parent_inode, name)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._entry(node)

    def forget(self, inode_list):
        for nid, n in inode_list:
            self.tree.forget(nid, n)

    async def getattr(self, inode, ctx):
        return self.attrs(self._node(inode))

    async def readlink(self, inode, ctx):
        node = self._node(inode)
        if node.target is None:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return node.target

    async def opendir(self, inode, ctx):
        node = self._node(inode)
        if node.children is None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        fh = self._next_fh
        self._next_fh += 1
        # a stable listing for this open, as getdents expects; `.` and `..` first, as a local file system lists them
        # (one list per directory and tree version, shared by its opens: never changed, only replaced)
        self._fresh()
        listing = self._listings.get(inode)
        if listing is None:
            listing = [(b".", inode), (b"..", self.tree.parent(inode)), *self.tree.listing(inode)]
            self._listings[inode] = listing
        self._dirs[fh] = listing
        return fh

    async def readdir(self, fh, start_id, token):
        entries = self._dirs.get(fh, [])
        for i in range(start_id, len(entries)):
            name, nid = entries[i]
            node = self.tree.nodes.get(nid)
            if node is None:
                continue
            if not pyfuse3.readdir_reply(token, name, self.attrs(node), i + 1):
                return
            if i >= 2:  # readdirplus: the kernel now holds a reference (it takes none for `.` and `..`)
                self.tree.remember(nid)

    async def releasedir(self, fh):
        self._dirs.pop(fh, None)

    async def open(self, inode, flags, ctx):
        node = self._node(inode)
        if flags & WRITE_FLAGS:
            self._helper(ctx, "open", inode=inode)
        else:
            node.opened = True  # pages of it may be cached from now on: its changes drop them (serve.py)
        if node.type != "file":
            raise pyfuse3.FUSEError(errno.EINVAL if node.type != "dir" else errno.EISDIR)
        return pyfuse3.FileInfo(fh=inode)

    async def read(self, fh, off, size):
        """Bytes of the view's own point (mirrorfs.view.reads), up to the node's size; EIO where they cannot be had,
        never padding: a reader must never take made-up bytes for the guest's."""
        if off >= self._node(fh).size:
            return b""  # at the end as the view shows it (tail -f asks once a second): no thread, no lock
        if self._try_read is not None:
            data = self._try_read(fh, off, size)  # nothing to wait for: here, without a thread round trip
            if data is not None:
                return data
        try:
            return await trio.to_thread.run_sync(self._read, fh, off, size)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None

    async def release(self, fh):
        pass

    # no flush: pyfuse3's default answers ENOSYS, after which the kernel sends no FLUSH at all (fc->no_flush). Every
    # close(2) on the view made one, a round trip of the trio thread answering nothing: one in five of the poke
    # helper's requests (a create's close, a modify's close). Nothing is ever written, so there is nothing to flush.

    async def statfs(self, ctx):
        return await trio.to_thread.run_sync(self._statfs)

    async def getxattr(self, inode, name, ctx):
        node = self._node(inode)
        key = name.decode("utf-8", "surrogateescape")
        value = node.xattrs.get(key)
        if value is None and key.startswith(XATTR_PREFIX):
            value = self._own_xattrs(node).get(key)  # the guest's own xattr of that name comes first
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    async def listxattr(self, inode, ctx):
        """Exactly the guest's names: AIDE, getfattr -d, rsync -X and tar --xattrs copy whatever is listed."""
        node = self._node(inode)
        return [k.encode("utf-8", "surrogateescape") for k in node.xattrs]

    def _own_xattrs(self, node: VNode) -> dict[str, bytes]:
        """What `mirrorfs stat` reads by name; the flags are chattr's (events name no others). A guest's own xattr
        of the same name is what getxattr gives."""
        return {XATTR_PREFIX + "ino": str(node.ino).encode(), XATTR_PREFIX + "seq": str(node.seq).encode(),
                XATTR_PREFIX + "mtime": f"{node.mut_time:.6f}".encode(),
                XATTR_PREFIX + "flags": f"{node.flags & CHATTR_MASK:#x}".encode(),
                XATTR_PREFIX + "blocks": str(node.blocks).encode(), XATTR_PREFIX + "fs": node.fs.encode()}

    # -- changing: the poke helper only

    async def create(self, parent_inode, name, mode, flags, ctx):
        self._helper(ctx, "create", entry=(parent_inode, name))
        attrs = self._made(parent_inode, name)
        return pyfuse3.FileInfo(fh=attrs.st_ino), attrs

    async def mkdir(self, parent_inode, name, mode, ctx):
        self._helper(ctx, "mkdir", entry=(parent_inode, name))
        return self._made(parent_inode, name)

    async def symlink(self, parent_inode, name, target, ctx):
        self._helper(ctx, "symlink", entry=(parent_inode, name))
        return self._made(parent_inode, name)

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        self._helper(ctx, "mknod", entry=(parent_inode, name))
        return self._made(parent_inode, name)

    async def link(self, inode, new_parent_inode, new_name, ctx):
        self._helper(ctx, "link", entry=(new_parent_inode, new_name), inode=inode)
        return self._made(new_parent_inode, new_name)

    async def unlink(self, parent_inode, name, ctx):
        self._helper(ctx, "unlink", entry=(parent_inode, name))

    async def rmdir(self, parent_inode, name, ctx):
        self._helper(ctx, "rmdir", entry=(parent_inode, name))

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        if flags:
            raise pyfuse3.FUSEError(errno.EROFS if ctx.pid != self.stage.tid else errno.EINVAL)
        self._helper(ctx, "rename", entry=(parent_inode_new, name_new), old=(parent_inode_old, name_old))

    async def setattr(self, inode, attr, fields, fh, ctx):
        self._helper(ctx, "setattr", inode=inode)
        return self.attrs(self._node(inode))

    async def setxattr(self, inode, name, value, ctx):
        self._helper(ctx, "xattr", inode=inode)

    async def removexattr(self, inode, name, ctx):
        self._helper(ctx, "xattr", inode=inode)

    async def write(self, fh, off, buf):
        raise pyfuse3.FUSEError(errno.EROFS)  # no one, not even the helper, writes bytes: content is the replica's

    async def fsync(self, fh, datasync):
        pass

    async def access(self, inode, mode, ctx):
        if mode & os.W_OK:
            return False
        return True


_HANDLERS = ("lookup", "getattr", "readlink", "opendir", "readdir", "releasedir", "open", "read", "release",
             "statfs", "getxattr", "listxattr", "create", "mkdir", "symlink", "mknod", "link", "unlink",
             "rmdir", "rename", "setattr", "setxattr", "removexattr", "write", "fsync", "access")
for _name in _HANDLERS:
    setattr(ViewOps, _name, _guarded(getattr(ViewOps, _name)))


def mount_options(fsname: str, allow_other: bool) -> set[str]:
    """nosuid,nodev always: the view holds the guest's set-uid files and device nodes, which must mean nothing
    on the host (libfuse sets them by default for root too; said here so no option can drop them)."""
    opts = set(pyfuse3.default_options) | {f"fsname={fsname}", "subtype=mirrorfs", "nosuid", "nodev"}
    if allow_other:
        opts.add("allow_other")
    return opts - {"suid", "dev"}

