"""The view's side of "the guest is hostile": the poke helper cannot leave its root (openat2, the real syscall,
in a tmp dir), the FUSE handlers let the helper change only the staged mutation's own entries, attributes that
do not fit the kernel's types are clamped, and a bad name in a snapshot is left out instead of failing the view.

No FUSE mount here: the helper's syscalls run against a plain directory standing in for the mount, which is
exactly what openat2 confines; the live mount is tests/integration/test_mount_hostile.py.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from pathlib import Path
from types import SimpleNamespace

import pyfuse3
import pytest
import trio

from inference.events import Mutation
from inference.view import Entry
from mirrorfs.view.ops import Stage, Staged, ViewOps
from mirrorfs.view.poke import CONFINED, Poker, Refused, components, mount_id, open_beneath, openat2
from mirrorfs.view.tree import ROOT_ID, ViewError, ViewTree, VNode

# -- openat2 itself


@pytest.fixture
def box(tmp_path: Path) -> tuple[Path, int]:
    """root/ (the confinement) with a dir, a file, symlinks out of it and within it; outside/ next to it."""
    root = tmp_path / "root"
    (root / "d" / "e").mkdir(parents=True)
    (root / "d" / "f").write_bytes(b"inside")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_bytes(b"outside")
    os.symlink("../outside", root / "up")            # relative, leaves the root
    os.symlink(str(tmp_path / "outside"), root / "abs")  # absolute
    os.symlink("d", root / "inner")                 # stays inside, still a symlink
    os.symlink("/proc/self/root", root / "procroot")  # to a magic link
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    yield root, fd
    os.close(fd)


def _errno(fn, *args) -> int:
    with pytest.raises(OSError) as info:
        os.close(fn(*args))
    return info.value.errno


def test_openat2_resolves_beneath(box):
    root, fd = box
    f = openat2(fd, b"d/f", os.O_RDONLY)
    try:
        assert os.read(f, 10) == b"inside"
    finally:
        os.close(f)
    os.close(openat2(fd, b"d/e", os.O_PATH | os.O_DIRECTORY))
    os.close(openat2(fd, b"d/e/..", os.O_PATH | os.O_DIRECTORY))  # `..` that stays beneath is fine


@pytest.mark.parametrize("path", [b"..", b"../outside/secret", b"d/../../outside", b"d/e/../../.."])
def test_openat2_refuses_dotdot_out(box, path):
    _, fd = box
    assert _errno(openat2, fd, path, os.O_PATH) == errno.EXDEV


def test_openat2_refuses_absolute(box, tmp_path):
    _, fd = box
    assert _errno(openat2, fd, str(tmp_path / "outside" / "secret").encode(), os.O_RDONLY) == errno.EXDEV


@pytest.mark.parametrize("path", [b"up/secret", b"abs/secret", b"inner/f", b"up", b"procroot/etc"])
def test_openat2_refuses_symlinks(box, path):
    _, fd = box
    assert _errno(openat2, fd, path, os.O_RDONLY) == errno.ELOOP


def test_openat2_refuses_magic_links_and_other_mounts():
    fdtab = os.open("/proc/self/fd", os.O_PATH | os.O_DIRECTORY)
    target = os.open("/", os.O_PATH | os.O_DIRECTORY)
    try:
        assert _errno(openat2, fdtab, str(target).encode(), os.O_PATH) == errno.ELOOP  # /proc/self/fd/N
        # with only RESOLVE_NO_MAGICLINKS, to show that flag is what stops it
        assert _errno(openat2, fdtab, str(target).encode(), os.O_PATH, 0, 0x02) == errno.ELOOP
        os.close(openat2(fdtab, str(target).encode(), os.O_PATH, 0, 0))  # unconfined, the kernel would follow
        assert _errno(openat2, target, b"proc/self", os.O_PATH) == errno.EXDEV  # / -> /proc crosses a mount
    finally:
        os.close(fdtab)
        os.close(target)


def test_components_refuse_bad_names():
    assert components(b"/") == [] and components(b"/a/b c/\x1b[31m") == [b"a", b"b c", b"\x1b[31m"]
    for bad in (b"/../PWNED", b"/a/./b", b"/a//b", b"/a/", b"a/b", b"/a/x\0y", b"/.."):
        with pytest.raises(Refused):
            components(bad)
    with pytest.raises(Refused):
        open_beneath(0, [b"a", b".."])


# -- the poke helper against a directory standing in for the mount


def _poker(mnt: Path, prefix: bytes = b"") -> tuple[Poker, list[Mutation]]:
    direct: list[Mutation] = []

    def apply_direct(m: Mutation):
        direct.append(m)
        from mirrorfs.view.tree import Applied
        return Applied()

    poker = Poker(Stage(), lambda fs: prefix, apply_direct, lambda applied, m: None)
    poker.set_root(mnt, _mount_id(mnt))
    return poker, direct


def _ev(kind: str, path: str, **kw) -> Mutation:
    return Mutation(seq=1, time=1.0, kind=kind, path=path, fs="disk", **kw)


def _snapshot(top: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for n in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, n))
            out[os.path.join(dirpath, n)] = (st.st_mode, st.st_mtime_ns)
    return out


HOSTILE = [
    _ev("create", "/../PWNED"), _ev("mkdir", "/sub/../../PWNED"), _ev("create", "/up/PWNED"),
    _ev("create", "/abs/PWNED"), _ev("symlink", "/../PWNED", target="/etc/passwd"),
    _ev("mknod", "/../PWNED", type="fifo"), _ev("delete", "/up/secret"), _ev("delete", "/../outside/secret"),
    _ev("rename", "/sub/x", old_path="/../outside/secret"), _ev("rename", "/../PWNED", old_path="/sub/x"),
    _ev("link", "/../PWNED", target="/sub/x"), _ev("link", "/sub/y", target="/up/secret"),
    _ev("truncate", "/up/secret", size=0), _ev("modify", "/../outside/secret", size=0),
    _ev("attrib", "/up/secret", mode=0o777), _ev("attrib", "/../outside", mode=0o777),
    _ev("attrib", "/abs/secret", mode=0o777, uid=1234), _ev("xattr", "/up/secret", xattr={"user.pwn": "00"}),
    _ev("xattr", "/..", xattr={"user.pwn": "00"}), _ev("create", "/sub/x\0y"), _ev("create", "/sub//x"),
    _ev("create", "/magic/PWNED"), _ev("create", "/magic/../PWNED"),
]


def test_poke_never_touches_anything_outside_its_root(tmp_path):
    """Every mutation kind with `..`, symlinked, absolute and magic-link paths: refused, nothing outside changes;
    the honest mutations around them still land."""
    mnt = tmp_path / "mnt"
    (mnt / "sub").mkdir(parents=True)
    (mnt / "sub" / "x").write_bytes(b"x")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    os.symlink("../outside", mnt / "up")
    os.symlink(str(outside), mnt / "abs")
    os.symlink("/proc/self/cwd", mnt / "magic")
    os.chmod(outside, 0o700)
    before = _snapshot(tmp_path.parent)
    poker, direct = _poker(mnt)
    for m in HOSTILE:
        poker.poke(m)
    assert poker.refused == len(HOSTILE), (poker.refused, direct)
    assert direct == []  # a refused path is not applied to the view either
    assert _snapshot(tmp_path.parent) == before
    assert (outside / "secret").read_bytes() == b"secret"
    assert not os.listxattr(outside / "secret")
    # honest work still goes through the same confinement
    for m in (_ev("create", "/sub/new"), _ev("mkdir", "/sub/dir"), _ev("symlink", "/sub/dir/l", target="../x"),
              _ev("attrib", "/sub/new", mode=0o640), _ev("rename", "/sub/dir/moved", old_path="/sub/new"),
              _ev("xattr", "/sub/x", xattr={"user.k": "0102"}), _ev("truncate", "/sub/x", size=0)):
        poker.poke(m)
    assert poker.refused == len(HOSTILE)
    assert stat.S_IMODE(os.stat(mnt / "sub" / "dir" / "moved").st_mode) == 0o640
    assert os.readlink(mnt / "sub" / "dir" / "l") == "../x"
    assert os.getxattr(mnt / "sub" / "x", "user.k") == b"\x01\x02"
    assert (mnt / "sub" / "x").read_bytes() == b""


def _mount_id(path: Path) -> int:
    fd = os.open(path, os.O_PATH | os.O_DIRECTORY)
    try:
        return mount_id(fd)
    finally:
        os.close(fd)


def test_a_mount_point_that_leads_elsewhere_refuses_every_change(tmp_path):
    """The mount point's path swapped (a renamed directory above it) so that it leads to a host directory: the
    helper opens the root for each change and refuses it unless it lies on the mount recorded at mount time."""
    host = tmp_path / "host"
    host.mkdir()
    poker, direct = _poker(host)
    view_id = _mount_id(Path("/proc"))  # stands for the view's mount: any mount the path does not lead to
    assert view_id is not None and view_id != _mount_id(host)
    poker.set_root(host, view_id)
    for m in (_ev("create", "/PWNED"), _ev("mkdir", "/PWNED"), _ev("delete", "/x")):
        poker.poke(m)
    assert poker.refused == 3 and list(host.iterdir()) == [] and direct == []
    poker.set_root(host, _mount_id(host))  # the same path on the recorded mount: changes go through
    poker.poke(_ev("mkdir", "/ok"))
    assert (host / "ok").is_dir()


def test_poke_stays_beneath_the_file_systems_own_directory(tmp_path):
    """With several file systems, each resolves below its own directory: `..` cannot reach a sibling."""
    mnt = tmp_path / "mnt"
    (mnt / "p1").mkdir(parents=True)
    (mnt / "p2").mkdir()
    poker, _ = _poker(mnt, b"p1")
    poker.poke(_ev("create", "/../p2/PWNED"))
    poker.poke(_ev("create", "/ok"))
    assert poker.refused == 1
    assert sorted(os.listdir(mnt / "p2")) == [] and os.listdir(mnt / "p1") == ["ok"]


def test_openat2_confinement_flags_are_all_set():
    assert CONFINED == 0x01 | 0x02 | 0x04 | 0x08


# -- the FUSE handlers: the helper may change only what is staged


def _entry(path: bytes, ino: int, type_: str = "file", **kw) -> Entry:
    ifmt = {"file": stat.S_IFREG, "dir": stat.S_IFDIR}[type_]
    base = dict(uid=0, gid=0, size=0, mtime_ns=1, ctime_ns=1, links=2 if type_ == "dir" else 1, rdev=0,
                target=None, xattrs=None)
    base.update(kw)
    return Entry(path=path, ino=ino, type=type_, mode=ifmt | 0o644, **base)


def _ops() -> tuple[ViewOps, Stage, SimpleNamespace, SimpleNamespace]:
    tree = ViewTree(["disk"])
    tree.load("disk", [_entry(b"/", 2, "dir"), _entry(b"/a", 12, "dir"), _entry(b"/b", 13, "dir"),
                       _entry(b"/a/x", 14), _entry(b"/b/y", 15), _entry(b"/z", 16)])
    stage = Stage()
    stage.tid = threading.get_native_id()
    ops = ViewOps(tree, stage, lambda *a: b"", lambda: pyfuse3.StatvfsData())
    return ops, stage, SimpleNamespace(pid=stage.tid), SimpleNamespace(pid=stage.tid + 1)


def _call(fn, *args) -> int | None:
    try:
        trio.run(fn, *args)
    except pyfuse3.FUSEError as exc:
        return exc.errno
    return None


def test_helper_requests_outside_the_staged_mutation_are_refused():
    ops, stage, helper, other = _ops()
    stage.current = Staged(_ev("delete", "/a/x", ino=14))
    assert _call(ops.unlink, 13, b"y", helper) == errno.EPERM      # another name
    assert _call(ops.unlink, ROOT_ID, b"x", helper) == errno.EPERM  # the right name in another directory
    assert _call(ops.rmdir, ROOT_ID, b"a", helper) == errno.EPERM
    assert _call(ops.setattr, 16, None, None, None, helper) == errno.EPERM
    assert _call(ops.unlink, 12, b"x", other) == errno.EROFS       # not the helper at all
    assert ops.tree.resolve("disk", b"/b/y") == 15 and ops.tree.resolve("disk", b"/a/x") == 14
    assert ops.refused == 4 and not stage.current.applied
    assert _call(ops.unlink, 12, b"x", helper) is None
    assert stage.current.applied and ops.tree.resolve("disk", b"/a/x") is None

    stage.current = Staged(_ev("rename", "/b/moved", old_path="/b/y", ino=15))
    assert _call(ops.rename, 12, b"y", 13, b"moved", 0, helper) == errno.EPERM  # wrong source directory
    assert _call(ops.rename, 13, b"y", ROOT_ID, b"moved", 0, helper) == errno.EPERM  # wrong destination
    assert _call(ops.rename, 13, b"y", 13, b"moved", 0, helper) is None
    assert ops.tree.resolve("disk", b"/b/moved") == 15

    stage.current = Staged(_ev("link", "/a/l", target="/b/moved", ino=15))
    assert _call(ops.link, 16, 12, b"l", helper) == errno.EPERM  # linking another inode
    assert ops.tree.resolve("disk", b"/a/l") is None

    stage.current = Staged(_ev("attrib", "/z", ino=16, mode=0o600))
    assert _call(ops.setattr, 15, None, None, None, helper) == errno.EPERM
    assert _call(ops.setxattr, 15, b"user.k", b"v", helper) == errno.EPERM
    assert _call(ops.open, 16, os.O_WRONLY, helper) == errno.EPERM  # its own inode, but not a request chmod makes
    assert _call(ops.setattr, 16, None, None, None, helper) is None
    assert stat.S_IMODE(ops.tree.nodes[16].mode) == 0o600 and stat.S_IMODE(ops.tree.nodes[15].mode) == 0o644

    stage.current = Staged(_ev("rename", "/b/y2", old_path="/b/moved", ino=15))
    assert _call(ops.unlink, 13, b"y2", helper) == errno.EPERM  # the staged name, but an unlink
    assert ops.tree.resolve("disk", b"/b/moved") == 15

    stage.current = Staged(_ev("truncate", "/z", ino=16, size=0))
    assert _call(ops.open, 16, os.O_WRONLY, helper) is None  # the open before the ftruncate only answers
    assert not stage.current.applied

    stage.current = None  # nothing staged: the helper changes nothing
    assert _call(ops.unlink, 13, b"moved", helper) == errno.EPERM


# -- attributes the kernel cannot hold


def test_attributes_out_of_range_are_clamped_not_fatal():
    ops, *_ = _ops()
    node = VNode(99, "disk", 99, "file", stat.S_IFREG | 0o644, uid=1 << 40, gid=-5, size=(1 << 64) - 1,
                 mtime_ns=(1 << 80) * 10**9, ctime_ns=-(1 << 80) * 10**9, links=1 << 70, rdev=1 << 70,
                 atime_ns=(1 << 80) * 10**9, blocks=1 << 70)
    a = ops.attrs(node)
    assert a.st_size == (1 << 63) - 1 and a.st_blocks == (1 << 63) - 1  # the guest's i_blocks, not made up
    assert a.st_nlink == (1 << 32) - 1 and a.st_uid == (1 << 32) - 1 and a.st_gid == 0
    assert a.st_rdev == (1 << 64) - 1
    assert a.st_mtime_ns == ((1 << 63) - 1) * 10**9 and a.st_atime_ns == a.st_mtime_ns
    assert ops.clamped == {99} and ops.clamps >= 7
    odd = VNode(98, "disk", 98, "dir", 0o170777, children={})  # the mode's type bits are not a type
    assert ops.attrs(odd).st_mode == stat.S_IFDIR | 0o777
    # the handler that answers with them
    ops.tree.nodes[99] = node
    assert _call(ops.getattr, 99, None) is None


def test_a_handler_bug_is_eio_not_a_dead_loop():
    ops, *_ = _ops()
    ops.tree.nodes[14].size = "not a number"  # anything unexpected in a handler
    assert _call(ops.read, 14, 0, 10) == errno.EIO


# -- a snapshot with names no directory can hold


def test_snapshot_with_bad_names_loads_without_them():
    t = ViewTree(["disk"])
    n = t.load("disk", [_entry(b"/", 2, "dir"), _entry(b"/d", 12, "dir"), _entry(b"/../PWNED", 13),
                        _entry(b"/d/SLASH/XX", 14), _entry(b"/d/x\0y", 15), _entry(b"/d/.", 16),
                        _entry(b"/bad\x1b[2J\n", 17), _entry(b"/ok", 18), _entry(b"/d/SLASH/XX/under", 19)])
    assert n == 3  # /d, the control-character name (legal on Linux) and /ok
    assert sorted(t.nodes[ROOT_ID].children) == [b"bad\x1b[2J\n", b"d", b"ok"]
    assert t.nodes[12].children == {}
    for nid in (13, 14, 15, 16, 19):
        assert nid not in t.nodes
    with pytest.raises(ViewError):
        t.apply(_ev("create", "/../PWNED", ino=20))
    with pytest.raises(ViewError):
        t.apply(_ev("create", "/d/..", ino=20))
    assert t.resolve("disk", b"/d/..") is None and t.entry_of("disk", b"/d/x\0y") is None


def test_mount_options_keep_nosuid_and_nodev():
    from mirrorfs.view.ops import mount_options

    for allow_other in (False, True):
        opts = mount_options("mirrorfs:vm", allow_other)
        assert {"nosuid", "nodev"} <= opts and not {"suid", "dev"} & opts
