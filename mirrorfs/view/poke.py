"""The poke helper: a thread that replays each Mutation as the matching syscall on the mount.

Why: the kernel raises inotify events only for operations it performs itself; no FUSE notification does
(docs/ARCHITECTURE.md "Poke"). So for every mutation the helper stages it (fuse.Stage) and makes the syscall a guest
process would have made; the FUSE handler sees the request from this thread, applies the staged change to
the view tree and answers with the real attributes. Never the trio thread (a syscall on the mount from there
hangs the daemon). The engine only appends to an unbounded queue, so a wedged mount or reader can stall this
thread but never the engine. When a syscall fails (the view and the stream disagree, an xattr namespace
the kernel will not pass on), the change is applied directly and the kernel's caches are invalidated.

This thread runs as root and its paths are the guest's names, so it must not be able to leave the mount,
whatever the path: every component is checked here (never empty, `.`, `..`, or holding NUL; the engine's name
policy already keeps `/` out of a name), and every directory is resolved by the kernel with openat2(2)
RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV below an O_PATH fd of the
file system's directory in the mount. O_NOFOLLOW alone stops symlinks, not `..`. The last name is then used
only with *at() calls that do not follow it, or opened with openat2 too. The root fd itself is opened by the
mounter right after the mount (a local user who can rename a directory above the mount point must not be able to
aim it at a host directory) is not trusted: the mounter records the view's mount id right after mounting, and
the root, opened again for each run of changes, must lie on that very mount, or the change is refused.

Held fds: the root, each file system's directory and the parent directories of a run of changes stay open while
the queue has work (opening and checking them for every change cost a fifth of it), and are closed once the
queue is empty (a held fd keeps `mirrorfs umount` from unmounting: during a burst it says busy, as it could before
during any one syscall), and before anything that can change which directory a held path names: a rename, an
rmdir, a change applied directly, a failed or refused syscall.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

from inference.events import Mutation, path_bytes
from inference.names import bad_name_reason
from mirrorfs.view.ops import Stage, Staged
from mirrorfs.view.tree import IFMT, Applied

log = logging.getLogger("mirrorfs.poke")

# After a new directory appears, recursive watchers (inotifywait -r, watchdog) need a moment to add a watch on
# it before its content appears, or they miss those events (20 ms was seen to be too short while a TCG guest
# loads both cores). The guest was slower than our replay of a burst. So when the next queued mutation is inside
# the new directory and some inotify instance watches its parent, the helper waits, at most MKDIR_PAUSE, until
# every instance watching the parent watches the new directory too (/proc/*/fdinfo; no event says so, hence
# WATCH_CHECK). Nobody watching the parent: nobody can be about to watch the new directory, so no wait at all.
QUIET_S = 0.5  # the queue idle this long: the view takes what moved with no event (on_idle)
MKDIR_PAUSE = 0.1
WATCH_CHECK = 0.002
MAX_HELD = 64  # parent directories held open at once (a run of changes usually stays in a few)
REAIMS = ("rename", "rmdir")  # kinds after which a held directory's path may lead elsewhere
# One write for a create and the content change of the same new file (Poker.submit): what may stand between them
# in the queue (changes of other names and inodes that cannot move this file), and how far behind the helper must
# be before a create takes the content change of a later point too.
RIDE_OVER = frozenset(("create", "mkdir", "symlink", "mknod", "modify"))
BURST = 1000  # queued changes

Invalidate = Callable[[Applied, "Mutation | None"], None]  # (what changed, the content-changing mutation)

# openat2(2) through the raw syscall (glibc 2.36 has no wrapper): the number is 437 on every architecture
SYS_OPENAT2 = 437
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
CONFINED = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV
OFF_T_MAX = (1 << 63) - 1  # a guest's i_size can be 2^64-1; ftruncate takes an off_t


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def mount_id(fd: int) -> int | None:
    """The id of the mount an fd lies on (/proc/self/fdinfo), or None: no request reaches the file system (a
    statfs on the view would be a FUSE request, which the guest's superblock can fail)."""
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("mnt_id:")), None)
    except (OSError, ValueError, IndexError):
        return None


