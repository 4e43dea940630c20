"""Issue 17 without FUSE: every stat field the view answers is the guest inode's (blocks, atime, directory
sizes), listxattr lists only the guest's names, and inode flags travel in events by name."""

from __future__ import annotations

import os
import stat
import threading

import pyfuse3
import trio

from inference.events import CHATTR_MASK, INODE_FLAGS, Mutation, flag_bits, flag_names
from inference.view import EngineView, Entry
from mirrorfs.view.ops import Stage, ViewOps
from mirrorfs.view.tree import ViewTree

IMMUTABLE, APPEND, EXTENTS = INODE_FLAGS["immutable"][0], INODE_FLAGS["append"][0], INODE_FLAGS["extents"][0]


def _entry(path: bytes, ino: int, type_: str = "file", **kw) -> Entry:
    ifmt = {"file": stat.S_IFREG, "dir": stat.S_IFDIR, "symlink": stat.S_IFLNK}[type_]
    base = dict(uid=0, gid=0, size=0, mtime_ns=1, ctime_ns=1, links=2 if type_ == "dir" else 1, rdev=0,
                target=None, xattrs=None)
    base.update(kw)
    return Entry(path=path, ino=ino, type=type_, mode=ifmt | 0o644, **base)


def _ops() -> ViewOps:
    tree = ViewTree(["disk"])
    tree.load("disk", [
        _entry(b"/", 2, "dir", size=1024, blocks=2, blksize=1024),
        _entry(b"/sparse", 12, size=3 << 20, blocks=400, atime_ns=1_577_836_800_123_456_789,
               mtime_ns=1_700_000_000_000_000_001, ctime_ns=1_700_000_000_000_000_002, flags=EXTENTS,
               xattrs={"user.k": b"v", "system.posix_acl_access": b"\x02\0\0\0"}),
        _entry(b"/fast", 13, "symlink", size=3, blocks=0, target=b"abc"),
    ])
    stage = Stage()
    stage.tid = threading.get_native_id()
    return ViewOps(tree, stage, lambda *a: b"", lambda: pyfuse3.StatvfsData())


def _ev(kind: str, path: str, **kw) -> Mutation:
    return Mutation(seq=9, time=2.0, kind=kind, path=path, fs="disk", **kw)


def test_stat_fields_are_the_inodes():
    ops = _ops()
    a = ops.attrs(ops.tree.nodes[12])
    assert a.st_blocks == 400 and a.st_size == 3 << 20               # i_blocks, not (size + 511) // 512
    assert a.st_atime_ns == 1_577_836_800_123_456_789                 # atime, not mtime
    assert (a.st_mtime_ns, a.st_ctime_ns) == (1_700_000_000_000_000_001, 1_700_000_000_000_000_002)
    assert ops.attrs(ops.tree.nodes[13]).st_blocks == 0               # a fast symlink has no block
    assert ops.attrs(ops.tree.nodes[1]).st_size == 1024
    assert a.st_blksize == 1024                                       # the file system's block size


def test_listxattr_lists_only_the_guests_names_and_own_facts_stay_readable_by_name():
    ops = _ops()
    names = trio.run(ops.listxattr, 12, None)
    assert sorted(names) == [b"system.posix_acl_access", b"user.k"]
    assert trio.run(ops.getxattr, 12, b"user.mirrorfs.ino", None) == b"12"
    assert trio.run(ops.getxattr, 12, b"user.mirrorfs.blocks", None) == b"400"
    assert trio.run(ops.getxattr, 12, b"user.mirrorfs.flags", None) == b"0x0"  # chattr's only (not extents)
    ops.tree.nodes[12].xattrs["user.mirrorfs.ino"] = b"guest's"       # the guest's own xattr of that name wins
    assert trio.run(ops.getxattr, 12, b"user.mirrorfs.ino", None) == b"guest's"


