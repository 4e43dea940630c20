"""4. The tap's cost per guest write: `qemu-img bench -w -d 1 -s 4096` into qemu-storage-daemon's own NBD export
of a disk, with no mirror and with `mirrorfs attach --mode exact|async` recording, alternated within each round
(plain runs vary by tens of percent run to run, so each mirrored run is compared with the plain runs around it).
Mode "sink" mirrors (write-blocking, as exact) into nbdkit's C memory plugin instead of the tap: what QEMU's own
path adds with a target that does next to nothing, measured in the same rounds. Each qemu-img run (its mean) is
followed by a timed client's run (the median of its per-write times).

    .venv/bin/python -m tests.bench.tapcost [--rounds N] [--count N]   # prints the table
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from tests.bench.common import GiB, Workspace, cpu_seconds, log, median, spread, stop_process
from tests.support import REPO

MODES = ("exact", "async", "sink")
_DONE = re.compile(r"Run completed in ([0-9.]+) seconds")


class _QMP:
    """Blocking QMP, just enough to start and cancel a mirror job into another NBD server."""

    def __init__(self, path: Path) -> None:
        self._sock = socket.socket(socket.AF_UNIX)
        self._sock.connect(str(path))
        self._f = self._sock.makefile("rw")
        self._events: list[dict] = []  # events that arrived while a command waited for its return
        json.loads(self._f.readline())  # the greeting
        self.execute("qmp_capabilities")

    def execute(self, cmd: str, args: dict | None = None) -> object:
        self._f.write(json.dumps({"execute": cmd, **({"arguments": args} if args else {})}) + "\n")
        self._f.flush()
        while True:
            msg = json.loads(self._f.readline())
            if "return" in msg:
                return msg["return"]
            if "error" in msg:
                raise RuntimeError(f"QMP {cmd}: {msg['error']}")
            if "event" in msg:
                self._events.append(msg)

    def wait_event(self, names: tuple[str, ...], timeout: float = 60) -> dict:
        while self._events:
            msg = self._events.pop(0)
            if msg["event"] in names:
                return msg
        self._sock.settimeout(timeout)
        try:
            while True:
                msg = json.loads(self._f.readline())
                if msg.get("event") in names:
                    return msg
        finally:
            self._sock.settimeout(None)

    def close(self) -> None:
        self._f.close()
        self._sock.close()


@contextlib.contextmanager
def sink_mirror(ws: Workspace, qmp_path: Path, node: str, tag: str) -> Iterator[subprocess.Popen]:
    """A write-blocking mirror job of `node` into `nbdkit memory` on a unix socket; yields the nbdkit process."""
    if shutil.which("nbdkit") is None:
        raise RuntimeError("nbdkit is missing: `make bench-apt` installs it (the cost benchmark's C reference target)")
    sock = ws.path / f"sink-{tag}.sock"
    proc = ws.popen(["nbdkit", "--foreground", "--unix", str(sock), "--exportname", "sink", "memory", str(GiB)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not sock.is_socket():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("nbdkit did not open its socket")
        time.sleep(0.01)
    qmp = _QMP(qmp_path)
    try:
        qmp.execute("blockdev-add", {"driver": "nbd", "node-name": "sink", "export": "sink",
                                     "server": {"type": "unix", "path": str(sock)}})
        qmp.execute("blockdev-mirror", {"job-id": "sink", "device": node, "target": "sink", "sync": "none",
                                        "copy-mode": "write-blocking"})
        qmp.wait_event(("BLOCK_JOB_READY",))
        yield proc
        qmp.execute("block-job-cancel", {"device": "sink"})
        qmp.wait_event(("BLOCK_JOB_CANCELLED", "BLOCK_JOB_COMPLETED"))
        qmp.execute("blockdev-del", {"node-name": "sink"})
    finally:
        qmp.close()
        stop_process(proc)


def _bench(uri: str, count: int, offset: int) -> float:
    """Seconds per write of one depth-1 4 KiB O_DIRECT run."""
    argv = ["qemu-img", "bench", "-f", "raw", "-w", "-t", "none", "-d", "1", "-s", "4096", "-c", str(count),
            "-o", str(offset), uri]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    m = _DONE.search(p.stdout)
    if p.returncode or not m:
        raise RuntimeError(f"{' '.join(argv)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return float(m.group(1)) / count


def _median_write(sock: Path, export: str, count: int, offset: int) -> float:
    """Median seconds per write of `count` depth-1 4 KiB WRITEs, each timed on its own, by a minimal NBD client
    (header and payload in one send, then the 16-byte reply): a median of thousands of writes shrugs off the
    bursts of other load that move qemu-img's mean by hundreds of microseconds on a shared machine."""
    from tap import nbd

    def take(s: socket.socket, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = s.recv(n - len(buf))
            if not chunk:
                raise RuntimeError(f"the NBD server at {sock} closed the connection")
            buf += chunk
        return bytes(buf)

    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(sock))
        take(s, nbd.GREETING.size)
        name = export.encode()
        go = nbd.U32.pack(len(name)) + name + nbd.U16.pack(0)
        s.sendall(nbd.CLIENT_FLAGS.pack(nbd.FLAG_C_FIXED_NEWSTYLE | nbd.FLAG_C_NO_ZEROES)
                  + nbd.OPTION_HEADER.pack(nbd.IHAVEOPT, nbd.OPT_GO, len(go)) + go)
        while True:
            _, _, rep, length = nbd.OPTION_REPLY.unpack(take(s, nbd.OPTION_REPLY.size))
            take(s, length)
            if rep == nbd.REP_ACK:
                break
            if rep != nbd.REP_INFO:
                raise RuntimeError(f"NBD_OPT_GO refused by {sock}: reply {rep:#x}")
        payload = os.urandom(4096)
        times = []
        clock = time.perf_counter_ns
        for i in range(count):
            req = nbd.REQUEST.pack(nbd.REQUEST_MAGIC, 0, nbd.CMD_WRITE, i, offset + i * 4096, 4096) + payload
            t0 = clock()
            s.sendall(req)
            _, error, _ = nbd.SIMPLE_REPLY.unpack(take(s, nbd.SIMPLE_REPLY.size))
            times.append(clock() - t0)
            if error:
                raise RuntimeError(f"WRITE failed with NBD error {error}")
        s.sendall(nbd.REQUEST.pack(nbd.REQUEST_MAGIC, 0, nbd.CMD_DISC, 0, 0, 0))
    return median(times) / 1e9