def inotify_watchers(dev: int, ino: int) -> set[tuple[int, int]]:
    """(pid, fd) of every inotify instance on the host that watches inode `ino` of device `dev` (st_dev), from
    /proc/PID/fdinfo; processes that come and go meanwhile are skipped."""
    want = (f"ino:{ino:x}", f"sdev:{(os.major(dev) << 20) | os.minor(dev):x}")  # the kernel's own dev_t
    found: set[tuple[int, int]] = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:inotify":
                    continue
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    for line in f:
                        parts = line.split()
                        if parts[:1] == ["inotify"] and want[0] in parts and want[1] in parts:
                            found.add((int(pid), int(fd)))
                            break
            except OSError:
                continue
    return found


class Refused(OSError):
    """A path the helper will not resolve (a bad component, or the kernel said it leaves the mount)."""


def check_component(name: bytes) -> bytes:
    """One path component as the helper accepts it; Refused for empty, `.`, `..`, `/` or NUL."""
    why = bad_name_reason(name)
    if why:
        raise Refused(errno.EPERM, f"unsafe path component {name!r}: {why}")
    return name


def components(path: bytes) -> list[bytes]:
    """An absolute path's components, each checked (a doubled or trailing `/` is an empty one: refused)."""
    if not path.startswith(b"/"):
        raise Refused(errno.EPERM, f"not an absolute path: {path!r}")
    if path == b"/":
        return []
    return [check_component(p) for p in path[1:].split(b"/")]


def openat2(dirfd: int, path: bytes, flags: int, mode: int = 0, resolve: int = CONFINED) -> int:
    """openat2(2): by default `path` must resolve beneath `dirfd`, through no symlink (magic or not) and no
    mount point, or the kernel refuses (EXDEV for `..` or an absolute path, ELOOP for a symlink)."""
    if not path or b"\0" in path:
        raise Refused(errno.EINVAL, f"bad path for openat2: {path!r}")
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    fd = _syscall(ctypes.c_long(SYS_OPENAT2), ctypes.c_int(dirfd), ctypes.c_char_p(path), ctypes.byref(how),
                  ctypes.c_size_t(ctypes.sizeof(how)))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"openat2 {path!r}: {os.strerror(err)}")
    return fd


def open_beneath(dirfd: int, parts: list[bytes], flags: int = os.O_PATH | os.O_DIRECTORY) -> int:
    """openat2 of checked components below `dirfd` (no components: `dirfd` itself, as a new fd)."""
    return openat2(dirfd, b"/".join(check_component(p) for p in parts) if parts else b".", flags)


