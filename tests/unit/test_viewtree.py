"""The FUSE view's own tree: snapshot loading and every mutation kind, without FUSE."""

from __future__ import annotations

import stat

import pytest

from inference.events import ErrorEvent, Mutation
from inference.view import Entry
from mirrorfs.view.tree import ROOT_ID, ViewError, ViewTree


def entry(path: bytes, ino: int, type_: str = "file", mode: int = 0o644, **kw) -> Entry:
    ifmt = {"file": stat.S_IFREG, "dir": stat.S_IFDIR, "symlink": stat.S_IFLNK}[type_]
    base = dict(uid=0, gid=0, size=0, mtime_ns=1, ctime_ns=1, links=2 if type_ == "dir" else 1, rdev=0,
                target=None, xattrs=None)
    base.update(kw)
    return Entry(path=path, ino=ino, type=type_, mode=ifmt | mode, **base)


def tree() -> ViewTree:
    t = ViewTree(["disk"])
    t.load("disk", [entry(b"/", 2, "dir", 0o755), entry(b"/etc", 12, "dir"), entry(b"/etc/passwd", 13, size=10),
                    entry(b"/hard", 13, size=10, links=2), entry(b"/ln", 14, "symlink", 0o777, target=b"etc")])
    return t


def ev(kind: str, path: str, **kw) -> Mutation:
    made = ErrorEvent if kind == "error" else Mutation
    return made(seq=kw.pop("seq", 7), time=1.5, kind=kind, path=path, fs="disk", **kw)


def test_load_single_fs_at_root_with_guest_inode_numbers():
    t = tree()
    assert t.nodes[ROOT_ID].st_ino == 2
    assert t.resolve("disk", b"/etc/passwd") == 13 == t.resolve("disk", b"/hard")
    assert sorted(t.nodes[13].names) == [(ROOT_ID, b"hard"), (12, b"passwd")]
    assert t.nodes[14].target == b"etc"
    assert t.resolve("disk", b"/ln/passwd") is None  # a symlink is not a directory of the view


def test_several_file_systems_get_a_directory_each():
    t = ViewTree(["p2", "p1"], names={"p1": b"boot", "p2": b"p2"})
    t.load("p1", [entry(b"/", 2, "dir"), entry(b"/a", 12)])
    t.load("p2", [entry(b"/", 2, "dir"), entry(b"/a", 12)])
    assert sorted(t.nodes[ROOT_ID].children) == [b"boot", b"p2"]
    a1, a2 = t.resolve("p1", b"/a"), t.resolve("p2", b"/a")
    assert a1 != a2 and a1 & 0xFFFFFFFF == a2 & 0xFFFFFFFF == 12
    assert t.fs_prefix("p2") == b"p2" and t.fs_prefix("p1") == b"boot"
    assert [n for n, _ in t.listing(ROOT_ID)] == [b"boot", b"p2"] and t.parent(t.fs_root["p1"]) == ROOT_ID


def assembled() -> ViewTree:
    """p1 at the root (its /etc/fstab mounts p2 on /data and p5 on /data/srv); p1's own /data has a file."""
    t = ViewTree(["p1", "p2", "p5"], root="p1")
    t.load("p1", [entry(b"/", 2, "dir"), entry(b"/data", 12, "dir"), entry(b"/etc", 13, "dir"),
                  entry(b"/data/under", 14)])
    t.load("p2", [entry(b"/", 2, "dir"), entry(b"/srv", 12, "dir"), entry(b"/f2", 13)])
    t.load("p5", [entry(b"/", 2, "dir"), entry(b"/f5", 12)])
    assert t.mount("p2", b"/data") is None
    assert t.mount("p5", b"/data/srv") is None
    return t


def test_assembled_mounts_cover_directories():
    t = assembled()
    data = t.lookup(ROOT_ID, b"data")
    assert data.nid == t.fs_root["p2"] and data.fs == "p2"
    assert [n for n, _ in t.listing(data.nid)] == [b"f2", b"srv"]
    srv = t.lookup(data.nid, b"srv")
    assert srv.fs == "p5" and t.lookup(srv.nid, b"f5").ino == 12
    assert t.parent(srv.nid) == data.nid and t.parent(data.nid) == ROOT_ID
    assert t.nodes[ROOT_ID].st_ino == 2 and t.resolve("p1", b"/etc") == 13  # the root fs keeps guest numbers
    assert (t.fs_prefix("p1"), t.fs_prefix("p2"), t.fs_prefix("p5")) == (b"", b"data", b"data/srv")
    # what lies under a mount point is not visible, and changes there raise no event
    assert t.hidden("p1", b"/data/under") and t.hidden("p1", b"/data") and not t.hidden("p1", b"/etc/x")
    assert t.hidden("p2", b"/srv/x") and not t.hidden("p2", b"/f2") and not t.hidden("p5", b"/f5")
    t.apply(Mutation(seq=1, time=1.0, kind="create", path="/data/new", fs="p1", ino=20, type="file"))
    assert t.resolve("p1", b"/data/new") == 20 and t.lookup(data.nid, b"new") is None
    t.apply(Mutation(seq=2, time=1.0, kind="create", path="/g2", fs="p2", ino=30, type="file"))
    assert t.lookup(data.nid, b"g2").ino == 30
    assert t.mount("p2", b"/etc/passwd") is not None and t.mount("p2", b"/nowhere") is not None


