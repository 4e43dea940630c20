"""2. Tap ingest: `qemu-img bench -w` as the NBD client, writing into the real tap (tests.bench.tapserver),
against the same bench writing a local raw file on the same file system (page cache, and O_DIRECT)."""

from __future__ import annotations

import re
import subprocess
import sys
import time

from tests.bench.common import GiB, Workspace, cpu_seconds, log, spread, stop_process
from tests.support import REPO

SIZE = GiB
TARGETS = ("local-buffered", "local-direct", "tap")
_DONE = re.compile(r"Run completed in ([0-9.]+) seconds")


def cases(quick: bool) -> list[dict]:
    k = 4 if quick else 1
    return [
        {"name": "seq256k", "label": "256 KiB sequential writes, depth 1", "size": 262144, "count": 2048 // k,
         "depth": 1},
        {"name": "w4k", "label": "4 KiB sequential writes, depth 1", "size": 4096, "count": 20000 // k, "depth": 1},
        {"name": "w4k-d16", "label": "4 KiB sequential writes, depth 16", "size": 4096, "count": 20000 // k,
         "depth": 16},
    ]


def qemu_img_bench(target: str, case: dict, cache: str) -> float:
    argv = ["qemu-img", "bench", "-w", "-f", "raw", "-t", cache, "-s", str(case["size"]), "-c", str(case["count"]),
            "-d", str(case["depth"]), target]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    m = _DONE.search(p.stdout)
    if p.returncode or not m:
        raise RuntimeError(f"{' '.join(argv)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return float(m.group(1))


def start_tap(ws: Workspace, tag: str) -> tuple[subprocess.Popen, str]:
    d = ws.path / tag
    d.mkdir()
    sock = d / "nbd.sock"
    proc = ws.popen([sys.executable, "-m", "tests.bench.tapserver", "--state", str(d / "state"), "--size", str(SIZE),
                     "--socket", str(sock)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    line = proc.stdout.readline()
    if line.strip() != "ready":
        stop_process(proc)
        raise RuntimeError(f"bench tap server did not start: {line}{proc.stdout.read()}")
    return proc, f"nbd+unix:///mirrorfs?socket={sock}"


def one(ws: Workspace, case: dict, target: str, tag: str) -> dict:
    import shutil

    d = ws.path / tag
    if target == "tap":
        proc, uri = start_tap(ws, tag)
        cpu0 = cpu_seconds(proc.pid)
        secs = qemu_img_bench(uri, case, "none")
        time.sleep(0.05)
        cpu = cpu_seconds(proc.pid) - cpu0
        stop_process(proc)
        out = proc.stdout.read()
        if f"writes={case['count']}" not in out:
            raise RuntimeError(f"tap recorded a different number of writes than sent: {out}")
    else:
        d.mkdir()
        img = d / "local.raw"
        with open(img, "wb") as f:
            f.truncate(SIZE)
        secs = qemu_img_bench(str(img), case, "writeback" if target == "local-buffered" else "none")
        cpu = 0.0
    shutil.rmtree(d, ignore_errors=True)
    nbytes = case["size"] * case["count"]
    return {"s": secs, "mbs": nbytes / secs / 1e6, "wps": case["count"] / secs,
            "tap_cpu_us_per_write": cpu / case["count"] * 1e6}


def bench_ingest(ws: Workspace, quick: bool) -> dict:
    rounds = 1 if quick else 3
    cs = cases(quick)
    per_round: list[dict[str, dict[str, dict]]] = []
    for r in range(rounds):
        res: dict[str, dict[str, dict]] = {}
        for case in cs:
            res[case["name"]] = {}
            for target in TARGETS:
                x = one(ws, case, target, f"ingest-r{r + 1}-{case['name']}-{target}")
                res[case["name"]][target] = x
                extra = f", tap CPU {x['tap_cpu_us_per_write']:.0f} us/write" if target == "tap" else ""
                log(f"ingest round {r + 1} {case['name']:8} {target:14}: {x['mbs']:8.1f} MB/s "
                    f"{x['wps']:9.0f} writes/s{extra}")
        per_round.append(res)
    return {"rounds": rounds, "cases": cs, "per_round": per_round}


def ingest_table(res: dict) -> list[str]:
    pr = res["per_round"]
    lines = ["| workload (qemu-img bench -w) | tap | tap CPU per write | local file, page cache | tap / local "
             "| local file, O_DIRECT | tap / local O_DIRECT |", "|---|---|---|---|---|---|---|"]
    for case in res["cases"]:
        n = case["name"]
        key, unit, fmt = ("mbs", "MB/s", "{:.0f}") if case["size"] > 4096 else ("wps", "writes/s", "{:.0f}")
        vals = {t: [r[n][t][key] for r in pr] for t in TARGETS}
        ratio = {t: [r[n]["tap"][key] / r[n][t][key] for r in pr] for t in TARGETS[:2]}
        cpu = spread([r[n]["tap"]["tap_cpu_us_per_write"] for r in pr], "{:.0f}")
        lines.append(f"| {case['label']} ({case['count']} x {case['size'] // 1024} KiB) | "
                     f"{spread(vals['tap'], fmt)} {unit} | {cpu} us | {spread(vals['local-buffered'], fmt)} {unit} | "
                     f"{spread(ratio['local-buffered'], '{:.3f}')} | {spread(vals['local-direct'], fmt)} {unit} | "
                     f"{spread(ratio['local-direct'], '{:.2f}')} |")
    return lines

