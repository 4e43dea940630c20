"""The least a pyfuse3 (trio) file system can do to serve one file: `/big`, an `os.pread` of a host file per read
request, with the view's FUSE options and readahead (mirrorfs.mount). The live benchmark reads it next to the
view and the loop mount, as the ceiling of any view written on pyfuse3: what is left between it and the loop
mount is pyfuse3's loop and the kernel's copy of each reply, which only splice or FUSE passthrough avoid.

Usage: python -m tests.bench.minfuse HOSTFILE MNT (until SIGTERM or unmount).
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import sys

import pyfuse3
import trio

from mirrorfs.view.mount import readahead_after_init
from mirrorfs.view.ops import mount_options

BIG_INO = 2


class MinOps(pyfuse3.Operations):
    def __init__(self, path: str) -> None:
        super().__init__()
        self.fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self.fd).st_size

    def _attrs(self, ino: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino, a.entry_timeout, a.attr_timeout = ino, 1.0, 1.0  # as the view's
        if ino == pyfuse3.ROOT_INODE:
            a.st_mode, a.st_nlink = stat.S_IFDIR | 0o755, 2
        else:
            a.st_mode, a.st_nlink, a.st_size = stat.S_IFREG | 0o444, 1, self.size
        return a

    async def getattr(self, inode, ctx):
        return self._attrs(inode)

    async def lookup(self, parent_inode, name, ctx):
        if parent_inode == pyfuse3.ROOT_INODE and name == b"big":
            return self._attrs(BIG_INO)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def open(self, inode, flags, ctx):
        return pyfuse3.FileInfo(fh=inode)  # keep_cache, as the view's

    async def read(self, fh, off, size):
        return os.pread(self.fd, size, off)


def main(argv: list[str]) -> None:
    path, mnt = argv
    target = os.path.realpath(mnt)  # now: once mounted, resolving the path asks this loop, not running yet
    pyfuse3.init(MinOps(path), mnt, mount_options("minfuse", False) | {"ro"})

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, readahead_after_init, target)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async def on_signal() -> None:
                    async for _ in signals:
                        pyfuse3.terminate()
                        return
                nursery.start_soon(on_signal)
                await pyfuse3.main()
                nursery.cancel_scope.cancel()

    try:
        trio.run(serve)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main(sys.argv[1:])
