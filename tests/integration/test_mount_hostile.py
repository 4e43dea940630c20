"""Hostile names and numbers against a live `mirrorfs attach --mount`: the host stays untouched, the view lives.

The guest is the host kernel's block layer without a VM (images/hostwriter.py: qemu-storage-daemon holds the
disk, its QMP socket takes the mirror job). The hostile entries (tests/hostile.py: `../PWNED` in the root,
`SLASH/XX` in /d, a NUL in a name, extra `.`/`..`, an empty name, control characters and escapes) and an
inode whose i_size is 2^64-1 are crafted offline with debugfs on a journal-less ext4 without metadata_csum, then
either written through the daemon's NBD export in one burst while the view is up (qemu-io, so the mirror job
copies them exactly as it copies a guest's writes), or already in the base image the view starts from. One
honest file is written in the same burst. The test asserts what the issue asks: nothing outside the mount and
the state directory appears or changes (the mount point's parent and a canary directory, before and after;
PWNED nowhere), the view serves the honest part of the tree (the honest file's bytes, `ls`, stat of the huge
file, the daemon alive afterwards), the view is mounted nosuid,nodev, and an error event names each bad entry.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.test_mount import events_of, wait_quiet
from tests.mountharness import force_unmount, mounted, wait_mounted, wait_unmounted
from tests.support import REPO, require_root, require_tools
from tests.tapharness import Attach

pytestmark = pytest.mark.integration

HUGE = "huge.bin"               # its i_size becomes 0xFFFFFFFFFFFFFFFF
HUGE_CONTENT = b"the first block of a file that claims 16 EiB\n"
OFF_T_MAX = (1 << 63) - 1
HONEST = "honest.txt"           # tests/hostile.py HONEST_PATH, without the slash
XATTR, XATTR_VALUE = "user.mirrorfs-test", b"hello"
TIMEOUT = 90                    # seconds for the burst to reach the view (a few seconds are typical)
SETTLE = 2.0                    # the event log unchanged this long: the engine is done with the burst


def _hostile_image(base: Path, work: Path) -> Path:
    """`base` plus the hostile entries, the honest file and the huge file, as a separate image."""
    from tests.hostile import apply_changes, hostile_name_changes

    crafted = work / "crafted.raw"
    shutil.copyfile(base, crafted)
    apply_changes(crafted, hostile_name_changes(base, work))
    payload = work / "huge-payload"
    payload.write_bytes(HUGE_CONTENT)
    script = work / "huge.debugfs"
    script.write_text(f"write {payload} {HUGE}\nsif {HUGE} size 0xFFFFFFFFFFFFFFFF\n")
    subprocess.run(["debugfs", "-w", "-f", str(script), str(crafted)], check=True, capture_output=True)
    out = subprocess.run(["debugfs", "-R", f"stat {HUGE}", str(crafted)], check=True, capture_output=True,
                         text=True).stdout
    assert "Size: 18446744073709551615" in out, out  # debugfs did make the hostile number
    return crafted


def _second_step(crafted: Path, work: Path) -> Path:
    """Then the guest sets an xattr and a mode on the honest file: the view must keep following, through the
    poke helper's confined path (setxattr and chmod by /proc/self/fd of an openat2 O_PATH fd)."""
    after = work / "second.raw"
    shutil.copyfile(crafted, after)
    script = work / "second.debugfs"
    script.write_text(f"ea_set {HONEST} {XATTR} {XATTR_VALUE.decode()}\nsif {HONEST} mode 0100600\n")
    subprocess.run(["debugfs", "-w", "-f", str(script), str(after)], check=True, capture_output=True)
    return after


def _runs(old: Path, new: Path, block: int = 4096) -> list[tuple[int, bytes]]:
    """The differing blocks of two images, merged into contiguous runs (offset, bytes), in disk order."""
    runs: list[tuple[int, bytes]] = []
    with open(old, "rb") as a, open(new, "rb") as b:
        off = 0
        while y := b.read(block):
            if a.read(block) != y:
                if runs and runs[-1][0] + len(runs[-1][1]) == off:
                    runs[-1] = (runs[-1][0], runs[-1][1] + y)
                else:
                    runs.append((off, y))
            off += len(y)
    return runs


