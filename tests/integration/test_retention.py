"""Retention (issue 14 item 5) with a real kernel writer: `attach --retain` folds the oldest history into a
checkpoint several times while the writer keeps writing, and nothing downstream stops.

The host kernel writes ext4 through qemu-storage-daemon (images/hostwriter.py): a numbered file every few tens of
milliseconds, each synced, into a state with 128 KiB segments and `--retain 2s`, so a fold comes about every
second. Meanwhile and afterwards:
- the live engine and its view (`--mount`) go on: a file written after several folds appears in the view with its
  bytes and in events.jsonl, and every numbered file has its create event;
- segments are removed and the replica equals the disk; `replica` (from the checkpoint) equals it too;
- a version of a file from before the checkpoint is refused by `cat --at` (and seq 1 by `cat`, `replica --until`)
  with a message naming the folded history; `history` says so; a version after it is exact;
- `replay` without a base starts at the checkpoint and keeps the events up to it as they were;
- later attaches start there too: after a clean detach (the disk compared), and after a kill, when the replica is
  rebuilt from the checkpoint and the log and compared with the disk.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import subprocess
import time
from pathlib import Path

import pytest

from images.hostwriter import HostWriter
from tap.retention import current
from tap.writelog import list_segments
from tests.mountharness import force_unmount, wait_mounted
from tests.support import ext4_base_and_disk, require_root, require_tools
from tests.tapharness import Attach, mirrorfs, same_bytes

pytestmark = pytest.mark.integration

WRITER = ('i=0; while [ ! -e STOP ]; do head -c 12000 /dev/urandom > live/f$i; sync live/f$i; i=$((i+1)); '
          'sleep 0.03; done; echo $i > COUNT')


def iso(ns: int) -> str:
    return dt.datetime.fromtimestamp(ns / 1e9, dt.UTC).isoformat().replace("+00:00", "Z")


def folds(attach: Attach) -> int:
    return attach.output().count("folded into a checkpoint")


def wait_for(cond, what: str, attach: Attach, timeout: float = 45) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert attach.proc is not None and attach.proc.poll() is None, attach.output()
        assert time.monotonic() < deadline, f"{what} within {timeout} s:\n{attach.output()}"
        time.sleep(0.1)


def events_of(state: Path) -> list[dict]:
    return [json.loads(x) for x in (state / "events.jsonl").read_text().splitlines() if x.endswith("}")]


def write_synced(path: Path, data: bytes) -> tuple[int, int]:
    """Write and sync `data`; (time before the write, time after the sync)."""
    t0 = time.time_ns()
    path.write_bytes(data)
    subprocess.run(["sync"], check=True)
    return t0, time.time_ns()


def test_retention_folds_while_a_writer_keeps_writing(tmp_path: Path) -> None:
    require_root()
    require_tools("qemu-storage-daemon", "losetup", "mount", "mke2fs", "fusermount3", "cmp")
    base, disk = ext4_base_and_disk(tmp_path)
    state, view = tmp_path / "state", tmp_path / "view"
    view.mkdir()
    old_doc, new_doc, late = b"before " * 3000, b"after " * 5000, b"late " * 2000
    attach = None
    try:
        with HostWriter(disk, tmp_path / "qsd") as hw:
            attach = Attach(hw.qmp, state, "--device", hw.node, "--base", str(base), "--mount", str(view),
                            "--segment-size", "128K", "--retain", "2s", log=tmp_path / "attach.log").start()
            wait_mounted(view, attach.proc, timeout=120)
            mnt = hw.mount()
            (mnt / "live").mkdir()
            before = write_synced(mnt / "doc.txt", old_doc)
            time.sleep(0.3)
            changed = time.time_ns()
            writer = subprocess.Popen(["sh", "-c", WRITER], cwd=mnt)
            try:
                wait_for(lambda: folds(attach) >= 2, "two folds", attach)
                # the view and the stream go on across folds
                write_synced(mnt / "late.txt", late)
                wait_for(lambda: (view / "late.txt").is_file() and (view / "late.txt").read_bytes() == late,
                         "late.txt with its bytes in the view", attach)
                wait_for(lambda: folds(attach) >= 3, "a third fold", attach)
            finally:
                (mnt / "STOP").touch()
                assert writer.wait(60) == 0
            n = int((mnt / "COUNT").read_text())
            after = write_synced(mnt / "doc.txt", new_doc)
            time.sleep(0.3)
            after = (after[1], time.time_ns())
            hw.unmount()
            out = attach.detach()
            ck = current(state)
            assert ck is not None
            # later attaches start at the checkpoint: one after the clean detach (the disk compared), killed; the
            # next one finds the unclean stop and rebuilds the replica from the checkpoint and the log
            again = Attach(hw.qmp, state, "--device", hw.node, "--base", str(base),
                           log=tmp_path / "again.log").start()
            hw.mount()
            assert hw.run("echo again > again.txt && sync").returncode == 0
            again.kill()
            with Attach(hw.qmp, state, "--device", hw.node, "--base", str(base), log=tmp_path / "third.log") as third:
                out3 = third.output()
                assert "did not stop cleanly" in out3 and f"Rebuilt the replica from {ck.image}" in out3, out3
                assert "resynchronized" in out3
                hw.unmount()
                third.detach()
    finally:
        if attach is not None and attach.proc is not None and attach.proc.poll() is None:
            attach.proc.kill()
            attach.proc.wait(10)
        force_unmount(view)
    assert "Traceback" not in out + out3, out + out3
    assert ck is not None and ck.index is not None and ck.time_ns > changed, out
    assert list_segments(state / "log")[0] == ck.seq + 1  # the segments it replaced are gone
    assert json.loads((state / "attach.json").read_text())["checkpoint"]["seq"] == ck.seq

    # the stream went on: every numbered file, and the late one, has its create event
    events = events_of(state)
    created = {e["path"] for e in events if e.get("kind") == "create"}
    missing = [i for i in range(n) if f"/live/f{i}" not in created]
    assert n > 20 and not missing, f"{len(missing)} of {n} files have no create event: {missing[:10]}"
    assert "/late.txt" in created and "/again.txt" in created

    # the disk: the tap's replica, and a replica made from the checkpoint and the log
    assert same_bytes(state / "replica.img", disk)
    rebuilt = tmp_path / "rebuilt.raw"
    mirrorfs("replica", "--state", state, "-o", rebuilt)
    assert same_bytes(rebuilt, disk)
    early = mirrorfs("replica", "--state", state, "--until", 1, "-o", tmp_path / "x.raw", check=False)
    assert early.returncode == 1 and "before the retained history" in early.stderr

    # history before the checkpoint is refused, clearly; after it, exact
    old = mirrorfs("cat", "--state", state, "--at", iso((before[1] + changed) // 2), "/doc.txt", check=False)
    assert old.returncode == 1 and "before the retained history" in old.stderr, old.stderr
    assert "folded into a checkpoint" in old.stderr and f"seq {ck.seq}" in old.stderr
    first = mirrorfs("cat", "--state", state, "--at", "1", "/doc.txt", check=False)
    assert first.returncode == 1 and "before the retained history" in first.stderr
    now = subprocess.run([*_cli(), "cat", "--state", str(state), "--at", iso((after[0] + after[1]) // 2),
                          "/doc.txt"], capture_output=True, check=True)
    assert hashlib.sha256(now.stdout).hexdigest() == hashlib.sha256(new_doc).hexdigest()
    hist = mirrorfs("history", "--state", state, "/doc.txt")
    assert "folded into a checkpoint" in hist.stderr
    assert hashlib.sha256(old_doc).hexdigest() in hist.stdout  # the events still tell of it
    assert "folded into a checkpoint" in mirrorfs("log", "--state", state).stderr
    assert f"history    from seq {ck.seq}" in mirrorfs("status", "--state", state).stdout

    # a replay starts at the checkpoint: the events up to it stay as they were, the later ones come again
    kept = [e for e in events if e["seq"] <= ck.seq]
    mirrorfs("replay", "--state", state)
    again = events_of(state)
    assert again[:len(kept)] == kept
    assert {e["path"] for e in again if e.get("kind") == "create"} >= {f"/live/f{i}" for i in range(n)}


def _cli() -> list[str]:
    from tests.tapharness import MIRRORFS
    return MIRRORFS
