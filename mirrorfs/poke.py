"""The poke helper: a thread that replays each Mutation as the matching syscall on the mount.

Why: the kernel raises inotify events only for operations it performs itself; no FUSE notification does
(FINDINGS "FUSE"). So for every mutation the helper stages it (fuse.Stage) and makes the syscall a guest
process would have made; the FUSE handler sees the request from this thread, applies the staged change to
the view tree and answers with the real attributes. Never the trio thread (a syscall on the mount from there
hangs the daemon). The engine only appends to an unbounded queue, so a wedged mount or reader can stall this
thread but never the engine. Paths are walked component by component with O_NOFOLLOW, so a guest symlink
is never followed on the host. When a syscall fails (the view and the stream disagree, an xattr namespace
the kernel will not pass on), the change is applied directly and the kernel's caches are invalidated.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

from inference.events import Mutation, path_bytes
from mirrorfs.fuse import Stage, Staged
from mirrorfs.viewtree import IFMT, Applied

log = logging.getLogger("mirrorfs.poke")

# After a new directory appears, recursive watchers (inotifywait -r, watchdog) need a moment to add a watch on
# it before its content appears, or they miss those events (20 ms was seen to be too short while a TCG guest
# loads both cores). The guest was slower than our replay of a burst; we pause only when the next queued
# mutation is inside the new directory.
MKDIR_PAUSE = 0.1

Invalidate = Callable[[Applied, "Mutation | None"], None]  # (what changed, the content-changing mutation)


class Poker:
    def __init__(self, mountpoint: str | bytes, stage: Stage, prefix: Callable[[str], bytes | None],
                 apply_direct: Callable[[Mutation], Applied], invalidate: Invalidate,
                 on_idle: Callable[[], None] | None = None, hidden: Callable[[Mutation], bool] | None = None) -> None:
        self.mnt = os.fsencode(mountpoint)
        self.stage, self.prefix = stage, prefix
        self.apply_direct, self.invalidate, self.on_idle = apply_direct, invalidate, on_idle
        self.hidden = hidden or (lambda m: False)  # not visible in the view (covered by a mount, not shown)
        self.unseen = 0
        self.queue: deque[Mutation] = deque()
        self.cond = threading.Condition()
        self.stopping = False
        self.done = 0
        self.fallbacks = 0
        self.thread = threading.Thread(target=self._run, name="mirrorfs-poke", daemon=True)

    # -- the engine's side: never blocks

    def submit(self, events: Iterable[Mutation]) -> None:
        events = [e for e in events if e.kind != "error"]
        if events:
            with self.cond:
                self.queue.extend(events)
                self.cond.notify()

    def pending(self) -> int:
        return len(self.queue)

    def start(self) -> None:
        self.thread.start()

    def stop(self, drain_timeout: float = 30) -> None:
        """Let the queue drain (bounded), then end the thread."""
        deadline = time.monotonic() + drain_timeout
        while self.queue and time.monotonic() < deadline and self.thread.is_alive():
            time.sleep(0.02)
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join(max(deadline - time.monotonic(), 1))

    # -- the helper thread

    def _run(self) -> None:
        self.stage.tid = threading.get_native_id()
        idle_since = None
        while True:
            with self.cond:
                if not self.queue and not self.stopping:
                    self.cond.wait(0.2)
                if self.stopping and not self.queue:
                    return
                m = self.queue.popleft() if self.queue else None
            if m is None:
                if self.on_idle is not None and (idle_since is None or time.monotonic() - idle_since > 0.5):
                    idle_since = time.monotonic()
                    try:
                        self.on_idle()
                    except Exception:  # noqa: BLE001 - the helper must outlive any one failure
                        log.exception("idle reconcile failed")
                continue
            try:
                self.poke(m)
            except Exception:  # noqa: BLE001
                log.exception("poke of %s %s failed", m.kind, m.path)
            self.done += 1
            if m.kind == "mkdir" and MKDIR_PAUSE and self._next_inside(m):
                time.sleep(MKDIR_PAUSE)

    def _next_inside(self, m: Mutation) -> bool:
        try:
            nxt = self.queue[0]
        except IndexError:
            return True  # nothing queued yet: it may well be the new directory's content
        return nxt.fs == m.fs and nxt.path.startswith(m.path.rstrip("/") + "/")

    def poke(self, m: Mutation) -> None:
        if self.hidden(m):  # no one can see it, so no event: a change under a directory something is mounted on
            self.unseen += 1
            self.invalidate(self.apply_direct(m), None)
            return
        staged = Staged(m)
        self.stage.current = staged
        try:
            self._syscall(m)
            error = None
        except OSError as exc:
            error = exc
        finally:
            self.stage.current = None
        if staged.error:
            log.warning("view disagrees with %s %s: %s", m.kind, m.path, staged.error)
        if error is not None or not staged.applied:
            self.fallbacks += 1
            log.info("poke %s %s: %s; applying directly", m.kind, m.path, error or "no request reached the view")
            if not staged.applied:
                self.invalidate(self.apply_direct(m), m if m.kind in ("modify", "truncate") else None)
            return
        if m.kind in ("modify", "truncate"):
            self.invalidate(Applied(), m)  # the ftruncate kept the cached pages that changed in place

    # -- syscalls

    def _dir(self, fs: str, path: bytes) -> tuple[int, bytes]:
        """An O_PATH fd of `path`'s parent, walked with O_NOFOLLOW, and the last name."""
        head, _, name = path.rstrip(b"/").rpartition(b"/")
        parts = [p for p in ((self.prefix(fs) or b"") + b"/" + head).split(b"/") if p]
        fd = os.open(self.mnt, os.O_PATH | os.O_DIRECTORY)
        try:
            for part in parts:
                nfd = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        return fd, name

    def _syscall(self, m: Mutation) -> None:
        kind = m.kind
        path = path_bytes(m.path)
        fd, name = self._dir(m.fs, path)
        try:
            if kind == "create":
                os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o600, dir_fd=fd))
            elif kind == "mkdir":
                os.mkdir(name, 0o700, dir_fd=fd)
            elif kind == "symlink":
                os.symlink(path_bytes(m.target or ""), name, dir_fd=fd)
            elif kind == "mknod":
                mode = IFMT.get(m.type, stat.S_IFIFO) | 0o600
                os.mknod(name, mode, m.rdev or 0, dir_fd=fd)
            elif kind == "link":
                sfd, sname = self._dir(m.fs, path_bytes(m.target or ""))
                try:
                    os.link(sname, name, src_dir_fd=sfd, dst_dir_fd=fd, follow_symlinks=False)
                finally:
                    os.close(sfd)
            elif kind == "delete":
                os.unlink(name, dir_fd=fd)
            elif kind == "rmdir":
                os.rmdir(name, dir_fd=fd)
            elif kind == "rename":
                sfd, sname = self._dir(m.fs, path_bytes(m.old_path or ""))
                try:
                    os.rename(sname, name, src_dir_fd=sfd, dst_dir_fd=fd)
                finally:
                    os.close(sfd)
            elif kind in ("modify", "truncate"):
                f = os.open(name, os.O_WRONLY | os.O_NOFOLLOW, dir_fd=fd)
                try:
                    os.ftruncate(f, m.size or 0)
                finally:
                    os.close(f)
            elif kind == "attrib":
                self._attrib(m, fd, name)
            elif kind == "xattr":
                self._xattr(m, fd, name)
        finally:
            os.close(fd)

    def _attrib(self, m: Mutation, fd: int, name: bytes) -> None:
        """One syscall, so one IN_ATTRIB; the handler takes every attribute the event carries."""
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        link = stat.S_ISLNK(st.st_mode)
        if m.mode is not None and stat.S_IMODE(st.st_mode) != m.mode and not link:
            os.chmod(name, m.mode, dir_fd=fd)
        elif (m.uid is not None and m.uid != st.st_uid) or (m.gid is not None and m.gid != st.st_gid):
            os.chown(name, m.uid if m.uid is not None else -1, m.gid if m.gid is not None else -1, dir_fd=fd,
                     follow_symlinks=False)
        else:
            mt = m.mtime_ns if m.mtime_ns is not None else st.st_mtime_ns
            os.utime(name, ns=(mt, mt), dir_fd=fd, follow_symlinks=False)

    def _xattr(self, m: Mutation, fd: int, name: bytes) -> None:
        """One setxattr (or removexattr) of the first changed name; the handler applies them all."""
        if not m.xattr:
            raise OSError(errno.EINVAL, "xattr event without names")
        key, value = next(iter(m.xattr.items()))
        target = f"/proc/self/fd/{fd}/".encode() + name
        if value is None:
            os.removexattr(target, key, follow_symlinks=False)
        else:
            os.setxattr(target, key, bytes.fromhex(value), follow_symlinks=False)
