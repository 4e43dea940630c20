"""Issue 16: `attach --sync none --base IMG` checks the base against the running disk before trusting it.

Real writers on the disk while the check runs: the host kernel's ext4 through qemu-storage-daemon, and a TCG guest
(whose QEMU starts its own NBD server for the check).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.support import require_root, require_tools
from tests.tapharness import Attach, mirrorfs, same_bytes

pytestmark = pytest.mark.integration

# Appends a numbered file every few milliseconds until STOP appears; blocked while the file system is frozen.
WRITER = 'i=0; while [ ! -e STOP ]; do echo "w $i" > live/f$i; sync; i=$((i+1)); sleep 0.01; done; echo $i > COUNT'


def _one_line_refusal(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "is not the disk" in lines[0] and "--sync full" in lines[0] and "--repair-base" in lines[0]
    return lines[0]


def _events(state: Path) -> list[dict]:
    path = state / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _stop_writer(hw, writer: subprocess.Popen) -> int:
    (hw.mnt / "STOP").touch()
    assert writer.wait(30) == 0
    return int((hw.mnt / "COUNT").read_text())


def _writer(hw) -> subprocess.Popen:
    (hw.mnt / "live").mkdir(exist_ok=True)
    return subprocess.Popen(["sh", "-c", WRITER], cwd=hw.mnt)


@pytest.fixture(params=[0])
def host(tmp_path, request):
    """(HostWriter with its ext4 mounted, the disk's first image, the disk); param: a size to mkfs, or the
    64 MiB test image."""
    require_root()
    require_tools("qemu-storage-daemon", "losetup", "mount", "cmp", "fsfreeze", "mke2fs")
    from images.build import artifact
    from images.hostwriter import HostWriter

    base = tmp_path / "base.raw"
    if request.param:
        with open(base, "wb") as f:
            f.truncate(request.param)
        subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                        str(base)], check=True, capture_output=True)
    else:
        shutil.copyfile(artifact("ext4.img"), base)
    disk = tmp_path / "disk.raw"
    shutil.copyfile(base, disk)
    with HostWriter(disk, tmp_path / "qsd") as hw:
        hw.start()
        hw.mount()
        yield hw, base, disk


def test_stale_base_is_refused_and_repaired_with_a_writer_running(tmp_path, host):
    hw, stale, disk = host
    assert hw.run("mkdir -p old && for i in $(seq 30); do echo $i > old/g$i; done; sync").returncode == 0
    writer = _writer(hw)
    state = tmp_path / "state"
    try:
        proc = mirrorfs("attach", "--qmp", hw.qmp, "--state", state, "--device", hw.node, "--base", stale,
                        "--verify-nbd", hw.export_sock, check=False, timeout=120)
        line = _one_line_refusal(proc)
        assert "at bytes" in line
        assert not (state / "state.json").exists() and not (state / "log").exists()  # a new state stays empty
        assert writer.poll() is None  # the writer never noticed
        assert hw.run("echo still > old/after && sync && cat old/after").stdout.strip() == "still"

        # --repair-base (every block, so the replica can equal the disk byte for byte) while the writer runs;
        # the same state directory again: the refusal left nothing in it; the job of the refusal is gone too
        with Attach(hw.qmp, state, "--device", hw.node, "--base", str(stale), "--repair-base", "--verify", "full"
                    ) as attach:
            assert "repaired into the replica" in attach.output()
            info = attach.info()
            assert info["base"] == str(state / "base.img") and info["verify"]["repaired_bytes"] > 0
            assert hw.run("rm old/g1 && sync").returncode == 0
            n = _stop_writer(hw, writer)
            hw.unmount()
            out = attach.detach()
    finally:
        if writer.poll() is None:
            writer.kill()
    assert "inference engine pid" in out
    assert same_bytes(state / "replica.img", disk)
    rebuilt = tmp_path / "rebuilt.raw"
    mirrorfs("replica", "--state", state, "--base", state / "base.img", "-o", rebuilt)
    assert same_bytes(rebuilt, disk)
    # the engine started from the repaired base: it knew /old/g1, which the stale base lacks, and saw it go
    events = _events(state)
    assert any(e.get("path") == "/old/g1" and e.get("kind") == "delete" for e in events), events[-5:]
    assert n > 0


@pytest.mark.parametrize("host", [512 << 20], indirect=True)  # --verify full takes long enough for writes
def test_one_inode_table_block_is_caught_then_a_correct_base_is_accepted_under_writes(tmp_path, host):
    hw, _, disk = host
    from inference.ext.reader import ExtReader

    writer = _writer(hw)
    try:
        time.sleep(0.2)  # a few files exist before the freeze
        subprocess.run(["fsfreeze", "-f", str(hw.mnt)], check=True)
        frozen = True
        try:
            before = set(os.listdir(hw.mnt / "live"))  # in the base
            good = tmp_path / "good.raw"
            shutil.copyfile(disk, good)  # the disk as it is: a correct base while nothing writes
            bad = tmp_path / "bad.raw"
            shutil.copyfile(good, bad)
            with open(bad, "r+b") as f:  # one inode-table block (the third of group 0's) differs, nothing else
                fs = ExtReader(lambda off, n: os.pread(f.fileno(), n, off), verify=False)
                at = (fs.descs[0].inode_table + 2) * fs.geo.block_size + 100
                f.seek(at)
                old = f.read(1)
                f.seek(at)
                f.write(bytes([old[0] ^ 0xFF]))
            proc = mirrorfs("attach", "--qmp", hw.qmp, "--state", tmp_path / "bad", "--device", hw.node,
                            "--base", bad, "--verify-nbd", hw.export_sock, "--no-engine", check=False, timeout=120)
            line = _one_line_refusal(proc)
            assert f"inode table of group 0 (disk) differs at bytes {at - 100}-" in line

            # the correct base: the check runs while the writer, thawed once the job logs, writes on
            state = tmp_path / "state"
            attach = Attach(hw.qmp, state, "--device", hw.node, "--base", str(good), "--verify", "full").spawn()
            deadline = time.monotonic() + 60
            while not (attach.info() or {}).get("verifying"):
                assert attach.proc.poll() is None and time.monotonic() < deadline, attach.output()
                time.sleep(0.01)
            subprocess.run(["fsfreeze", "-u", str(hw.mnt)], check=True)
            frozen = False
            attach.wait_ready()
        finally:
            if frozen:
                subprocess.run(["fsfreeze", "-u", str(hw.mnt)], check=False)
        verified = attach.info()["verify"]
        assert verified["differing"] == 0 and verified["writes_during"] > 0, verified
        deadline = time.monotonic() + 60
        while len(os.listdir(hw.mnt / "live")) < len(before) + 15 and time.monotonic() < deadline:
            time.sleep(0.05)  # some files after the check too
        n = _stop_writer(hw, writer)
        hw.unmount()
        attach.detach()
    finally:
        if writer.poll() is None:
            writer.kill()
    assert same_bytes(state / "replica.img", disk)
    paths = {e.get("path") for e in _events(state)}
    new = [i for i in range(n) if f"f{i}" not in before]
    assert len(new) > 10
    missing = [i for i in new if f"/live/f{i}" not in paths]
    assert not missing, f"{len(missing)} of {n} files written around the check have no event: {missing[:10]}"


def test_running_guest_stale_base_refused_guest_unharmed(tmp_path):
    """A TCG guest that runs (no -S): QEMU starts the NBD server for the check itself; a refusal leaves the
    guest running and no block job behind (a second attach's mirror job starts)."""
    require_tools("qemu-system-x86_64", "cmp")
    from images.build import artifact
    from images.guest import DONE, Guest

    base = tmp_path / "base.raw"
    shutil.copyfile(artifact("ext4.img"), base)
    disk = tmp_path / "disk.raw"
    shutil.copyfile(base, disk)
    workload = ('cd "$MNT"; mkdir -p g; i=0; while [ $i -lt 250 ]; do '
                'echo $i > g/f$i; i=$((i+1)); if [ $((i % 25)) = 0 ]; then echo "TICK $i"; fi; sleep 0.1; done; sync')
    with Guest(disk, workload, tmp_path / "vm", paused=False) as guest:
        guest.wait_for("TICK 25", timeout=180)
        proc = mirrorfs("attach", "--qmp", guest.qmp, "--state", tmp_path / "st", "--base", base, check=False,
                        timeout=120)
        _one_line_refusal(proc)
        seen = guest.console().count("TICK")
        with Attach(guest.qmp, tmp_path / "st2", "--base", str(base), "--repair-base", "--verify", "full",
                    "--no-engine") as attach:
            assert guest.running() and seen < 10, guest.console()[-500:]
            guest.wait_for(f"TICK {(seen + 1) * 25}", timeout=120)  # still writing after the refusal
            guest.wait_for(DONE + " rc=0", timeout=240)
            guest.wait_for("reboot: Power down", timeout=30)
            attach.detach()
    assert same_bytes(tmp_path / "st2" / "replica.img", disk)


def test_paused_guest_check_is_skipped_only_with_cont(tmp_path):
    """QEMU -S: a guest that never ran cannot have written, so `--cont` skips the check; without --cont the
    check runs (the guest is paused, not proven unwritten); --verify none says what it risks."""
    require_tools("qemu-system-x86_64")
    from images.build import artifact
    from images.guest import Guest

    base = tmp_path / "base.raw"
    shutil.copyfile(artifact("ext4.img"), base)
    disk = tmp_path / "disk.raw"
    shutil.copyfile(base, disk)
    with Guest(disk, "true", tmp_path / "vm", paused=True) as guest:
        a = Attach(guest.qmp, tmp_path / "s1", "--base", str(base), "--no-engine").start()
        assert "the base is the disk" in a.detach()
        a = Attach(guest.qmp, tmp_path / "s2", "--base", str(base), "--no-engine", "--verify", "none").start()
        assert "--verify none" in a.detach() and "wrong from the start" in a.output()
        a = Attach(guest.qmp, tmp_path / "s3", "--base", str(base), "--no-engine", "--cont").start()
        out = a.detach()
        assert "has not run since QEMU started" in out and "the base is the disk" not in out
