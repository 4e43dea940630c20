"""What content hashes in events cost (issue 14): the untar replay with and without them, alternating.

    MIRRORFS_CACHE=... .venv/bin/python -m tests.bench.hashbench [ROUNDS]

Each replay runs in its own subprocess (tests.bench.enginebench probe replay DIR none|default); prints one JSON
line: the medians and the share of replay time hashing costs, both as the difference of the medians (noisy on a
shared machine) and as the time the engine's hashers spent inside each run over that run's time (`share`).
"""

from __future__ import annotations

import json
import sys

from tests.bench.common import median
from tests.bench.enginebench import probe
from tests.bench.enginedata import recorded


def main(argv: list[str]) -> int:
    rounds = int(argv[0]) if argv else 5
    rec = recorded("untar")
    times: dict[str, list[float]] = {"none": [], "default": []}
    shares: list[float] = []
    for _ in range(rounds):
        for mode in times:
            r = probe("replay", rec, mode)
            times[mode].append(r["seconds"])
            if mode == "default":
                shares.append(r["hash_s"] / r["seconds"])
    off, on = median(times["none"]), median(times["default"])
    print(json.dumps({"rounds": rounds, "without_s": off, "with_s": on, "cost": (on - off) / off,
                      "share": median(shares),
                      "shares": shares, "hashed_bytes": r["hashed_bytes"],
                      "without": times["none"], "with": times["default"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
