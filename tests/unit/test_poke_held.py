"""What the poke helper's speed-ups must keep true (issue 12): directories held open across a run of changes still
lead where each change's path says (a rename or rmdir re-aims a path), nothing of the mount stays open once the
queue is empty (`mirrorfs umount`), and a file's cached pages are dropped exactly when a reader may hold some.

No FUSE mount here: a plain directory stands in for the mount, as in test_view_confinement.py.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import trio

from inference.events import Mutation
from inference.view import Entry
from mirrorfs.view.ops import Stage, ViewOps
from mirrorfs.view.poke import Poker, mount_id
from mirrorfs.view.serve import ViewServer
from mirrorfs.view.tree import Applied, ViewTree


class _Poker(Poker):
    """Each syscall that succeeds counts as applied, as the FUSE handler of the real mount would mark it (here a
    plain directory stands in: no handler runs)."""

    def _syscall(self, m: Mutation, keep_open: bool = False) -> int | None:
        fd = super()._syscall(m, keep_open=keep_open)
        self.stage.current.applied = True
        return fd

    def _truncate(self, f: int, m: Mutation) -> None:
        super()._truncate(f, m)
        self.stage.current.applied = True


def _poker(mnt: Path, done: list[Mutation] | None = None) -> tuple[Poker, list[Mutation]]:
    direct: list[Mutation] = []

    def apply_direct(m: Mutation) -> Applied:
        direct.append(m)
        return Applied()

    poker = _Poker(Stage(), lambda fs: b"", apply_direct, lambda applied, m: None,
                  on_done=done.append if done is not None else None)
    fd = os.open(mnt, os.O_PATH | os.O_DIRECTORY)
    try:
        poker.set_root(mnt, mount_id(fd))
    finally:
        os.close(fd)
    return poker, direct


def _ev(kind: str, path: str, **kw) -> Mutation:
    return Mutation(seq=1, time=1.0, kind=kind, path=path, fs="disk", **kw)


def _fds_into(path: Path) -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target == str(path) or target.startswith(str(path) + "/"):
            out.append(target)
    return out


def test_held_directories_follow_renames_and_rmdirs(tmp_path):
    """A path whose directory was renamed away or removed and made again names the new directory: the held fd
    of the old one is not used for it."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    poker, direct = _poker(mnt)
    for m in (_ev("mkdir", "/a"), _ev("create", "/a/x"), _ev("rename", "/b", old_path="/a"), _ev("mkdir", "/a"),
              _ev("create", "/a/y"),
              _ev("mkdir", "/c"), _ev("create", "/c/x"), _ev("delete", "/c/x"), _ev("rmdir", "/c"),
              _ev("mkdir", "/c"), _ev("create", "/c/z")):
        poker.poke(m)
    assert direct == [] and poker.refused == 0
    assert sorted(os.listdir(mnt / "a")) == ["y"] and sorted(os.listdir(mnt / "b")) == ["x"]
    assert os.listdir(mnt / "c") == ["z"]
    assert _fds_into(mnt), "a run of changes keeps its directories open"


