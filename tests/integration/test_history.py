"""History (issue 14) with a real kernel writer: every version of a file back by time, a deleted tree restored.

The host kernel writes ext4 through qemu-storage-daemon (images/hostwriter.py) while a live `mirrorfs attach
--base` records and its engine emits events. A file is written, then changed five times (rewritten longer,
shorter, in place), with a sync and a pause between versions; a directory tree is made; then both are deleted and
the disk filled, so their blocks hold other files' bytes. Afterwards:
- `cat --at` a time inside each version's interval gives exactly that version (the writer's sha256);
- `history` lists each version with that sha256 (the events' hashes, taken by the live engine at each point),
  oldest first, ending with the delete; the tree's files' events carry the sha256 of what the writer wrote;
- `restore` of the deleted tree as of before the deletion equals the tree as written (content, modes, owners,
  mtimes, symlinks), and nothing lands outside DEST;
- `mount --at` a time inside a version's interval shows what a loop mount of `replica --until` that point shows;
- WHEN outside the history, and a path that did not exist then, are clear errors.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import random
import stat
import subprocess
import time
from pathlib import Path

import pytest

from images.hostwriter import HostWriter
from tests.support import ext4_base_and_disk, require_root, require_tools
from tests.tapharness import Attach, mirrorfs

pytestmark = pytest.mark.integration

PAUSE = 0.6  # between versions: each version's interval is [its sync's return, the next write)


def versions() -> list[tuple[str, bytes]]:
    """(how it is written, content) of the six versions: new, longer, shorter, in place, appended, rewritten."""
    rng = random.Random(14)
    v0 = rng.randbytes(20_000)
    v1 = rng.randbytes(150_000)
    v2 = v1[:9_000]
    v3 = v2[:4000] + rng.randbytes(3000) + v2[7000:]
    v4 = v3 + rng.randbytes(70_000)
    v5 = rng.randbytes(33_333)
    return [("new", v0), ("rewrite", v1), ("truncate", v2), ("inplace", v3), ("append", v4), ("rewrite", v5)]


def write_version(path: Path, how: str, data: bytes, old: bytes) -> None:
    if how == "truncate":
        os.truncate(path, len(data))
    elif how == "inplace":
        with open(path, "r+b") as f:
            f.seek(4000)
            f.write(data[4000:7000])
    elif how == "append":
        with open(path, "ab") as f:
            f.write(data[len(old):])
    else:
        path.write_bytes(data)
    subprocess.run(["sync"], check=True)


def make_tree(root: Path) -> None:
    (root / "a" / "b").mkdir(parents=True)
    (root / "empty").mkdir()
    rng = random.Random(3)
    for i, (rel, size, mode) in enumerate((("a/one", 5000, 0o640), ("a/b/two", 70_000, 0o600),
                                           ("a/b/exec", 300, 0o755), ("top", 0, 0o444))):
        p = root / rel
        p.write_bytes(rng.randbytes(size))
        p.chmod(mode)
        os.utime(p, ns=(1_600_000_000_000_000_000 + i, 1_600_000_000_000_000_000 + i * 1_000_000_007))
    os.chown(root / "a" / "b" / "two", 1000, 1001)
    os.symlink("../top", root / "a" / "link")
    os.symlink("/etc/passwd", root / "abs")  # restored as a link, never followed
    (root / "a" / "b").chmod(0o750)
    os.utime(root / "a" / "b", ns=(1_500_000_000_000_000_000, 1_500_000_000_000_000_000))


def manifest(root: Path) -> dict[str, tuple]:
    """What a restore must reproduce, per relative path (atime and ctime aside)."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            s = p.lstat()
            if stat.S_ISLNK(s.st_mode):
                what = ("link", os.readlink(p))
            elif stat.S_ISREG(s.st_mode):
                what = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
            else:
                what = ("dir",)
            mtime = None if stat.S_ISLNK(s.st_mode) else s.st_mtime_ns
            out[str(p.relative_to(root))] = (*what, stat.S_IMODE(s.st_mode) if what[0] != "link" else None,
                                             s.st_uid, s.st_gid, mtime)
    return out