def test_file_systems_outside_the_layout_are_hidden():
    t = ViewTree(["p1", "p3"], root="p1")
    t.load("p1", [entry(b"/", 2, "dir")])
    t.load("p3", [entry(b"/", 2, "dir")])
    assert t.fs_prefix("p3") is None and t.hidden("p3", b"/x") and t.listing(ROOT_ID) == []


def test_create_mkdir_symlink_take_the_event_attributes():
    t = tree()
    t.apply(ev("mkdir", "/etc/d", ino=20, type="dir", mode=0o750, uid=5, links=2))
    t.apply(ev("create", "/etc/d/f", ino=21, type="file", mode=0o600, size=3, mtime_ns=99))
    t.apply(ev("symlink", "/etc/s", ino=22, type="symlink", mode=0o777, target="/x"))
    d, f, s = (t.nodes[t.resolve("disk", p)] for p in (b"/etc/d", b"/etc/d/f", b"/etc/s"))
    assert stat.S_ISDIR(d.mode) and stat.S_IMODE(d.mode) == 0o750 and d.uid == 5
    assert stat.S_ISREG(f.mode) and f.size == 3 and f.mtime_ns == 99 and f.seq == 7 and f.mut_time == 1.5
    assert stat.S_ISLNK(s.mode) and s.target == b"/x"
    assert t.nodes[12].links == 3  # the new subdirectory's ..


def test_link_delete_and_hard_link_counts():
    t = tree()
    t.apply(ev("link", "/etc/again", ino=13, type="file", links=3, target="/etc/passwd"))
    assert t.resolve("disk", b"/etc/again") == 13 and t.nodes[13].links == 3
    t.apply(ev("delete", "/hard", ino=13, links=2))
    assert t.resolve("disk", b"/hard") is None and t.nodes[13].links == 2
    t.apply(ev("delete", "/etc/passwd", ino=13, links=1))
    t.apply(ev("delete", "/etc/again", ino=13, links=0))
    assert 13 not in t.nodes


def test_unlinked_node_lives_while_the_kernel_holds_it():
    t = tree()
    t.remember(14)
    t.apply(ev("delete", "/ln", ino=14, links=0))
    assert 14 in t.nodes and t.nodes[14].links == 0
    t.forget(14, 1)
    assert 14 not in t.nodes


def test_rename_moves_and_replaces():
    t = tree()
    t.apply(ev("mkdir", "/d", ino=30, type="dir", links=2))
    t.apply(ev("rename", "/d/p", old_path="/etc/passwd", ino=13, ctime_ns=5))
    assert t.resolve("disk", b"/d/p") == 13 and t.resolve("disk", b"/etc/passwd") is None
    assert t.nodes[13].ctime_ns == 5
    t.apply(ev("rename", "/d/p", old_path="/ln", ino=14))  # over an existing name: that name goes
    assert t.resolve("disk", b"/d/p") == 14 and t.nodes[13].names == [(ROOT_ID, b"hard")]
    t.apply(ev("rename", "/etc/d2", old_path="/d", ino=30, type="dir"))
    assert t.resolve("disk", b"/etc/d2/p") == 14
    with pytest.raises(ViewError):
        t.apply(ev("rename", "/etc/d2/x", old_path="/etc", ino=12, type="dir"))


def test_modify_truncate_attrib_xattr():
    t = tree()
    t.apply(ev("modify", "/etc/passwd", ino=13, size=100, mtime_ns=9, ranges=[(0, 100)]))
    assert t.nodes[13].size == 100 and t.nodes[13].mtime_ns == 9
    t.apply(ev("truncate", "/etc/passwd", ino=13, size=4))
    t.apply(ev("attrib", "/etc/passwd", ino=13, mode=0o4711, uid=1000, gid=100))
    n = t.nodes[13]
    assert n.size == 4 and n.mode == stat.S_IFREG | 0o4711 and (n.uid, n.gid) == (1000, 100)
    t.apply(ev("xattr", "/etc/passwd", ino=13, xattr={"user.a": b"1".hex(), "user.b": "00"}))
    t.apply(ev("xattr", "/etc/passwd", ino=13, xattr={"user.b": None}))
    assert n.xattrs == {"user.a": b"1"}


def test_rmdir_and_errors_that_do_not_fit():
    t = tree()
    with pytest.raises(ViewError):
        t.apply(ev("rmdir", "/etc", ino=12, type="dir"))  # not empty
    with pytest.raises(ViewError):
        t.apply(ev("create", "/nowhere/f", ino=40))
    with pytest.raises(ViewError):
        t.apply(ev("delete", "/missing", ino=41))
    t.apply(ev("delete", "/etc/passwd", ino=13, links=1))
    t.apply(ev("rmdir", "/etc", ino=12, type="dir", links=0))
    assert t.resolve("disk", b"/etc") is None and t.nodes[ROOT_ID].links == 2
    assert t.apply(ev("error", "/", message="x")).nodes == []


def test_inode_reuse_gets_a_new_generation():
    t = tree()
    t.remember(14)
    old = t.nodes[14].generation
    t.apply(ev("delete", "/ln", ino=14, links=0))
    t.apply(ev("create", "/new", ino=14, type="file"))
    assert t.nodes[14].generation > old and stat.S_ISREG(t.nodes[14].mode)


def test_directory_attributes_from_the_engine():
    t = tree()
    assert t.set_attrs(12, entry(b"", 12, "dir", mtime_ns=50, ctime_ns=51, links=3))
    assert (t.nodes[12].mtime_ns, t.nodes[12].links) == (50, 3)
    assert not t.set_attrs(12, entry(b"", 12, "dir", mtime_ns=50, ctime_ns=51, links=3))