def test_nothing_of_the_mount_stays_open_once_the_queue_is_empty(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    done: list[Mutation] = []
    poker, direct = _poker(mnt, done)
    events = [_ev("mkdir", "/d"), *(_ev("create", f"/d/f{i}") for i in range(20))]
    poker.start()
    try:
        poker.submit(events)
        deadline = time.monotonic() + 10
        while (len(done) < len(events) or poker._held) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(done) == len(events) and direct == []
        assert sorted(os.listdir(mnt / "d")) == sorted(f"f{i}" for i in range(20))
        assert not poker._held and _fds_into(mnt) == []
    finally:
        poker.stop(10)
    assert not poker.thread.is_alive()


def _entry(path: bytes, ino: int, type_: str = "file") -> Entry:
    mode = (stat.S_IFDIR | 0o755) if type_ == "dir" else (stat.S_IFREG | 0o644)
    return Entry(path=path, ino=ino, type=type_, mode=mode, uid=0, gid=0, size=5, mtime_ns=1, ctime_ns=1,
                 links=1, rdev=0, target=None, xattrs=None)


def test_pages_are_dropped_only_for_files_a_reader_opened():
    """A file never opened for reading has no page in the kernel's cache: its changes drop nothing (a thread
    hand-off per modify); once a reader opened it (less +F, tail -f, mmap), every change drops its pages."""
    tree = ViewTree(["disk"])
    tree.load("disk", [_entry(b"/", 2, "dir"), _entry(b"/f", 12), _entry(b"/g", 13)])
    stage = Stage()
    stage.tid = threading.get_native_id()
    ops = ViewOps(tree, stage, lambda *a: b"", lambda: None)
    trio.run(ops.open, 13, os.O_RDONLY, SimpleNamespace(pid=stage.tid + 1))
    assert tree.nodes[13].opened and not tree.nodes[12].opened

    dropped: list[int] = []
    server = SimpleNamespace(tree=tree, dropper=SimpleNamespace(drop=lambda nid: dropped.append(nid) or
                                                                 SimpleNamespace(wait=lambda t: True)))
    for ino in (12, 13):
        m = _ev("modify", "/f" if ino == 12 else "/g", ino=ino, size=10)
        ViewServer._invalidate(server, Applied(), m)
        ViewServer._before_growth(server, m)
    assert dropped == [13, 13]

    # the guest reuses the opened file's inode number while the kernel may still hold the old inode's pages
    tree.remember(13)  # the kernel still holds it
    tree.apply(_ev("delete", "/g", ino=13))
    tree.apply(_ev("create", "/h", ino=13, type="file", size=0))
    assert tree.nodes[13].opened


def test_a_held_directory_takes_no_unchecked_name(tmp_path):
    """The held parent's shortcut still checks what it is given: a relative path or a bad last name is refused
    even right after a change in the same directory."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    poker, direct = _poker(mnt)
    bad = (_ev("create", "rel"), _ev("create", "/.."), _ev("create", "/d/.."), _ev("mkdir", "/d/"))
    poker.poke(_ev("mkdir", "/d"))
    for i, m in enumerate(bad):
        poker.poke(_ev("create", f"/d/ok{i}"))  # /d held again
        poker.poke(m)
    assert poker.refused == len(bad) and direct == []
    assert os.listdir(mnt) == ["d"] and sorted(os.listdir(mnt / "d")) == [f"ok{i}" for i in range(len(bad))]


def _queued(poker: Poker) -> list[tuple[str, str]]:
    return [(m.kind, m.path) for m in poker.queue]


def test_a_new_files_content_change_rides_on_its_create_at_the_same_point(tmp_path, monkeypatch):
    """A create and the modify of the same new file at one point are one open(O_CREAT) + ftruncate + close (the
    kernel raises CREATE, MODIFY, CLOSE_WRITE, as for the guest's creat + write + close); other files' creates
    and modifies between them do not keep them apart; anything that could move or reuse the file does, and so
    does a later point unless the helper is BURST changes behind."""
    import mirrorfs.view.poke as poke

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    done: list[Mutation] = []
    poker, direct = _poker(mnt, done)

    def ev(kind: str, path: str, ino: int, seq: int = 1, **kw) -> Mutation:
        return Mutation(seq=seq, time=1.0, kind=kind, path=path, fs="disk", ino=ino, **kw)

    batch = [ev("create", "/a", 11), ev("create", "/b", 12), ev("modify", "/b", 12, size=7),
             ev("modify", "/a", 11, size=5),
             ev("create", "/c", 13), ev("delete", "/b", 12), ev("modify", "/c", 13, size=3),  # a delete between
             ev("create", "/d", 14), ev("modify", "/d", 14, seq=2, size=4),                    # another point
             ev("create", "/e", 15), ev("modify", "/e", 15, size=2), ev("modify", "/e", 15, size=9)]
    poker.submit(batch)
    assert _queued(poker) == [("create", "/a"), ("create", "/b"), ("create", "/c"), ("delete", "/b"),
                              ("modify", "/c"), ("create", "/d"), ("modify", "/d"), ("create", "/e"),
                              ("modify", "/e")]
    assert poker.joined == 3
    poker.start()
    try:
        deadline = time.monotonic() + 10
        while len(done) < len(batch) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        poker.stop(10)
    assert sorted(id(m) for m in done) == sorted(id(m) for m in batch) and direct == [] and poker.fallbacks == 0
    assert poker.done == len(batch)
    assert {p.name: p.stat().st_size for p in mnt.iterdir()} == {"a": 5, "c": 3, "d": 4, "e": 9}
    assert not poker._creates and not poker._riders  # nothing left behind once the queue is empty

    # far behind, a create still queued takes the content change of a later point too; one already begun does not
    monkeypatch.setattr(poke, "BURST", 2)
    poker2, _ = _poker(tmp_path)
    poker2.submit([ev("create", "/x", 21), ev("create", "/y", 22), ev("modify", "/x", 21, seq=3, size=1)])
    assert poker2.joined == 1 and _queued(poker2) == [("create", "/x"), ("create", "/y")]
    with poker2.cond:  # the helper begins the create of /y (as _loop does)
        begun = poker2.queue.pop()
        del poker2._creates[(begun.fs, begun.ino)]
    poker2.submit([ev("create", "/z", 23), ev("modify", "/y", 22, seq=4, size=1)])
    assert poker2.joined == 1 and _queued(poker2) == [("create", "/x"), ("create", "/z"), ("modify", "/y")]
