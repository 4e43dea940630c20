"""What content hashes and the diff store cost (issue 14): replays with none, with hashes, with hashes and the store.

    MIRRORFS_CACHE=... .venv/bin/python -m tests.bench.hashbench [ROUNDS] [WORKLOAD...]

WORKLOAD: untar (incompressible files: nothing is text, the store keeps only "binary" rows) and untar-text (the
same sizes as lines of hex digits: each file up to 64 KiB is kept); default both. Each replay runs in its own
subprocess (tests.bench.enginebench probe replay DIR none|default [store]), the three modes alternating; prints
one JSON line per workload: the medians of wall and CPU time, the cost of each mode over no hashing as the
difference of the medians (noisy on a shared machine), and `share`: the time the engine's hashers (reading,
SHA-256, keeping bytes) and the store's commits spent inside each run over that run's time; `cpu_share`: the
hashers' CPU time over the run's (the replay is one thread; a busy machine's preemption inflates neither; the
store's commits left out). Then, per workload, what `events --diff --json` costs over `events --json` on that
replay's events (`diff_read`), in this process.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from tests.bench.common import median
from tests.bench.enginebench import probe
from tests.bench.enginedata import recorded

MODES = {"none": ("none",), "hash": ("default",), "store": ("default", "store")}


def diff_read(rec: Path) -> dict:
    """Replay with the store into a temporary state directory, then read its events as `events --json` does,
    without and with --diff (mirrorfs/stream/diffs.py), alternating, 3 times each."""
    from inference.blobs import BlobStore
    from inference.engine import Engine
    from inference.eventlog import EventLog, read_events
    from mirrorfs.stream.diffs import Differ
    from mirrorfs.stream.render import format_event
    from tap.writelog import LogFollower

    state = rec / "state"
    size = json.loads((state / "state.json").read_text())["size"]
    with tempfile.TemporaryDirectory(prefix="mfs-diff-", dir="/tmp") as tmp:
        out = Path(tmp)
        engine = Engine(out / "engine", size, base=rec / "base.raw")
        engine.blobs = BlobStore(out / "blobs.db")
        with EventLog(out / "events.jsonl", truncate=True) as events, LogFollower(state / "log") as follower:
            while batch := follower.poll():
                events.append(engine.process(batch))
            events.append(engine.finish())
        engine.close()
        times: dict[str, list[float]] = {"plain": [], "diff": []}
        diffs = skipped = 0
        for _ in range(3):
            for mode in times:
                differ = Differ(out) if mode == "diff" else None
                t0 = time.perf_counter()
                for ev in read_events(out / "events.jsonl", 0, follow=False):
                    if differ is not None:
                        differ.add_to_event(ev)
                        diffs += ev.diff is not None
                        skipped += ev.diff_skipped is not None
                    format_event(ev, True)
                times[mode].append(time.perf_counter() - t0)
        return {"plain_s": median(times["plain"]), "diff_s": median(times["diff"]),
                "diffs": diffs // 3, "skipped": skipped // 3}


def main(argv: list[str]) -> int:
    rounds = int(argv[0]) if argv else 5
    for workload in argv[1:] or ["untar", "untar-text"]:
        rec = recorded(workload)
        times: dict[str, list[float]] = {m: [] for m in MODES}
        cpu: dict[str, list[float]] = {m: [] for m in MODES}
        shares: dict[str, list[float]] = {"hash": [], "store": []}
        cpu_shares: dict[str, list[float]] = {"hash": [], "store": []}
        last: dict[str, dict] = {}
        for _ in range(rounds):
            for mode, args in MODES.items():
                r = last[mode] = probe("replay", rec, *args)
                times[mode].append(r["seconds"])
                cpu[mode].append(r["cpu_s"])
                if mode in shares:
                    shares[mode].append((r["hash_s"] + r.get("store_s", 0.0)) / r["seconds"])
                    cpu_shares[mode].append(r["hash_cpu_s"] / r["cpu_s"])
        base, cpu_base = median(times["none"]), median(cpu["none"])
        print(json.dumps({
            "workload": workload, "rounds": rounds,
            "median_s": {m: median(t) for m, t in times.items()},
            "median_cpu_s": {m: median(t) for m, t in cpu.items()},
            "cost": {m: (median(times[m]) - base) / base for m in shares},
            "cpu_cost": {m: (median(cpu[m]) - cpu_base) / cpu_base for m in shares},
            "share": {m: median(s) for m, s in shares.items()}, "shares": shares,
            "cpu_share": {m: median(s) for m, s in cpu_shares.items()}, "cpu_shares": cpu_shares,
            "hashed_bytes": last["hash"]["hashed_bytes"], "hashed_files": last["hash"]["hashed_files"],
            "kept": last["store"]["kept"], "store_bytes": last["store"]["store_bytes"], "times": times,
            "diff_read": diff_read(rec)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
