"""Benchmark 7: latency from the guest's sync to the engine's emitted event, exact and async (TCG guest).

`mirrorfs attach --base IMAGE --cont` runs the live engine (`mirrorfs replay --follow` in its own process). The
guest helper `latmark sync` creates a file, syncs and prints the guest time right after sync returns; the
harness tails the state dir's events.jsonl with inotify and stamps every line as it arrives (ConsoleTail).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from tests.bench.common import Workspace, clone_disk, log, median, percentile, spread
from tests.bench.guestbench import ConsoleTail

MODES = ("exact", "async")
WORKLOAD = r"""
set -e
mkdir "$MNT/sync"
sync
sleep 2
/mnt/latmark sync "$MNT/sync" {n} {gap_us} {samples}
"""


def _wait_file(path: Path, timeout: float, proc) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline or (proc is not None and proc.poll() is not None):
            raise RuntimeError(f"{path} did not appear (is the live engine running?)")
        time.sleep(0.01)


def sync_run(ws: Workspace, pristine: Path, tag: str, mode: str, workload: str, timeout: float = 300) -> dict:
    from images.guest import DONE, Guest
    from tests.tapharness import Attach

    d = ws.path / tag
    d.mkdir()
    disk = clone_disk(pristine, d / "disk.raw")
    state = d / "state"
    guest = Guest(disk, workload, d / "vm", paused=True)
    ws.on_cleanup(guest.stop)
    console = ConsoleTail(guest.console_path)
    ws.on_cleanup(console.close)
    events_tail = None
    try:
        attach = Attach(guest.qmp, state, "--mode", mode, "--sync", "none", "--cont", "--base", str(pristine),
                        log=d / "attach.log")
        attach.start()
        ws.on_cleanup(lambda: attach.__exit__())
        _wait_file(state / "events.jsonl", 60, attach.proc)
        events_tail = ConsoleTail(state / "events.jsonl")
        ws.on_cleanup(events_tail.close)
        guest.wait_for(DONE, timeout)
        guest.wait_for("reboot: Power down", 30)
        time.sleep(1.0)  # the engine polls the log every 50 ms: let it emit what the last records completed
        attach.detach()  # the engine drains, finishes and exits
    finally:
        guest.stop()
        console.close()
        if events_tail:
            events_tail.close()
    text = guest.console()
    if DONE + " rc=0" not in text:
        raise RuntimeError(f"{tag}: workload failed; console tail:\n{text[-3000:]}")
    return {"console": console.lines, "events": events_tail.lines if events_tail else []}


def latency_of(run: dict) -> dict:
    samples, marks = [], {}
    for host_ns, line in run["console"]:
        parts = line.split()
        if parts[:1] == ["MIRRORFS-CLK"]:
            samples.append(host_ns - int(parts[1]))
        elif parts[:1] == ["MIRRORFS-SYNC"]:
            i, t0, ts, t1 = map(int, parts[1:5])
            marks[i] = (t0, ts, t1)
            samples.append(host_ns - t1)
    if not samples:
        raise RuntimeError("no clock samples on the console")
    offset = min(samples)
    k = max(1, len(samples) // 3)
    drift_us = (min(samples[-k:]) - min(samples[:k])) / 1e3
    emitted: dict[int, tuple[int, float]] = {}
    kinds: dict[str, int] = {}
    for host_ns, line in run["events"]:
        if not line:
            continue
        ev = json.loads(line)
        kinds[ev["kind"]] = kinds.get(ev["kind"], 0) + 1
        path = ev.get("path") or ""
        if ev["kind"] == "create" and path.startswith("/sync/s"):
            i = int(path.rsplit("/s", 1)[1])
            emitted.setdefault(i, (host_ns, ev["time"]))
    found = sorted(i for i in marks if i in emitted)
    emit_ms = [(emitted[i][0] - (marks[i][2] + offset)) / 1e6 for i in found]
    record_ms = [(emitted[i][1] * 1e9 - (marks[i][2] + offset)) / 1e6 for i in found]
    sync_ms = [(t1 - ts) / 1e6 for _, ts, t1 in marks.values()]
    return {"n": len(marks), "found": len(found), "emit_ms": emit_ms, "record_ms": record_ms, "sync_ms": sync_ms,
            "before_sync_returned": sum(1 for x in emit_ms if x < 0), "drift_us": drift_us, "kinds": kinds}


def bench_synclat(ws: Workspace, pristine: Path, quick: bool) -> dict:
    rounds, n = (1, 30) if quick else (2, 100)
    workload = WORKLOAD.format(n=n, gap_us=100_000, samples=200)
    per_round: list[dict] = []
    for r in range(rounds):
        res: dict[str, dict] = {}
        for mode in MODES:
            tag = f"synclat-r{r + 1}-{mode}"
            x = res[mode] = latency_of(sync_run(ws, pristine, tag, mode, workload))
            shutil.rmtree(ws.path / tag, ignore_errors=True)
            log(f"synclat round {r + 1} {mode:5}: sync->event median {median(x['emit_ms']):.1f} ms, "
                f"p99 {percentile(x['emit_ms'], 99):.1f} ms ({x['found']}/{x['n']} found), event time field "
                f"median {median(x['record_ms']):.1f} ms, guest sync {median(x['sync_ms']):.1f} ms, "
                f"clock drift {x['drift_us']:.0f} us")
        per_round.append(res)
    return {"rounds": rounds, "n": n, "per_round": per_round}


def synclat_table(res: dict) -> list[str]:
    pr = res["per_round"]
    lines = ["| mode | sync return → event emitted: median (ms) | p99 (ms) | max (ms) | events found "
             "| emitted before sync returned | event `time` (record) − sync return: median (ms) | guest sync (ms) |",
             "|---|---|---|---|---|---|---|---|"]
    for mode in MODES:
        rows = [r[mode] for r in pr]
        lines.append(
            f"| {mode} | {spread([median(x['emit_ms']) for x in rows], '{:.1f}')} "
            f"| {spread([percentile(x['emit_ms'], 99) for x in rows], '{:.1f}')} "
            f"| {max(max(x['emit_ms']) for x in rows):.1f} "
            f"| {sum(x['found'] for x in rows)}/{sum(x['n'] for x in rows)} "
            f"| {sum(x['before_sync_returned'] for x in rows)} "
            f"| {spread([median(x['record_ms']) for x in rows], '{:.1f}')} "
            f"| {spread([median(x['sync_ms']) for x in rows], '{:.1f}')} |")
    drift = max(abs(r[m]["drift_us"]) for r in pr for m in MODES)
    lines.append("")
    lines.append(f"Clock-offset drift between the first and last third of a run: at most {drift:.0f} us.")
    return lines
