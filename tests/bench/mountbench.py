"""Mount benchmarks (issue 4): the mirrorfs FUSE view against a loop mount and `guestmount --ro` of one image,
and the delay from a guest mutation to its inotify event on the live view.

- views: sequential read of a 256 MiB file and `find -ls` over the 100k-file image (tests/bench/enginedata.py's
  `many_image(100_000)`, copied once with a 256 MiB file added by `debugfs -w`, cached in .cache/bench/mount/).
- inotify: a TCG guest creates, appends to and renames files with a `sync` after each, under `mirrorfs attach
  --cont --base --mount`; `inotifywait -m -r` on the mount; each mutation's first kernel event is matched in order.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from tests.bench.common import MiB, Workspace, clone_disk, log, median, percentile, run, spread
from tests.support import CACHE, REPO

BIG = 256 * MiB
MOUNT_RECIPE = "mount-v1"
GUESTFS_ENV = {"LIBGUESTFS_BACKEND": "direct", "LIBGUESTFS_BACKEND_SETTINGS": "force_tcg"}  # no KVM here: TCG
VIEWS = ("mirrorfs", "loop", "guestmount")
CHUNK = 1 << 20


# ------------------------------------------------------------------ the image

def bench_image() -> tuple[Path, dict]:
    """The 100k-file image plus /big (256 MiB of random bytes), built once."""
    from tests.bench.enginedata import many_image

    src, info = many_image(100_000)
    d = CACHE / "bench" / "mount"
    d.mkdir(parents=True, exist_ok=True)
    final, side = d / "many-100000-big.raw", d / "many-100000-big.json"
    if final.exists() and side.exists() and json.loads(side.read_text()).get("recipe") == MOUNT_RECIPE:
        return final, json.loads(side.read_text())
    log(f"building {final}: {src} plus a 256 MiB file (debugfs -w)")
    tmp = d / ".building.raw"
    run(["cp", "--sparse=always", src, tmp])
    blob = d / ".big"
    with open(blob, "wb") as f:
        for _ in range(BIG // CHUNK):
            f.write(os.urandom(CHUNK))
    run(["debugfs", "-w", "-R", f"write {blob} big", tmp])
    blob.unlink()
    run(["e2fsck", "-fn", tmp])
    tmp.rename(final)
    meta = {"recipe": MOUNT_RECIPE, "files": info["files"] + 1, "dirs": info["dirs"], "big": BIG}
    side.write_text(json.dumps(meta))
    return final, meta


# ------------------------------------------------------------------ the three views

class Views:
    """Mounts the image three ways, read-only; unmounts (by mount point; processes by pid) at workspace cleanup."""

    def __init__(self, ws: Workspace, image: Path) -> None:
        self.ws, self.image = ws, image
        self.mnt = {v: ws.path / f"view-{v}" for v in VIEWS}
        for m in self.mnt.values():
            m.mkdir()
        self.mount_s: dict[str, float] = {}

    def mount_all(self) -> None:
        self._mirrorfs()
        t0 = time.monotonic()
        run(["mount", "-o", "ro,loop", self.image, self.mnt["loop"]])
        self.mount_s["loop"] = time.monotonic() - t0
        self.ws.on_cleanup(lambda: subprocess.run(["umount", str(self.mnt["loop"])], capture_output=True))
        self._guestmount()

    def _mirrorfs(self) -> None:
        from tap.state import StateDir

        state = self.ws.path / "mount-state"
        StateDir(state).path.mkdir(parents=True)
        StateDir(state).init_state(self.image.stat().st_size, "drive0")  # an empty log: the base is the view
        out = self.ws.path / "mirrorfs-mount.log"
        mnt = self.mnt["mirrorfs"]
        t0 = time.monotonic()
        with open(out, "wb") as f:
            proc = self.ws.popen([str(REPO / ".venv" / "bin" / "python"), "-m", "mirrorfs.cli", "mount", "--state",
                                  str(state), "--base", str(self.image), str(mnt)], stdout=f,
                                 stderr=subprocess.STDOUT, cwd=REPO)
        self.ws.on_cleanup(lambda: subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True))
        while "mirrorfs: mounted" not in out.read_text():
            if proc.poll() is not None or time.monotonic() - t0 > 600:
                raise RuntimeError(f"mirrorfs mount failed:\n{out.read_text()}")
            time.sleep(0.05)
        self.mount_s["mirrorfs"] = time.monotonic() - t0
        self.pid = proc.pid

    def _guestmount(self) -> None:
        mnt = self.mnt["guestmount"]
        pidfile = self.ws.path / "guestmount.pid"
        t0 = time.monotonic()
        run(["guestmount", "--ro", "-a", self.image, "-m", "/dev/sda", "--pid-file", pidfile, mnt],
            env=guestfs_env(), timeout=900)
        self.mount_s["guestmount"] = time.monotonic() - t0

        def unmount() -> None:
            """Never leave it mounted: the workspace's rmtree would walk (slowly) into a live guestmount."""
            try:
                subprocess.run(["guestunmount", "--retry=3", str(mnt)], capture_output=True, timeout=120)
            except subprocess.TimeoutExpired:
                pass
            if str(mnt) in Path("/proc/self/mountinfo").read_text():
                subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
            try:
                pid = int(pidfile.read_text())
            except (OSError, ValueError):
                return
            for i in range(300):  # guestmount exits once the appliance has shut down; else end it by its pid
                try:
                    os.kill(pid, 15 if i == 100 else 0)
                except ProcessLookupError:
                    return
                time.sleep(0.1)
        self.ws.on_cleanup(unmount)


