"""Issue 17: the view's metadata is the disk's. The host kernel writes ext4 (qemu-storage-daemon, a live
`attach --mount`); then AIDE with the full rule `p+i+n+u+g+s+b+m+c+xattrs+acl+sha256`, initialised on a loop mount
of a snapshot of the final disk and checked on the live view, finds no difference; Tripwire with Debian's policy
masks (less the device number), initialised on the view, finds none on the snapshot mounted at the same path;
every lstat field and `du -s` agree; `chattr +i`, `+a`, `-i` are attrib events naming the flags; the view lists
no xattr of its own. While another writer keeps the stream busy (never quiet), a directory grown across blocks has
the disk's size, blocks, link count and times in the view as soon as its last entry is there. Both layouts: 4 KiB
blocks with htree directories; 1 KiB blocks with htree directories and a linear one (made before dir_index was
turned on, so it stays linear) grown across blocks.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.integration.test_mount import events_of, wait_quiet
from tests.mountharness import Tripwire, host_writer_view
from tests.support import require_root, require_tools
from tests.tapharness import mirrorfs

pytestmark = pytest.mark.integration

TIMEOUT = 60
SLOW_TARGET = "a/target/long/enough/not/to/fit/in/the/inode/" + "x" * 40  # > 60 bytes: a block of its own

# Phase 1 makes the directories; phase 2 grows them (the view saw them small) and makes everything else.
PHASE1 = "set -e\nmkdir many htree acl\n: > many/first\nsync\n"
LINEAR = "a-linear-directory-entry-with-a-long-name"
PHASE2 = rf"""
set -e
i=0; while [ $i -lt 120 ]; do : > many/a-name-long-enough-to-fill-blocks-$i; i=$((i+1)); done
if [ -d linear ]; then i=0; while [ $i -lt 60 ]; do : > linear/{LINEAR}-more-$i; i=$((i+1)); done; fi
i=0; while [ $i -lt 400 ]; do : > htree/entry-number-$i-with-some-padding; i=$((i+1)); done
printf small > small
printf 'x%.0s' $(seq 1 5000) > twoblocks
truncate -s 3M sparse
printf data | dd of=sparse bs=1 seek=1048576 conv=notrunc status=none
printf more | dd of=sparse bs=1 seek=2500000 conv=notrunc status=none
ln -s small fast
ln -s {SLOW_TARGET} slow
ln small hard
mkfifo fifo
mknod chr c 1 3
setfattr -n user.note -v hello small
setfattr -h -n trusted.t -v 1 fast
setfacl -m u:1234:rw,g:77:r small
setfacl -d -m g:55:rx acl
: > acl/inherits
chown 1000:1000 twoblocks
chmod 4750 twoblocks
touch -a -d '2020-01-01 00:00:00.123456789' small
touch -m -d '2019-05-05 05:05:05.987654321' many/first
: > flagged
: > appended
printf later > later
sync
"""
FLAG_STEPS = (("chattr +i flagged", "/flagged", ["immutable"], []),
              ("chattr +a appended", "/appended", ["append"], []),
              ("chattr -i flagged", "/flagged", [], ["immutable"]))
BUSY = "while :; do echo x >> busy; sync; sleep 0.1; done"  # a consistency point every ~0.1 s: never quiet
DIR_FIELDS = ("st_size", "st_blocks", "st_nlink", "st_mtime_ns", "st_ctime_ns")
DIRS_WAIT = 10.0  # for the view to apply the rest of PHASE2's last points after its last file
FIELDS = ("st_mode", "st_ino", "st_nlink", "st_uid", "st_gid", "st_size", "st_blocks", "st_rdev", "st_atime_ns",
          "st_mtime_ns", "st_ctime_ns", "st_blksize")


def _linear_dir(base: Path, mnt: Path) -> None:
    """A linear directory of several blocks in `base` (made with ^dir_index), then dir_index on: ext4 indexes a
    directory only as it outgrows its first block, so this one grows on linearly beside new htree ones."""
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(base), str(mnt)], check=True)
    try:
        (mnt / "linear").mkdir()
        for i in range(40):
            (mnt / "linear" / f"{LINEAR}-{i}").touch()
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    subprocess.run(["tune2fs", "-O", "dir_index", str(base)], check=True, capture_output=True)


@contextmanager
def live(tmp_path: Path, block_size: int, features: str, linear: bool = False) -> Iterator[tuple]:
    """A fresh ext4 served by `attach --base --mount`; yields (host writer, host mount, view, state, disk).
    `linear`: the base has a linear directory of several blocks on a file system with dir_index on."""
    require_root()
    require_tools("qemu-storage-daemon", "losetup", "mount", "mke2fs", "tune2fs", "fusermount3", "setfacl",
                  "setfattr", "chattr", "lsattr", "aide", "tripwire", "twadmin", "twprint", "du")

    base = tmp_path / "base.raw"
    with open(base, "wb") as f:
        f.truncate(48 << 20)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-b", str(block_size), "-E", "lazy_itable_init=0",
                    *(["-O", features] if features else []), str(base)], check=True, capture_output=True)
    if linear:
        _linear_dir(base, tmp_path / "premount")
    disk = tmp_path / "disk.raw"
    shutil.copyfile(base, disk)
    with host_writer_view(tmp_path, base, disk) as v:
        yield v.hw, v.host, v.mnt, v.state, disk, v.attach
        v.attach.detach()


def _run(hw, script: str) -> None:
    p = hw.run(script)
    assert p.returncode == 0, p.stderr


def _wait_event(state: Path, pred, what: str) -> dict:
    deadline = time.monotonic() + TIMEOUT
    while True:
        hit = next((e for e in events_of(state) if pred(e)), None)
        if hit is not None:
            return hit
        assert time.monotonic() < deadline, f"no event: {what}"
        time.sleep(0.1)


def _lstat_tree(root: Path) -> dict[str, tuple]:
    out = {}
    for d, dirs, files in os.walk(root):
        for name in [".", *dirs, *files]:
            p = Path(d) / name
            s = os.lstat(p)
            out[str(p.relative_to(root))] = tuple(getattr(s, f) for f in FIELDS)
    return out


def _du(root: Path) -> tuple[str, str]:
    run = lambda *a: subprocess.run(["du", "-s", *a, "."], cwd=root, check=True, capture_output=True,  # noqa: E731
                                    text=True).stdout
    return run("--block-size=512"), run("--apparent-size", "--block-size=1")


def _aide(work: Path, init_root: Path, check_root: Path) -> subprocess.CompletedProcess:
    conf = work / "aide.conf"
    conf.write_text(f"database_in=file:{work}/aide.db\ndatabase_out=file:{work}/aide.db.new\nreport_url=stdout\n"
                    "Full = p+i+n+u+g+s+b+m+c+xattrs+acl+sha256\n/ Full\n")
    subprocess.run(["aide", "--init", "-c", str(conf), "-B", f"root_prefix={init_root}"], check=True,
                   capture_output=True, timeout=300)
    (work / "aide.db.new").rename(work / "aide.db")
    return subprocess.run(["aide", "--check", "-c", str(conf), "-B", f"root_prefix={check_root}"],
                          capture_output=True, text=True, timeout=300)


def debian_policy(root: Path) -> str:
    """Debian's twpol.txt masks, each less `d` (the device number, which differs between any two mounts)."""
    return ("SEC_CRIT = $(IgnoreNone)-SHad ;\nSEC_BIN = $(ReadOnly)-d ;\nSEC_CONFIG = $(Dynamic)-d ;\n"
            "SEC_LOG = $(Growing)-d ;\nSEC_INVARIANT = +tpug ;\n"
            f'(rulename = "view") {{\n  {root} -> $(SEC_CRIT) ;\n  {root}/many -> $(SEC_BIN) ;\n'
            f"  {root}/htree -> $(SEC_CONFIG) ;\n  {root}/acl -> $(SEC_LOG) ;\n"
            f"  {root}/lost+found -> $(SEC_INVARIANT) ;\n}}\n")


