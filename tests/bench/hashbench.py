"""What content hashes and the diff store cost (issue 14): replays with none, with hashes, with hashes and the store.

    MIRRORFS_CACHE=... .venv/bin/python -m tests.bench.hashbench [ROUNDS] [WORKLOAD...]

WORKLOAD: untar (incompressible files: nothing is text, the store keeps only "binary" rows) and untar-text (the
same sizes as lines of hex digits: each file up to 64 KiB is kept); default both. Each replay runs in its own
subprocess (tests.bench.enginebench probe replay DIR none|default [store]), the three modes alternating; prints
one JSON line per workload: the medians, the cost of each mode over no hashing as the difference of the medians
(noisy on a shared machine), and `share`: the time the engine's hashers (reading, SHA-256, keeping bytes) and the
store's commits spent inside each run over that run's time.
"""

from __future__ import annotations

import json
import sys

from tests.bench.common import median
from tests.bench.enginebench import probe
from tests.bench.enginedata import recorded

MODES = {"none": ("none",), "hash": ("default",), "store": ("default", "store")}


def main(argv: list[str]) -> int:
    rounds = int(argv[0]) if argv else 5
    for workload in argv[1:] or ["untar", "untar-text"]:
        rec = recorded(workload)
        times: dict[str, list[float]] = {m: [] for m in MODES}
        shares: dict[str, list[float]] = {"hash": [], "store": []}
        last: dict[str, dict] = {}
        for _ in range(rounds):
            for mode, args in MODES.items():
                r = last[mode] = probe("replay", rec, *args)
                times[mode].append(r["seconds"])
                if mode in shares:
                    shares[mode].append((r["hash_s"] + r.get("store_s", 0.0)) / r["seconds"])
        base = median(times["none"])
        print(json.dumps({
            "workload": workload, "rounds": rounds,
            "median_s": {m: median(t) for m, t in times.items()},
            "cost": {m: (median(times[m]) - base) / base for m in shares},
            "share": {m: median(s) for m, s in shares.items()}, "shares": shares,
            "hashed_bytes": last["hash"]["hashed_bytes"], "hashed_files": last["hash"]["hashed_files"],
            "kept": last["store"]["kept"], "store_bytes": last["store"]["store_bytes"], "times": times}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
