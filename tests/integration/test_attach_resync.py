"""Issue 13: after an unclean stop, `attach` on the same state directory notices that the log may lack writes it
acknowledged, resynchronizes with the running disk, and says so; the replica then equals the disk and the events
cover every change. After a clean detach the guest may write on unrecorded: the next attach resynchronizes too.

The host kernel writes ext4 through qemu-storage-daemon (images/hostwriter.py) the whole time. Two ways to stop
uncleanly: SIGKILL of the tap (the page cache keeps every record it acknowledged; QEMU re-sends what was in
flight), and a host crash, simulated by SIGKILL of the tap and its engine and then cutting the last second of
records from the log, as a power loss does to what was never fsynced (QEMU never sends those writes again).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tap.writelog import HEADER, KIND_WRITE, SEGMENT_HEADER, list_segments, read_records, segment_name
from tests.support import require_root, require_tools
from tests.tapharness import Attach, mirrorfs, same_bytes

pytestmark = pytest.mark.integration

# A numbered file every few milliseconds, each synced, until STOP appears.
WRITER = ('i=0; while [ ! -e STOP ]; do echo "w $i" > live/f$i; sync live/f$i; i=$((i+1)); sleep 0.01; done; '
          'echo $i > COUNT')


@pytest.fixture
def host(tmp_path):
    require_root()
    require_tools("qemu-storage-daemon", "losetup", "mount", "fsfreeze")
    from images.build import artifact
    from images.hostwriter import HostWriter

    disk = tmp_path / "disk.raw"
    shutil.copyfile(artifact("ext4.img"), disk)
    base = tmp_path / "base.raw"
    with HostWriter(disk, tmp_path / "qsd") as hw:
        hw.mount()
        (hw.mnt / "live").mkdir()
        # the base: the disk as it is while nothing writes; it stays frozen until the first attach is ready
        # (a thaw writes the superblock), so the base check passes and the thaw is mirrored
        subprocess.run(["fsfreeze", "-f", str(hw.mnt)], check=True)
        try:
            shutil.copyfile(disk, base)
            yield hw, base, disk
        finally:
            subprocess.run(["fsfreeze", "-u", str(hw.mnt)], check=False, capture_output=True)


def _wait_records(state: Path, more_than: int, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = json.loads((state / "attach.json").read_text())
        if info.get("last_seq", 0) > more_than:
            return info["last_seq"]
        time.sleep(0.1)
    raise AssertionError(f"fewer than {more_than} records within {timeout} s")


def _kill_tap(attach: Attach, *, engine_too: bool) -> None:
    assert attach.proc is not None
    os.kill(attach.proc.pid, signal.SIGKILL)
    attach.proc.wait(10)
    if engine_too:  # a host crash takes the engine with it
        m = re.search(r"inference engine pid (\d+)", attach.output())
        assert m, attach.output()
        try:
            os.kill(int(m.group(1)), signal.SIGKILL)
        except ProcessLookupError:
            pass


def _cut_last_second(log: Path) -> int:
    """Truncate the log where its records' last second begins, as a power loss does to an unsynced tail (the
    replica file keeps those writes: the worst case for an attach that trusted it). Returns the seqs cut."""
    records = [r for r in read_records(log)]
    cut_at = records[-1].time_ns - 1_000_000_000
    first_cut = next(r.seq for r in records if r.time_ns >= cut_at)
    segs = list_segments(log)
    last = max(s for s in segs if s <= first_cut)
    for s in segs:
        if s > last:
            (log / segment_name(s)).unlink()
    off = SEGMENT_HEADER.size
    for r in records:
        if r.seq < last:
            continue
        if r.seq == first_cut:
            break
        off += HEADER.size + (r.length if r.kind == KIND_WRITE else 0)
    os.truncate(log / segment_name(last), off)
    return records[-1].seq - first_cut + 1


def _check(tmp_path: Path, hw, base: Path, disk: Path, state: Path, again: Attach, writer: subprocess.Popen) -> None:
    (hw.mnt / "STOP").touch()
    assert writer.wait(60) == 0
    n = int((hw.mnt / "COUNT").read_text())
    hw.unmount()  # syncs: every write has reached the disk, and through the mirror the log
    out = again.detach()
    assert "inference engine pid" in out
    assert same_bytes(state / "replica.img", disk)
    rebuilt = tmp_path / "rebuilt.raw"
    mirrorfs("replica", "--state", state, "--base", base, "-o", rebuilt)
    assert same_bytes(rebuilt, disk)  # the log alone (with the resync's records) makes the disk
    events = [json.loads(line) for line in (state / "events.jsonl").read_text().splitlines()]
    created = {e["path"] for e in events if e.get("kind") == "create"}
    missing = [i for i in range(n) if f"/live/f{i}" not in created]
    assert n > 0 and not missing, f"{len(missing)} of {n} files have no create event: {missing[:10]}"


def test_sigkill_of_the_tap_mid_run_is_noticed_and_resynchronized(tmp_path, host):
    hw, base, disk = host
    state = tmp_path / "state"
    first = Attach(hw.qmp, state, "--device", hw.node, "--base", str(base)).start()
    subprocess.run(["fsfreeze", "-u", str(hw.mnt)], check=True)
    writer = subprocess.Popen(["sh", "-c", WRITER], cwd=hw.mnt)
    try:
        _wait_records(state, 50)
        _kill_tap(first, engine_too=False)  # the engine lives on; the next attach's takeover ends it
        assert "detached" not in json.loads((state / "attach.json").read_text())
        with Attach(hw.qmp, state, "--device", hw.node, "--base", str(base), log=tmp_path / "again.log") as again:
            out = again.output()
            assert "did not stop cleanly" in out and "resynchronized" in out, out
            assert "resuming mirror job" in out
            info = again.info()
            assert info["verify"]["mode"] == "resync" and info["verify"]["bytes"] == disk.stat().st_size
            _check(tmp_path, hw, base, disk, state, again, writer)
    finally:
        first.__exit__()
        if writer.poll() is None:
            writer.kill()
    assert json.loads((state / "attach.json").read_text()).get("detached")
    # detached cleanly, the disk changes with nobody recording: the next attach finds and logs that too
    hw.mount()
    assert hw.run("echo after > live/after && sync").returncode == 0
    hw.unmount()
    with Attach(hw.qmp, state, "--device", hw.node, "--base", str(base), log=tmp_path / "third.log") as third:
        out = third.output()
        assert "was detached at" in out and "did not stop cleanly" not in out, out
        assert re.search(r"resynchronized: \d+ range\(s\), [1-9]\d* bytes", out), out
        third.detach()
    assert same_bytes(state / "replica.img", disk)
    events = [json.loads(line) for line in (state / "events.jsonl").read_text().splitlines()]
    assert any(e.get("kind") == "create" and e.get("path") == "/live/after" for e in events)


def test_a_host_crash_that_cut_the_logs_last_second_is_resynchronized(tmp_path, host):
    hw, base, disk = host
    state = tmp_path / "state"
    first = Attach(hw.qmp, state, "--device", hw.node, "--base", str(base)).start()
    subprocess.run(["fsfreeze", "-u", str(hw.mnt)], check=True)
    writer = subprocess.Popen(["sh", "-c", WRITER], cwd=hw.mnt)
    try:
        _wait_records(state, 200)
        _kill_tap(first, engine_too=True)
        cut = _cut_last_second(state / "log")
        assert cut > 0
        with Attach(hw.qmp, state, "--device", hw.node, "--base", str(base), log=tmp_path / "again.log") as again:
            out = again.output()
            assert "did not stop cleanly" in out, out
            m = re.search(r"resynchronized: (\d+) range\(s\), (\d+) bytes", out)
            assert m and int(m.group(2)) > 0, out  # the lost second was found on the disk and logged again
            _check(tmp_path, hw, base, disk, state, again, writer)
    finally:
        first.__exit__()
        if writer.poll() is None:
            writer.kill()