def _grow_while_busy(hw, host: Path, mnt: Path, dirs: list[str]) -> tuple[dict, dict]:
    """PHASE2 while BUSY appends and syncs: the stream is never quiet. The directories' stat as the disk has them
    after PHASE2's sync, and as the view has them once it shows them so (or at the timeout), while the stream
    is still busy: the events of PHASE2's points carry them, a quiet spell is not needed. (Not the moment PHASE2's
    last file shows: the events of one point reach the view in order, the last file's perhaps before others.)"""
    busy = subprocess.Popen(["sh", "-c", BUSY], cwd=host, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: os.path.lexists(mnt / "busy"), "busy in the view")
        _run(hw, PHASE2)
        disk = {d: tuple(getattr(os.lstat(host / d), f) for f in DIR_FIELDS) for d in dirs}
        _wait_for(lambda: os.path.lexists(mnt / "later"), "PHASE2's last file in the view", step=0.02)

        def view_dirs() -> dict:
            return {d: tuple(getattr(os.lstat(mnt / d), f) for f in DIR_FIELDS) for d in dirs}
        deadline = time.monotonic() + DIRS_WAIT
        while (view := view_dirs()) != disk and time.monotonic() < deadline:
            time.sleep(0.05)
        assert busy.poll() is None, "the busy writer stopped: the stream may have been quiet"
    finally:
        busy.terminate()
        busy.wait(10)
    return disk, view


def _wait_for(cond, what: str, step: float = 0.1) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not cond():
        assert time.monotonic() < deadline, f"timed out: {what}"
        time.sleep(step)


@pytest.mark.parametrize("block_size,features,linear", [(4096, "", False), (1024, "^dir_index", True)],
                         ids=["4k-htree", "1k-htree-and-linear"])
