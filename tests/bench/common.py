"""Shared bench plumbing: statistics, a workspace that cleans up after itself, process CPU, the guest disk."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
MiB = 1 << 20
GiB = 1 << 30
_TICK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    if not s:
        return math.nan
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def percentile(xs: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    s = sorted(xs)
    if not s:
        return math.nan
    return s[min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))]


def spread(xs: Sequence[float], fmt: str = "{:.2f}") -> str:
    """'median (min-max)' of per-round values."""
    if not xs:
        return "n/a"
    if len(xs) == 1:
        return fmt.format(xs[0])
    return f"{fmt.format(median(xs))} ({fmt.format(min(xs))}-{fmt.format(max(xs))})"


def cpu_seconds(pid: int) -> float:
    """user+system CPU time of a live process (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


class Workspace:
    """A temp dir plus cleanup callbacks run in reverse order, whatever happens (processes by pid, files)."""

    def __init__(self, prefix: str = "mirrorfs-bench-") -> None:
        self.path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))  # short: unix socket paths live here
        self._cleanups: list[Callable[[], None]] = []

    def on_cleanup(self, fn: Callable[[], None]) -> None:
        self._cleanups.append(fn)

    def popen(self, argv: list[str], **kw) -> subprocess.Popen:
        """Start a process that is terminated (then killed) by its pid at cleanup."""
        proc = subprocess.Popen(argv, **kw)
        self.on_cleanup(lambda: stop_process(proc))
        return proc

    def close(self) -> None:
        while self._cleanups:
            fn = self._cleanups.pop()
            try:
                fn()
            except Exception as exc:  # cleanup must go on
                log(f"cleanup step failed: {exc}")
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def stop_process(proc: subprocess.Popen, timeout: float = 10) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


def run(argv: list[str | Path], **kw) -> subprocess.CompletedProcess:
    p = subprocess.run([str(a) for a in argv], capture_output=True, text=True, **kw)
    if p.returncode:
        raise RuntimeError(f"{' '.join(map(str, argv))} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def build_latmark(dest_dir: Path) -> Path:
    """tests/bench/latmark.c, static (the guest has only busybox), into dest_dir."""
    out = dest_dir / "latmark"
    run(["gcc", "-O2", "-static", "-o", out, HERE / "latmark.c"])
    return out


def make_disk(ws: Workspace, size: int = GiB) -> Path:
    """A fresh sparse ext4 image (Debian mke2fs defaults, tables initialized now, like images.build),
    holding /latmark for the latency benchmark. Copy it per guest run with clone_disk()."""
    root = ws.path / "disk-root"
    root.mkdir()
    build_latmark(root)
    img = ws.path / "pristine.raw"
    with open(img, "wb") as f:
        f.truncate(size)
    run(["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-E", "lazy_itable_init=0,lazy_journal_init=0,nodiscard",
         "-d", root, img])
    return img


def clone_disk(pristine: Path, dest: Path) -> Path:
    run(["cp", "--sparse=always", pristine, dest])
    return dest


class Stopwatch:
    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def seconds(self) -> float:
        return time.monotonic() - self.t0

    def __str__(self) -> str:
        return f"{self.seconds():.1f} s"
