"""History pieces without a disk (issue 14): WHEN, the event index and its inode lives, content hashes, the
bodyfile line, and restore's refusal of names that would lead outside DEST."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import stat
from pathlib import Path

import pytest

from inference.events import Mutation
from inference.hashes import Hasher
from inference.history import HistoryIndex
from inference.view import Entry
from mirrorfs.cli.history import Restorer, join_at, parse_when
from mirrorfs.stream.render import format_bodyfile, format_time

NOW = 1_800_000_000 * 10**9


def test_when_forms() -> None:
    assert parse_when("4711") == (4711, None)
    assert parse_when("0") == (0, None)
    assert parse_when("-90s", NOW) == (None, NOW - 90 * 10**9)
    assert parse_when("-5min", NOW) == (None, NOW - 300 * 10**9)
    assert parse_when("-2h", NOW) == (None, NOW - 7200 * 10**9)
    assert parse_when("2026-12-01T23:57:42Z") == (None, 1_796_169_462 * 10**9)
    local = dt.datetime(2026, 12, 1, 23, 57, 42, 500000).timestamp()
    assert parse_when("2026-12-01T23:57:42.5") == (None, int(local * 1e9))  # no zone: local time
    with pytest.raises(ValueError, match="ISO-8601"):
        parse_when("yesterday")
    assert join_at(["cat", "--at", "-90s", "/x"]) == ["cat", "--at=-90s", "/x"]


def ev(seq: int, kind: str, path: str, ino: int, **kw) -> Mutation:
    return Mutation(seq=seq, time=seq, kind=kind, path=path, fs="p1", ino=ino, type=kw.pop("type", "file"), **kw)


def write(path: Path, events: list[Mutation], mode: str = "a") -> None:
    with open(path, mode) as f:
        for i, e in enumerate(events):
            e.id = f"{e.seq}-{i + 1}"
            f.write(e.to_json() + "\n")


def test_index_follows_renames_and_splits_reused_inodes(tmp_path: Path) -> None:
    log = tmp_path / "events.jsonl"
    first_life = [ev(1, "create", "/a", 5, size=0, links=1), ev(2, "modify", "/a", 5, size=3, links=1),
                  ev(3, "rename", "/b", 5, old_path="/a", links=1), ev(4, "attrib", "/b", 5, links=1, mode=0o600)]
    write(log, first_life + [ev(5, "create", "/other", 6, links=1)])
    index = HistoryIndex(log, tmp_path / "history.db")
    assert index.update() == 5
    assert [e.seq for e in index.versions("/b")] == [1, 2, 3, 4]
    assert [e.seq for e in index.versions("/a")] == [1, 2, 3, 4]  # the name it had before the rename
    write(log, [ev(6, "delete", "/b", 5, links=0), ev(7, "create", "/a", 5, links=1)])  # the number reused
    assert index.update() == 2  # only what was appended
    assert [e.seq for e in index.versions("/a")] == [1, 2, 3, 4, 6, 7]
    assert [e.seq for e in index.versions("/b")] == [1, 2, 3, 4, 6]  # not the new file that got number 5
    assert index.versions("/a", fs="p9") == []
    index.close()
    write(log, [ev(1, "create", "/z", 9, links=1)], mode="w")  # a replay rewrote the log: indexed anew
    again = HistoryIndex(log, tmp_path / "history.db")
    again.update()
    assert again.versions("/a") == [] and [e.seq for e in again.versions("/z")] == [1]
    again.close()


def test_hasher_hashes_content_events_and_reuses_for_the_rest() -> None:
    content = {5: b"hello", 6: b"x" * 100}
    reads: list[int] = []

    def read(ino: int, off: int, n: int) -> bytes:
        reads.append(ino)
        return content[ino][off:off + n]

    h = Hasher(read, limit=50)
    evs = [ev(1, "create", "/a", 5, size=5), ev(1, "modify", "/a", 5, size=5), ev(2, "rename", "/b", 5, size=5),
           ev(2, "modify", "/big", 6, size=100), ev(3, "mkdir", "/d", 7, type="dir", size=4096)]
    h.stamp(evs)
    assert [e.sha256 for e in evs[:3]] == [hashlib.sha256(b"hello").hexdigest()] * 3
    assert reads == [5]  # one point, one read; the rename costs nothing
    assert evs[3].sha256 is None and evs[3].hash_skipped is True
    assert evs[4].sha256 is None and evs[4].hash_skipped is None
    content[5] = b"HELLO"
    later = [ev(4, "modify", "/b", 5, size=5)]
    h.stamp(later)
    assert later[0].sha256 == hashlib.sha256(b"HELLO").hexdigest()
    off = [ev(5, "modify", "/b", 5, size=5)]
    Hasher(read, limit=None).stamp(off)
    assert off[0].sha256 is None and off[0].hash_skipped is None
    assert '"sha256"' in later[0].to_json() and '"hash_skipped"' not in later[0].to_json()


def test_timefmt() -> None:
    t = 1_796_169_462.25
    assert format_time(t, "iso") == dt.datetime.fromtimestamp(t).astimezone().isoformat(timespec="microseconds")
    assert format_time(t, "%s") == "1796169462"
    assert format_time(t, None) == dt.datetime.fromtimestamp(t).strftime("%H:%M:%S")


def test_bodyfile_lines() -> None:
    d = ev(9, "delete", "/tmp/a|b\n", 12, size=7, mode=0o644, uid=1, gid=2, atime_ns=10**9, mtime_ns=2 * 10**9,
           ctime_ns=3 * 10**9)
    assert format_bodyfile(d) == "0|/tmp/a\\|b\\n (deleted)|12|r/rrw-r--r--|1|2|7|1|2|3|0"
    link = ev(9, "symlink", "/l", 13, type="symlink", target="/etc", mode=0o777, size=4)
    assert format_bodyfile(link).split("|")[1:4] == ["/l -> /etc", "13", "l/lrwxrwxrwx"]


class FakeView:
    """The three calls Restorer makes of inference/view.py EngineView, over a hand-made hostile tree."""

    def __init__(self, tree: dict[int, tuple[Entry, dict[bytes, int]]], data: dict[int, bytes]) -> None:
        self.tree, self.data = tree, data

    def stat(self, fs: str, ino: int) -> Entry:
        return self.tree[ino][0]

    def children(self, fs: str, ino: int) -> list[tuple[bytes, int]]:
        return sorted(self.tree[ino][1].items())

    def read(self, fs: str, ino: int, off: int, n: int) -> bytes:
        return self.data[ino][off:off + n]


def entry(ino: int, kind: str, mode: int, size: int = 0, target: bytes | None = None, links: int = 1) -> Entry:
    bits = {"dir": stat.S_IFDIR, "file": stat.S_IFREG, "symlink": stat.S_IFLNK}[kind]
    return Entry(path=b"", ino=ino, type=kind, mode=bits | mode, uid=0, gid=0, size=size, mtime_ns=10**18,
                 ctime_ns=10**18, links=links, rdev=0, target=target, xattrs=None, atime_ns=10**18)


def test_restore_never_writes_outside_dest(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    view = FakeView({
        2: (entry(2, "dir", 0o555), {b"..": 3, b"a/b": 3, b"up": 4, b"sub": 5, b"f": 3}),
        3: (entry(3, "file", 0o4755, size=4, links=2), {}),
        4: (entry(4, "symlink", 0o777, size=len(str(outside)), target=str(outside).encode()), {}),
        5: (entry(5, "dir", 0o700), {b"g": 3}),
    }, {3: b"data"})
    fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    try:
        count = Restorer(view, "p1", fd).restore(2, b"root")
    finally:
        os.close(fd)
    assert count == 5  # root, f, up, sub, sub/g: not '..' nor 'a/b'
    assert list(outside.iterdir()) == []
    assert sorted(os.listdir(dest / "root")) == ["f", "sub", "up"]
    assert os.readlink(dest / "root" / "up") == str(outside)
    assert (dest / "root" / "sub" / "g").read_bytes() == b"data"
    assert (dest / "root" / "sub" / "g").stat().st_ino == (dest / "root" / "f").stat().st_ino  # one inode again
    assert stat.S_IMODE((dest / "root").stat().st_mode) == 0o555  # set after its contents were written
    assert stat.S_IMODE((dest / "root" / "f").stat().st_mode) == 0o4755
    assert (dest / "root" / "f").stat().st_mtime_ns == 10**18
    fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(FileExistsError):
            Restorer(view, "p1", fd).restore(3, b"root")  # nothing is overwritten
    finally:
        os.close(fd)
