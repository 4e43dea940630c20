"""`mirrorfs mount` of a stopped state, `mirrorfs umount`, stale-mount cleanup, and read-only for root.

No guest needed: a state directory with an empty write log serves the base image's file systems.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.mountharness import force_unmount, mounted, wait_mounted, wait_unmounted
from tests.support import REPO, require_root, require_tools
from tests.tapharness import MIRRORFS, mirrorfs

pytestmark = pytest.mark.integration


def _state(tmp_path: Path) -> tuple[Path, Path]:
    from images.build import artifact
    from tap.state import StateDir

    base = tmp_path / "base.raw"
    shutil.copyfile(artifact("ext4.img"), base)
    state = tmp_path / "state"
    StateDir(state).path.mkdir(parents=True)
    StateDir(state).init_state(base.stat().st_size, "drive0")
    return base, state


def _serve(tmp_path: Path, base: Path, state: Path, mnt: Path) -> subprocess.Popen:
    """Start `mirrorfs mount` and wait for its "mounted" line (a stale mount would pass a mountinfo check)."""
    path = tmp_path / "mount.log"
    before = path.read_text().count("mirrorfs: mounted") if path.exists() else 0
    log = open(path, "ab")
    proc = subprocess.Popen([*MIRRORFS, "mount", "--state", str(state), "--base", str(base), str(mnt)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    deadline = time.monotonic() + 120
    while path.read_text().count("mirrorfs: mounted") == before:
        assert proc.poll() is None, path.read_text()
        assert time.monotonic() < deadline, path.read_text()
        time.sleep(0.05)
    wait_mounted(mnt, proc)
    return proc


@pytest.fixture
def view(tmp_path):
    require_root()
    require_tools("fusermount3", "setfattr")
    base, state = _state(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = _serve(tmp_path, base, state, mnt)
    yield mnt, proc, base, state
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    force_unmount(mnt)


def _tree(root: Path) -> str:
    fmt = "%P %i %M %n %U %G %s %T@ %C@ %l\n"
    return "".join(sorted(subprocess.run(["find", ".", "-printf", fmt], cwd=root, capture_output=True,
                                         text=True, check=True).stdout.splitlines(keepends=True)))


def test_view_equals_a_loop_mount_of_the_same_image(view, tmp_path):
    mnt, _, base, _ = view
    loop = tmp_path / "loop"
    loop.mkdir()
    subprocess.run(["mount", "-o", "ro,loop", str(base), str(loop)], check=True)
    try:
        assert _tree(mnt) == _tree(loop)
        sums = [subprocess.run("find . -type f -print0 | sort -z | xargs -0 sha256sum", shell=True, cwd=r,
                               capture_output=True, text=True, check=True).stdout for r in (mnt, loop)]
        assert sums[0] == sums[1]
        assert os.stat(mnt).st_ino == os.stat(loop).st_ino == 2
        # statfs as the kernel's ext4 reports it (overhead and reserved blocks subtracted)
        fields = ("f_bsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_namemax")
        assert [getattr(os.statvfs(mnt), f) for f in fields] == [getattr(os.statvfs(loop), f) for f in fields]
        # directory listings with `.` and `..`, and their inode numbers, as a local file system gives them
        for sub in (".", "etc"):
            if (loop / sub).is_dir():
                ls = [subprocess.run(["ls", "-ai1", "-U", sub], cwd=r, capture_output=True, text=True,
                                     check=True).stdout.split("\n") for r in (mnt, loop)]
                assert sorted(ls[0]) == sorted(ls[1])
                assert {x.split()[1] for x in ls[0] if x} >= {".", ".."}
    finally:
        subprocess.run(["umount", str(loop)], check=True)
    readme = mnt / "README"
    assert os.getxattr(readme, "user.mirrorfs.ino") == str(os.stat(readme).st_ino).encode()
    assert os.getxattr(readme, "user.mirrorfs.seq") == b"0"  # by name only: listed are the guest's own
    assert not [x for x in os.listxattr(readme) if x.startswith("user.mirrorfs.")]


WRITES = ["touch README", "touch newfile", "rm README", "mv README R2", "chmod 777 README", "chown 1:1 README",
          "ln README L", "ln -s README S", "mkdir D", "rmdir lost+found", "truncate -s 0 README", "echo x > README",
          "echo x >> README", "setfattr -n user.x -v 1 README", "mknod F p", "rm -rf deep"]


def test_every_write_fails_with_erofs_for_root(view):
    mnt, *_ = view
    before = _tree(mnt)
    for cmd in WRITES:
        proc = subprocess.run(cmd, shell=True, cwd=mnt, capture_output=True, text=True)
        assert proc.returncode != 0 and "Read-only file system" in proc.stderr, (cmd, proc.stderr)
    for flags in (os.O_RDWR, os.O_WRONLY, os.O_RDONLY | os.O_TRUNC, os.O_WRONLY | os.O_APPEND):
        with pytest.raises(OSError) as exc:
            os.open(mnt / "README", flags)
        assert exc.value.errno == errno.EROFS
    assert _tree(mnt) == before


def test_umount_ends_the_server(view):
    mnt, proc, *_ = view
    mirrorfs("umount", mnt)
    wait_unmounted(mnt)
    assert proc.wait(30) == 0


def test_sigterm_unmounts(view):
    mnt, proc, *_ = view
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert not mounted(mnt)


def test_a_crash_leaves_a_stale_mount_that_the_next_start_cleans(view, tmp_path):
    mnt, proc, base, state = view
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    with pytest.raises(OSError) as exc:
        os.listdir(mnt)
    assert exc.value.errno == errno.ENOTCONN  # what a crash leaves
    again = _serve(tmp_path, base, state, mnt)
    try:
        assert (mnt / "README").read_bytes()
        assert "stale mount" in (tmp_path / "mount.log").read_text()
    finally:
        again.send_signal(signal.SIGTERM)
        assert again.wait(30) == 0
    assert not mounted(mnt)


def test_a_live_mount_is_not_taken_over(view, tmp_path):
    mnt, _, base, state = view
    proc = subprocess.run([sys.executable, "-m", "mirrorfs.cli", "mount", "--state", str(state), "--base",
                           str(base), str(mnt)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 1 and "already served" in proc.stderr
