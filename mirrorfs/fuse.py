"""The read-only FUSE view (pyfuse3 + trio) over a ViewTree, content from the engine's replica.

Read-only for everyone, root included: every modifying request fails with EROFS unless it comes from the
poke helper's thread (`ctx.pid` is the caller's thread id). The helper's requests are how the view changes:
the helper stages a Mutation and issues the matching syscall on the mount; the handler applies the staged
mutation to the tree and answers with the real attributes, so the kernel raises the inotify events itself
(FINDINGS "FUSE": invalidation alone raises none). Handlers never make a syscall on the mount and never
wait on the engine in the trio thread (content and statfs go through trio.to_thread).
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

import pyfuse3
import trio

from inference.events import Mutation
from mirrorfs.viewtree import ROOT_ID, ViewError, ViewTree, VNode

log = logging.getLogger("mirrorfs.fuse")

TIMEOUT = 1.0            # entry/attribute cache; every change is followed by a reply or an invalidation
XATTR_PREFIX = "user.mirrorfs."
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT

# which requests of the helper apply which kind of staged mutation (the first one that arrives applies it;
# the others, such as the open before an ftruncate, only answer)
APPLIES = {"create": "create", "mkdir": "mkdir", "symlink": "symlink", "mknod": "mknod", "link": "link",
           "delete": "unlink", "rmdir": "rmdir", "rename": "rename", "modify": "setattr", "truncate": "setattr",
           "attrib": "setattr", "xattr": "xattr"}


@dataclass
class Staged:
    mutation: Mutation
    applied: bool = False
    error: str | None = None


class Stage:
    """The one change in flight between the poke helper and the handlers (the helper is serial)."""

    def __init__(self) -> None:
        self.tid = -1
        self.current: Staged | None = None
        self.lock = threading.Lock()


class ViewOps(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, tree: ViewTree, stage: Stage, read: Callable[[str, int, int, int], bytes],
                 statfs: Callable[[], pyfuse3.StatvfsData]) -> None:
        super().__init__()
        self.tree, self.stage = tree, stage
        self._read, self._statfs = read, statfs
        self._dirs: dict[int, list[tuple[bytes, int]]] = {}
        self._next_fh = 1
        self.applied = 0

    # -- helpers

    def _node(self, nid: int) -> VNode:
        node = self.tree.nodes.get(nid)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def attrs(self, node: VNode) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.st_ino if node.nid == ROOT_ID else node.nid
        a.generation = node.generation
        a.entry_timeout = a.attr_timeout = TIMEOUT
        a.st_mode = node.mode
        a.st_nlink = max(node.links, 0)
        a.st_uid, a.st_gid = node.uid, node.gid
        a.st_rdev = node.rdev
        a.st_size = node.size if node.type in ("file", "dir", "symlink") else 0
        a.st_blksize = 4096
        a.st_blocks = (a.st_size + 511) // 512
        a.st_atime_ns = a.st_mtime_ns = node.mtime_ns
        a.st_ctime_ns = node.ctime_ns
        return a

    def _entry(self, node: VNode) -> pyfuse3.EntryAttributes:
        self.tree.remember(node.nid)
        return self.attrs(node)

    def _helper(self, ctx: pyfuse3.RequestContext, op: str) -> Staged | None:
        """The staged change this request applies (None: it only answers); EROFS for everyone else."""
        if ctx.pid != self.stage.tid or self.stage.tid < 0:
            raise pyfuse3.FUSEError(errno.EROFS)
        staged = self.stage.current
        if staged is None or staged.applied or APPLIES.get(staged.mutation.kind) != op:
            return None
        staged.applied = True
        try:
            self.tree.apply(staged.mutation)
            self.applied += 1
        except ViewError as exc:
            staged.error = str(exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        return staged

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
        self._dirs[fh] = [(b".", inode), (b"..", self.tree.parent(inode)), *self.tree.listing(inode)]
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
            self._helper(ctx, "open")
        if node.type != "file":
            raise pyfuse3.FUSEError(errno.EINVAL if node.type != "dir" else errno.EISDIR)
        return pyfuse3.FileInfo(fh=inode)

    async def read(self, fh, off, size):
        node = self._node(fh)
        end = min(node.size, off + size)
        if off >= end:
            return b""
        data = await trio.to_thread.run_sync(self._read, node.fs, node.ino, off, end - off)
        return data.ljust(end - off, b"\0")

    async def release(self, fh):
        pass

    async def flush(self, fh):
        pass

    async def statfs(self, ctx):
        return await trio.to_thread.run_sync(self._statfs)

    async def getxattr(self, inode, name, ctx):
        node = self._node(inode)
        key = name.decode("utf-8", "surrogateescape")
        if key.startswith(XATTR_PREFIX):
            value = self._own_xattrs(node).get(key)
        else:
            value = node.xattrs.get(key)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    async def listxattr(self, inode, ctx):
        node = self._node(inode)
        return [k.encode("utf-8", "surrogateescape") for k in [*node.xattrs, *self._own_xattrs(node)]]

    def _own_xattrs(self, node: VNode) -> dict[str, bytes]:
        return {XATTR_PREFIX + "ino": str(node.ino).encode(), XATTR_PREFIX + "seq": str(node.seq).encode(),
                XATTR_PREFIX + "mtime": f"{node.mut_time:.6f}".encode()}

    # -- changing: the poke helper only

    async def create(self, parent_inode, name, mode, flags, ctx):
        self._helper(ctx, "create")
        attrs = self._made(parent_inode, name)
        return pyfuse3.FileInfo(fh=attrs.st_ino), attrs

    async def mkdir(self, parent_inode, name, mode, ctx):
        self._helper(ctx, "mkdir")
        return self._made(parent_inode, name)

    async def symlink(self, parent_inode, name, target, ctx):
        self._helper(ctx, "symlink")
        return self._made(parent_inode, name)

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        self._helper(ctx, "mknod")
        return self._made(parent_inode, name)

    async def link(self, inode, new_parent_inode, new_name, ctx):
        self._helper(ctx, "link")
        return self._made(new_parent_inode, new_name)

    async def unlink(self, parent_inode, name, ctx):
        self._helper(ctx, "unlink")

    async def rmdir(self, parent_inode, name, ctx):
        self._helper(ctx, "rmdir")

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        if flags:
            raise pyfuse3.FUSEError(errno.EROFS if ctx.pid != self.stage.tid else errno.EINVAL)
        self._helper(ctx, "rename")

    async def setattr(self, inode, attr, fields, fh, ctx):
        self._helper(ctx, "setattr")
        return self.attrs(self._node(inode))

    async def setxattr(self, inode, name, value, ctx):
        self._helper(ctx, "xattr")

    async def removexattr(self, inode, name, ctx):
        self._helper(ctx, "xattr")

    async def write(self, fh, off, buf):
        raise pyfuse3.FUSEError(errno.EROFS)  # no one, not even the helper, writes bytes: content is the replica's

    async def fsync(self, fh, datasync):
        pass

    async def access(self, inode, mode, ctx):
        if mode & os.W_OK:
            return False
        return True


def mount_options(fsname: str, allow_other: bool) -> set[str]:
    opts = set(pyfuse3.default_options) | {f"fsname={fsname}", "subtype=mirrorfs"}
    if allow_other:
        opts.add("allow_other")
    return opts

