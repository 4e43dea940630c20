"""The live view of a partitioned disk (mbr.img: ext4 p1 p2, swap p3, logical ext4 p5) behind a TCG guest that
mounts the partitions itself: one directory per file system, named by label, and `--assemble` from /etc/fstab."""

from __future__ import annotations

import json
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.integration.test_mount import live_view, primary, wait_quiet
from tests.mountharness import Inotify, wait_unmounted
from tests.support import require_tools

pytestmark = pytest.mark.integration

PER_FS = r"""
set -e
mkdir -p /m1 /m2 /m5
mount ${DISK}1 /m1; mount ${DISK}2 /m2; mount ${DISK}5 /m5
sleep 3
echo one > /m1/one.txt
mkdir /m2/two.d
echo five > /m5/five.txt
dd if=/dev/urandom of=${DISK}3 bs=4096 seek=16 count=8 conv=fsync 2>/dev/null
sync
mv /m5/five.txt /m5/cinq.txt
sync
echo end > /m1/END
sync
umount /m1 /m2 /m5
"""

ASSEMBLED = r"""
set -e
mkdir -p /m1 /m2 /m5
mount ${DISK}1 /m1; mount ${DISK}2 /m2; mount ${DISK}5 /m5
sleep 3
echo data > /m2/in-data.txt
echo srv > /m5/in-srv.txt
echo root > /m1/in-root.txt
sync
echo under > /m1/data/under-new.txt
sync
echo end > /m1/END
sync
umount /m1 /m2 /m5
"""

FSTAB = """\
# written by the test: p1 is the root, p2 and p5 by label
LABEL=mbr-p1  /      ext4  errors=remount-ro  0 1
LABEL=mbr-p2  /data  ext4  defaults           0 2
LABEL=mbr-p5  /srv   ext4  defaults           0 2
/dev/vda3     none   swap  sw                 0 0
"""


def _partition(image: Path, number: int) -> tuple[int, int]:
    table = json.loads(subprocess.run(["sfdisk", "-J", str(image)], capture_output=True, text=True,
                                      check=True).stdout)["partitiontable"]
    for p in table["partitions"]:
        if p["node"].endswith(str(number)) and not p["node"].endswith(f"1{number}"):
            return p["start"] * 512, p["size"] * 512
    raise AssertionError(f"no partition {number} in {image}")


def _with_fstab(image: Path, work: Path) -> None:
    """Give p1 of `image` an /etc/fstab, mount points /data and /srv, and a file under /data that the mount of
    p2 must hide (the host kernel writes them through a loop mount at p1's offset)."""
    off, size = _partition(image, 1)
    mnt = work / "p1"
    mnt.mkdir()
    subprocess.run(["mount", "-o", f"loop,offset={off},sizelimit={size}", str(image), str(mnt)], check=True)
    try:
        (mnt / "etc").mkdir(exist_ok=True)
        (mnt / "etc" / "fstab").write_text(FSTAB)
        for d in ("data", "srv"):
            (mnt / d).mkdir(exist_ok=True)
        (mnt / "data" / "hidden-under-mount").write_text("p1's own /data\n")
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@contextmanager
def live_mbr(tmp_path: Path, workload: str, *extra: str, fstab: bool = False):
    """`live_view` on mbr.img (p1 given an fstab first, if asked); yields (guest, attach, mnt, state)."""
    require_tools("sfdisk")
    prepare = (lambda base: _with_fstab(base, tmp_path)) if fstab else None
    with live_view(tmp_path, workload, "mbr.img", *extra, prepare=prepare) as (guest, attach, mnt, state, _):
        yield guest, attach, mnt, state


def watch_until_done(guest, mnt: Path, state: Path, marker: str) -> list[tuple[str, str]]:
    """The view's inotify events (kind, path) from now until the workload is done and `marker` has appeared."""
    from images.guest import DONE

    ino = Inotify(mnt)
    try:
        guest.wait_for(DONE + " rc=0", timeout=300)
        wait_quiet(mnt, state, marker)
    finally:
        ino.stop()
    return [(k, p) for _, k, p, _ in primary(ino.events())]


def test_one_directory_per_file_system_named_by_label(tmp_path):
    with live_mbr(tmp_path, PER_FS) as (guest, attach, mnt, state):
        assert sorted(p.name for p in mnt.iterdir()) == ["mbr-p1", "mbr-p2", "mbr-p5"]  # no swap
        assert (mnt / "mbr-p2" / "PARTITION").read_text() == "mbr-p2\n"
        got = watch_until_done(guest, mnt, state, "mbr-p1/END")
        assert (mnt / "mbr-p5" / "cinq.txt").read_text() == "five\n"
        assert (mnt / "mbr-p1" / "one.txt").read_text() == "one\n"
        assert (mnt / "mbr-p2" / "two.d").is_dir()
        attach.detach()
    wait_unmounted(mnt)
    for want in [("CREATE", "mbr-p1/one.txt"), ("CREATE", "mbr-p2/two.d"), ("CREATE", "mbr-p5/five.txt"),
                 ("MOVED_FROM", "mbr-p5/five.txt"), ("MOVED_TO", "mbr-p5/cinq.txt"), ("CREATE", "mbr-p1/END")]:
        assert want in got, (want, got)
    assert got.index(("CREATE", "mbr-p5/five.txt")) < got.index(("MOVED_TO", "mbr-p5/cinq.txt"))
    assert not [p for _, p in got if p.split("/")[0] not in ("mbr-p1", "mbr-p2", "mbr-p5")], got


def test_assemble_lays_out_the_guest_fstab(tmp_path):
    with live_mbr(tmp_path, ASSEMBLED, "--assemble", fstab=True) as (guest, attach, mnt, state):
        assert (mnt / "etc" / "fstab").read_text() == FSTAB
        assert (mnt / "data" / "PARTITION").read_text() == "mbr-p2\n"       # p2's root on p1's /data
        assert (mnt / "srv" / "dir" / "file.txt").read_text() == "file on mbr-p5\n"
        assert not (mnt / "data" / "hidden-under-mount").exists()          # covered, as on a real mount
        assert {"data", "srv", "etc"} <= {p.name for p in mnt.iterdir()}
        assert len({(mnt / d).stat().st_ino for d in ("data", "srv", ".")}) == 3
        got = watch_until_done(guest, mnt, state, "END")
        assert (mnt / "data" / "in-data.txt").read_text() == "data\n"
        assert (mnt / "srv" / "in-srv.txt").read_text() == "srv\n"
        assert (mnt / "in-root.txt").read_text() == "root\n"
        assert not (mnt / "data" / "under-new.txt").exists()
        attach.detach()
    wait_unmounted(mnt)
    for want in [("CREATE", "data/in-data.txt"), ("CREATE", "srv/in-srv.txt"), ("CREATE", "in-root.txt"),
                 ("CREATE", "END")]:
        assert want in got, (want, got)
    assert not [p for _, p in got if "under-new" in p], got  # p1's /data/under-new.txt is under p2: no event
    events = [json.loads(x) for x in (state / "events.jsonl").read_text().splitlines()]
    assert any(e["fs"] == "p1" and e["path"] == "/data/under-new.txt" for e in events)  # the engine did see it
