"""Serve the view: the engine, the FUSE loop and the poke helper in one process, and mount hygiene.

Threads, and why:
- trio thread: pyfuse3's loop only. It answers from the ViewTree and never makes a syscall on the mount.
- engine thread: inference.runner.Runner follows the write log and runs `Engine.process` in chunks of records
  under the engine's lock. A chunk can take tens of milliseconds (a jbd2 commit, a rescan); in the trio thread
  that would stall every FUSE request, `ls` included. Content reads and statfs take the same lock from trio's
  worker threads.
- poke thread (mirrorfs.view.poke): turns the engine's mutations into syscalls on the mount. The engine only appends
  to its queue, so nothing the mount does (a wedged reader, a slow tool) can slow the engine.
"""

from __future__ import annotations

import errno
import faulthandler
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pyfuse3
import trio

from inference.events import Mutation, path_bytes
from inference.runner import Runner
from inference.view import EngineView
from mirrorfs.view.assemble import dir_names, parse_fstab, plan
from mirrorfs.view.ops import Stage, ViewOps, mount_options
from mirrorfs.view.poke import Poker, mount_id
from mirrorfs.view.reads import PointReads
from mirrorfs.view.tree import Applied, ViewError, ViewTree

log = logging.getLogger("mirrorfs.mount")

READAHEAD_KB = 4096  # the view's readahead window (set_readahead)
PRE_DROP_WAIT = 0.05  # seconds the poke helper waits for a file's pages to drop before it grows the file
FSTYPE = "fuse.mirrorfs"


class MountError(OSError):
    """A user-facing mount failure (an OSError, so the CLI prints it without importing this module)."""


# -- mount hygiene


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def mount_type(mnt: Path) -> str | None:
    """The file-system type mounted exactly at `mnt` (the top one), or None."""
    target = os.path.realpath(mnt)
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if len(fields) > 4 and _unescape(fields[4]) == target:
                found = right.split()[0]
    return found


def is_stale(mnt: Path, timeout: float = 5.0) -> bool:
    """True if the FUSE server behind `mnt` is gone (ENOTCONN). stat alone can answer from the attribute cache
    for a second after a crash, so open the directory, which always asks the server; in a thread, so a live but
    wedged server cannot hang us."""
    result: list[bool] = []

    def probe() -> None:
        try:
            os.close(os.open(mnt, os.O_RDONLY | os.O_DIRECTORY))
            result.append(False)
        except OSError as exc:
            result.append(exc.errno == errno.ENOTCONN)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(result and result[0])


def unmount(mnt: Path, *, lazy: bool = False) -> bool:
    """fusermount3 -u (then umount -l as root); True if nothing is mounted there afterwards."""
    cmds = [["fusermount3", "-u", *(["-z"] if lazy else []), str(mnt)]]
    if lazy:
        cmds.append(["umount", "-l", str(mnt)])
    for cmd in cmds:
        try:
            subprocess.run(cmd, capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if mount_type(mnt) is None:
            return True
    return mount_type(mnt) is None


def mount_device(target: str) -> str | None:
    """"major:minor" of the file system mounted exactly at `target` (a resolved path; the top mount), from
    mountinfo: no request reaches the file system (resolving the path of a FUSE mount whose loop is not running
    yet would hang)."""
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split(" - ")[0].split()
            if len(fields) > 4 and _unescape(fields[4]) == target:
                found = fields[2]
    return found


def set_readahead(mnt: str, kib: int = READAHEAD_KB) -> bool:
    """Raise the view's readahead window (its bdi's read_ahead_kb; FUSE starts at 128 KiB): a sequential read is
    then asked of us in requests of up to 1 MiB (libfuse's max_pages), with more of them in flight, instead of
    128 KiB ones, each of which costs a Python round trip. Root only; False if it could not be set."""
    dev = mount_device(mnt)
    if dev is None:
        return False
    try:
        with open(f"/sys/class/bdi/{dev}/read_ahead_kb", "w") as f:
            f.write(str(kib))
        return True
    except OSError as exc:
        log.info("readahead of %s left as it is: %s", mnt, exc)
        return False


def readahead_after_init(target: str) -> None:
    """set_readahead once the kernel has taken FUSE's INIT reply, which lowers the window to what libfuse was
    offered at mount time (128 KiB): a request answered (this stat, from a worker thread, never the trio
    thread) means INIT is done."""
    try:
        os.stat(target)
    except OSError:
        return
    set_readahead(target)


def prepare_mountpoint(mnt: Path) -> None:
    """Clean a stale mount a crashed mirrorfs left (ENOTCONN); refuse a live one."""
    kind = mount_type(mnt)
    if kind is not None:
        if is_stale(mnt):
            print(f"mirrorfs: cleaning up a stale mount at {mnt} (a previous mirrorfs died)", file=sys.stderr)
            if not unmount(mnt, lazy=True):
                raise MountError(f"could not unmount the stale mount at {mnt}")
        elif kind == FSTYPE:
            raise MountError(f"{mnt} is already served by a running mirrorfs (mirrorfs umount {mnt})")
    if not mnt.is_dir():
        raise MountError(f"mount point {mnt} is not a directory")


# -- who may read the view (issue 9)


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


# -- serving


class PageDropper:
    """Drops the kernel's cached pages (and attributes) of files whose content changed, in a thread of its own.

    Why not in the poke helper: the kernel's invalidation waits for every page being read, and a read of the
    view may be waiting for the helper to apply the file's next event (mirrorfs.view.reads): done by the helper
    itself, that would deadlock. Here it waits only for that read, which the helper releases."""

    def __init__(self) -> None:
        self.nodes: dict[int, threading.Event] = {}  # queued node ids, in order, each once, and who waits
        self.cond = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="mirrorfs-pages", daemon=True)
        self.thread.start()

    def drop(self, nid: int) -> threading.Event:
        """Queue a drop of the node's pages; the returned event is set once it is done."""
        with self.cond:
            done = self.nodes.setdefault(nid, threading.Event())
            self.cond.notify()
            return done

    def _run(self) -> None:
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.nodes or self.stopping)
                if not self.nodes:
                    return
                nid = next(iter(self.nodes))
                done = self.nodes.pop(nid)
            _quiet(pyfuse3.invalidate_inode, nid, False)
            done.set()

    def stop(self, timeout: float = 10) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join(timeout)


