"""Live mount benchmark (issue 10): the host kernel writes ext4 through qemu-storage-daemon under `mirrorfs attach
--base --mount`; the live view is measured against a loop mount of a copy of the same disk, in the same run.

- sync -> inotify: the writer creates a file and calls `sync -f` (syncfs) on its mount; `inotifywait -m` on the
  view stamps the file's CREATE; delay = stamp - the moment syncfs returned.
- sequential read of a 256 MiB file (first read with the view's cached pages dropped, then a second read) and
  `find -ls` over 20,000 files, on the live view and on `mount -o ro,loop` of a copy of the disk taken after the
  writer unmounted.
"""

from __future__ import annotations

import ctypes
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.bench.common import MiB, Workspace, log, median, percentile, run, spread
from tests.bench.mountbench import find_ls

BIG = 256 * MiB
CHUNK = 1 << 20
FILES, PER_DIR = 20_000, 100
VIEWS = ("mirrorfs", "loop")                       # find -ls on both
READ_VIEWS = ("mirrorfs", "pyfuse3 minimal", "loop")  # reads also on tests/bench/minfuse.py (the ceiling)
_libc = ctypes.CDLL(None, use_errno=True)


def syncfs(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            raise OSError(ctypes.get_errno(), f"syncfs {path}")
    finally:
        os.close(fd)


def drop_pages(path: Path) -> None:
    """Write back and drop a host file's cached pages (the backing of a view: the engine's replica, the copy)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_all(path: Path, drop: bool, backing: Path | None = None) -> float:
    """MB/s of one sequential read in 1 MiB requests; with `drop`, the file's cached pages are dropped first,
    and with `backing` too the backing file's (a cold read, from the host's disk)."""
    if backing is not None:
        drop_pages(backing)
    fd = os.open(path, os.O_RDONLY)
    try:
        if drop:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        n, t0 = 0, time.monotonic()
        while chunk := os.read(fd, CHUNK):
            n += len(chunk)
        dt = time.monotonic() - t0
    finally:
        os.close(fd)
    if n != BIG:
        raise RuntimeError(f"{path}: read {n} bytes, expected {BIG}")
    return n / dt / 1e6


MARKER = b'"path":"/lat/written"'


class Tail:
    """What has been appended to a file since the last look (events.jsonl: is an event in the stream yet?)."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.rest = path, 0, b""

    def has(self, needle: bytes) -> bool:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return False
        self.offset += len(data)
        text, self.rest = self.rest + data, (self.rest + data)[-len(needle):]
        return needle in text


def resident_mib(path: Path) -> float:
    """MiB of a host file in the host's page cache (fincore): what "first read" assumes of both backings."""
    return int(run(["fincore", "--bytes", "--noheadings", "--output", "RES", path]).stdout.split()[0]) / MiB


