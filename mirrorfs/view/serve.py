"""Serve the view: the engine, the FUSE loop and the poke helper in one process (docs/ARCHITECTURE.md "Poke").

Threads, and why:
- trio thread: pyfuse3's loop only. It answers from the ViewTree and never makes a syscall on the mount.
- engine thread: inference.runner.Runner follows the write log and runs `Engine.process` in chunks of records
  under the engine's lock. A chunk can take tens of milliseconds (a jbd2 commit, a rescan); in the trio thread
  that would stall every FUSE request, `ls` included. Content reads and statfs take the same lock from trio's
  worker threads.
- poke thread (mirrorfs.view.poke): turns the engine's mutations into syscalls on the mount. The engine only
  appends to its queue, so nothing the mount does (a wedged reader, a slow tool) can slow the engine.
- pages thread (PageDropper): drops the kernel's cached pages of changed files.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pyfuse3
import trio

from inference.events import Mutation, path_bytes
from inference.runner import Runner
from inference.view import EngineView
from mirrorfs.view.access import group_ops
from mirrorfs.view.assemble import dir_names, parse_fstab, plan
from mirrorfs.view.mount import FSTYPE, MountError, mount_type, prepare_mountpoint, readahead_after_init, unmount
from mirrorfs.view.ops import Stage, ViewOps, mount_options
from mirrorfs.view.poke import Poker, mount_id
from mirrorfs.view.reads import PointReads
from mirrorfs.view.tree import Applied, ViewError, ViewTree

log = logging.getLogger("mirrorfs.mount")

PRE_DROP_WAIT = 0.05  # seconds the poke helper waits for a file's pages to drop before it grows the file
# How long a thread may keep the GIL while another waits for it (Python's default: 5 ms). Each change is ~3 FUSE
# requests the helper waits for, each a hand-off poke thread -> trio thread -> poke thread; while the engine thread
# runs Python (a guest writing), every hand-off waited out the engine's slice: ~5x fewer changes/s. Shorter slices
# trade some of the engine's speed for the view's lag while both are busy (BENCHMARKS.md, Mount 4).
SWITCH_S = 0.0005


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


class ViewServer:
    """One mounted view, built from the engine's tree now: the tree, the FUSE operations, reads at the view's
    point, the poke helper and the page dropper. `loop` (already caught up) keeps feeding mutations.
    Who may read it: root only (FUSE's default without allow_other); with `group`, root and that group's
    members (allow_other plus a check of each request); with `allow_other`, every host user."""

    def __init__(self, engine, mnt: Path, loop: Runner | None, *, allow_other: bool = False,
                 fsname: str = "mirrorfs", assemble: bool = False, group: int | None = None) -> None:
        self.engine, self.mnt, self.loop = engine, mnt, loop
        self.lock = engine.lock  # held across several EngineView calls where they must see one point
        self.view = EngineView(engine)
        filesystems = self.view.filesystems()
        if not filesystems:
            raise MountError("no file system the engine can read on this disk: nothing to mount")
        prepare_mountpoint(mnt)
        if allow_other:
            print("mirrorfs: warning: allow_other: any host user may read the view as far as the GUEST's file "
                  "modes and uids allow; guest modes are not host policy", file=sys.stderr)
        with self.lock:
            self.tree, self.names, notes = build_tree(self.view, filesystems, assemble)
        for note in notes:
            print(f"mirrorfs: {note}", file=sys.stderr)
        self.shown = [fs for fs in self.tree.filesystems if self.tree.fs_prefix(fs) is not None]
        self.fsname, self.shared = fsname, allow_other or group is not None
        self.stage = Stage()
        self.reads = PointReads(self.lock, self.view, self.tree.nodes.get, stuck=self._stuck)
        self.dropper = PageDropper()
        ops = group_ops(group) if group is not None and not allow_other else ViewOps
        self.ops = ops(self.tree, self.stage, self.reads.read, self.statfs, self.reads.applied, self.reads.try_read)
        self.poker = Poker(self.stage, self.tree.fs_prefix, self._apply_direct, self._invalidate,
                           on_idle=self._reconcile_quiet, hidden=self._hidden, before_growth=self._before_growth,
                           on_done=self.reads.applied)
        self.token: trio.lowlevel.TrioToken | None = None
        self._quiet_mark = (-1, -1)
        if loop is not None:
            with self.lock:  # from the next engine step on; what came before is in the tree's snapshot
                loop.locked.append(self.reads.noted)
                # each step may move what no event carries (a read's atime): arm the quiet reconcile
                loop.locked.append(lambda _events: self.poker.touch())
            loop.sinks.append(self.poker.submit)

    # -- answers the FUSE operations need

    def statfs(self) -> pyfuse3.StatvfsData:
        with self.lock:
            totals = [self.view.statfs(fs) for fs in self.shown]
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

    def _stuck(self, fs: str, ino: int) -> bool:
        """Is the poke helper inside a resizing syscall of this very file (a read must not wait for it)?"""
        staged = self.stage.current
        return staged is not None and staged.resized and (staged.mutation.fs, staged.mutation.ino) == (fs, ino)

    # -- the poke helper's side (its thread)

    def _in_trio(self, fn: Callable):
        return trio.from_thread.run_sync(fn, trio_token=self.token)

    def _apply_direct(self, m: Mutation) -> Applied:
        def apply() -> Applied:
            try:
                return self.tree.apply(m)
            except ViewError as exc:
                log.warning("mutation does not fit the view: %s", exc)
                return Applied()
            finally:
                self.reads.applied(m)
        return self._in_trio(apply)

    def _invalidate(self, applied: Applied, content: Mutation | None) -> None:
        """From the poke thread only: these calls may block, and must never run in the trio thread."""
        for parent, name in applied.entries:
            _quiet(pyfuse3.invalidate_entry, parent, name)
        for nid in dict.fromkeys(applied.nodes):
            _quiet(pyfuse3.invalidate_inode, nid, True)
        if content is not None and content.fs in self.tree.fs_root:
            nid = self.tree.nid(content.fs, content.ino)
            node = self.tree.nodes.get(nid)
            if node is None or node.opened:  # never opened for reading: the kernel holds no page of it
                self.dropper.drop(nid)

    def _before_growth(self, m: Mutation) -> None:
        """The poke thread is about to grow a file: drop its cached pages first. The kernel publishes the new
        size before it drops the old partial last page, whose zero tail a reader (less +F) would read meanwhile;
        a page dropped now is one fewer to race. Bounded: a read the drop waits for may itself wait for this
        very event (mirrorfs.view.reads), so the helper goes on after PRE_DROP_WAIT whatever became of it."""
        if m.fs in self.tree.fs_root:
            nid = self.tree.nid(m.fs, m.ino)
            node = self.tree.nodes.get(nid)
            if node is not None and node.opened and (m.size or 0) > node.size:
                self.dropper.drop(nid).wait(PRE_DROP_WAIT)

    def _reconcile_quiet(self) -> None:
        """What moves with no event at all: a file's atime (a read in the guest), and a directory's record when it
        reached the disk after its entries (an entry event carries its directory as its point has it, `parent`,
        so a directory's size follows without this): take them from the engine when the stream is quiet."""
        mark = (self.engine.stats().last_seq, self.poker.done)
        if mark == self._quiet_mark:
            return
        self._quiet_mark = mark
        tree, view = self.tree, self.view
        dirs = self._in_trio(lambda: [(nid, n.fs, n.ino) for nid, n in tree.nodes.items()
                                      if n.children is not None and n.fs])
        with self.lock:
            stats = [(nid, view.stat(fs, ino)) for nid, fs, ino in dirs]
            stats += [(tree.nid(fs, e.ino), e) for fs in tree.fs_root for e in view.take_quiet(fs)]  # atime
        changed = self._in_trio(lambda: [nid for nid, e in stats if e is not None and tree.set_attrs(nid, e)])
        for nid in changed:
            _quiet(pyfuse3.invalidate_inode, nid, True)

    def _hidden(self, m: Mutation) -> bool:
        return self.tree.hidden(m.fs, path_bytes(m.path)) or (m.old_path is not None
                                                               and self.tree.hidden(m.fs, path_bytes(m.old_path)))

    # -- running

    async def _main(self, target: str) -> None:
        self.token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        loop, token = self.loop, self.token
        if loop is not None:
            loop.on_exit = lambda: _set_from_thread(done, token)
        async with trio.open_nursery() as nursery:
            async def fuse_loop() -> None:
                await pyfuse3.main()
                done.set()  # unmounted from outside (mirrorfs umount, fusermount3 -u)
            nursery.start_soon(fuse_loop)
            self.poker.start()
            nursery.start_soon(trio.to_thread.run_sync, readahead_after_init, target)
            if loop is not None:
                loop.thread.start()
            where = ", ".join(f"{fs} at /{self.tree.fs_prefix(fs).decode('utf-8', 'replace')}" for fs in self.shown)
            print(f"mirrorfs: mounted {self.mnt} ({self.names} names; {where}), pid {os.getpid()}", flush=True)
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
            await trio.to_thread.run_sync(self.poker.stop)
            await trio.to_thread.run_sync(self.dropper.stop)
            pyfuse3.terminate()
            nursery.cancel_scope.cancel()

    def run(self) -> None:
        """Mount, serve until SIGINT/SIGTERM (or the engine ends after a non-follow run), unmount, report."""
        mnt = self.mnt
        faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID`: where is each thread stuck?
        target = os.path.realpath(mnt)  # now: once mounted, resolving the path asks the view, not served yet
        pyfuse3.init(self.ops, str(mnt), mount_options(self.fsname, self.shared))
        # the view's mount id, taken now: later, a renamed directory above MNT could aim the path elsewhere
        root = os.open(mnt, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            self.poker.set_root(mnt, mount_id(root))
        finally:
            os.close(root)
        switch = sys.getswitchinterval()
        sys.setswitchinterval(min(switch, SWITCH_S))
        try:
            trio.run(self._main, target)
        finally:
            sys.setswitchinterval(switch)
            pyfuse3.close(unmount=True)
        if mount_type(mnt) == FSTYPE:
            unmount(mnt, lazy=True)
        if self.loop is not None and self.loop.error is not None:
            raise self.loop.error
        poker = self.poker
        refused = poker.refused + self.ops.refused  # paths and requests outside the mount / the staged change
        eio = sum(self.reads.errors.values())
        print(f"mirrorfs: unmounted {mnt} ({poker.done} mutations poked, {poker.fallbacks} applied directly"
              f"{f', {refused} refused' if refused else ''}{f', {eio} reads answered EIO' if eio else ''})",
              file=sys.stderr)


def serve_log(engine, state, mnt: Path, *, follow: bool, allow_other: bool = False, assemble: bool = False,
              live: Callable | None = None, finished: Callable[[], bool] | None = None,
              group: int | None = None, since: int = 1, keep_until: int | None = None,
              on_segment: Callable[[int], None] | None = None) -> None:
    """`replay [--follow] --mount` and `mount`: catch up with the log (events to DIR/events.jsonl), build the
    view, then serve it while (with follow) the engine keeps following the log. From a retention checkpoint:
    records from `since`, the events up to `keep_until` kept."""
    from inference.eventlog import EventLog
    from tap.writelog import LogFollower

    with EventLog(state.path / "events.jsonl", truncate=True, keep_until=keep_until) as events, \
            LogFollower(state.log, since) as follower:
        services = live(follower, events) if live is not None and follow else None  # issue 5's socket, metrics
        loop = Runner(engine, follower, follow=follow, finished=finished, watch=(state.path,))
        loop.on_segment = on_segment
        loop.sinks.append(events.append)
        try:
            loop.catch_up()
            if not follow:
                loop.run()  # drains nothing more, then finishes: the view shows the log's end state
            server = ViewServer(engine, Path(mnt), loop if follow else None, allow_other=allow_other,
                                assemble=assemble, fsname=f"mirrorfs:{engine.vm or state.path.name}", group=group)
            metrics = getattr(services, "metrics", None)
            if metrics is not None:
                metrics.reads = server.reads  # the view's read errors join the engine's metrics
            server.run()
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