class Poker:
    def __init__(self, stage: Stage, prefix: Callable[[str], bytes | None],
                 apply_direct: Callable[[Mutation], Applied], invalidate: Invalidate,
                 on_idle: Callable[[], None] | None = None, hidden: Callable[[Mutation], bool] | None = None,
                 before_growth: Callable[[Mutation], None] | None = None,
                 on_done: Callable[[Mutation], None] | None = None) -> None:
        """`before_growth(m)`: called before the ftruncate of a modify or truncate (the view's page drop).
        `on_done(m)`: the view is done with m, whatever became of it (applied by the handler or directly,
        refused, failed): reads of its file stop waiting for it."""
        self.stage, self.prefix = stage, prefix
        self.before_growth, self.on_done = before_growth, on_done
        self.apply_direct, self.invalidate, self.on_idle = apply_direct, invalidate, on_idle
        self.hidden = hidden or (lambda m: False)  # not visible in the view (covered by a mount, not shown)
        self.unseen = 0
        self.queue: deque[Mutation] = deque()
        self.cond = threading.Condition()
        self.stopping = False
        self.done = 0
        self._quiet_from: float | None = None  # armed: on_idle runs once QUIET_S after this (monotonic) if idle
        self.fallbacks = 0
        self.refused = 0
        self._root: tuple[bytes, int] | None = None  # the mount point and its mount id (set_root)
        self._made_dir: tuple[int, int, int] | None = None  # (st_dev, parent's st_ino, st_ino) of the last mkdir
        self._held: dict[object, int] = {}  # O_PATH fds held while the queue has work: "root", fs, (fs, parent)
        # creates still queued that a later modify of the same file may join (submit): (fs, ino) -> (create, the
        # barrier count when it was queued); a modify that joined its create, by the create's id
        self._creates: dict[tuple[str, int], tuple[Mutation, int]] = {}
        self._barriers = 0
        self._riders: dict[int, Mutation] = {}
        self.joined = 0
        self.thread = threading.Thread(target=self._run, name="mirrorfs-poke", daemon=True)

    # -- the engine's side: never blocks

    def submit(self, events: Iterable[Mutation]) -> None:
        events = [e for e in events if not e.is_error]
        if events:
            with self.cond:
                for e in events:
                    if not self._join(e):
                        self.queue.append(e)
                self.cond.notify()

    def _join(self, e: Mutation) -> bool:
        """Take `e` into the queue's state; True if it rides on its file's queued create instead of queueing.

        A new file's content change joins the file's create when both are queued with nothing between them that
        could move or reuse that file (only other creates, mkdirs and modifies: RIDE_OVER), and they came with
        the same point, or the helper is BURST changes behind: the two are then one open(O_CREAT|O_EXCL) +
        ftruncate + close, and the kernel raises CREATE, MODIFY, CLOSE_WRITE, as for the guest's own creat +
        write + close, instead of CREATE, CLOSE_WRITE, MODIFY, CLOSE_WRITE. A create and a modify each cost ~4
        FUSE requests; together ~6 (docs/ARCHITECTURE.md "Poke")."""
        key = (e.fs, e.ino)
        if e.kind == "create":
            self._creates[key] = (e, self._barriers)
            return False
        if e.kind not in RIDE_OVER:
            self._barriers += 1
            self._creates.clear()  # nothing queued so far may be joined any more
            return False
        if e.kind != "modify":
            return False
        queued = self._creates.pop(key, None)
        if queued is None:
            return False
        create, barriers = queued
        if barriers != self._barriers or create.path != e.path or not (create.seq == e.seq
                                                                       or len(self.queue) >= BURST):
            return False
        self._riders[id(create)] = e
        self.joined += 1
        return True

    def start(self) -> None:
        self.thread.start()

    def touch(self) -> None:
        """The engine took records that may have moved what no event carries (an atime): arm the quiet-time
        reconcile, without pushing it back (cheap; called under the engine's lock)."""
        with self.cond:
            if self._quiet_from is None:
                self._quiet_from = time.monotonic()
                self.cond.notify()

    def stop(self, drain_timeout: float = 30) -> None:
        """End the thread once the queue is drained (bounded)."""
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join(drain_timeout)

    # -- the helper thread

    def set_root(self, mountpoint: str | bytes, mnt_id: int) -> None:
        """Where the view is mounted, and the id of its mount as the mounter saw it right after mounting."""
        self._root = (os.fsencode(mountpoint), mnt_id)

    def _open_root(self) -> int:
        """An O_PATH fd of the view's root (held), or Refused when the path now leads anywhere but the view's
        mount."""
        fd = self._held.get("root")
        if fd is not None:
            return fd
        if self._root is None:
            raise Refused(errno.EPERM, "the view's root is not known")
        path, want = self._root
        fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        found = mount_id(fd)
        if found != want:
            os.close(fd)
            log.error("%r now leads to mount %s, not to the view's mount %s: change refused", path, found, want)
            raise Refused(errno.EPERM, f"the mount point {path!r} no longer leads to the view")
        self._held["root"] = fd
        return fd

    def _release(self) -> None:
        """Close every held fd (the queue is empty, or a held path may now lead elsewhere)."""
        held, self._held = self._held, {}
        for fd in held.values():
            os.close(fd)

    def _run(self) -> None:
        self.stage.tid = threading.get_native_id()
        self._loop()

    def _quiet_wait(self) -> float | None:
        """Seconds until the armed quiet-time reconcile is due (0: now; None: nothing armed, wait for work)."""
        if self._quiet_from is None or self.on_idle is None:
            return None
        return max(self._quiet_from + QUIET_S - time.monotonic(), 0.0)

    def _loop(self) -> None:
        while True:
            if self._held and not self.queue:  # only this thread empties the queue: it stays empty till the wait
                self._release()
            with self.cond:
                while not self.queue and not self.stopping and self._quiet_wait() != 0:
                    self.cond.wait(self._quiet_wait())
                if self.stopping and not self.queue:
                    self._release()
                    return
                m = self.queue.popleft() if self.queue else None
                rider = None
                if m is None:
                    self._quiet_from = None
                elif m.kind == "create":
                    rider = self._riders.pop(id(m), None)
                    if self._creates.get((m.fs, m.ino), (None,))[0] is m:
                        del self._creates[(m.fs, m.ino)]  # begun: nothing joins it any more
            if m is None:  # quiet for QUIET_S since the last change: what no event carries
                try:
                    self.on_idle()
                except Exception:  # noqa: BLE001 - the helper must outlive any one failure
                    log.exception("idle reconcile failed")
                continue
            try:
                self.poke(m, rider)
            except Exception:  # noqa: BLE001
                log.exception("poke of %s %s failed", m.kind, m.path)
            finally:
                if self.on_done is not None:
                    self.on_done(m)
                    if rider is not None:
                        self.on_done(rider)
            self.done += 1 if rider is None else 2
            with self.cond:
                self._quiet_from = time.monotonic()
            made, self._made_dir = self._made_dir, None
            if made is not None and MKDIR_PAUSE and self._next_inside(m):
                self._let_watchers_follow(*made)

    def _let_watchers_follow(self, dev: int, parent: int, made: int) -> None:
        """Wait (at most MKDIR_PAUSE) until every inotify instance watching `parent` watches `made` too."""
        watchers = inotify_watchers(dev, parent)
        if not watchers:
            return
        deadline = time.monotonic() + MKDIR_PAUSE
        while time.monotonic() < deadline:
            if watchers <= inotify_watchers(dev, made):
                return
            time.sleep(WATCH_CHECK)

    def _next_inside(self, m: Mutation) -> bool:
        try:
            nxt = self.queue[0]
        except IndexError:
            return True  # nothing queued yet: it may well be the new directory's content
        return nxt.fs == m.fs and nxt.path.startswith(m.path.rstrip("/") + "/")

    def poke(self, m: Mutation, rider: Mutation | None = None) -> None:
        """Replay `m`; `rider`: the modify that joined this create (submit), replayed through the same open."""
        if rider is not None and not (self.hidden(m) or self.hidden(rider)):
            self._poke_pair(m, rider)
            return
        self._poke(m)
        if rider is not None:
            self._poke(rider)

    def _poke_pair(self, create: Mutation, modify: Mutation) -> None:
        """open(O_CREAT|O_EXCL) as the create, then ftruncate of that same fd as the modify, then close. If the
        create does not go through as staged, the modify is replayed on its own, as if it had not joined."""
        fd = self._poke(create, keep_open=True)
        if fd is None:
            self._poke(modify)
            return
        closed = False

        def truncate(m: Mutation) -> None:
            nonlocal closed
            try:
                self._truncate(fd, m)
            finally:
                closed = True
                os.close(fd)
        try:
            self._poke(modify, call=truncate)
        finally:
            if not closed:
                os.close(fd)

    def _poke(self, m: Mutation, keep_open: bool = False, call: Callable[[Mutation], None] | None = None
              ) -> int | None:
        """Stage `m` and make its syscall (`call`, default _syscall). With `keep_open` (a create), the new
        file's fd is returned, open for writing, once the view applied the create as staged (else None)."""
        if self.hidden(m):  # no one can see it, so no event: a change under a directory something is mounted on
            self.unseen += 1
            self._release()
            self.invalidate(self.apply_direct(m), None)
            return None
        if len(self._held) > MAX_HELD:
            self._release()
        staged = Staged(m)
        self.stage.current = staged
        kept = None
        try:
            if call is not None:
                call(m)
            else:
                kept = self._syscall(m, keep_open=keep_open)
            error = None
        except Refused as exc:  # a path that would leave the mount: nothing of it reaches the host or the view
            self.refused += 1
            self._release()
            log.warning("refused %s %r: %s", m.kind, m.path, exc.strerror or exc)
            return None
        except OSError as exc:
            error = exc
        finally:
            self.stage.current = None
            if m.kind in REAIMS:
                self._release()
        if staged.error:
            log.warning("view disagrees with %s %s: %s", m.kind, m.path, staged.error)
        if error is not None or not staged.applied:
            if kept is not None:
                os.close(kept)
                kept = None
            self.fallbacks += 1
            self._release()
            log.info("poke %s %s: %s; applying directly", m.kind, m.path, error or "no request reached the view")
            if not staged.applied:
                self.invalidate(self.apply_direct(m), m if m.kind in ("modify", "truncate") else None)
                return None
        if kept is not None and staged.error:
            os.close(kept)
            kept = None
        if m.kind in ("modify", "truncate"):
            # the ftruncate kept the cached pages that changed in place (and a syscall that failed after the
            # handler applied the change left them too): drop them, and the attributes, so that a reader with
            # the file open (tail -f, less +F, an mmap) gets the new bytes and size on its next read
            self.invalidate(Applied(), m)
        return kept

    # -- syscalls

    def _fs_fd(self, fs: str) -> int:
        """An O_PATH fd (held) of the directory `fs` is shown at, resolved beneath the mount's root."""
        fd = self._held.get(fs)
        if fd is not None:
            return fd
        prefix = self.prefix(fs)
        if prefix is None:
            raise Refused(errno.ENOENT, f"file system {fs} is not in the view")
        fd = self._held[fs] = open_beneath(self._open_root(), [p for p in prefix.split(b"/") if p])
        return fd

    def _dir(self, fs: str, path: bytes) -> tuple[int, bytes]:
        """An O_PATH fd (held: the caller does not close it) of `path`'s parent, resolved beneath `fs`'s
        directory, and the last name (checked)."""
        head, _, name = path.rpartition(b"/")
        key = (fs, head)  # held only once its components passed the checks below
        fd = self._held.get(key) if path[:1] == b"/" else None
        if fd is not None:
            return fd, check_component(name)
        parts = components(path)
        if not parts:
            raise OSError(errno.EINVAL, "the root of a file system has no parent in the view")
        top = self._fs_fd(fs)
        try:
            fd = open_beneath(top, parts[:-1])
        except OSError as exc:
            if exc.errno in (errno.EXDEV, errno.ELOOP):  # the kernel says it leaves the mount, or is a symlink
                raise Refused(exc.errno, f"{path!r}: {exc.strerror}") from None
            raise
        self._held[key] = fd
        return fd, parts[-1]

    def _syscall(self, m: Mutation, keep_open: bool = False) -> int | None:
        """The syscall a guest process would have made for `m`; with `keep_open`, a create's fd is returned."""
        kind = m.kind
        path = path_bytes(m.path)
        fd, name = self._dir(m.fs, path)
        if kind == "create":
            f = openat2(fd, name, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o600)
            if keep_open:
                return f
            os.close(f)
        elif kind == "mkdir":
            os.mkdir(name, 0o700, dir_fd=fd)
            try:  # for _let_watchers_follow: the kernel's numbers of the parent and the new directory
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                self._made_dir = (st.st_dev, os.fstat(fd).st_ino, st.st_ino)
            except OSError:
                self._made_dir = None
        elif kind == "symlink":
            target = path_bytes(m.target or "")
            if b"\0" in target:
                raise Refused(errno.EINVAL, "symlink target holds NUL")
            os.symlink(target, name, dir_fd=fd)
        elif kind == "mknod":
            mode = IFMT.get(m.type, stat.S_IFIFO) | 0o600
            os.mknod(name, mode, m.rdev or 0, dir_fd=fd)
        elif kind == "link":
            sfd, sname = self._dir(m.fs, path_bytes(m.target or ""))
            os.link(sname, name, src_dir_fd=sfd, dst_dir_fd=fd, follow_symlinks=False)
        elif kind == "delete":
            os.unlink(name, dir_fd=fd)
        elif kind == "rmdir":
            os.rmdir(name, dir_fd=fd)
        elif kind == "rename":
            sfd, sname = self._dir(m.fs, path_bytes(m.old_path or ""))
            os.rename(sname, name, src_dir_fd=sfd, dst_dir_fd=fd)
        elif kind in ("modify", "truncate"):
            f = openat2(fd, name, os.O_WRONLY | os.O_NOFOLLOW)
            try:
                self._truncate(f, m)
            finally:
                os.close(f)
        elif kind in ("attrib", "xattr"):
            target = openat2(fd, name, os.O_PATH | os.O_NOFOLLOW)
            try:
                if kind == "attrib":
                    self._attrib(m, fd, name, target)
                else:
                    self._xattr(m, fd, name, target)
            finally:
                os.close(target)

    def _truncate(self, f: int, m: Mutation) -> None:
        """ftruncate of an fd open for writing to the modify's size (the view's page drop first)."""
        if self.before_growth is not None:
            self.before_growth(m)
        os.ftruncate(f, min(max(m.size or 0, 0), OFF_T_MAX))  # the view clamps it the same way

    @staticmethod
    def _at(fd: int, name: bytes, target: int) -> tuple[bytes | int, dict]:
        """How to name the target (an O_PATH fd `target` opened beneath the mount): through its own fd in
        /proc/self/fd (the kernel follows that magic link to exactly this inode), or, for a symlink, as the
        checked `name` in its parent `fd` without following it."""
        if stat.S_ISLNK(os.fstat(target).st_mode):
            return name, {"dir_fd": fd, "follow_symlinks": False}
        return f"/proc/self/fd/{target}".encode(), {}

    def _attrib(self, m: Mutation, fd: int, name: bytes, target: int) -> None:
        """One syscall, so one IN_ATTRIB; the handler takes every attribute the event carries."""
        st = os.fstat(target)
        link = stat.S_ISLNK(st.st_mode)
        where, how = self._at(fd, name, target)
        if m.mode is not None and stat.S_IMODE(st.st_mode) != m.mode and not link:
            os.chmod(where, m.mode)
        elif (m.uid is not None and m.uid != st.st_uid) or (m.gid is not None and m.gid != st.st_gid):
            os.chown(where, m.uid if m.uid is not None else -1, m.gid if m.gid is not None else -1, **how)
        else:
            mt = m.mtime_ns if m.mtime_ns is not None else st.st_mtime_ns
            os.utime(where, ns=(mt, mt), **how)

    def _xattr(self, m: Mutation, fd: int, name: bytes, target: int) -> None:
        """One setxattr (or removexattr) of the first changed name; the handler applies them all."""
        if not m.xattr:
            raise OSError(errno.EINVAL, "xattr event without names")
        key, value = next(iter(m.xattr.items()))
        where, how = self._at(fd, name, target)
        link = bool(how)  # a symlink: its parent's fd and the checked name, not followed
        if link:
            where = f"/proc/self/fd/{fd}/".encode() + name
        if value is None:
            os.removexattr(where, key, follow_symlinks=not link)
        else:
            os.setxattr(where, key, bytes.fromhex(value), follow_symlinks=not link)