def populate(host: Path) -> None:
    with open(host / "big", "wb") as f:
        for _ in range(BIG // CHUNK):
            f.write(os.urandom(CHUNK))
    for d in range(FILES // PER_DIR):
        dd = host / "tree" / f"d{d:03d}"
        dd.mkdir(parents=True)
        for i in range(PER_DIR):
            (dd / f"f{i:03d}").write_bytes(b"x" * (i % 7 * 100))
    (host / "lat").mkdir()
    syncfs(host)


def sync_latency(host: Path, mnt: Path, n: int) -> list[float]:
    """ms from syncfs returning on the writer to the CREATE of the same file printed by inotifywait on the view."""
    from tests.mountharness import Inotify

    ino = Inotify(mnt / "lat")
    done: list[tuple[str, float]] = []
    try:
        for i in range(n):
            name = f"s{i:04d}"
            (host / "lat" / name).write_bytes(b"%d\n" % i)
            syncfs(host)
            done.append((name, time.time()))
            deadline = time.monotonic() + 10
            while not any(e[2] == name and "CREATE" in e[1] for e in ino.events()):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no CREATE for {name} on the view within 10 s")
                time.sleep(0.005)
            time.sleep(0.1)
        events = ino.events()
    finally:
        ino.stop()
    first = {}
    for t, ev, path, _ in events:
        if "CREATE" in ev:
            first.setdefault(path, t)
    return [(first[name] - t) * 1000 for name, t in done]


def bench_live(ws: Workspace, quick: bool) -> dict:
    from images.hostwriter import HostWriter
    from tests.mountharness import force_unmount, wait_mounted
    from tests.tapharness import Attach

    d = ws.path / "live"
    d.mkdir()
    base, disk = d / "base.raw", d / "disk.raw"
    with open(base, "wb") as f:
        f.truncate(1 << 30)
    run(["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-E", "lazy_itable_init=0,lazy_journal_init=0", base])
    run(["cp", "--sparse=always", base, disk])
    state, mnt, loop_mnt = d / "state", d / "view", d / "loop"
    mnt.mkdir()
    loop_mnt.mkdir()
    hw = HostWriter(disk, d / "qsd").start()
    ws.on_cleanup(hw.stop)
    ws.on_cleanup(hw.unmount)
    attach = Attach(hw.qmp, state, "--device", hw.node, "--base", str(base), "--mount", str(mnt),
                    log=d / "attach.log")
    attach.start()
    ws.on_cleanup(lambda: force_unmount(mnt))
    ws.on_cleanup(lambda: attach.proc.poll() is None and (attach.proc.kill(), attach.proc.wait(10)))
    wait_mounted(mnt, attach.proc, timeout=120)
    host = hw.mount()
    t0 = time.monotonic()
    populate(host)
    log(f"live: wrote 256 MiB and {FILES} files in {time.monotonic() - t0:.1f} s")
    (host / "lat" / "written").write_bytes(b"1")  # after all of it: the engine takes the log in order, so once
    syncfs(host)                                   # the view shows this, it has taken everything before it
    synced = time.monotonic()
    last = mnt / "tree" / f"d{FILES // PER_DIR - 1:03d}" / f"f{PER_DIR - 1:03d}"
    stream = Tail(state / "events.jsonl")
    in_stream = None
    deadline = time.monotonic() + 300
    while not ((mnt / "lat" / "written").exists() and last.exists() and (mnt / "big").stat().st_size == BIG):
        if in_stream is None and stream.has(MARKER):
            in_stream = time.monotonic() - synced
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for the view to show the written tree: written "
                               f"{(mnt / 'lat' / 'written').exists()}, last {last.exists()}, big "
                               f"{(mnt / 'big').stat().st_size}; attach log:\n{attach.output()[-3000:]}")
        time.sleep(0.02)
    caught_up, after_sync = time.monotonic() - t0, time.monotonic() - synced
    if in_stream is None and stream.has(MARKER):
        in_stream = after_sync
    log(f"live: the view showed it all {caught_up:.1f} s after the writer started, {after_sync:.1f} s after its "
        f"last syncfs returned; in the stream (events.jsonl) "
        f"{'?' if in_stream is None else f'{in_stream:.1f}'} s after it")
    n = 20 if quick else 100
    rounds = 1 if quick else 5
    lat = sync_latency(host, mnt, n)
    log(f"live: sync -> inotify median {median(lat):.1f} ms, p99 {percentile(lat, 99):.1f} ms ({len(lat)} samples)")
    hw.unmount()  # the writer's last state is on the disk now; the view stays live
    copy = d / "copy.raw"
    run(["cp", "--sparse=always", disk, copy])
    run(["mount", "-o", "ro,loop", copy, loop_mnt])
    ws.on_cleanup(lambda: subprocess.run(["umount", str(loop_mnt)], capture_output=True))
    host_big, min_mnt = d / "big.host", d / "minfuse"
    run(["cp", loop_mnt / "big", host_big])
    min_mnt.mkdir()
    minfuse = ws.popen([sys.executable, "-m", "tests.bench.minfuse", str(host_big), str(min_mnt)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ws.on_cleanup(lambda: force_unmount(min_mnt))
    wait_mounted(min_mnt, minfuse, timeout=30)
    roots = {"mirrorfs": mnt, "pyfuse3 minimal": min_mnt, "loop": loop_mnt}
    backing = {"mirrorfs": state / "engine" / "disk.img", "pyfuse3 minimal": host_big, "loop": copy}
    sums = {v: run(["sha256sum", r / "big"]).stdout.split()[0] for v, r in roots.items()}
    if len(set(sums.values())) != 1:
        raise RuntimeError(f"the views disagree on /big: {sums}")
    for v in VIEWS:
        find_ls(roots[v])  # warm-up
    per_round = []
    for r in range(rounds):
        # step by step across the views (and in turn in reverse order), so the ratios of a round compare
        # measurements seconds apart, not a minute: the machine is shared
        order = list(roots) if r % 2 == 0 else list(reversed(roots))
        res: dict[str, dict] = {v: {} for v in order}
        for v in order:
            res[v]["cold_mbps"] = read_all(roots[v] / "big", drop=True, backing=backing[v])
            res[v]["backing_mib"] = resident_mib(backing[v])  # /big's 256 MiB and the metadata read since
        for v in order:
            res[v]["first_mbps"] = read_all(roots[v] / "big", drop=True)
        for v in order:
            res[v]["second_mbps"] = read_all(roots[v] / "big", drop=False)
        for v in order:
            res[v]["find_s"], res[v]["find_lines"] = find_ls(roots[v]) if v in VIEWS else (math.nan, None)
        for v in roots:
            x = res[v]
            log(f"live round {r + 1} {v:15}: cold read {x['cold_mbps']:.0f} MB/s, first {x['first_mbps']:.0f} MB/s "
                f"(backing file {x['backing_mib']:.0f} MiB in the host page cache), second {x['second_mbps']:.0f} "
                f"MB/s, find -ls {x['find_lines']} lines in {x['find_s']:.3f} s")
        per_round.append(res)
    lines = {x[v]["find_lines"] for x in per_round for v in VIEWS}
    if len(lines) != 1:
        raise RuntimeError(f"find -ls line counts differ between views: {lines}")
    subprocess.run(["umount", str(loop_mnt)], capture_output=True)
    minfuse.terminate()
    minfuse.wait(30)
    attach.detach()
    return {"rounds": rounds, "samples": n, "sync_ms": lat, "caught_up_s": caught_up, "after_sync_s": after_sync,
            "in_stream_s": in_stream, "per_round": per_round, "files": FILES, "find_lines": lines.pop()}


def live_table(res: dict) -> list[str]:
    pr = res["per_round"]

    def col(v: str, key: str, fmt: str = "{:.0f}") -> str:
        return spread([r[v][key] for r in pr], fmt) if v in VIEWS or key != "find_s" else "-"

    def ratio(v: str, key: str, inverse: bool = False) -> str:
        if key == "find_s" and v not in VIEWS:
            return "-"
        return spread([(r["loop"][key] / r[v][key]) if inverse else (r[v][key] / r["loop"][key]) for r in pr],
                      "{:.2f}")

    lat = res["sync_ms"]
    return [f"{res['files']} files of 0-600 bytes in {res['files'] // PER_DIR} directories and a 256 MiB random "
            f"file on a fresh 1 GiB ext4; {res['find_lines']} lines of `find -ls`. The view showed all of it "
            f"{res['caught_up_s']:.0f} s after the writer started"
            + (f", {res['after_sync_s']:.1f} s after its last syncfs returned" if "after_sync_s" in res else "")
            + (f" (in the stream, events.jsonl: {res['in_stream_s']:.1f} s after it)." if res.get("in_stream_s")
               is not None else "."),
            "",
            "| view | cold first read, 256 MiB (MB/s) | backing file in the page cache before the first read (MiB) "
            "| first read (MB/s) | second read (MB/s) | `find -ls` (s) |",
            "|---|---|---|---|---|---|",
            *(f"| {v} | {col(v, 'cold_mbps')} | {col(v, 'backing_mib')} | {col(v, 'first_mbps')} "
              f"| {col(v, 'second_mbps')} | {col(v, 'find_s', '{:.3f}')} |" for v in READ_VIEWS),
            *(f"| **{v} / loop** (same round; speed) | **{ratio(v, 'cold_mbps')}** | | **{ratio(v, 'first_mbps')}** "
              f"| **{ratio(v, 'second_mbps')}** | **{ratio(v, 'find_s', inverse=True)}** |"
              for v in READ_VIEWS if v != "loop"), "",
            "| writer `sync -f` → inotify CREATE on the view | median (ms) | p99 (ms) | max (ms) | samples |",
            "|---|---|---|---|---|",
            f"| host kernel as writer | {median(lat):.1f} | {percentile(lat, 99):.1f} | {max(lat):.1f} | {len(lat)} |"]
