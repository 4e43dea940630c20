"""A TCG guest appends to its log with no sync; every reader a user runs on the live view gets its lines, whole.

The guest's own ext4 decides what reaches the disk (a 5 s journal commit that may carry a larger i_size before
the bytes; 30 s writeback for the bytes), so the engine sees sizes run ahead of data and must hold them
(inference/reconcile.py). While the guest writes, the host watches `mirrorfs attach --mount` with what a user
runs on a log: `tail -F -n +1`, `tail -f -n +1`, `less +F` (on a pty), a program that re-reads the whole file
and an mmap reader. One boot; all of them watch the same run.

When an assertion fails, the test directory keeps what explains it: readers.txt (each reader's sizes over time,
CLOCK_MONOTONIC like the attach log), the attach log, state/events.jsonl and the guest's console.
"""

from __future__ import annotations

import mmap
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.mountharness import OnPty, force_unmount, wait_mounted
from tests.support import require_root, require_tools
from tests.tapharness import Attach

pytestmark = pytest.mark.integration

DURATION = 62      # seconds the guest appends: two of its writeback rounds (30 s) and more
FIRST = 40         # lines the log has in the base image (a partial tail block on the disk)
SETTLE = 90.0      # after the guest's final sync: every reader must reach the final file within this

WORKLOAD = r"""
L="$MNT/app.log"
end=$(( $(date +%s) + DURATION ))
i=FIRST
while [ $(date +%s) -lt $end ]; do
  p= j=0
  while [ $j -lt $((i % 13)) ]; do p="${p}abcdefghij"; j=$((j + 1)); done
  printf '%06d %s\n' $i "$p" >> "$L"
  i=$((i + 1))
  usleep 200000
done
echo "MIRRORFS: appended up to $i"
""".replace("DURATION", str(DURATION)).replace("FIRST", str(FIRST))


def line(i: int) -> bytes:
    """Line i as the workload writes it: varying lengths, so lines straddle blocks at many offsets."""
    return b"%06d %s\n" % (i, b"abcdefghij" * (i % 13))


class Snapshots(threading.Thread):
    """Reads the view's file every `every` s until stopped, keeping (CLOCK_MONOTONIC, bytes) of each read:
    `whole` opens and reads the whole file each time; `mmap` keeps one descriptor open and maps the size fstat
    gives it each time (a missing or empty file is skipped); `follow` keeps one descriptor open and reads on from
    where it was, with no stat, as `less +F` does, each read's bytes added to the last (the range past the end a
    reader saw before is where a page the kernel cached at the old end meets the new size)."""

    def __init__(self, path: Path, how: str, every: float) -> None:
        super().__init__(daemon=True)
        self.path, self.how, self.every = path, how, every
        self.reads: list[tuple[float, bytes]] = []
        self.errors: list[str] = []
        self.stop = threading.Event()

    def read(self, fd: int) -> bytes | None:
        if self.how == "whole":
            return self.path.read_bytes()
        if self.how == "follow":
            more = os.read(fd, 1 << 16)
            return (self.reads[-1][1] if self.reads else b"") + more if more else None
        size = os.fstat(fd).st_size
        if not size:
            return None
        with mmap.mmap(fd, size, prot=mmap.PROT_READ) as mm:
            return mm[:]

    def run(self) -> None:
        fd = -1
        while not self.stop.is_set():
            try:
                if self.how != "whole" and fd < 0:
                    fd = os.open(self.path, os.O_RDONLY)
                data = self.read(fd)
                if data is not None:
                    self.reads.append((time.monotonic(), data))
            except FileNotFoundError:
                pass
            except (OSError, ValueError) as exc:
                self.errors.append(f"{time.monotonic():.3f} {exc!r}")
            self.stop.wait(self.every)
        if fd >= 0:
            os.close(fd)


def whole_line_prefix(data: bytes, final: bytes) -> bool:
    return final.startswith(data) and (not data or data.endswith(b"\n"))


def timeline(reads: list[tuple[float, bytes]], final: bytes) -> list[str]:
    """Each change of (size, whole-line prefix or not), with when it was first read."""
    out, last = [], None
    for t, data in reads:
        key = (len(data), whole_line_prefix(data, final))
        if key != last:
            out.append(f"{t:.3f} size {len(data)}" + ("" if key[1] else
                       f" NOT A PREFIX: {data.count(0)} NULs, ends {data[-60:]!r}"))
            last = key
    return out


def less_lines(pty_lines: list[bytes]) -> list[bytes]:
    """What `less +F` showed of the file: its lines without the pager's own (`~` past the end, the
    'Waiting for data' prompt)."""
    return [x for x in pty_lines if x != b"~" and not x.startswith(b"Waiting for data")]