FSTAB = b"/etc/fstab"
MAX_FSTAB = 1 << 20


def build_tree(view: EngineView, filesystems: list[str], assemble: bool) -> tuple[ViewTree, int, list[str]]:
    """The view's tree (caller holds the engine lock): one file system at the root; several in a directory each
    (label, else UUID, else engine name); with `assemble`, laid out as the /etc/fstab of the file system that
    has one says. Returns the tree, the number of names loaded, and notes for the user."""
    ids = {fs: view.identity(fs) for fs in filesystems}
    notes: list[str] = []
    if not assemble or len(filesystems) == 1:
        tree = ViewTree(filesystems, names=dir_names(ids.values()))
        return tree, sum(tree.load(fs, view.snapshot(fs)) for fs in tree.filesystems), notes
    root = fstab_ino = None
    for fs in filesystems:
        ino = view.resolve(fs, FSTAB)
        entry = view.stat(fs, ino) if ino is not None else None
        if entry is not None and entry.type == "file":
            if root is None:
                root, fstab_ino = fs, ino
            else:
                notes.append(f"{fs} also has {FSTAB.decode()}; {root}'s is the one used")
    if root is None:
        raise MountError(f"--assemble: no file system on this disk has {FSTAB.decode()} "
                         f"({', '.join(filesystems)}); mount without --assemble")
    text = view.read(root, fstab_ino, 0, MAX_FSTAB).decode("utf-8", "replace")
    order, skipped = plan(parse_fstab(text), ids.values(), root)
    notes += [f"{FSTAB.decode()} of {root}: {n}" for n in skipped]
    tree = ViewTree([root, *(fs for fs, _ in order)], root=root)
    names = sum(tree.load(fs, view.snapshot(fs)) for fs in tree.filesystems)
    for fs, point in order:
        why = tree.mount(fs, point.encode("utf-8", "surrogateescape"))
        notes.append(f"{fs} not mounted: {why}" if why else f"{fs} ({ids[fs].label or ids[fs].uuid}) on {point}")
    left = [fs for fs in filesystems if tree.fs_prefix(fs) is None]
    if left:
        notes.append(f"not in the assembled view (not in {root}'s fstab): {', '.join(left)}")
    return tree, names, notes