def test_events_carry_blocks_atime_and_flags_to_the_view():
    t = _ops().tree
    t.apply(_ev("attrib", "/sparse", flags=["immutable", "append"], old_flags=[], atime_ns=5, blocks=402))
    node = t.nodes[12]
    assert node.flags == IMMUTABLE | APPEND | EXTENTS and node.atime_ns == 5 and node.blocks == 402
    t.apply(_ev("attrib", "/sparse", flags=["append"], old_flags=["immutable", "append"]))
    assert node.flags == APPEND | EXTENTS                              # the file system's own flags stay
    t.apply(_ev("modify", "/sparse", size=10, ranges=[(0, 10)]))      # no flags named: they stay as they were
    assert node.flags == APPEND | EXTENTS


def test_directory_size_follows_the_engine_and_a_files_atime_but_not_its_size():
    t = _ops().tree
    grown = _entry(b"", 2, "dir", size=6144, blocks=12)
    assert t.set_attrs(1, grown) and t.nodes[1].size == 6144 and t.nodes[1].blocks == 12
    assert not t.set_attrs(1, grown)
    read = _entry(b"", 12, size=1, atime_ns=42, blocks=400, flags=EXTENTS, mtime_ns=5)
    assert t.set_attrs(12, read) and t.nodes[12].atime_ns == 42
    assert t.nodes[12].size == 3 << 20 and t.nodes[12].mtime_ns == 1_700_000_000_000_000_001  # events' only


def test_flag_names():
    assert flag_names(IMMUTABLE | EXTENTS) == ["immutable"]          # extents is the file system's, not chattr's
    assert flag_names(IMMUTABLE | EXTENTS, mask=~0) == ["immutable", "extents"]
    assert flag_bits(["immutable", "append", "nonsense"]) == IMMUTABLE | APPEND
    assert not EXTENTS & CHATTR_MASK
    assert Mutation.from_json(_ev("attrib", "/x", flags=[], old_flags=["immutable"]).to_json()).old_flags == \
        ["immutable"]


def _reconciler():
    from inference.reconcile import Reconciler
    from inference.shadow import ROOT_INO, Node, ShadowTree

    tree = ShadowTree()
    tree.add_node(Node(ino=ROOT_INO, type="dir", mode=0o40755, links=2))
    tree.add_node(Node(ino=12, type="file", mode=0o100644, links=1, size=5, mtime_ns=10, ctime_ns=10, atime_ns=10,
                       blocks=8, flags=EXTENTS))
    tree.add_name(ROOT_INO, b"f", 12)
    return Reconciler(tree)


def _point(r, seq: int, **changed) -> list[Mutation]:
    from dataclasses import replace

    from inference.reconcile import Change, Context

    node = r.tree.nodes[12]
    events, _ = r.apply(Change(inodes={12: replace(node, names=[], **changed)}), Context(seq=seq, time=float(seq)),
                        settled=True)
    return events


def test_chattr_flags_are_attrib_events_by_name_and_a_read_is_none():
    r = _reconciler()
    (ev,) = _point(r, 1, flags=EXTENTS | IMMUTABLE, ctime_ns=11)            # chattr +i
    assert (ev.kind, ev.flags, ev.old_flags, ev.blocks) == ("attrib", ["immutable"], [], 8)
    (ev,) = _point(r, 2, flags=EXTENTS | IMMUTABLE | APPEND, ctime_ns=12)   # chattr +a
    assert (ev.flags, ev.old_flags) == (["immutable", "append"], ["immutable"])
    (ev,) = _point(r, 3, flags=EXTENTS | APPEND, ctime_ns=13)               # chattr -i
    assert (ev.flags, ev.old_flags) == (["append"], ["immutable", "append"])
    assert _point(r, 4, flags=APPEND) == []                                 # the file system's own flag: no event
    handler = type("H", (), {"reconciler": r, "tree": r.tree})()
    fs = type("F", (), {"handler": handler})()
    engine = type("E", (), {"filesystems": {"disk": fs}, "lock": threading.RLock()})()
    view = EngineView(engine)
    assert view.take_quiet("disk") == [] and r.quiet == set()               # a view asks: collecting starts
    assert _point(r, 5, atime_ns=99) == [] and r.quiet == {12}              # a read moves atime alone: no event;
    (quiet,) = view.take_quiet("disk")                                      # the view takes it when quiet
    assert (quiet.ino, quiet.atime_ns) == (12, 99) and not r.quiet
    (ev,) = _point(r, 6, atime_ns=7, ctime_ns=14)                           # touch -a: an attrib event
    assert (ev.kind, ev.atime_ns, ev.flags, ev.old_flags) == ("attrib", 7, ["append"], None)


