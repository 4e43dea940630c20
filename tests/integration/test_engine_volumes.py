"""Partitioned disks: MBR (with swap and a logical partition), GPT and LVM2, written by real kernels."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.integration.test_engine_guest import _events, run_live
from tests.support import require_root, require_tools
from tests.tapharness import Attach

pytestmark = pytest.mark.integration
MiB = 1 << 20


def _guest_run(tmp_path: Path, image: str, workload: str) -> list[dict]:
    return run_live(tmp_path, image, workload)[2]


MBR_WORKLOAD = r"""
set -e
mkdir -p /m1 /m2 /m5
mount ${DISK}1 /m1; mount ${DISK}2 /m2; mount ${DISK}5 /m5
echo one > /m1/one.txt
mkdir /m2/two.d
echo five > /m5/five.txt
mv /m5/five.txt /m5/cinq.txt
# the guest writes raw pages to its swap partition: not a file system, no events
dd if=/dev/urandom of=${DISK}3 bs=4096 seek=16 count=32 conv=fsync 2>/dev/null
sync
umount /m1 /m2 /m5
"""


def test_mbr_two_ext4_a_logical_one_and_swap(tmp_path):
    events = _guest_run(tmp_path, "mbr.img", MBR_WORKLOAD)
    seen = {(e["fs"], e["kind"], e["path"]) for e in events if e["kind"] != "modify"}
    assert seen == {("p1", "create", "/one.txt"), ("p2", "mkdir", "/two.d"), ("p5", "create", "/five.txt"),
                    ("p5", "rename", "/cinq.txt")} or seen == {
        ("p1", "create", "/one.txt"), ("p2", "mkdir", "/two.d"), ("p5", "create", "/cinq.txt")}, seen
    assert not [e for e in events if e["fs"] not in ("p1", "p2", "p5")]
    assert {e["fs"] for e in events if e["kind"] == "modify"} <= {"p1", "p5"}


GPT_WORKLOAD = r"""
set -e
mkdir -p /g1 /g2
mount ${DISK}1 /g1; mount ${DISK}2 /g2
mkdir -p /g1/etc && echo 'root:x:0:0' > /g1/etc/passwd
ln -s /etc/passwd /g2/link
chmod 600 /g1/etc/passwd
sync
umount /g1 /g2
"""


def test_gpt_two_ext4(tmp_path):
    events = _guest_run(tmp_path, "gpt.img", GPT_WORKLOAD)
    seen = {(e["fs"], e["kind"], e["path"]) for e in events if e["kind"] not in ("modify", "attrib")}
    assert seen == {("p1", "mkdir", "/etc"), ("p1", "create", "/etc/passwd"), ("p2", "symlink", "/link")}
    link = next(e for e in events if e["kind"] == "symlink")
    assert link["target"] == "/etc/passwd"
    passwd = [e for e in events if e["path"] == "/etc/passwd"]
    assert passwd[-1]["mode"] == 0o600 and passwd[-1]["size"] == len("root:x:0:0\n")


def test_lvm2_linear_lvs(tmp_path):
    """LV two (one linear segment) written by the host kernel through a loop window; LV one stays quiet."""
    require_root()
    require_tools("qemu-storage-daemon", "losetup")
    from images.build import artifact
    from images.hostwriter import HostWriter

    image = artifact("lvm.img")
    meta = json.loads((image.parent / "lvm.json").read_text())
    base = tmp_path / "base.raw"
    shutil.copyfile(image, base)
    disk = tmp_path / "disk.raw"
    shutil.copyfile(base, disk)
    state = tmp_path / "state"
    (disk_off, _, length), = meta["lvs"]["two"]["segments"]
    with HostWriter(disk, tmp_path / "qsd") as hw:
        hw.start()
        with Attach(hw.qmp, state, "--device", hw.node, "--base", str(base)) as attach:
            hw.mount(offset=disk_off, sizelimit=length)
            proc = hw.run("mkdir lvdir && echo data > lvdir/file && ln lvdir/file hard && sync")
            assert proc.returncode == 0, proc.stderr
            hw.unmount()
            attach.detach()
    events = _events(state)
    fs = {e["fs"] for e in events}
    assert fs == {f"{meta['vg']}/two"}, fs
    seen = {(e["kind"], e["path"]) for e in events if e["kind"] in ("mkdir", "create", "link")}
    # file and its hard link reached the disk in one commit: either name may be the first
    assert seen in ({("mkdir", "/lvdir"), ("create", "/lvdir/file"), ("link", "/hard")},
                    {("mkdir", "/lvdir"), ("create", "/hard"), ("link", "/lvdir/file")})


# big's bytes are all >= 0x80 and the patch is ASCII. Modify ranges are exact to the byte, so an old byte equal to
# the patch's would trim the range: with random bytes, a 1-in-128 flake (seen in CI).
LVM_GUEST_WORKLOAD = r"""
set -e
dmlinear one {one}
dmlinear two {two}
mkdir -p /lv1 /lv2
mount /dev/mapper/one /lv1; mount /dev/mapper/two /lv2
mkdir /lv1/d
echo note > /lv1/d/note.txt
head -c $(({big_mib} * 1048576)) /dev/urandom | tr '\000-\177' '\200-\377' > /lv1/big
sync
yes MIRRORFS-SECOND-SEGMENT | head -c {patch_len} > /tmp/patch
dd if=/tmp/patch of=/lv1/big bs=4096 seek={patch_block} conv=notrunc 2>/dev/null
sync
echo two > /lv2/two.txt
sync
umount /lv1 /lv2
"""


def _merge(ranges: list) -> list[tuple[int, int]]:
    """Byte ranges as sorted disjoint [start, end) pairs, touching ones joined."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(map(tuple, ranges)):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _dm_table(segments: list[list[int]]) -> str:
    """dmlinear's arguments for an LV: one quoted linear line per segment, in sectors, on the guest's $DISK."""
    return " ".join(f'"{lv_off // 512} {length // 512} linear $DISK {disk_off // 512}"'
                    for disk_off, lv_off, length in segments)