def serve(engine, mnt: Path, loop: Runner | None, *, allow_other: bool = False,
          fsname: str = "mirrorfs", assemble: bool = False, group: int | None = None,
          on_reads: Callable[[PointReads], None] | None = None) -> None:
    """Build the view from the engine's tree now, mount it, serve until SIGINT/SIGTERM (or the engine ends
    after a non-follow run), then unmount. `loop` (already caught up) keeps feeding mutations.
    Who may read it: root only (FUSE's default without allow_other); with `group`, root and that group's
    members (allow_other plus a check of each request); with `allow_other`, every host user."""
    lock = engine.lock  # held across several EngineView calls where they must see one point
    view = EngineView(engine)
    filesystems = view.filesystems()
    if not filesystems:
        raise MountError("no file system the engine can read on this disk: nothing to mount")
    prepare_mountpoint(mnt)
    if allow_other:
        print("mirrorfs: warning: allow_other: any host user may read the view as far as the GUEST's file modes "
              "and uids allow; guest modes are not host policy", file=sys.stderr)
    with lock:
        tree, names, notes = build_tree(view, filesystems, assemble)
    for note in notes:
        print(f"mirrorfs: {note}", file=sys.stderr)
    shown = [fs for fs in tree.filesystems if tree.fs_prefix(fs) is not None]

    def statfs() -> pyfuse3.StatvfsData:
        with lock:
            totals = [view.statfs(fs) for fs in shown]
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = totals[0].block_size
        s.f_blocks = sum(t.blocks * t.block_size // s.f_bsize for t in totals)
        s.f_bfree = sum(t.blocks_free * t.block_size // s.f_bsize for t in totals)
        s.f_bavail = sum((t.blocks_free if t.blocks_avail is None else t.blocks_avail) * t.block_size // s.f_bsize
                         for t in totals)
        s.f_files = sum(t.files for t in totals)
        s.f_ffree = s.f_favail = sum(t.files_free for t in totals)
        s.f_namemax = totals[0].name_max
        return s

    stage = Stage()

    def stuck(fs: str, ino: int) -> bool:
        staged = stage.current
        return staged is not None and staged.resized and (staged.mutation.fs, staged.mutation.ino) == (fs, ino)

    reads = PointReads(lock, view, tree.nodes.get, stuck=stuck)
    if loop is not None:
        with lock:  # from the next engine step on; what came before is in the snapshot the tree was built from
            loop.locked.append(reads.noted)
    if on_reads is not None:
        on_reads(reads)
    dropper = PageDropper()
    ops = (group_ops(group) if group is not None and not allow_other else ViewOps)(tree, stage, reads.read, statfs,
                                                                                    reads.applied, reads.try_read)
    token_box: list[trio.lowlevel.TrioToken] = []

    def in_trio(fn: Callable):
        return trio.from_thread.run_sync(fn, trio_token=token_box[0])

    def apply_direct(m: Mutation) -> Applied:
        def apply() -> Applied:
            try:
                return tree.apply(m)
            except ViewError as exc:
                log.warning("mutation does not fit the view: %s", exc)
                return Applied()
            finally:
                reads.applied(m)
        return in_trio(apply)

    def invalidate(applied: Applied, content: Mutation | None) -> None:
        """From the poke thread only: these calls may block, and must never run in the trio thread."""
        for parent, name in applied.entries:
            _quiet(pyfuse3.invalidate_entry, parent, name)
        for nid in dict.fromkeys(applied.nodes):
            _quiet(pyfuse3.invalidate_inode, nid, True)
        if content is not None and content.fs in tree.fs_root:
            dropper.drop(tree.nid(content.fs, content.ino))

    def before_growth(m: Mutation) -> None:
        """The poke thread is about to grow a file: drop its cached pages first. The kernel publishes the new
        size before it drops the old partial last page, whose zero tail a reader (less +F) would read meanwhile;
        a page dropped now is one fewer to race. Bounded: a read the drop waits for may itself wait for this
        very event (mirrorfs.view.reads), so the helper goes on after PRE_DROP_WAIT whatever became of it."""
        if m.fs in tree.fs_root:
            nid = tree.nid(m.fs, m.ino)
            node = tree.nodes.get(nid)
            if node is not None and (m.size or 0) > node.size:
                dropper.drop(nid).wait(PRE_DROP_WAIT)

    seen = [-1, -1]

    def reconcile_dirs() -> None:
        """What moves with no event at all: a file's atime (a read in the guest), and a directory's record when it
        reached the disk after its entries (an entry event carries its directory as its point has it, `parent`,
        so a directory's size follows without this): take them from the engine when the stream is quiet."""
        mark = [engine.stats().last_seq, poker.done]
        if mark == seen:
            return
        seen[:] = mark
        dirs = in_trio(lambda: [(nid, n.fs, n.ino) for nid, n in tree.nodes.items()
                                if n.children is not None and n.fs])
        with lock:
            stats = [(nid, view.stat(fs, ino)) for nid, fs, ino in dirs]
            stats += [(tree.nid(fs, e.ino), e) for fs in tree.fs_root for e in view.take_quiet(fs)]  # atime (issue 17)
        changed = in_trio(lambda: [nid for nid, e in stats if e is not None and tree.set_attrs(nid, e)])
        for nid in changed:
            _quiet(pyfuse3.invalidate_inode, nid, True)

    def hidden(m: Mutation) -> bool:
        return tree.hidden(m.fs, path_bytes(m.path)) or (m.old_path is not None
                                                          and tree.hidden(m.fs, path_bytes(m.old_path)))

    poker = Poker(stage, tree.fs_prefix, apply_direct, invalidate, on_idle=reconcile_dirs, hidden=hidden,
                  before_growth=before_growth)
    poke = poker.poke

    def poke_and_release(m: Mutation) -> None:
        """Whatever became of `m` (applied by the handler or directly, refused, failed), the view is done with
        it: reads of its file stop waiting for it."""
        try:
            poke(m)
        finally:
            reads.applied(m)

    poker.poke = poke_and_release
    if loop is not None:
        loop.sinks.append(poker.submit)
        with lock:  # each engine step may move what no event carries (a read's atime): arm the quiet reconcile
            loop.locked.append(lambda _events: poker.touch())

    async def main() -> None:
        token_box.append(trio.lowlevel.current_trio_token())
        done = trio.Event()
        if loop is not None:
            loop.on_exit = lambda: _set_from_thread(done, token_box[0])
        async with trio.open_nursery() as nursery:
            async def fuse_loop() -> None:
                await pyfuse3.main()
                done.set()  # unmounted from outside (mirrorfs umount, fusermount3 -u)
            nursery.start_soon(fuse_loop)
            poker.start()
            nursery.start_soon(trio.to_thread.run_sync, readahead_after_init, target)
            if loop is not None:
                loop.thread.start()
            where = ", ".join(f"{fs} at /{tree.fs_prefix(fs).decode('utf-8', 'replace')}" for fs in shown)
            print(f"mirrorfs: mounted {mnt} ({names} names; {where}), pid {os.getpid()}", flush=True)
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async def on_signal() -> None:
                    async for _ in signals:
                        done.set()
                        return
                nursery.start_soon(on_signal)
                await done.wait()
            if loop is not None:
                loop.halt()
                await trio.to_thread.run_sync(loop.thread.join)
            await trio.to_thread.run_sync(poker.stop)
            await trio.to_thread.run_sync(dropper.stop)
            pyfuse3.terminate()
            nursery.cancel_scope.cancel()

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID`: where is each thread stuck?
    target = os.path.realpath(mnt)  # now: once mounted, resolving the path asks the view, which is not served yet
    pyfuse3.init(ops, str(mnt), mount_options(fsname, allow_other or group is not None))
    # the view's mount id, taken now: later, a renamed directory above MNT could aim the path elsewhere
    root = os.open(mnt, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        poker.set_root(mnt, mount_id(root))
    finally:
        os.close(root)
    try:
        trio.run(main)
    finally:
        pyfuse3.close(unmount=True)
    if mount_type(mnt) == FSTYPE:
        unmount(mnt, lazy=True)
    if loop is not None and loop.error is not None:
        raise loop.error
    refused = poker.refused + ops.refused  # paths and requests outside the mount / the staged change
    eio = sum(reads.errors.values())
    print(f"mirrorfs: unmounted {mnt} ({poker.done} mutations poked, {poker.fallbacks} applied directly"
          f"{f', {refused} refused' if refused else ''}{f', {eio} reads answered EIO' if eio else ''})",
          file=sys.stderr)


def serve_log(engine, state, mnt: Path, *, follow: bool, allow_other: bool = False, assemble: bool = False,
              live: Callable | None = None, finished: Callable[[], bool] | None = None,
              group: int | None = None) -> None:
    """`replay [--follow] --mount` and `mount`: catch up with the log (events to DIR/events.jsonl), build the
    view, then serve it while (with follow) the engine keeps following the log."""
    from inference.eventlog import EventLog
    from tap.writelog import LogFollower

    with EventLog(state.path / "events.jsonl", truncate=True) as events, LogFollower(state.log) as follower:
        services = live(follower, events) if live is not None and follow else None  # issue 5's socket, metrics
        loop = Runner(engine, follower, follow=follow, finished=finished, watch=(state.path,))
        loop.sinks.append(events.append)
        try:
            loop.catch_up()
            if not follow:
                loop.run()  # drains nothing more, then finishes: the view shows the log's end state
            metrics = getattr(services, "metrics", None)  # the view's read errors join the engine's metrics
            serve(engine, Path(mnt), loop if follow else None, allow_other=allow_other, assemble=assemble,
                  fsname=f"mirrorfs:{engine.vm or state.path.name}", group=group,
                  on_reads=(lambda r: setattr(metrics, "reads", r)) if metrics is not None else None)
        finally:
            if services is not None:
                services.close()


def _set_from_thread(event: trio.Event, token: trio.lowlevel.TrioToken) -> None:
    try:
        trio.from_thread.run_sync(event.set, trio_token=token)
    except trio.RunFinishedError:
        pass


def _quiet(fn: Callable, *args) -> None:
    try:
        fn(*args)
    except OSError:
        pass  # the kernel does not hold that entry or inode: nothing to invalidate
