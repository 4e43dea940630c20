"""Who may read the view: root only by default; with `--group`, root and that group's members (issue 9)."""

from __future__ import annotations

import errno
from collections.abc import Callable

import pyfuse3

from mirrorfs.view.ops import ViewOps


def in_group(ctx: pyfuse3.RequestContext, gid: int) -> bool:
    """Is the requesting process root or a member of `gid` (its primary group, or a supplementary one)?
    ctx.pid is the calling thread's id, which /proc/<tid>/status answers for too. Unknown: no."""
    if ctx.uid == 0 or ctx.gid == gid:
        return True
    if ctx.pid <= 0:
        return False
    try:
        with open(f"/proc/{ctx.pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Groups:"):
                    return str(gid).encode() in line.split()[1:]
    except OSError:
        pass
    return False


# every request that carries the caller's context; the others (read, readdir, release...) need a handle that
# one of these gave out
GROUP_CHECKED = ("lookup", "getattr", "readlink", "opendir", "open", "statfs", "getxattr", "listxattr", "access",
                 "create", "mkdir", "symlink", "mknod", "link", "unlink", "rmdir", "rename", "setattr", "setxattr",
                 "removexattr")


def group_ops(gid: int) -> type[ViewOps]:
    """ViewOps for `--group`: the view is mounted allow_other, and every request from a process that is
    neither root nor in the group fails with EACCES. Attributes and entries are not cached by the kernel
    (timeouts 0), so that a member's lookup never lets a non-member's stat through from the cache; file
    data is read only through an open, which is checked."""

    def guard(method: Callable) -> Callable:
        async def checked(self, *args):
            if not in_group(args[-1], gid):
                raise pyfuse3.FUSEError(errno.EACCES)
            return await method(self, *args)
        checked.__name__ = method.__name__
        return checked

    class GroupViewOps(ViewOps):
        def attrs(self, node):
            a = super().attrs(node)
            a.entry_timeout = a.attr_timeout = 0
            return a

    for name in GROUP_CHECKED:
        setattr(GroupViewOps, name, guard(getattr(ViewOps, name)))
    return GroupViewOps
