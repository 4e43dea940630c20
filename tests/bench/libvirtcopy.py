"""The whole-disk copy an `attach --domain` starts with (libvirt's block copy), against QEMU's own `--sync full`.

    .venv/bin/python -m tests.bench.libvirtcopy [--rounds 3] [--size-mib 256] [--data-mib 64]

One sparse ext4 image with DATA MiB of random files; a TCG domain of a private libvirtd (tests/libvirtharness.py)
and a plain QEMU guest (images/guest.py) each run an idle workload on a sparse copy of it. Each round attaches
to both, in turn, with a fresh state directory and no engine (`--no-engine`), waits for ready and detaches.
"copy" is the write log's own time from its first record to the FLUSH at job ready (what the copy took), "ready"
is the attach's wall time from its start to attach.json saying ready (connection, job start and copy). The ratio
is libvirt / QMP of the copy times within the same round; the table gives medians and their range. Prints a
Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from tests.bench.common import MiB, Stopwatch, Workspace, log, spread
from tests.tapharness import MIRRORFS, Attach

IDLE = "while true; do sleep 1; done\n"


def make_disk(ws: Workspace, size: int, data: int) -> Path:
    root = ws.path / "root"
    root.mkdir()
    for i in range(data // (4 * MiB)):
        (root / f"f{i:03d}").write_bytes(os.urandom(4 * MiB))
    img = ws.path / "disk.raw"
    with open(img, "wb") as f:
        f.truncate(size)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-E",
                    "lazy_itable_init=0,lazy_journal_init=0,nodiscard", "-d", str(root), str(img)], check=True)
    return img


def copy_seconds(state: Path) -> tuple[float, int, int]:
    """(seconds from the first record to the first FLUSH, data bytes written, bytes written as zeroes)."""
    out = subprocess.run([*MIRRORFS, "log", "--state", str(state), "--json"], capture_output=True, text=True,
                         check=True).stdout
    records = [json.loads(x) for x in out.splitlines()]
    flush = next(r for r in records if r["kind"] == "flush")
    before = [r for r in records if r["seq"] < flush["seq"]]
    data = sum(r["length"] for r in before if r["kind"] == "write")
    zeroes = sum(r["length"] for r in before if r["kind"] == "zeroes")
    return (flush["time_ns"] - records[0]["time_ns"]) / 1e9, data, zeroes


def attach_once(args: list[str], state: Path) -> tuple[float, float, int, int]:
    a = Attach(Path("/nonexistent/qmp"), state)
    a.args = [*MIRRORFS, "attach", *args, "--state", str(state), "--no-engine"]
    watch = Stopwatch()
    a.start(300)
    ready = watch.seconds()
    a.detach()
    return (ready, *copy_seconds(state))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--data-mib", type=int, default=64)
    opts = ap.parse_args(argv)
    from images.guest import Guest
    from tests.libvirtharness import NAME, Libvirt

    with Workspace("libvirtcopy") as ws:
        disk = make_disk(ws, opts.size_mib * MiB, opts.data_mib * MiB)
        lv = Libvirt(disk, IDLE)
        ws.on_cleanup(lv.close)
        lv.virsh("resume", NAME)
        qdisk = ws.path / "qemu-disk.raw"
        subprocess.run(["cp", "--sparse=always", str(disk), str(qdisk)], check=True)
        guest = Guest(qdisk, IDLE, ws.path / "vm", paused=False)
        ws.on_cleanup(guest.stop)
        rows: dict[str, list[tuple[float, float, int, int]]] = {"libvirt": [], "qmp": []}
        for r in range(opts.rounds):
            rows["libvirt"].append(attach_once(["--domain", NAME, "--connect", lv.uri, "--disk", "vda"],
                                               lv.dir / f"st-lv-{r}"))
            rows["qmp"].append(attach_once(["--qmp", str(guest.qmp), "--sync", "full"], ws.path / f"st-q-{r}"))
            log(f"round {r + 1}: libvirt {rows['libvirt'][-1]}, qmp {rows['qmp'][-1]}")
    ratio = [lv_[1] / q[1] for lv_, q in zip(rows["libvirt"], rows["qmp"], strict=True)]
    print(f"\ndisk {opts.size_mib} MiB, ext4 with {opts.data_mib} MiB of random files; {opts.rounds} rounds\n")
    print("| attach | copy (s) | data MB/s in the copy | ready (s) | data written | written as zeroes |")
    print("|---|---|---|---|---|---|")
    for name, label in (("qmp", "`--qmp --sync full` (baseline)"), ("libvirt", "`--domain`")):
        rs = rows[name]
        print(f"| {label} | {spread([x[1] for x in rs], '{:.3f}')} | "
              f"{spread([x[2] / x[1] / 1e6 for x in rs], '{:.0f}')} | {spread([x[0] for x in rs])} | "
              f"{rs[-1][2]:,} B | {rs[-1][3]:,} B |")
    print(f"\ncopy time libvirt / QMP: {spread(ratio)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