def guestfs_env() -> dict[str, str]:
    """libguestfs: direct backend, TCG (docs/ARCHITECTURE.md "The machine"); supermin's appliance kernel from the test
    guests' unpacked Debian kernel package (this host has no /boot kernel and no /lib/modules; supermin still
    lstat()s /lib/modules, so an empty one is made)."""
    from images.build import kernel_root

    root = kernel_root()
    kver = (root / "KVER").read_text().strip()
    os.makedirs("/lib/modules", exist_ok=True)
    return {**os.environ, **GUESTFS_ENV, "SUPERMIN_KERNEL": str(root / "root" / "boot" / f"vmlinuz-{kver}"),
            "SUPERMIN_MODULES": str(root / "root" / "lib" / "modules" / kver), "SUPERMIN_KERNEL_VERSION": kver}


def seq_read(path: Path) -> float:
    """MB/s of one sequential read in 1 MiB requests, the file's cached pages dropped first."""
    fd = os.open(path, os.O_RDONLY)
    try:
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


def find_ls(root: Path) -> tuple[float, int]:
    """(seconds, lines) of `find ROOT -ls`, output discarded but counted."""
    t0 = time.monotonic()
    p = subprocess.run(["find", str(root), "-ls"], capture_output=True, text=True)
    dt = time.monotonic() - t0
    if p.returncode:
        raise RuntimeError(f"find -ls {root} failed: {p.stderr[-2000:]}")
    return dt, p.stdout.count("\n")


def bench_views(ws: Workspace, quick: bool) -> dict:
    image, meta = bench_image()
    views = Views(ws, image)
    views.mount_all()
    sums = {v: subprocess.run(["sha256sum", str(views.mnt[v] / "big")], capture_output=True, text=True,
                              check=True).stdout.split()[0] for v in VIEWS}  # also the unmeasured warm-up read
    if len(set(sums.values())) != 1:
        raise RuntimeError(f"the views disagree on /big: {sums}")
    for v in VIEWS[:2]:
        find_ls(views.mnt[v])  # warm-up: each view as a running system has it (dentries, attributes, page cache)
    rounds = 1 if quick else 3
    per_round = []
    for r in range(rounds):
        res: dict[str, dict] = {}
        for v in VIEWS:
            mbps = seq_read(views.mnt[v] / "big")
            res[v] = {"read_mbps": mbps}
            # guestmount lists ~0.3-3k entries/s here: one `find -ls` of it (the first round's, no warm-up) is
            # minutes, so it is measured once
            if v != "guestmount" or r == 0:
                secs, lines = find_ls(views.mnt[v])
                res[v].update(find_s=secs, find_lines=lines, find_per_s=lines / secs)
            log(f"views round {r + 1} {v:10}: read {mbps:.0f} MB/s" + (
                f", find -ls {res[v]['find_lines']} lines in {res[v]['find_s']:.2f} s ({res[v]['find_per_s']:.0f}/s)"
                if "find_s" in res[v] else ""))
        per_round.append(res)
    lines = {res[v]["find_lines"] for res in per_round for v in VIEWS if "find_lines" in res[v]}
    if len(lines) != 1:
        raise RuntimeError(f"find -ls line counts differ between views: {lines}")
    return {"image": meta, "mount_s": views.mount_s, "rounds": rounds, "per_round": per_round}


def views_table(res: dict) -> list[str]:
    pr = res["per_round"]

    def col(v: str, key: str, fmt: str = "{:.0f}") -> str:
        return spread([r[v][key] for r in pr if key in r[v]], fmt)

    def ratio(a: str, b: str, key: str) -> str:
        return spread([r[a][key] / r[b][key] for r in pr if key in r[a] and key in r[b]], "{:.3f}")

    lines = [f"Image: {res['image']['files']} files in {res['image']['dirs']} directories (1 GiB ext4) plus a "
             f"256 MiB file; {pr[0]['mirrorfs']['find_lines']} lines of `find -ls`.", "",
             "| view | sequential read, 256 MiB (MB/s) | `find -ls` (entries/s) | `find -ls` (s) | mount time (s) |",
             "|---|---|---|---|---|"]
    for v in VIEWS:
        lines.append(f"| {v} | {col(v, 'read_mbps')} | {col(v, 'find_per_s')} | {col(v, 'find_s', '{:.2f}')} "
                     f"| {res['mount_s'][v]:.1f} |")
    lines += ["", "| ratio (same round) | sequential read | `find -ls` |", "|---|---|---|"]
    for a, b in (("mirrorfs", "loop"), ("mirrorfs", "guestmount")):
        lines.append(f"| {a} / {b} | {ratio(a, b, 'read_mbps')} | {ratio(a, b, 'find_per_s')} |")
    return lines