def _lv_block_on_disk(disk: Path, segments: list[list[int]], lv_image: Path, path: str, offset: int) -> tuple[int, int]:
    """(LV offset, disk offset) of the file block holding `offset`, as e2fsprogs sees the LV on the final disk."""
    import subprocess

    with open(disk, "rb") as src, open(lv_image, "wb") as dst:
        for disk_off, lv_off, length in segments:
            src.seek(disk_off)
            dst.seek(lv_off)
            dst.write(src.read(length))
    stats = subprocess.run(["dumpe2fs", "-h", str(lv_image)], capture_output=True, text=True, check=True).stdout
    bsize = int(next(line.split(":")[1] for line in stats.splitlines() if line.startswith("Block size:")))
    out = subprocess.run(["debugfs", "-R", f"bmap {path} {offset // bsize}", str(lv_image)], capture_output=True,
                         text=True, check=True).stdout
    lv_pos = int(out.split()[0]) * bsize + offset % bsize
    disk_pos = next(d + lv_pos - lo for d, lo, n in segments if lo <= lv_pos < lo + n)
    return lv_pos, disk_pos


def test_lvm2_two_segment_lv_written_by_guest_kernel(tmp_path):
    """The guest's dm-linear writes LV one's second segment: the engine must map those blocks back into LV one.

    The overwrite lands only in the second segment, after a sync: its modify event can only come from a data
    write the engine attributed through that segment. The host has no device-mapper, so this needs the guest.
    """
    require_tools("debugfs", "dumpe2fs", "gcc")
    from images.build import artifact

    meta = json.loads((artifact("lvm.img").parent / "lvm.json").read_text())
    one, two = meta["lvs"]["one"]["segments"], meta["lvs"]["two"]["segments"]
    second_start = one[1][1]
    patch_off, patch_len = 20 * MiB + 4096, 3 * 4096
    workload = LVM_GUEST_WORKLOAD.format(one=_dm_table(one), two=_dm_table(two), big_mib=21,
                                         patch_len=patch_len, patch_block=patch_off // 4096)
    _, _, events = run_live(tmp_path, "lvm.img", workload)

    # the overwrite really went through the second segment: the file block is there on the final disk
    lv_pos, disk_pos = _lv_block_on_disk(tmp_path / "disk.raw", one, tmp_path / "one.img", "/big", patch_off)
    assert lv_pos >= second_start, (lv_pos, one)
    with open(tmp_path / "disk.raw", "rb") as f:
        f.seek(disk_pos)
        assert f.read(24) == b"MIRRORFS-SECOND-SEGMENT\n"

    assert not [e for e in events if e["kind"] == "error"], events
    vg = meta["vg"]
    assert {e["fs"] for e in events} == {f"{vg}/one", f"{vg}/two"}, events
    seen = {(e["fs"], e["kind"], e["path"]) for e in events if e["kind"] in ("create", "mkdir")}
    assert seen == {(f"{vg}/one", "mkdir", "/d"), (f"{vg}/one", "create", "/d/note.txt"),
                    (f"{vg}/one", "create", "/big"), (f"{vg}/two", "create", "/two.txt")}, seen
    big = [e for e in events if e["fs"] == f"{vg}/one" and e["path"] == "/big" and e["kind"] == "modify"]
    # the first sync interval: the whole file, in as many commits as writeback took
    written: list[tuple[int, int]] = []
    whole = None  # index of the event that completes the file
    for i, e in enumerate(big):
        written = _merge(written + e["ranges"])
        if whole is None and written == [(0, 21 * MiB)]:
            whole = i
    assert whole is not None and big[whole]["size"] == 21 * MiB, big
    # the second: after the whole file, a small modify covering the overwritten bytes
    later = [e for e in big[whole + 1:] if sum(b - a for a, b in e["ranges"]) < MiB]
    assert any(any(a <= patch_off and patch_off + patch_len <= b for a, b in e["ranges"]) for e in later), big


def test_partition_table_and_file_system_made_while_running(tmp_path):
    """A blank disk gets a GPT, an ext4 and files while mirrored: the engine finds the new file system."""
    require_root()
    require_tools("qemu-storage-daemon", "losetup", "sfdisk", "mkfs.ext4")
    import subprocess

    from images.hostwriter import HostWriter

    base = tmp_path / "base.raw"
    with open(base, "wb") as f:
        f.truncate(64 << 20)
    disk = tmp_path / "disk.raw"
    shutil.copyfile(base, disk)
    state = tmp_path / "state"
    mnt = tmp_path / "p1"
    mnt.mkdir()
    with HostWriter(disk, tmp_path / "qsd") as hw:
        hw.start()
        with Attach(hw.qmp, state, "--device", hw.node, "--base", str(base)) as attach:
            loop = hw.loop_device(partscan=True)
            try:
                subprocess.run(["sfdisk", "-q", loop], input="label: gpt\n,32M,L\n,,L\n", text=True, check=True)
                subprocess.run(["partx", "-u", loop], check=False)
                subprocess.run(["mkfs.ext4", "-q", "-L", "fresh", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                                f"{loop}p1"], check=True)
                subprocess.run(["mount", f"{loop}p1", str(mnt)], check=True)
                (mnt / "etc").mkdir()
                (mnt / "etc" / "hostname").write_text("vm1\n")
                subprocess.run(["sync"], check=True)
            finally:
                subprocess.run(["umount", str(mnt)], check=False)
                hw.unmount()
            attach.detach()
    events = _events(state)
    assert {(e["fs"], e["kind"], e["path"]) for e in events if e["kind"] in ("mkdir", "create")} == {
        ("p1", "mkdir", "/etc"), ("p1", "create", "/etc/hostname")}, events
    assert not [e for e in events if e["kind"] == "error"]
