"""Benchmarks with a TCG guest: guest write overhead of the mirror (1) and write→record latency (3).

Every guest run boots on a fresh copy of one 1 GiB ext4 image, runs a workload that times itself with the
guest clock and prints marker lines on the console; mirrored runs boot paused and `mirrorfs attach --cont`
starts the guest once the mirror job is ready, so boot and attach are never inside a timed section.
"""

from __future__ import annotations

import ctypes
import os
import re
import select
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.bench.common import MiB, Workspace, clone_disk, cpu_seconds, log, median, percentile, spread

MODES = ("none", "exact", "async")
IN_MODIFY = 0x2


class ConsoleTail:
    """Stamps each console line with the host time it was seen complete in QEMU's console file.

    inotify wakes the reader on every write QEMU makes to the file; the stamp is taken after the read, so it
    is never earlier than the line's arrival (an upper bound, which is what the min-filter in
    clock_offset() needs)."""

    def __init__(self, path: Path) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._fd = libc.inotify_init1(os.O_CLOEXEC | os.O_NONBLOCK)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        if libc.inotify_add_watch(self._fd, os.fsencode(path), IN_MODIFY) < 0:
            os.close(self._fd)
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {path}")
        self._file = open(path, "rb")
        self._buf = b""
        self._stop = False
        self.lines: list[tuple[int, str]] = []
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop:
            ready, _, _ = select.select([self._fd], [], [], 0.2)
            if ready:
                try:
                    os.read(self._fd, 65536)
                except BlockingIOError:
                    pass
            self._drain()

    def _drain(self) -> None:
        data = self._file.read()
        now = time.time_ns()
        if not data:
            return
        self._buf += data
        *complete, self._buf = self._buf.split(b"\n")
        for line in complete:
            self.lines.append((now, line.decode(errors="replace").strip()))

    def close(self) -> None:
        if not self._stop:
            self._stop = True
            self._thread.join(5)
            self._drain()
            self._file.close()
            os.close(self._fd)


@dataclass
class GuestRun:
    mode: str
    console: str
    state: Path | None
    tap_cpu: float = 0.0
    tap_writes: int = 0
    tap_bytes: int = 0
    lines: list[tuple[int, str]] = field(default_factory=list)

    def markers(self, prefix: str) -> list[list[str]]:
        return [line.split()[1:] for line in self.console.splitlines() if line.startswith(prefix + " ")]


def guest_run(ws: Workspace, pristine: Path, tag: str, mode: str, workload: str, *, timeout: float = 300,
              tail: bool = False) -> GuestRun:
    """Boot on a fresh disk copy, attach in `mode` (or not, for 'none'), run the workload to its end."""
    from images.guest import DONE, Guest
    from tests.tapharness import Attach

    d = ws.path / tag
    d.mkdir()
    disk = clone_disk(pristine, d / "disk.raw")
    state = d / "state"
    guest = Guest(disk, workload, d / "vm", paused=mode != "none")
    ws.on_cleanup(guest.stop)
    console_tail = ConsoleTail(guest.console_path) if tail else None
    if console_tail:
        ws.on_cleanup(console_tail.close)
    attach = None
    cpu0 = cpu1 = 0.0
    try:
        if mode != "none":
            attach = Attach(guest.qmp, state, "--mode", mode, "--sync", "none", "--cont", log=d / "attach.log")
            attach.start()
            ws.on_cleanup(lambda: attach.__exit__())
            cpu0 = cpu_seconds(attach.proc.pid)
        guest.wait_for(DONE, timeout)
        if attach:
            cpu1 = cpu_seconds(attach.proc.pid)
        guest.wait_for("reboot: Power down", 30)
        if attach:
            attach.detach()
    finally:
        guest.stop()
        if console_tail:
            console_tail.close()
    console = guest.console()
    if DONE + " rc=0" not in console:
        raise RuntimeError(f"{tag}: workload failed; console tail:\n{console[-3000:]}")
    run = GuestRun(mode, console, state if attach else None, tap_cpu=cpu1 - cpu0,
                   lines=console_tail.lines if console_tail else [])
    if attach:
        info = attach.info() or {}
        run.tap_writes, run.tap_bytes = info.get("writes", 0), info.get("bytes", 0)
    return run


def drop_run(ws: Workspace, tag: str) -> None:
    """Free the disk copy, write log and replica of a finished run (a 256 MiB dd logs 256 MiB)."""
    shutil.rmtree(ws.path / tag, ignore_errors=True)


# ------------------------------------------------------------------ 1. guest write overhead