def iso(ns: int, zone: bool = True) -> str:
    if zone:
        return dt.datetime.fromtimestamp(ns / 1e9, dt.UTC).isoformat().replace("+00:00", "Z")
    return dt.datetime.fromtimestamp(ns / 1e9).isoformat()  # local time, no zone


def test_every_version_back_and_a_deleted_tree_restored(tmp_path: Path) -> None:
    require_root()
    require_tools("qemu-storage-daemon", "losetup", "mount", "mke2fs", "fusermount3", "mactime")
    base, disk = ext4_base_and_disk(tmp_path)
    state = tmp_path / "state"
    vers = versions()
    intervals: list[tuple[int, int]] = []  # per version: (its sync returned, the next change began)
    with HostWriter(disk, tmp_path / "qsd") as hw:
        with Attach(hw.qmp, state, "--device", hw.node, "--base", str(base), log=tmp_path / "attach.log") as attach:
            mnt = hw.mount()
            doc = mnt / "doc.txt"
            old = b""
            for how, data in vers:
                if intervals:
                    intervals[-1] = (intervals[-1][0], time.time_ns())
                write_version(doc, how, data, old)
                assert doc.read_bytes() == data
                intervals.append((time.time_ns(), 0))
                old = data
                time.sleep(PAUSE)
            make_tree(mnt / "tree")
            subprocess.run(["sync"], check=True)
            written = manifest(mnt / "tree")
            time.sleep(PAUSE)
            before_delete = time.time_ns()
            intervals[-1] = (intervals[-1][0], before_delete)
            time.sleep(PAUSE)
            # fill the disk to the last block (ext4 keeps reserved_clusters back even from root: none here)
            Path(f"/sys/fs/ext4/{Path(hw.loop).name}/reserved_clusters").write_text("0")
            assert hw.run("rm -rf tree doc.txt && sync && sleep 0.3 && dd if=/dev/urandom of=fill bs=1M "
                          "2>/dev/null; dd if=/dev/urandom of=fill2 bs=4k 2>/dev/null; sync; true").returncode == 0
            after_all = time.time_ns()
            hw.unmount()
            attach.detach()
    image = disk.read_bytes()
    assert vers[-1][1][:4096] not in image and vers[1][1][:4096] not in image  # blocks reused: gone from the disk

    hist = [json.loads(line) for line in mirrorfs("history", "--state", state, "--json", "/doc.txt").stdout.split("\n")
            if line]
    assert hist[0]["kind"] == "create" and hist[-1]["kind"] == "delete", [h["kind"] for h in hist]
    assert [h["seq"] for h in hist] == sorted(h["seq"] for h in hist)
    hashes = [h.get("sha256") for h in hist]
    found = [hashes.index(hashlib.sha256(data).hexdigest()) for _, data in vers]  # ValueError: a version missing
    assert found == sorted(found), "the versions' hashes come in the order they were written"
    assert any(h["kind"] == "truncate" and h.get("old_size") == len(vers[1][1]) for h in hist)
    text = mirrorfs("history", "--state", state, "/doc.txt").stdout
    assert hashlib.sha256(vers[3][1]).hexdigest() in text and "delete" in text

    # the tree's files: their events carry the sha256 the writer wrote
    for rel, facts in written.items():
        if facts[0] == "file":
            evs = [json.loads(x) for x in mirrorfs("history", "--state", state, "--json", f"/tree/{rel}").stdout.split(
                "\n") if x]
            assert facts[1] in [e.get("sha256") for e in evs], rel

    for k, (start, end) in enumerate(intervals):
        when = iso((start + end) // 2, zone=k % 2 == 0)
        got = subprocess.run([*_cli(), "cat", "--state", str(state), "--at", when, "/doc.txt"], capture_output=True)
        assert got.returncode == 0, got.stderr
        assert hashlib.sha256(got.stdout).hexdigest() == hashlib.sha256(vers[k][1]).hexdigest(), f"version {k}"
    first = hist[0]["seq"]
    got = subprocess.run([*_cli(), "cat", "--state", str(state), "--at", str(first), "/doc.txt"], capture_output=True)
    assert got.stdout == vers[0][1]

    mount_at_equals_replica(tmp_path, state, base, (intervals[3][0] + intervals[3][1]) // 2)

    dest = tmp_path / "dest"
    around = sorted(p.name for p in tmp_path.iterdir())
    out = mirrorfs("restore", "--state", state, "--at", iso(before_delete), "/tree", "-o", dest)
    assert "restored" in out.stderr
    assert manifest(dest / "tree") == written
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*around, "dest"])  # nothing beside DEST
    again = mirrorfs("restore", "--state", state, "--at", iso(before_delete), "/tree", "-o", dest, check=False)
    assert again.returncode == 1 and "exists" in again.stderr  # nothing is overwritten

    body = mirrorfs("events", "--state", state, "--format", "bodyfile").stdout  # a timeline by mactime (sleuthkit)
    timeline = subprocess.run(["mactime", "-b", "-", "-d"], input=body, capture_output=True, text=True,
                              check=True).stdout
    assert "/doc.txt (deleted)" in timeline and "/tree/a/b/two (deleted)" in timeline

    gone = mirrorfs("cat", "--state", state, "--at", iso(after_all + 10**9), "/doc.txt", check=False)
    assert gone.returncode == 1 and "did not exist" in gone.stderr
    early = mirrorfs("cat", "--state", state, "--at", "2001-01-01T00:00:00Z", "/doc.txt", check=False)
    assert early.returncode == 1 and "before the retained history" in early.stderr
    late = mirrorfs("cat", "--state", state, "--at", "99999999", "/doc.txt", check=False)
    assert late.returncode == 1 and "after the end" in late.stderr