def test_i_blocks_honours_huge_file(tmp_path):
    """st_blocks is i_blocks: with huge_file, i_blocks_hi counts too, and an inode with EXT4_HUGE_FILE_FL counts
    file-system blocks, not 512-byte sectors (ext4_inode_blocks)."""
    import dataclasses
    import struct
    import subprocess

    from inference.ext import layout as L
    from inference.ext.reader import ExtReader, parse_inode

    img = tmp_path / "fs.img"
    with open(img, "wb") as f:
        f.truncate(8 << 20)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", str(img)], check=True, capture_output=True)
    with open(img, "rb") as f:
        geo = ExtReader(lambda off, n: os.pread(f.fileno(), n, off)).geo
    assert geo.huge_file and geo.inode_size >= 256
    raw = bytearray(geo.inode_size)
    struct.pack_into("<HHI", raw, 0, 0o100644, 0, 1)               # i_mode, i_uid, i_size_lo
    struct.pack_into("<HI", raw, 0x1A, 1, 3)                        # i_links_count, i_blocks_lo
    struct.pack_into("<H", raw, 0x74, 1)                            # l_i_blocks_high
    assert parse_inode(bytes(raw), 12, geo).blocks == 3 + (1 << 32)
    struct.pack_into("<I", raw, 0x20, L.HUGE_FILE_FL)               # i_flags: i_blocks in file-system blocks
    assert parse_inode(bytes(raw), 12, geo).blocks == (3 + (1 << 32)) * 8
    no_huge = dataclasses.replace(geo, huge_file=False)             # without the feature, the high bits mean nothing
    assert parse_inode(bytes(raw), 12, no_huge).blocks == 3


def test_a_directorys_size_reaches_the_view_with_the_entry_event_of_its_point():
    """No quiet period needed: the create that grew /d across a block carries /d's new size, blocks and times
    (`parent`), a rename names both directories, and the view tree takes them as it applies the event."""
    from dataclasses import replace

    from inference.reconcile import Change, Context, Reconciler
    from inference.shadow import ROOT_INO, Node, ShadowTree

    tree = ShadowTree()
    tree.add_node(Node(ino=ROOT_INO, type="dir", mode=0o40755, links=3, size=1024, blocks=2))
    tree.add_node(Node(ino=11, type="dir", mode=0o40755, links=2, size=1024, blocks=2, mtime_ns=5, ctime_ns=5))
    tree.add_name(ROOT_INO, b"d", 11)
    r = Reconciler(tree)
    view = ViewTree(["disk"])
    view.load("disk", [_entry(b"/", 2, "dir", size=1024, blocks=2, links=3),
                       _entry(b"/d", 11, "dir", size=1024, blocks=2, mtime_ns=5, ctime_ns=5)])
    d = tree.nodes[11]
    grown = replace(d, names=[], size=2048, blocks=4, mtime_ns=20, ctime_ns=20)
    new = Node(ino=13, type="file", mode=0o100644, links=1, mtime_ns=20, ctime_ns=20)
    events, _ = r.apply(Change(inodes={11: grown, 13: new}, dirs={11: {b"x": 13}}, generations={13: True}),
                        Context(seq=1, time=1.0, fs="disk"), settled=True)
    (create,) = events
    assert (create.kind, create.path) == ("create", "/d/x")
    assert create.parent == {"ino": 11, "size": 2048, "blocks": 4, "links": 2, "mtime_ns": 20, "ctime_ns": 20,
                             "atime_ns": 0}
    assert Mutation.from_json(create.to_json()).parent == create.parent
    applied = view.apply(create)
    assert (view.nodes[11].size, view.nodes[11].blocks, view.nodes[11].mtime_ns) == (2048, 4, 20)
    assert 11 in applied.nodes                                          # a direct apply invalidates it
    root = replace(tree.nodes[ROOT_INO], names=[], mtime_ns=30, ctime_ns=30)
    moved = replace(tree.nodes[13], names=[], ctime_ns=30)
    dirs = {ROOT_INO: {b"d": 11, b"x": 13}, 11: {}}
    (rename,), _ = r.apply(Change(inodes={ROOT_INO: root, 11: replace(grown, mtime_ns=30, ctime_ns=30), 13: moved},
                                  dirs=dirs), Context(seq=2, time=2.0, fs="disk"), True)
    assert (rename.kind, rename.parent["ino"], rename.old_parent["ino"]) == ("rename", ROOT_INO, 11)
    view.apply(rename)
    assert view.nodes[1].mtime_ns == 30 and view.nodes[11].mtime_ns == 30
    same = _ev("rename", "/x", old_path="/y", ino=13)                   # older streams: no parent, as before
    assert same.to_dict().get("parent") is None