OVERHEAD_WORKLOAD = r"""
set -e
cd "$MNT"
cp /mnt/latmark /tmp/latmark
head -c 4096 /dev/urandom > /tmp/blk
dd if=/dev/zero of=rnd bs=1M count=16 conv=fsync 2>/dev/null
sync
sleep {settle}
t0=$(/tmp/latmark now)
dd if=/dev/zero of=big bs=1M count={dd_mib} conv=fsync 2>/dev/null
t1=$(/tmp/latmark now)
echo "MIRRORFS-BENCH dd $t0 $t1"
sync
sleep {settle}
x=12345
i=0
t0=$(/tmp/latmark now)
while [ $i -lt {rand_n} ]; do
  x=$(( (x * 1103515245 + 12345) % 2147483648 ))
  dd if=/tmp/blk of=rnd bs=4k count=1 seek=$(( x % 4096 )) conv=notrunc,fsync 2>/dev/null
  i=$((i + 1))
done
t1=$(/tmp/latmark now)
echo "MIRRORFS-BENCH rand4k $t0 $t1"
"""


def bench_overhead(ws: Workspace, pristine: Path, quick: bool) -> dict:
    rounds, dd_mib, rand_n = (1, 64, 100) if quick else (3, 256, 300)
    workload = OVERHEAD_WORKLOAD.format(settle=3, dd_mib=dd_mib, rand_n=rand_n)
    per_round: list[dict[str, dict]] = []
    for r in range(rounds):
        res: dict[str, dict] = {}
        for mode in MODES:
            tag = f"overhead-r{r + 1}-{mode}"
            run = guest_run(ws, pristine, tag, mode, workload)
            drop_run(ws, tag)
            m = {name: (int(t1) - int(t0)) / 1e9 for name, t0, t1 in run.markers("MIRRORFS-BENCH")}
            res[mode] = {"dd_s": m["dd"], "rand_s": m["rand4k"], "dd_mbs": dd_mib * MiB / m["dd"] / 1e6,
                         "rand_wps": rand_n / m["rand4k"], "tap_cpu": run.tap_cpu,
                         "tap_writes": run.tap_writes, "tap_mib": run.tap_bytes / MiB}
            log(f"overhead round {r + 1} {mode:5}: dd {res[mode]['dd_mbs']:.1f} MB/s, "
                f"4k {res[mode]['rand_wps']:.1f} writes/s, tap CPU {run.tap_cpu:.1f} s, "
                f"{run.tap_writes} writes / {run.tap_bytes / MiB:.0f} MiB recorded")
        per_round.append(res)
    return {"rounds": rounds, "dd_mib": dd_mib, "rand_n": rand_n, "per_round": per_round}


def overhead_table(res: dict) -> list[str]:
    pr = res["per_round"]
    dd_none = [r["none"]["dd_mbs"] for r in pr]
    rd_none = [r["none"]["rand_wps"] for r in pr]
    lines = [
        "| workload (guest-timed) | no mirror | exact / no mirror | async / no mirror |",
        "|---|---|---|---|",
        f"| dd {res['dd_mib']} MiB bs=1M conv=fsync | {spread(dd_none, '{:.1f}')} MB/s | "
        + " | ".join(spread([r[m]["dd_mbs"] / r["none"]["dd_mbs"] for r in pr]) for m in ("exact", "async")) + " |",
        f"| {res['rand_n']} x 4 KiB random dd conv=notrunc,fsync | {spread(rd_none, '{:.1f}')} writes/s | "
        + " | ".join(spread([r[m]["rand_wps"] / r["none"]["rand_wps"] for r in pr]) for m in ("exact", "async"))
        + " |",
    ]
    lines.append("")
    lines.append("| tap per guest run (whole workload incl. 16 MiB prealloc) | exact | async |")
    lines.append("|---|---|---|")
    for key, label, fmt in (("tap_writes", "NBD writes recorded", "{:.0f}"),
                            ("tap_mib", "MiB recorded", "{:.0f}"),
                            ("tap_cpu", "tap CPU seconds", "{:.1f}")):
        lines.append(f"| {label} | " + " | ".join(spread([r[m][key] for r in pr], fmt) for m in ("exact", "async"))
                     + " |")
    return lines


# ------------------------------------------------------------------ 3. write -> record latency

LATENCY_WORKLOAD = r"""
set -e
cd "$MNT"
dd if=/dev/zero of=lat bs=64k count={n} conv=fsync 2>/dev/null
sync
sleep 3
/mnt/latmark lat {n} {gap_us} {samples}
"""
_MARK = re.compile(rb"MFSLAT (\d{8}) (\d{19})\n")


