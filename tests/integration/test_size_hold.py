"""The engine holds a committed size until its bytes come, over a log recorded from the host kernel's ext4.

An append inside an allocated block moves ext4's on-disk size at write() time; the page waits for writeback. The
host kernel writes through qemu-storage-daemon with a mirror job attached (commit=1, so the size commits at once
and the data only at `sync`), and the recorded write log is fed to inference.engine.Engine record by record:
- after the commit and before the data: no event shows the new size (the hold), the reconciler holds it;
- the data write: one modify with the new size whose range is exactly the appended bytes;
- a second append whose data never comes (its data writes are left out, as if the guest crashed): the first
  record HOLD_S later (record time) releases it, a modify with the size and "unconfirmed": true.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

import pytest

from inference.engine import Engine
from inference.events import Mutation
from inference.ext.handler import DATA_WAIT_NS
from inference.reconcile import HOLD_S
from tap.writelog import KIND_WRITE, Gap, LogFollower, Record
from tests.support import require_root, require_tools
from tests.tapharness import Attach

pytestmark = pytest.mark.integration

FIRST = b"".join(b"line %04d of the log as it was\n" % i for i in range(40))  # 1,240 bytes: a partial block
A = b"appended A, committed before its data\n"
B = b"appended B, its data never comes\n"


def _record(tmp_path: Path) -> tuple[Path, list[Record]]:
    """Base image with /app.log; on the host mount: append A, let the commit land, sync; append B, let the commit
    land; unmount. Returns the base and the records."""
    require_root()
    require_tools("qemu-storage-daemon", "losetup", "mount", "mke2fs")
    from images.hostwriter import HostWriter

    populate = tmp_path / "populate"
    populate.mkdir()
    (populate / "app.log").write_bytes(FIRST)
    base = tmp_path / "base.raw"
    with open(base, "wb") as f:
        f.truncate(32 << 20)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-E", "lazy_itable_init=0",
                    "-d", str(populate), str(base)], check=True, capture_output=True)
    disk, state = tmp_path / "disk.raw", tmp_path / "state"
    shutil.copyfile(base, disk)
    with HostWriter(disk, tmp_path / "qsd") as hw:
        with Attach(hw.qmp, state, "--device", hw.node, "--mode", "exact", "--sync", "none") as attach:
            mnt = hw.mount()
            subprocess.run(["mount", "-o", "remount,commit=1", str(mnt)], check=True)
            script = (f"printf '{A.decode()[:-1]}\\n' >> app.log; sleep 3; sync; "
                      f"printf '{B.decode()[:-1]}\\n' >> app.log; sleep 3")
            proc = hw.run(script, timeout=60)
            assert proc.returncode == 0, proc.stderr
            assert (mnt / "app.log").read_bytes() == FIRST + A + B
            hw.unmount()
            attach.detach()
    records: list[Record] = []
    with LogFollower(state / "log") as follower:
        while batch := follower.poll():
            assert type(batch[0]) is not Gap
            records += batch
    return base, records


def _log_events(events: list[Mutation]) -> list[Mutation]:
    return [e for e in events if e.path == "/app.log"]


def test_size_waits_for_its_data_then_the_bound_releases_it(tmp_path: Path) -> None:
    base, records = _record(tmp_path)
    engine = Engine(tmp_path / "engine", base.stat().st_size, base=base)
    handler = next(iter(engine.filesystems.values())).handler
    ino = handler.tree.children[2][b"app.log"]
    bs = handler.geo.block_size
    (_, phys, count, _), = handler.tree.nodes[ino].extents
    lo, hi = phys * bs, (phys + count) * bs

    def is_data(rec: Record) -> bool:
        return rec.kind == KIND_WRITE and rec.offset < hi and rec.offset + rec.length > lo

    data_at = [i for i, rec in enumerate(records) if is_data(rec)]
    assert data_at, "the log's data block was written"
    a_data = data_at[0]
    holds = handler.reconciler.holds

    # Up to A's data: A's size was committed (commit=1, 3 s before the sync) while its page waited: held.
    before = []
    for rec in records[:a_data]:
        before += engine.process([rec])
        if holds.get(ino):
            break
    assert [s for s, _ in holds[ino]] == [len(FIRST + A)], "the commit of A's size is held"
    before += engine.process(records[records.index(rec) + 1:a_data])
    assert not [e for e in _log_events(before) if (e.size or 0) > len(FIRST)], _log_events(before)
    # A's data: one modify with the size and exactly the appended bytes, confirmed. Data with no commit after it
    # is a point of its own once it waited DATA_WAIT_NS for one (the sync's commit, here, takes it sooner).
    with_data = engine.process(records[a_data:a_data + 1])
    with_data += engine.tick(records[a_data].time_ns + DATA_WAIT_NS) if ino in holds else []
    with_data = _log_events(with_data)
    assert [(e.kind, e.size, e.ranges, e.unconfirmed) for e in with_data] == \
        [("modify", len(FIRST + A), [(len(FIRST), len(FIRST + A))], None)], with_data
    assert ino not in holds

    # B: its data never comes (every later write of the data block is left out, as if the guest crashed before
    # writeback). Once its size is committed and held, the records after it arrive HOLD_S later (record time):
    # the size is released as the bound falls due, before the first of them, unconfirmed.
    rest = [r for r in records[a_data + 1:] if not is_data(r)]
    events = []
    for k, rec in enumerate(rest):  # noqa: B007 - k is where the loop stopped
        events += engine.process([rec])
        if holds.get(ino):
            break
    assert [s for s, _ in holds[ino]] == [len(FIRST + A + B)], "B's size is held"
    assert not [e for e in _log_events(events) if (e.size or 0) > len(FIRST + A)], _log_events(events)
    shift = int((HOLD_S + 1) * 1e9)
    late = [dataclasses.replace(r, time_ns=r.time_ns + shift) for r in rest[k + 1:]]
    assert late, "records came after B's commit (the unmount)"
    released = _log_events(engine.process(late[:1]))
    assert [(e.kind, e.size, e.ranges, e.unconfirmed) for e in released] == \
        [("modify", len(FIRST + A + B), [(len(FIRST + A), len(FIRST + A + B))], True)], released
    # decided when the bound fell due (record time), before the first record past it, not at the end of the replay
    assert released[0].seq < late[0].seq and released[0].time < late[0].time_ns / 1e9
    assert '"unconfirmed":true' in released[0].to_json()
    rest_events = engine.process(late[1:]) + engine.finish()
    assert not [e for e in _log_events(rest_events) if e.unconfirmed], "released once"
    engine.close()

