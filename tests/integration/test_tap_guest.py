"""The tap against a real TCG guest: the replica must equal the guest's final disk, byte for byte."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.support import require_tools
from tests.tapharness import MIRRORFS, Attach, log_seqs, mirrorfs, same_bytes

pytestmark = pytest.mark.integration

WORKLOAD = r"""
set -e
cd "$MNT"
mkdir -p work/a/b/c
i=0
while [ $i -lt 40 ]; do
  echo "line $i $(date +%s%N)" >> work/app.log
  dd if=/dev/urandom of=work/a/b/f$i bs=1k count=$((i % 9 + 1)) 2>/dev/null
  i=$((i + 1))
done
sync
echo MIRRORFS-MARK phase1
mv work/a/b/f1 work/a/b/c/moved
mv work/a/b work/renamed
rm work/renamed/f2 work/renamed/f3
dd if=/dev/urandom of=work/big bs=64k count=64 2>/dev/null
sync
rm -rf work/renamed/c
echo tail >> work/app.log
sync
"""


def _base_image(tmp_path: Path) -> Path:
    from images.build import artifact

    base = tmp_path / "base.raw"
    shutil.copyfile(artifact("ext4.img"), base)
    return base


def run_mirrored(tmp_path: Path, mode: str, sync: str, workload: str = WORKLOAD,
                 on_mark=None) -> tuple[Path, Path, Path]:
    """Boot paused, attach with --cont, run the workload, detach; returns (base, disk, state)."""
    from images.guest import DONE, Guest

    require_tools("qemu-system-x86_64", "mke2fs", "cmp")
    base = _base_image(tmp_path)
    disk = tmp_path / "disk.raw"
    shutil.copyfile(base, disk)
    state = tmp_path / "state"
    with Guest(disk, workload, tmp_path / "vm", paused=True) as guest:
        attach = Attach(guest.qmp, state, "--mode", mode, "--sync", sync, "--cont")
        with attach:
            if on_mark is not None:
                on_mark(guest, attach)
            guest.wait_for(DONE + " rc=0", timeout=240)
            guest.wait_for("reboot: Power down", timeout=30)
            attach.detach()
    return base, disk, state


@pytest.mark.parametrize("mode", ["exact", "async"])
def test_sync_none_replica_from_base_equals_guest_disk(tmp_path, mode):
    base, disk, state = run_mirrored(tmp_path, mode, "none")
    assert not same_bytes(base, disk), "the workload changed nothing: the test would prove nothing"
    out = tmp_path / "replica.raw"
    mirrorfs("replica", "--state", state, "--base", base, "-o", out)
    assert same_bytes(out, disk)
    seqs = log_seqs(state)
    assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) > 10


@pytest.mark.parametrize("mode", ["exact", "async"])
def test_sync_full_replica_from_nothing_equals_guest_disk(tmp_path, mode):
    _, disk, state = run_mirrored(tmp_path, mode, "full")
    out = tmp_path / "replica.raw"
    mirrorfs("replica", "--state", state, "-o", out)
    assert same_bytes(out, disk)
    # the live replica the tap kept (served to NBD readers) is the same disk
    assert same_bytes(state / "replica.img", disk)


def test_point_in_time_replica_until_seq(tmp_path):
    """--until SEQ gives an earlier disk: the workload's first phase without its later deletions."""
    base, disk, state = run_mirrored(tmp_path, "exact", "none")
    seqs = log_seqs(state)
    half = tmp_path / "half.raw"
    mirrorfs("replica", "--state", state, "--base", base, "--until", str(seqs[len(seqs) // 2]), "-o", half)
    full = tmp_path / "full.raw"
    mirrorfs("replica", "--state", state, "--base", base, "-o", full)
    assert same_bytes(full, disk) and not same_bytes(half, disk) and not same_bytes(half, base)


KILL_WORKLOAD = r"""
set -e
cd "$MNT"
i=0
while [ $i -lt 30 ]; do
  dd if=/dev/urandom of=f$i bs=4k count=8 2>/dev/null
  echo "round $i" >> rounds.log
  sync
  [ $i -eq 5 ] && echo MIRRORFS-MARK kill-now
  i=$((i + 1))
done
"""


def test_killed_tap_restarts_and_qemu_reconnects(tmp_path):
    """SIGKILL the tap mid-run; a new attach on the same state dir gets QEMU's reconnect and the backlog."""
    restarted = {}

    def kill_and_restart(guest, attach):
        guest.wait_for("MIRRORFS-MARK kill-now", timeout=120)
        attach.kill()
        time.sleep(1.5)
        second = Attach(guest.qmp, attach.state, "--mode", "exact", "--sync", "none",
                        log=attach.state.parent / "attach-second.log")
        second.start()
        restarted["attach"] = second
        guest.wait_for("MIRRORFS: workload done rc=0", timeout=240)
        guest.wait_for("reboot: Power down", timeout=30)
        second.detach()
        attach.proc = second.proc  # the outer context has nothing left to stop

    from images.guest import Guest

    require_tools("qemu-system-x86_64", "cmp")
    base = _base_image(tmp_path)
    disk = tmp_path / "disk.raw"
    shutil.copyfile(base, disk)
    state = tmp_path / "state"
    with Guest(disk, KILL_WORKLOAD, tmp_path / "vm", paused=True) as guest:
        with Attach(guest.qmp, state, "--mode", "exact", "--sync", "none", "--cont",
                    "--reconnect-delay", "15") as first:
            kill_and_restart(guest, first)
    second = restarted["attach"]
    assert "resuming mirror job" in second.output()
    assert second.info()["writes"] > 0, "QEMU did not reconnect to the restarted tap"
    out = tmp_path / "replica.raw"
    mirrorfs("replica", "--state", state, "--base", base, "-o", out)
    assert same_bytes(out, disk)
    seqs = log_seqs(state)
    assert seqs == list(range(1, len(seqs) + 1))


def test_nbdinfo_and_nbdcopy_read_the_replica_back(tmp_path):
    """A second real NBD client (libnbd) handshakes with our server and reads every byte."""
    require_tools("nbdinfo", "nbdcopy")
    _, disk, state = run_mirrored(tmp_path, "async", "full")
    port = 10809 + (hash(str(tmp_path)) % 2000)
    serve = subprocess.Popen([*MIRRORFS, "serve", "--state", str(state),
                              "--listen", f"tcp:127.0.0.1:{port}", "--listen", f"unix:{tmp_path}/ro.sock"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        first = serve.stdout.readline()
        assert "serving" in first, first + serve.stdout.read()
        info = subprocess.run(["nbdinfo", "--json", f"nbd://127.0.0.1:{port}/mirrorfs"],
                              capture_output=True, text=True, timeout=30, check=True).stdout
        assert f'"export-size": {disk.stat().st_size}' in info and '"is_read_only": true' in info
        copy = tmp_path / "copy.raw"
        subprocess.run(["nbdcopy", f"nbd+unix:///mirrorfs?socket={tmp_path}/ro.sock", str(copy)],
                       check=True, timeout=120)
        assert same_bytes(copy, disk)
        listing = subprocess.run(["nbdinfo", "--list", f"nbd://127.0.0.1:{port}"],
                                 capture_output=True, text=True, timeout=30, check=True).stdout
        assert "mirrorfs" in listing
    finally:
        serve.terminate()
        serve.wait(10)