def bench_cost(ws: Workspace, quick: bool = False, rounds: int | None = None, count: int | None = None,
               compare: Path | None = None) -> dict:
    """`compare`: another checkout of mirrorfs whose attach runs too, as modes "exact@other" and "async@other",
    in the same rounds (before/after numbers measured side by side)."""
    import tests.tapharness
    from images.hostwriter import HostWriter
    from tests.tapharness import Attach

    modes = [(m, REPO) for m in MODES] + ([(f"{m}@other", compare) for m in MODES if m != "sink"] if compare else [])

    rounds = rounds or (1 if quick else 3)
    count = count or (1000 if quick else 3000)
    disk = ws.path / "cost-disk.raw"
    with open(disk, "wb") as f:
        f.truncate(GiB)
    per_round: list[dict] = []
    with HostWriter(disk, ws.path / "cost-qsd") as hw:
        uri = f"nbd+unix:///{hw.node}?socket={hw.export_sock}"
        offset = 0

        def measure(res: dict, key: str, pid: int | None) -> None:
            """qemu-img's mean (and the CPU of `pid` over it), then the timed client's median."""
            nonlocal offset
            offset = (offset + count * 4096) % (GiB // 2)
            cpu0 = cpu_seconds(pid) if pid else 0.0
            mean = _bench(uri, count, offset)
            if pid:
                res[f"{key}_cpu"] = (cpu_seconds(pid) - cpu0) / count
            offset = (offset + count * 4096) % (GiB // 2)
            p50 = _median_write(hw.export_sock, hw.node, count, offset)
            if key == "plain":
                res["plain"].append(mean)
                res["plain_p50s"].append(p50)
            else:
                res[key], res[f"{key}_p50"] = mean, p50

        for r in range(rounds):
            res: dict = {"plain": [], "plain_p50s": []}
            for mode, repo in modes:
                measure(res, "plain", None)
                if mode == "sink":
                    with sink_mirror(ws, hw.qmp, hw.node, f"{r}") as proc:
                        measure(res, mode, proc.pid)
                    continue
                state = ws.path / f"cost-state-{r}-{mode}"
                tests.tapharness.REPO = repo  # the checkout whose attach runs (its cwd)
                with Attach(hw.qmp, state, "--device", hw.node, "--mode", mode.split("@")[0]) as attach:
                    assert attach.proc is not None
                    measure(res, mode, attach.proc.pid)
                    attach.detach()
                subprocess.run(["rm", "-rf", str(state)], check=False)
            measure(res, "plain", None)
            plain, plain_p50 = median(res["plain"]), median(res["plain_p50s"])
            line = ", ".join(f"{m} +{(res[m] - plain) * 1e6:.0f} us, median +{(res[m + '_p50'] - plain_p50) * 1e6:.0f}"
                             f" us (tap CPU {res[m + '_cpu'] * 1e6:.0f} us)" for m, _ in modes)
            log(f"cost round {r + 1}: plain {plain * 1e6:.0f} us/write, median {plain_p50 * 1e6:.0f} us; {line}")
            res["plain_median"], res["plain_p50"] = plain, plain_p50
            per_round.append(res)
    tests.tapharness.REPO = REPO
    return {"rounds": rounds, "count": count, "per_round": per_round, "modes": [m for m, _ in modes]}


def cost_table(res: dict) -> list[str]:
    pr = res["per_round"]
    lines = ["| 4 KiB writes, depth 1 | qemu-img bench: per write (mean) | added by the mirror | "
             "timed client: per write (median) | added by the mirror | tap CPU per write |",
             "|---|---|---|---|---|---|",
             f"| no mirror | {spread([r['plain_median'] * 1e6 for r in pr], '{:.0f}')} us | – | "
             f"{spread([r['plain_p50'] * 1e6 for r in pr], '{:.0f}')} us | – | – |"]
    for m in res.get("modes", MODES):
        label = ("`nbdkit memory` as the target (write-blocking)" if m == "sink" else
                 f"`attach --mode {m.split('@')[0]}`" + (" (the other checkout)" if "@" in m else ""))
        lines.append(f"| {label} | {spread([r[m] * 1e6 for r in pr], '{:.0f}')} us | "
                     f"{spread([(r[m] - r['plain_median']) * 1e6 for r in pr], '{:.0f}')} us | "
                     f"{spread([r[m + '_p50'] * 1e6 for r in pr], '{:.0f}')} us | "
                     f"{spread([(r[m + '_p50'] - r['plain_p50']) * 1e6 for r in pr], '{:.0f}')} us | "
                     f"{spread([r[m + '_cpu'] * 1e6 for r in pr], '{:.0f}')} us |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--count", type=int, default=3000)
    ap.add_argument("--compare", type=Path, metavar="CHECKOUT", help="another mirrorfs checkout to run alongside")
    a = ap.parse_args()
    with Workspace() as ws:
        res = bench_cost(ws, rounds=a.rounds, count=a.count, compare=a.compare)
    print("\n".join(cost_table(res)))


if __name__ == "__main__":
    main()