def clock_offset(lines: list[tuple[int, str]]) -> tuple[int, list[int], float]:
    """host - guest clock offset: min over console lines of (host arrival stamp - guest time printed).

    Each sample is the true offset plus that line's console delay (>= 0), so the minimum is the best
    estimate; it overestimates the offset by the smallest console delay. Also returns per-third minima
    (drift check) and the median console delay above the smallest one, in ms."""
    samples = []
    for host_ns, text in lines:
        parts = text.split()
        if parts[:1] == ["MIRRORFS-CLK"]:
            samples.append(host_ns - int(parts[1]))
        elif parts[:1] == ["MIRRORFS-LAT"]:
            samples.append(host_ns - int(parts[4]))
    if not samples:
        raise RuntimeError("no clock samples on the console")
    k = max(1, len(samples) // 3)
    return min(samples), [min(samples[:k]), min(samples[-k:])], (median(samples) - min(samples)) / 1e6


def latency_of_run(run: GuestRun) -> dict:
    from tap.writelog import KIND_WRITE, read_records

    offset, thirds, console_ms = clock_offset(run.lines)
    lat = {int(i): (int(t0), int(t1)) for i, t0, t1, _ in run.markers("MIRRORFS-LAT")}
    out = {"n": len(lat), "guest_write_ms": [(t1 - t0) / 1e6 for t0, t1 in lat.values()],
           "drift_us": (thirds[1] - thirds[0]) / 1e3, "console_ms": console_ms}
    if run.state is None:
        return out
    first: dict[int, int] = {}
    for rec in read_records(run.state / "log"):
        if rec.kind != KIND_WRITE or b"MFSLAT " not in rec.payload:
            continue
        for m in _MARK.finditer(rec.payload):
            i, t0 = int(m.group(1)), int(m.group(2))
            if i in lat and lat[i][0] == t0 and i not in first:
                first[i] = rec.time_ns
    ms = [(first[i] - (lat[i][0] + offset)) / 1e6 for i in sorted(first)]
    before_return = sum(1 for i in first if first[i] <= lat[i][1] + offset)
    out.update({"found": len(first), "lat_ms": ms, "before_return": before_return})
    return out


def bench_latency(ws: Workspace, pristine: Path, quick: bool) -> dict:
    rounds, n = (1, 60) if quick else (2, 300)
    workload = LATENCY_WORKLOAD.format(n=n, gap_us=20000, samples=200)
    per_round: list[dict[str, dict]] = []
    for r in range(rounds):
        res: dict[str, dict] = {}
        for mode in MODES:
            tag = f"latency-r{r + 1}-{mode}"
            run = guest_run(ws, pristine, tag, mode, workload, tail=True)
            res[mode] = latency_of_run(run)
            drop_run(ws, tag)
            x = res[mode]
            msg = f"latency round {r + 1} {mode:5}: guest write {median(x['guest_write_ms']):.2f} ms"
            if "lat_ms" in x:
                msg += (f", write->record median {median(x['lat_ms']):.2f} ms p99 {percentile(x['lat_ms'], 99):.2f}"
                        f" ms ({x['found']}/{x['n']} markers found, {x['before_return']} before the write "
                        f"returned), clock drift {x['drift_us']:.0f} us")
            log(msg)
        per_round.append(res)
    return {"rounds": rounds, "n": n, "per_round": per_round}


def latency_table(res: dict) -> list[str]:
    pr = res["per_round"]
    lines = ["| mode | write → record median (ms) | p99 (ms) | markers found | record before pwrite returned "
             "| guest pwrite median (ms) |", "|---|---|---|---|---|---|"]
    for mode in MODES:
        gw = spread([median(r[mode]["guest_write_ms"]) for r in pr])
        if mode == "none":
            lines.append(f"| no mirror | – | – | – | – | {gw} |")
            continue
        med = spread([median(r[mode]["lat_ms"]) for r in pr])
        p99 = spread([percentile(r[mode]["lat_ms"], 99) for r in pr])
        found = f"{sum(r[mode]['found'] for r in pr)}/{sum(r[mode]['n'] for r in pr)}"
        before = f"{sum(r[mode]['before_return'] for r in pr)}/{sum(r[mode]['found'] for r in pr)}"
        lines.append(f"| {mode} | {med} | {p99} | {found} | {before} | {gw} |")
    drift = [abs(r[m]["drift_us"]) for r in pr for m in MODES]
    lines.append("")
    console = [r[m]["console_ms"] for r in pr for m in MODES]
    lines.append(f"Clock-offset drift between the first and last third of a run: at most {max(drift):.0f} us. "
                 f"Console delay of a line above the fastest one: median {median(console):.2f} ms "
                 f"(per-run medians {min(console):.2f}-{max(console):.2f} ms).")
    return lines