def test_guest_appends_without_sync_every_reader_gets_whole_lines(tmp_path: Path) -> None:
    """`tail -F`'s and `tail -f`'s output equal the final file byte for byte; every whole-file read, mmap
    snapshot and what a follower read so far is a whole-line prefix of it; `less +F` shows whole lines of it in
    order; no NUL anywhere."""
    require_root()
    require_tools("qemu-system-x86_64", "fusermount3", "mke2fs", "debugfs", "tail", "less")
    from images.guest import Guest

    populate = tmp_path / "populate"
    populate.mkdir()
    first = b"".join(line(i) for i in range(FIRST))
    (populate / "app.log").write_bytes(first)
    base = tmp_path / "base.raw"
    with open(base, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-E",  # as images.build makes ext4.img
                    "lazy_itable_init=0,lazy_journal_init=0,nodiscard", "-d", str(populate), str(base)],
                   check=True, capture_output=True)
    disk = tmp_path / "disk.raw"
    shutil.copyfile(base, disk)
    state, mnt = tmp_path / "state", tmp_path / "mnt"
    mnt.mkdir()
    view_log = mnt / "app.log"
    tails: dict[str, subprocess.Popen] = {}
    less: OnPty | None = None
    readers = [Snapshots(view_log, "whole", 0.1), Snapshots(view_log, "mmap", 0.2),
               Snapshots(view_log, "follow", 0.01)]
    attach_out = ""
    try:
        with Guest(disk, WORKLOAD, tmp_path / "vm", paused=True) as guest:
            with Attach(guest.qmp, state, "--cont", "--base", str(base), "--mount", str(mnt)) as attach:
                wait_mounted(mnt, attach.proc, timeout=120)
                less = OnPty(["less", "+F", str(view_log)])
                for opt in ("-F", "-f"):
                    with open(tmp_path / f"tail{opt}.out", "wb") as out:
                        tails[opt] = subprocess.Popen(["tail", opt, "-n", "+1", "-s", "0.2",
                                                       "--max-unchanged-stats=1", str(view_log)],
                                                      stdout=out, stderr=subprocess.DEVNULL)
                for r in readers:
                    r.start()
                guest.wait_for("MIRRORFS: appended up to", timeout=DURATION * 4 + 120)
                ended = time.monotonic()  # the guest's writes end here; its final sync follows
                n = int(re.search(r"appended up to (\d+)", guest.console()).group(1))
                final = first + b"".join(line(k) for k in range(FIRST, n))
                guest.wait_for("reboot: Power down", timeout=120)
                on_disk = subprocess.run(["debugfs", "-R", "cat /app.log", str(disk)], capture_output=True,
                                         check=True).stdout
                assert on_disk == final, f"the guest's log is not what it wrote ({len(on_disk)} bytes)"

                def done() -> bool:
                    return (all(r.reads and r.reads[-1][1] == final for r in readers)
                            and all((tmp_path / f"tail{o}.out").stat().st_size >= len(final) for o in tails)
                            and line(n - 1).rstrip(b"\n") in less_lines(less.text_lines()))
                deadline = time.monotonic() + SETTLE
                while not done() and time.monotonic() < deadline:
                    time.sleep(0.2)
                for r in readers:
                    r.stop.set()
                    r.join(10)
                for p in tails.values():
                    p.terminate()
                    p.wait(10)
                less.stop()
                (tmp_path / "less.out").write_bytes(bytes(less.out))  # raw, escapes and all
                (tmp_path / "less.times").write_text("".join(f"{t:.3f} {o}\n" for t, o in less.chunks))
                attach_out = attach.detach()
    finally:
        for r in readers:
            r.stop.set()
        for p in tails.values():
            if p.poll() is None:
                p.kill()
                p.wait(10)
        if less is not None:
            less.stop()
        force_unmount(mnt)

    events = (state / "events.jsonl").read_text() if (state / "events.jsonl").exists() else ""
    with open(tmp_path / "readers.txt", "w") as f:
        f.write(f"guest writes ended at {ended:.3f}; final {len(final)} bytes, {n} lines\n")
        for r in readers:
            f.write(f"\n{r.how}: {len(r.reads)} reads, errors {r.errors[:5]}\n")
            f.write("\n".join(timeline(r.reads, final)) + "\n")
    where = f"(see {tmp_path}/readers.txt, {attach.log_path}, {state}/events.jsonl)"

    assert "reads answered EIO" not in attach_out, attach_out[-3000:]
    for r in readers:
        assert not r.errors, (r.how, r.errors[:5], where)
        assert r.reads and r.reads[-1][1] == final, f"{r.how}: the view never reached the file {where}"
        bad = [(t, d) for t, d in r.reads if not whole_line_prefix(d, final)]
        assert not bad, (f"{r.how}: {len(bad)} of {len(r.reads)} reads are not whole-line prefixes of the file; "
                         f"first at {bad[0][0]:.3f}: {len(bad[0][1])} bytes, {bad[0][1].count(0)} NULs, "
                         f"ends {bad[0][1][-80:]!r} {where}")
        # the view was live while the guest wrote: its writeback (~30 s) brought lines before the final sync
        during = {len(d) for t, d in r.reads if t < ended}
        assert len(during) >= 3, (r.how, sorted(during), where)
    for opt in tails:
        got = (tmp_path / f"tail{opt}.out").read_bytes()
        assert b"\0" not in got, f"tail {opt} printed {got.count(0)} NUL bytes {where}"
        assert got == final, f"tail {opt} printed {len(got)} bytes, the file has {len(final)} {where}"
    shown = less_lines(less.text_lines())
    assert shown, bytes(less.out[-2000:])
    nul = [x for x in shown if b"\0" in x or b"^@" in x]
    assert not nul, f"less showed NUL bytes: {len(nul)} lines, first {nul[0][:60]!r}...{nul[0][-60:]!r} {where}"
    numbers = []
    file_lines = set(final.split(b"\n"))
    for x in shown:
        assert x in file_lines and x, f"less showed {x!r}, not a line of the file {where}"
        numbers.append(int(x[:6]))
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers), f"less: lines out of order {numbers}"
    assert numbers[-1] == n - 1
    # every size the stream showed was confirmed by its data (the guest wrote it back within the bound)
    assert '"unconfirmed":true' not in events, where