def _listing(ops: ViewOps, nid: int) -> list[bytes]:
    fh = trio.run(ops.opendir, nid, None)
    try:
        return [name for name, _ in ops._dirs[fh]]
    finally:
        trio.run(ops.releasedir, fh)


def test_cached_attributes_and_listings_follow_every_change_of_the_tree():
    """The view keeps each node's attributes and each directory's listing until the tree changes (a `find -ls` of
    an unchanged tree builds none): every way the tree changes (a mutation, the engine's quiet attributes) must
    show in the next stat and listing, or the kernel would be handed stale ones."""
    ops = _ops()
    first = ops.attrs(ops.tree.nodes[12])
    assert ops.attrs(ops.tree.nodes[12]) is first                    # unchanged tree: the same answer, cached
    assert _listing(ops, 1) == [b".", b"..", b"fast", b"sparse"]
    ops.tree.apply(_ev("modify", "/sparse", ino=12, size=10, ranges=[(0, 10)], mtime_ns=77))
    a = ops.attrs(ops.tree.nodes[12])
    assert (a.st_size, a.st_mtime_ns) == (10, 77)
    ops.tree.apply(_ev("attrib", "/sparse", ino=12, mode=0o600))
    assert stat.S_IMODE(ops.attrs(ops.tree.nodes[12]).st_mode) == 0o600
    assert ops.tree.set_attrs(12, _entry(b"", 12, atime_ns=4242, blocks=400, flags=EXTENTS))  # a read in the guest
    assert ops.attrs(ops.tree.nodes[12]).st_atime_ns == 4242
    ops.tree.apply(_ev("create", "/new", ino=14, type="file", mode=0o644))
    assert _listing(ops, 1) == [b".", b"..", b"fast", b"new", b"sparse"]
    ops.tree.apply(_ev("link", "/again", ino=12, target="/sparse", links=2))
    assert ops.attrs(ops.tree.nodes[12]).st_nlink == 2
    ops.tree.apply(_ev("rename", "/again", old_path="/new", ino=14))  # over the link: /sparse has one name again
    assert _listing(ops, 1) == [b".", b"..", b"again", b"fast", b"sparse"]
    assert ops.tree.nodes[12].names == [(1, b"sparse")]
    ops.tree.apply(_ev("delete", "/again", ino=14))
    assert _listing(ops, 1) == [b".", b"..", b"fast", b"sparse"]
