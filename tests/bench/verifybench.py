"""How long `attach --verify metadata|full` takes before the attach is ready (issue 16).

    .venv/bin/python -m tests.bench.verifybench [--runs 3]

Two disks, each served by qemu-storage-daemon (images.hostwriter, the disk mounted by the host kernel and idle)
with a correct base: a 1 GiB ext4 holding the test tree (images/tree) and the 100k-file image of
tests/bench/enginedata (`many_image(100_000)`, 1 GiB, built into the bench cache on first use). Each run is one
`mirrorfs attach --no-engine` to ready and detached; the time is the check's own (attach.json `verify.seconds`)
and the whole attach to ready. Prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from tests.bench.common import GiB, log, median
from tests.tapharness import Attach


def _tree_disk(path: Path) -> Path:
    from images.build import artifact_path

    with open(path, "wb") as f:
        f.truncate(GiB)
    tree = artifact_path("tree")
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-E", "lazy_itable_init=0,lazy_journal_init=0", "-d",
                    str(tree), str(path)], check=True, capture_output=True)
    return path


def measure(image: Path, work: Path, mode: str, runs: int) -> tuple[list[float], list[float], dict]:
    from images.hostwriter import HostWriter

    disk = work / "disk.raw"
    shutil.copyfile(image, disk)
    checks, readies, info = [], [], {}
    with HostWriter(disk, work / "qsd") as hw:
        hw.start()
        hw.mount()
        subprocess.run(["sync"], check=True)
        subprocess.run(["fsfreeze", "-f", str(hw.mnt)], check=True)  # nothing writes: the copy is a correct base
        try:
            base = work / "base.raw"
            subprocess.run(["cp", "--sparse=always", str(disk), str(base)], check=True)
            for i in range(runs):
                state = work / f"state-{mode}-{i}"
                t0 = time.monotonic()
                attach = Attach(hw.qmp, state, "--device", hw.node, "--base", str(base), "--verify", mode,
                                "--no-engine").start(timeout=600)
                readies.append(time.monotonic() - t0)
                info = attach.info()["verify"]
                assert info["differing"] == 0, info
                checks.append(info["seconds"])
                attach.detach()
                shutil.rmtree(state)
        finally:
            subprocess.run(["fsfreeze", "-u", str(hw.mnt)], check=False)
    return checks, readies, info


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    from tests.bench.enginedata import many_image

    rows = ["| disk | --verify | regions | bytes compared | check (median) | attach to ready (median) |",
            "|---|---|---:|---:|---:|---:|"]
    with tempfile.TemporaryDirectory(prefix="verifybench-", dir="/tmp") as tmp:
        tmpd = Path(tmp)
        images = {"1 GiB ext4, test tree": _tree_disk(tmpd / "tree.raw"),
                  "100k-file image (1 GiB)": many_image(100_000)[0]}
        for name, image in images.items():
            for mode in ("metadata", "full"):
                work = tmpd / f"{mode}-{image.stem}"
                work.mkdir()
                log(f"{name}: --verify {mode}")
                checks, readies, info = measure(image, work, mode, args.runs)
                rows.append(f"| {name} | {mode} | {info['regions']} | {info['bytes'] / 2**20:,.1f} MiB | "
                            f"{median(checks):.2f} s | {median(readies):.2f} s |")
                shutil.rmtree(work)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