def _write_live(export: Path, node: str, runs: list[tuple[int, bytes]], work: Path) -> None:
    """One qemu-io run through qemu-storage-daemon's NBD export: the mirror job sees guest-like writes."""
    cmds = []
    for i, (off, data) in enumerate(runs):
        src = work / f"run{i}.bin"
        src.write_bytes(data)
        cmds += ["-c", f"write -q -s {src} {off} {len(data)}"]
    cmds += ["-c", "flush"]
    proc = subprocess.run(["qemu-io", "-f", "raw", f"nbd+unix:///{node}?socket={export}", *cmds],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "error" not in proc.stdout.lower(), proc.stdout + proc.stderr


def _snapshot(top: Path, skip: set[Path]) -> dict[str, tuple[int, int, int, int]]:
    """Every name under `top` (not following symlinks, not entering `skip`): (mode, size, mtime, ino)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = [d for d in dirnames if Path(dirpath, d) not in skip]
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = os.lstat(p)
            out[str(p.relative_to(top))] = (st.st_mode, st.st_size, st.st_mtime_ns, st.st_ino)
    return out


def _pwned_anywhere(tree: Path, skip: set[Path]) -> list[str]:
    """PWNED under `tree` (the test's whole directory), and at the top of the places a path could reach from the
    mount or the serving process's cwd (not walked: other mounts may live below them)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(tree):
        dirnames[:] = [d for d in dirnames if Path(dirpath, d) not in skip]
        found += [os.path.join(dirpath, n) for n in dirnames + filenames if "PWNED" in n]
    for top in (REPO, REPO.parent, Path("/"), Path("/tmp"), Path("/root"), tree.parent):
        found += [str(top / n) for n in os.listdir(top) if "PWNED" in n]
    return found


def _serving_pid(attach: Attach) -> int:
    found = re.findall(r"mirrorfs: mounted .*, pid (\d+)", attach.output())
    assert found, attach.output()
    return int(found[-1])


@pytest.mark.parametrize("arrival", ["live", "base"])
def test_hostile_names_and_sizes_against_a_live_mount(tmp_path, arrival):
    require_root()
    require_tools("qemu-storage-daemon", "qemu-io", "debugfs", "mke2fs", "fusermount3", "findmnt", "ls")
    from images.hostwriter import HostWriter
    from tests.hostile import BAD_NAMES, HIDDEN_CHILD, HONEST_CONTENT, HONEST_PATH, ODD_PATHS, make_image

    work = tmp_path / "work"
    work.mkdir()
    clean = make_image(work / "clean.raw")
    crafted = _hostile_image(clean, work)
    base = tmp_path / "base.raw"
    shutil.copyfile(crafted if arrival == "base" else clean, base)
    disk = tmp_path / "disk.raw"
    shutil.copyfile(base, disk)
    runs = _runs(clean, crafted)
    assert runs, "the crafted image does not differ from the clean one"

    # the host around the mount: the mount point's parent (where `../PWNED` would land) and a canary directory
    host = tmp_path / "host"
    mnt = host / "mnt"
    mnt.mkdir(parents=True)
    (host / "neighbour.txt").write_bytes(b"next to the mount point\n")
    canary = tmp_path / "canary"
    canary.mkdir()
    for i in range(3):
        (canary / f"c{i}").write_bytes(b"canary %d\n" % i)
    state = tmp_path / "state"
    before = {d: _snapshot(d, {mnt}) for d in (host, canary)}
    top_before = sorted(p.name for p in tmp_path.iterdir())

    try:
        with HostWriter(disk, tmp_path / "qsd") as hw:
            with Attach(hw.qmp, state, "--device", hw.node, "--base", str(base), "--mount", str(mnt)) as attach:
                wait_mounted(mnt, attach.proc, timeout=120)
                pid = _serving_pid(attach)
                options = subprocess.run(["findmnt", "-n", "-o", "OPTIONS", "--mountpoint", str(mnt)],
                                         capture_output=True, text=True, check=True).stdout.strip().split(",")
                assert "nosuid" in options and "nodev" in options, options
                if arrival == "live":
                    assert not (mnt / HONEST_PATH.lstrip("/")).exists()
                    t0 = time.monotonic()
                    _write_live(hw.export_sock, hw.node, runs, work)
                wait_quiet(mnt, state, HONEST_PATH.lstrip("/"), timeout=TIMEOUT, settle=SETTLE)
                if arrival == "live":
                    print(f"burst of {sum(len(d) for _, d in runs)} bytes in {len(runs)} runs reached the view "
                          f"in {time.monotonic() - t0:.1f} s")

                # the honest part of the tree is served
                assert (mnt / HONEST_PATH.lstrip("/")).read_bytes() == HONEST_CONTENT
                assert (mnt / "d" / "keep.txt").read_bytes() == b"kept\n"
                assert (mnt / "top.txt").read_bytes() == b"top\n"
                root = set(os.listdir(os.fsencode(mnt)))
                for path in ODD_PATHS:  # legal names with control characters and escapes stay
                    assert os.path.lexists(os.fsencode(mnt) + path), (path, root)
                for d, name in BAD_NAMES:
                    listed = os.listdir(os.fsencode(mnt / d.lstrip("/")))
                    assert name not in listed and not [n for n in listed if b"\0" in n or b"PWNED" in n], listed
                assert not (mnt / "d" / "SLASH").exists()
                assert not [p for p in _walk_view(mnt) if p.name == HIDDEN_CHILD]  # behind the extra '..'
                ls = subprocess.run(["ls", "-laRb", str(mnt)], capture_output=True, timeout=60)
                assert ls.returncode == 0, ls.stderr

                # the i_size of 2^64-1: a clamped attribute (or left out with an error event), never a dead view
                huge = mnt / HUGE
                if huge.exists():
                    st = os.stat(huge)
                    assert 0 <= st.st_size <= OFF_T_MAX
                    with open(huge, "rb") as f:
                        assert f.read(len(HUGE_CONTENT)) == HUGE_CONTENT
                    os.listdir(mnt)
                else:
                    assert any(e["kind"] == "error" and HUGE in json.dumps(e) for e in events_of(state)), \
                        "huge.bin is neither in the view nor named by an error event"
                assert os.path.exists(f"/proc/{pid}") and mounted(mnt)
                assert (mnt / HONEST_PATH.lstrip("/")).read_bytes() == HONEST_CONTENT  # still answering

                # and it keeps following the guest: an xattr and a mode, poked through the mount
                _write_live(hw.export_sock, hw.node, _runs(crafted, _second_step(crafted, work)), work)
                deadline = time.monotonic() + TIMEOUT
                while XATTR not in os.listxattr(mnt / HONEST) or os.stat(mnt / HONEST).st_mode & 0o777 != 0o600:
                    assert time.monotonic() < deadline, "the second step never reached the view"
                    time.sleep(0.1)
                assert os.getxattr(mnt / HONEST, XATTR) == XATTR_VALUE

                # nothing of it reached the host (checked while mounted, too)
                assert sorted(os.listdir(host)) == ["mnt", "neighbour.txt"]
                assert _pwned_anywhere(tmp_path, {mnt}) == []
                events = events_of(state)
                attach.detach()
            hw.stop()
        wait_unmounted(mnt)
    finally:
        force_unmount(mnt)

    assert {d: _snapshot(d, {mnt}) for d in (host, canary)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({*top_before, "state", "qsd", attach.log_path.name})
    assert _pwned_anywhere(tmp_path, set()) == []
    out = attach.output()
    assert "Traceback" not in out and "OverflowError" not in out, out
    # the engine's name policy kept every bad name away, so the helper's own confinement had nothing to refuse
    assert "unmounted" in out and not re.search(r"unmounted .* refused\)", out), out
    # every mutation reached the view through a syscall on the mount (none applied directly)
    assert re.search(r"unmounted .*\(\d+ mutations poked, 0 applied directly\)", out), out

    # the stream: no event carries a bad component; an error event names each bad entry by its raw name (hex)
    for e in events:
        if e["kind"] != "error":
            for p in (e["path"], e.get("old_path") or "/x"):
                parts = p.split("/")[1:]
                assert parts == [""] or not [c for c in parts if c in ("", ".", "..")], e
                assert "PWNED" not in p and "SLASH" not in p, e
    errors = [e for e in events if e["kind"] == "error"]
    for d, name in BAD_NAMES:
        assert any(e.get("name_hex") == name.hex() or f"'{name.hex()}'" in (e.get("message") or "")
                   for e in errors), (d, name, errors)


def _walk_view(mnt: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(mnt):
        out += [Path(dirpath, n) for n in dirnames + filenames]
    return out
