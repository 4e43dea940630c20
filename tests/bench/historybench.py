"""`mirrorfs history` speed (issue 14): one path's versions out of an event log of 100k events.

    .venv/bin/python -m tests.bench.historybench [EVENTS]

Makes a synthetic events.jsonl (real Mutation lines: creates, modifies with hashes, renames, deletes, inode
numbers reused) in a temporary state directory, then times: building the index once (DIR/history.db), an update
with nothing new, and `mirrorfs history --state DIR PATH` as a user runs it (a subprocess, interpreter start
included) for a few paths. The engine's write log is not read at all, so its size (the issue's 1 GiB) does not
matter. Prints one JSON line.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from inference.events import Mutation
from inference.history import HistoryIndex
from tests.bench.common import median
from tests.support import REPO


def make_events(path: Path, n: int) -> list[str]:
    rng = random.Random(14)
    live: dict[int, str] = {}
    next_ino, seq = 12, 1
    with open(path, "w") as f:
        for i in range(n):
            seq += rng.randrange(3)
            r = rng.random()
            if r < 0.3 or len(live) < 100:
                ino, next_ino = next_ino, next_ino + 1
                p = f"/home/u{ino % 50}/dir{ino % 997}/file{ino}.txt"
                live[ino] = p
                ev = Mutation(seq=seq, time=1.8e9 + seq / 100, kind="create", path=p, ino=ino, fs="p1", type="file",
                              size=0, mode=0o644, uid=1000, gid=1000, links=1)
            else:
                ino = rng.choice(list(live)) if r < 0.95 else next(iter(live))
                p = live[ino]
                if r < 0.8:
                    ev = Mutation(seq=seq, time=1.8e9 + seq / 100, kind="modify", path=p, ino=ino, fs="p1",
                                  type="file", size=rng.randrange(10**6), mode=0o644, uid=1000, gid=1000, links=1,
                                  ranges=[(0, 4096)], sha256=f"{rng.getrandbits(256):064x}")
                elif r < 0.9:
                    new = p.replace(".txt", f".v{i}")
                    live[ino] = new
                    ev = Mutation(seq=seq, time=1.8e9 + seq / 100, kind="rename", path=new, old_path=p, ino=ino,
                                  fs="p1", type="file", size=1, mode=0o644, uid=1000, gid=1000, links=1)
                else:
                    del live[ino]
                    ev = Mutation(seq=seq, time=1.8e9 + seq / 100, kind="delete", path=p, ino=ino, fs="p1",
                                  type="file", size=1, mode=0o644, uid=1000, gid=1000, links=0)
            ev.id = f"{seq}-{i}"
            f.write(ev.to_json() + "\n")
    return list(live.values())


def main(argv: list[str]) -> int:
    n = int(argv[0]) if argv else 100_000
    with tempfile.TemporaryDirectory(prefix="mfs-histbench-") as tmp:
        state = Path(tmp) / "state"
        state.mkdir(mode=0o700)
        (state / "state.json").write_text(json.dumps({"size": 1 << 30}))
        (state / "log").mkdir(exist_ok=True)
        events = state / "events.jsonl"
        paths = make_events(events, n)
        index = HistoryIndex(events, state / "history.db")
        t0 = time.perf_counter()
        index.update()
        build = time.perf_counter() - t0
        t0 = time.perf_counter()
        index.update()
        noop = time.perf_counter() - t0
        picks = random.Random(1).sample(paths, 5)
        inproc, found = [], []
        for p in picks:
            t0 = time.perf_counter()
            found.append(len(index.versions(p)))
            inproc.append(time.perf_counter() - t0)
        index.close()
        cli = []
        for p in picks:
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "mirrorfs.cli", "history", "--state", str(state), p],
                                  cwd=REPO, capture_output=True, text=True)
            cli.append(time.perf_counter() - t0)
            if proc.returncode:
                raise RuntimeError(proc.stderr)
        print(json.dumps({"events": n, "events_mb": events.stat().st_size / 1e6, "index_build_s": build,
                          "update_noop_s": noop, "query_s": median(inproc), "cli_s": median(cli),
                          "cli_max_s": max(cli), "versions": found}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