# ------------------------------------------------------------------ mutation -> inotify event

INOTIFY_WORKLOAD = r"""
set -e
mkdir "$MNT/w"
sync
sleep 4
i=0
while [ $i -lt {n} ]; do
  echo $i > "$MNT/w/f$i"; sync
  echo more >> "$MNT/w/f$i"; sync
  mv "$MNT/w/f$i" "$MNT/w/g$i"; sync
  i=$((i + 1))
done
echo end > "$MNT/w/END"
sync
"""


def _match(mutations: list[dict], events: list[tuple[float, str, str, str]]) -> tuple[list[float], int]:
    """Delays (s) from each mutation's `time` to its first expected kernel event, matched in order; and misses."""
    from tests.integration.test_mount import expected_sequence, primary

    got = primary(events)
    delays, missed, i = [], 0, 0
    for m, exp in expected_sequence(mutations):
        if not exp:
            continue
        j = next((k for k in range(i, len(got)) if (got[k][1], got[k][2]) == exp[0]), None)
        if j is None:
            missed += 1
            continue
        delays.append(got[j][0] - m["time"])
        i = j + 1
    return delays, missed


def inotify_run(ws: Workspace, pristine: Path, tag: str, n: int) -> dict:
    from images.guest import DONE, Guest
    from tests.mountharness import Inotify, force_unmount, wait_mounted
    from tests.tapharness import Attach

    d = ws.path / tag
    d.mkdir()
    disk = clone_disk(pristine, d / "disk.raw")
    state, mnt = d / "state", d / "mnt"
    mnt.mkdir()
    guest = Guest(disk, INOTIFY_WORKLOAD.replace("{n}", str(n)), d / "vm", paused=True)
    ws.on_cleanup(guest.stop)
    ws.on_cleanup(lambda: force_unmount(mnt))
    attach = Attach(guest.qmp, state, "--cont", "--base", str(pristine), "--mount", str(mnt), log=d / "attach.log")
    attach.start()
    ws.on_cleanup(lambda: attach.__exit__())
    wait_mounted(mnt, timeout=120)
    ino = Inotify(mnt)
    ws.on_cleanup(ino.stop)
    guest.wait_for(DONE, 600)
    deadline = time.monotonic() + 60
    while not (mnt / "w" / "END").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(2)
    ino.stop()
    attach.detach()
    events = ino.events()
    mutations = [json.loads(x) for x in (state / "events.jsonl").read_text().splitlines()]
    mutations = [m for m in mutations if m["kind"] != "error"]
    delays, missed = _match(mutations, events)
    shutil.rmtree(d, ignore_errors=True)
    return {"mutations": len(mutations), "matched": len(delays), "missed": missed,
            "delays_ms": [x * 1000 for x in delays]}


def bench_inotify(ws: Workspace, pristine: Path, quick: bool) -> dict:
    rounds, n = (1, 20) if quick else (2, 100)
    per_round = []
    for r in range(rounds):
        x = inotify_run(ws, pristine, f"inotify-r{r + 1}", n)
        log(f"inotify round {r + 1}: {x['matched']}/{x['mutations']} mutations matched, median "
            f"{median(x['delays_ms']):.1f} ms, p99 {percentile(x['delays_ms'], 99):.1f} ms")
        per_round.append(x)
    return {"rounds": rounds, "n": n, "per_round": per_round}


def inotify_table(res: dict) -> list[str]:
    pr = res["per_round"]
    alld = [d for r in pr for d in r["delays_ms"]]
    return ["| mutation → inotify event | median (ms) | p99 (ms) | max (ms) | samples | mutations without "
            "their event |", "|---|---|---|---|---|---|",
            f"| per round | {spread([median(r['delays_ms']) for r in pr], '{:.1f}')} "
            f"| {spread([percentile(r['delays_ms'], 99) for r in pr], '{:.1f}')} | {max(alld):.1f} "
            f"| {sum(r['matched'] for r in pr)} | {sum(r['missed'] for r in pr)} |",
            f"| all samples | {median(alld):.1f} | {percentile(alld, 99):.1f} | {max(alld):.1f} | {len(alld)} | |"]