def facts(root: Path) -> dict[str, tuple]:
    """Every path below root with what `ls -l`, `stat` and `sha256sum` would say of it (atime aside)."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            s = p.lstat()
            body = os.readlink(p) if stat.S_ISLNK(s.st_mode) else (
                hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(s.st_mode) else None)
            out[str(p.relative_to(root))] = (s.st_mode, s.st_uid, s.st_gid, s.st_size, s.st_mtime_ns, s.st_nlink, body)
    return out


def mount_at_equals_replica(tmp_path: Path, state: Path, base: Path, when_ns: int) -> None:
    """`mount --at WHEN` shows what a loop mount of `replica --until` the same point shows."""
    from tests.mountharness import force_unmount, wait_mounted, wait_unmounted

    seq = max(r["seq"] for r in map(json.loads, mirrorfs("log", "--state", state, "--json").stdout.splitlines())
              if r["time_ns"] <= when_ns)
    replica = tmp_path / "replica.raw"
    mirrorfs("replica", "--state", state, "--base", base, "--until", seq, "-o", replica)
    loop_mnt, view = tmp_path / "loop", tmp_path / "at"
    loop_mnt.mkdir()
    view.mkdir()
    dev = subprocess.run(["losetup", "-f", "--show", "-r", str(replica)], check=True, capture_output=True,
                         text=True).stdout.strip()
    proc = None
    try:
        subprocess.run(["mount", "-o", "ro,noload", "-t", "ext4", dev, str(loop_mnt)], check=True)
        proc = subprocess.Popen([*_cli(), "mount", "--state", str(state), "--at", iso(when_ns), str(view)],
                                stderr=subprocess.PIPE)
        wait_mounted(view, proc)
        got, want = facts(view), facts(loop_mnt)
        assert got == want
        assert ("doc.txt" in got) and got["doc.txt"][-1] == hashlib.sha256(versions()[3][1]).hexdigest()
    finally:
        if proc is not None:
            mirrorfs("umount", view, check=False)
            wait_unmounted(view)
            force_unmount(view)
            proc.wait(30)
        subprocess.run(["umount", str(loop_mnt)], capture_output=True)
        subprocess.run(["losetup", "-d", dev], capture_output=True)


def _cli() -> list[str]:
    from tests.tapharness import MIRRORFS
    return MIRRORFS
