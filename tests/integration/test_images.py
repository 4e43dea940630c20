"""The image recipes and runners work end to end: a TCG guest and the host kernel write real ext4."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest

from images.build import artifact
from images.guest import READY, Guest, run_workload
from images.hostwriter import HostWriter
from images.tree import BIG_DIR, BIG_DIR_ENTRIES
from tests.support import require_root, require_tools

pytestmark = pytest.mark.integration

CONTENT = "mirrorfs was here"
WORKLOAD = f"""
set -e
mkdir -p "$MNT/newdir/sub"
printf '%s\\n' '{CONTENT}' > "$MNT/newdir/sub/hello.txt"
echo MIRRORFS-MARK wrote
"""


def debugfs(image: Path, request: str) -> str:
    return subprocess.run(["debugfs", "-R", request, str(image)], capture_output=True, text=True,
                          check=True).stdout


def copy_image(name: str, dest: Path) -> Path:
    out = dest / name
    subprocess.run(["cp", "--sparse=always", str(artifact(name)), str(out)], check=True)
    return out


def test_guest_runs_workload(tmp_path: Path) -> None:
    require_tools("qemu-system-x86_64", "debugfs", "apt-get", "busybox", "gcc")
    disk = copy_image("ext4.img", tmp_path)
    console = run_workload(disk, WORKLOAD, tmp_path / "guest", timeout=180)
    assert "MIRRORFS-MARK wrote" in console
    assert "MIRRORFS: workload done rc=0" in console, console
    assert debugfs(disk, "cat /newdir/sub/hello.txt") == CONTENT + "\n"
    assert "sub" in debugfs(disk, "ls /newdir")


def test_guest_paused_until_cont(tmp_path: Path) -> None:
    """-S: nothing boots until a QMP client says cont; the QMP socket is free for that client."""
    require_tools("qemu-system-x86_64")
    disk = copy_image("ext4.img", tmp_path)
    with Guest(disk, "echo paused-ok", tmp_path / "guest") as g:
        assert g.running() and g.console() == ""
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(g.qmp))
            f = s.makefile("rw")
            json.loads(f.readline())
            for cmd in ("qmp_capabilities", "cont"):
                f.write(json.dumps({"execute": cmd}) + "\n")
                f.flush()
                while "return" not in json.loads(f.readline()):
                    pass
        g.wait_for(READY, 120)
        g.wait_for("MIRRORFS: workload done rc=0", 60)
        assert "paused-ok" in g.console()


def test_hostwriter_writes_through_daemons(tmp_path: Path) -> None:
    require_root()
    require_tools("qemu-storage-daemon", "losetup", "debugfs")
    disk = copy_image("ext4.img", tmp_path)
    work = tmp_path / "hw"
    with HostWriter(disk, work) as hw:
        assert hw.qmp.is_socket() and hw.node == "disk0"
        mnt = hw.mount("ext4")
        result = hw.run(WORKLOAD, timeout=60)
        assert result.returncode == 0, result.stderr
        assert (mnt / "newdir/sub/hello.txt").read_text() == CONTENT + "\n"
        hw.unmount()
        assert not (work / "mnt" / "newdir").exists()
    assert debugfs(disk, "cat /newdir/sub/hello.txt") == CONTENT + "\n"
    assert str(work) not in Path("/proc/self/mounts").read_text()
    assert str(work) not in subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout


def test_generated_tree_in_images() -> None:
    require_tools("mke2fs", "debugfs")
    for name in ("ext2.img", "ext3.img", "ext4.img", "ext4-1k.img"):
        image = artifact(name)
        assert subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True).returncode == 0, name
        entries = debugfs(image, f"ls /{BIG_DIR}").split()
        assert sum(e.startswith("entry-") for e in entries) == BIG_DIR_ENTRIES, name
        assert "Type: symlink" in debugfs(image, "stat /links/dangling")
        assert "Links: 3" in debugfs(image, "stat /links/hardlink.txt")
        assert "user.mirrorfs.small" in debugfs(image, "ea_list /xattrs/tagged.txt")


def test_partitioned_images() -> None:
    require_tools("sfdisk", "blkid")
    for name, swap in (("mbr.img", True), ("gpt.img", False)):
        image = artifact(name)
        table = json.loads(subprocess.run(["sfdisk", "-J", str(image)], capture_output=True, text=True,
                                          check=True).stdout)
        assert image.stat().st_size <= 128 << 20
        types = []
        for part in table["partitiontable"]["partitions"]:
            out = subprocess.run(["blkid", "-p", "-O", str(part["start"] * 512), "-o", "value", "-s", "TYPE",
                                  str(image)], capture_output=True, text=True).stdout.strip()
            types.append(out)
        assert types.count("ext4") == 3 if swap else types.count("ext4") == 2, types
        assert ("swap" in types) == swap


def test_guest_mounts_partition(tmp_path: Path) -> None:
    """mirrorfs.mount=5 mounts the logical partition of the MBR disk."""
    require_tools("qemu-system-x86_64")
    disk = copy_image("mbr.img", tmp_path)
    console = run_workload(disk, 'cat "$MNT/PARTITION"; echo "$DISK"', tmp_path / "guest", timeout=180,
                           mount_part="5")
    assert "mbr-p5" in console and "rc=0" in console, console


def test_initramfs_dmlinear_checks_its_arguments(tmp_path: Path) -> None:
    """The guest's device-mapper tool is in the initramfs and refuses bad input before touching any device."""
    require_tools("cpio", "gcc")
    import gzip

    cpio = gzip.decompress(artifact("initramfs.gz").read_bytes())
    tool = tmp_path / "dmlinear"
    tool.write_bytes(subprocess.run(["cpio", "-i", "--quiet", "--to-stdout", "bin/dmlinear"], input=cpio,
                                    capture_output=True, check=True).stdout)
    tool.chmod(0o755)
    for args, why in (([], "usage: dmlinear NAME"), (["a/b", "0 8 linear /dev/vda 0"], "bad device name"),
                      (["x", "0 8 linear"], "bad table line"), (["x", "0 0 linear /dev/vda 0"], "LEN is 0")):
        proc = subprocess.run([str(tool), *args], capture_output=True, text=True)
        assert proc.returncode == 2 and why in proc.stderr, (args, proc.stderr)
