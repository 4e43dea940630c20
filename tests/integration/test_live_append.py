"""A log appended with no sync, watched on the live view: readers get the lines the guest wrote, never NULs.

ext4 commits a larger i_size before the bytes (delayed allocation: an append inside an allocated block moves the
on-disk size at write() time, the page waits ~30 s for writeback). The engine holds that part of the size until
the data comes (inference/reconcile.py), so `tail -F` and a program that re-reads the whole file only ever see
whole lines the writer wrote. The writer is the host kernel's ext4 through qemu-storage-daemon
(images/hostwriter.py) with its own 5 s commit and 30 s writeback deciding what is flushed; the view is a live
`mirrorfs attach --mount`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.mountharness import host_writer_view
from tests.support import require_root, require_tools
from tests.tapharness import mirrorfs

pytestmark = pytest.mark.integration

DURATION = 62.0   # seconds of appends: two writeback rounds of ext4 (30 s) and more
PERIOD = 0.2      # one line per PERIOD, one write() each, never a sync
READ_EVERY = 0.1  # the whole-file reader's pace
SETTLE = 90.0     # after the final sync: the view and tail must reach the file within this


def line(i: int) -> bytes:
    """Line i: varying lengths, so lines straddle blocks at many offsets."""
    return b"%06d %s\n" % (i, b"abcdefghij" * (i % 13))


class WholeReader(threading.Thread):
    """Re-reads the whole file every READ_EVERY s, keeping each read's bytes (a missing file counts as none)."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.reads: list[bytes] = []
        self.errors: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.reads.append(self.path.read_bytes())
            except FileNotFoundError:
                pass
            except OSError as exc:
                self.errors.append(repr(exc))
            self.stop.wait(READ_EVERY)


def test_log_appended_without_sync_reads_whole_lines(tmp_path: Path) -> None:
    require_root()
    require_tools("qemu-storage-daemon", "losetup", "mount", "mke2fs", "fusermount3", "tail")

    populate = tmp_path / "populate"
    populate.mkdir()
    first = b"".join(line(i) for i in range(40))  # a log that already has a partial tail block on the disk
    (populate / "app.log").write_bytes(first)
    base = tmp_path / "base.raw"
    with open(base, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-E", "lazy_itable_init=0", "-d", str(populate), str(base)],
                   check=True, capture_output=True)
    disk = tmp_path / "disk.raw"
    shutil.copyfile(base, disk)
    tail = None
    tail_out = tmp_path / "tail.out"
    try:
        with host_writer_view(tmp_path, base, disk) as v:
            hw, host, mnt, state, attach = v.hw, v.host, v.mnt, v.state, v.attach
            view_log = mnt / "app.log"
            with open(tail_out, "wb") as out:
                tail = subprocess.Popen(["tail", "-F", "-n", "+1", "--max-unchanged-stats=1", "-s", "0.2",
                                         str(view_log)], stdout=out, stderr=subprocess.DEVNULL)
            reader = WholeReader(view_log)
            reader.start()

            fd = os.open(host / "app.log", os.O_WRONLY | os.O_APPEND)
            try:
                i, start = 40, time.monotonic()
                while time.monotonic() - start < DURATION:  # the writer: no fsync, no sync
                    os.write(fd, line(i))
                    i += 1
                    time.sleep(PERIOD)
            finally:
                os.close(fd)
            during = len(reader.reads)
            sizes_during = {len(r) for r in reader.reads}
            subprocess.run(["sync"], check=True)
            final = (host / "app.log").read_bytes()
            assert final == first + b"".join(line(k) for k in range(40, i))

            deadline = time.monotonic() + SETTLE
            while (reader.reads[-1:] != [final] or tail_out.stat().st_size < len(final)) and \
                    time.monotonic() < deadline:
                time.sleep(0.2)
            reader.stop.set()
            reader.join(10)
            tail.terminate()
            tail.wait(10)
            got = tail_out.read_bytes()
            hw.unmount()
            out_text = attach.detach()
        events = (state / "events.jsonl").read_text() if (state / "events.jsonl").exists() else ""
    finally:
        if tail is not None and tail.poll() is None:
            tail.kill()
            tail.wait(10)

    assert not reader.errors, reader.errors[:5]
    assert reader.reads and reader.reads[-1] == final, f"the view never reached the file:\n{out_text[-3000:]}"
    # The view was live while the writer ran: ext4's writeback (~30 s after the first dirty page; the next one
    # ~30 s later may fall just past DURATION) brought lines before the final sync.
    assert during > DURATION / READ_EVERY / 3, during
    assert any(len(first) < s < len(final) for s in sizes_during), sorted(sizes_during)
    # Every whole-file read: a prefix of the final file that ends at a line's end (no NULs, no half line).
    bad = [r for r in reader.reads if not final.startswith(r) or (r and not r.endswith(b"\n"))]
    assert not bad, (f"{len(bad)} of {len(reader.reads)} reads are not whole-line prefixes of the file; first: "
                     f"{len(bad[0])} bytes, {bad[0].count(0)} NULs, tail {bad[0][-80:]!r}")
    # tail -F printed the file byte for byte: no NULs where lines belong, nothing lost, nothing twice.
    assert b"\0" not in got, f"tail printed {got.count(0)} NUL bytes"
    assert got == final, f"tail printed {len(got)} bytes, the file has {len(final)}"
    # Every size the stream showed was confirmed by its data (ext4 wrote it back within the bound).
    assert '"unconfirmed":true' not in events
    # One clock (issue 11): the live engine decided each wait (data waiting for its commit, a burst's settle, a
    # held size) on an idle log by its clock; an offline replay of the same log decides them between the same
    # records, at the same record times, so it emits the same events, times included.
    mirrorfs("replay", "--state", state, "--base", base)
    again = (state / "events.jsonl").read_text()
    assert again.splitlines() == events.splitlines(), "a replay of the log emits other events than the live engine"

