"""A damaged older write-log segment through the real CLI: `mirrorfs replay`, `events`, `log` and `replica` report
the exact seqs lost as an error event (or a gap line) and go on with every file change after the damage.

No QEMU needed: the guest's writes are made with debugfs on a journal-less ext4 and logged by the real WriteLog,
exactly as the tap would log them; the damage is a flipped byte in a rolled-over segment, as a disk makes it.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from tests.hostile import apply_changes, debugfs_changes, make_image
from tests.support import require_tools
from tests.tapharness import mirrorfs

pytestmark = pytest.mark.integration

FILES = 12


def test_replay_reports_the_lost_seqs_and_goes_on(tmp_path: Path) -> None:
    require_tools("mke2fs", "debugfs")
    from tap.state import StateDir
    from tap.writelog import HEADER, KIND_WRITE, WriteLog, list_segments, read_records, segment_name

    base = make_image(tmp_path / "base.raw")
    disk = tmp_path / "disk.raw"
    shutil.copyfile(base, disk)
    state = tmp_path / "state"
    StateDir(state).path.mkdir(parents=True)
    StateDir(state).init_state(base.stat().st_size, "drive0")
    log_dir = StateDir(state).log
    content = tmp_path / "content"
    step_seqs: dict[int, list[int]] = {}
    with WriteLog(log_dir, segment_bytes=16 << 10) as log:
        for k in range(1, FILES + 1):
            content.write_bytes(f"file {k}\n".encode() * 50)
            changes = debugfs_changes(disk, tmp_path / "work", [f"write {content} f{k}"])
            apply_changes(disk, changes)
            step_seqs[k] = [log.append(KIND_WRITE, off, len(data), data) for off, data in changes]
    segs = list_segments(log_dir)
    assert len(segs) >= 5
    # damage the data block of /f3 (the record that carries "file 3"), in a rolled-over segment
    victim = next(r.seq for r in read_records(log_dir) if r.seq in step_seqs[3] and b"file 3\n" in r.payload)
    seg = max(s for s in segs if s <= victim)
    assert seg != segs[-1]
    path = log_dir / segment_name(seg)
    data = bytearray(path.read_bytes())
    off = 24
    while int.from_bytes(data[off + 8:off + 16], "little") != victim:
        off += HEADER.size + int.from_bytes(data[off + 32:off + 36], "little")
    data[off + HEADER.size + 100] ^= 0x55
    path.write_bytes(data)

    t = time.monotonic()
    proc = mirrorfs("replay", "--state", state, "--base", base, timeout=120)
    took = time.monotonic() - t
    assert took < 60, f"replay took {took:.1f} s"
    events = [json.loads(line) for line in (state / "events.jsonl").read_text().splitlines()]
    errors = [e for e in events if e["kind"] == "error"]
    lost = [e for e in errors if "write log records lost" in e["message"]]
    assert len(lost) == 1, errors
    assert lost[0]["seq"] == victim
    assert f"seq {victim}," in lost[0]["message"] and segment_name(seg) in lost[0]["message"]
    assert f"byte {off}" in lost[0]["message"]
    created = {e["path"] for e in events if e["kind"] == "create"}
    later = {f"/f{k}" for k in range(4, FILES + 1)}
    assert later <= created, (sorted(created), proc.stderr)
    assert f"seq {victim}," in proc.stderr  # the reader's warning on the terminal too

    shown = mirrorfs("events", "--state", state, "--kind", "error").stdout
    assert f"seq {victim}," in shown

    lines = [json.loads(line) for line in mirrorfs("log", "--state", state, "--json").stdout.splitlines()]
    gaps = [x for x in lines if x["kind"] == "gap"]
    assert [(g["first_seq"], g["last_seq"], g["segment"], g["offset"]) for g in gaps] == [
        (victim, victim, segment_name(seg), off)]
    seqs = [x["seq"] for x in lines]
    assert seqs == list(range(1, seqs[-1] + 1)) and seqs[-1] == step_seqs[FILES][-1]

    # the mount's engine thread (`mirrorfs mount`, `replay --mount`) turns the gap into the same error event
    from inference.engine import Engine
    from inference.runner import Runner
    from tap.writelog import LogFollower

    seen: list = []
    engine = Engine(tmp_path / "engine", base.stat().st_size, base=base, vm="drive0")
    try:
        with LogFollower(log_dir) as follower:
            loop = Runner(engine, follower, follow=False)
            loop.sinks.append(seen.extend)
            loop.run()  # as serve_log does before serving a stopped state
    finally:
        engine.close()
    assert [(e.seq, e.kind) for e in seen if "write log records lost" in (e.message or "")] == [(victim, "error")]
    assert later <= {e.path for e in seen if e.kind == "create"}

    out = tmp_path / "replica.raw"
    proc = mirrorfs("replica", "--state", state, "--base", base, "-o", out)
    assert f"seq {victim}," in proc.stderr and "lacks their writes" in proc.stderr
    assert out.stat().st_size == base.stat().st_size