def test_view_metadata_is_the_disks(tmp_path, block_size, features, linear):
    work = tmp_path / "checkers"
    work.mkdir()
    snap_mnt = tmp_path / "snapshot"
    snap_mnt.mkdir()
    dirs = [".", "many", "htree", "acl", *(["linear"] if linear else [])]
    with live(tmp_path, block_size, features, linear) as (hw, host, mnt, state, disk, attach):
        _run(hw, PHASE1)
        wait_quiet(mnt, state, "many/first")
        small = {d: os.lstat(mnt / d).st_size for d in dirs}
        disk_dirs, view_dirs = _grow_while_busy(hw, host, mnt, dirs)
        assert view_dirs == disk_dirs, (DIR_FIELDS, view_dirs, disk_dirs)
        assert all(disk_dirs[d][0] > small[d] for d in ("many", "htree", *(["linear"] if linear else [])))
        indexed = subprocess.run(["lsattr", "-d", *dirs[1:]], cwd=host, capture_output=True, text=True,
                                 check=True).stdout.splitlines()
        assert ["I" in line.split()[0] for line in indexed] == [True, True, False, *([False] if linear else [])]
        wait_quiet(mnt, state, "appended")
        for script, path, flags, old in FLAG_STEPS:
            _run(hw, script + "\nsync\n")
            want = {"kind": "attrib", "path": path, "flags": flags, "old_flags": old}
            ev = _wait_event(state, lambda e, want=want: all(e.get(k) == v for k, v in want.items()),
                             f"{script}: {want}")
            assert ev["ino"] == os.lstat(mnt / path.lstrip("/")).st_ino
        _run(hw, "cat later > /dev/null\nsync\n")  # a read in the guest moves atime alone: no event
        stat_out = mirrorfs("stat", "--json", mnt / "appended", mnt / "fast").stdout.splitlines()
        text = mirrorfs("stat", mnt / "appended").stdout
        assert " flags: append " in text and f"guest inode: {os.lstat(mnt / 'appended').st_ino}" in text, text
        lsattr = subprocess.run(["lsattr", "-d", mnt / "appended"], capture_output=True, text=True)
        assert lsattr.returncode != 0, "lsattr works on the view now: say so in mirrorfs-mount(1)"
        hw.unmount()  # the guest's disk is clean and final
        wait_quiet(mnt, state, "appended", settle=3)
        view_stat, view_du = _lstat_tree(mnt), _du(mnt)
        assert not any(n.startswith("user.mirrorfs") for n in os.listxattr(mnt / "small"))
        assert sorted(os.listxattr(mnt / "small")) == ["system.posix_acl_access", "user.note"]
        assert os.getxattr(mnt / "small", "user.mirrorfs.ino") == str(view_stat["small"][1]).encode()
        shutil.copyfile(disk, tmp_path / "snapshot.raw")
        subprocess.run(["mount", "-o", "ro,loop", str(tmp_path / "snapshot.raw"), str(snap_mnt)], check=True)
        try:
            snap_stat, snap_du = _lstat_tree(snap_mnt), _du(snap_mnt)
            aide = _aide(work, snap_mnt, mnt)
        finally:
            subprocess.run(["umount", str(snap_mnt)], check=True)
        tw = Tripwire(work, debian_policy(mnt))
        tw.init()
        view_tw = tw.check("view")
        assert "Total objects scanned" in view_tw[1], view_tw[1]
    subprocess.run(["mount", "-o", "ro,loop", str(tmp_path / "snapshot.raw"), str(mnt)], check=True)
    try:
        snap_tw = tw.check("snapshot")
        assert "Total objects scanned" in snap_tw[1], snap_tw[1]
    finally:
        subprocess.run(["umount", str(mnt)], check=True)

    import json
    appended, fast = (json.loads(x) for x in stat_out)
    assert aide.returncode == 0 and "NO differences" in aide.stdout, aide.stdout[-4000:]
    assert appended["flags"] == ["append"] and appended["ino"] == view_stat["appended"][1]
    assert fast["flags"] is None and fast["blocks"] == 0
    diffs = {p: (v, snap_stat.get(p)) for p, v in view_stat.items() if snap_stat.get(p) != v}
    assert not diffs and view_stat.keys() == snap_stat.keys(), (FIELDS, diffs)
    assert view_du == snap_du
    assert view_stat["small"][8] == 1_577_836_800_123_456_789          # the guest's atime, to the nanosecond
    assert view_stat["later"][8] > view_stat["later"][9]               # moved by the read (relatime)
    assert view_stat["sparse"][6] < view_stat["sparse"][5] // 512      # a sparse file's blocks are its own
    assert view_stat["fast"][6] == 0 and view_stat["slow"][6] > 0
    assert view_tw[0] == snap_tw[0] == 0, snap_tw[1][-4000:]
