"""The metadata-heavy benchmark workload: run by the host kernel writer in the mounted file system.

    python metaops.py ROOT COUNTS.json

Four phases, each ended by sync(): create 40 dirs x 75 empty files; rename half the files (a fifth of those into
another directory) and mkdir a subdirectory in each dir; chmod a third of the files and dirs; delete a quarter of
the files, then empty and rmdir 5 whole directories. Fixed order, no randomness. Counts go to COUNTS.json.
"""

from __future__ import annotations

import json
import os
import sys

DIRS, FILES = 40, 75


def main(root: str, counts_path: str) -> None:
    ops = {"mkdir": 0, "create": 0, "rename": 0, "chmod": 0, "unlink": 0, "rmdir": 0, "sync": 0}
    os.mkdir(root)
    ops["mkdir"] += 1
    names: dict[int, list[str]] = {}
    for d in range(DIRS):
        dp = os.path.join(root, f"d{d:02d}")
        os.mkdir(dp)
        ops["mkdir"] += 1
        names[d] = []
        for f in range(FILES):
            os.close(os.open(os.path.join(dp, f"f{f:03d}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            names[d].append(f"f{f:03d}")
            ops["create"] += 1
    os.sync()
    ops["sync"] += 1
    for d in range(DIRS):
        dp = os.path.join(root, f"d{d:02d}")
        for i, n in enumerate(list(names[d])):
            if i % 2:
                continue
            if i % 10 == 0:  # across directories
                to = (d + 1) % DIRS
                new = f"x{d:02d}_{n}"
                os.rename(os.path.join(dp, n), os.path.join(root, f"d{to:02d}", new))
                names[d].remove(n)
                names[to].append(new)
            else:
                new = "r" + n
                os.rename(os.path.join(dp, n), os.path.join(dp, new))
                names[d][names[d].index(n)] = new
            ops["rename"] += 1
        os.mkdir(os.path.join(dp, "sub"))
        ops["mkdir"] += 1
    os.sync()
    ops["sync"] += 1
    k = 0
    for d in range(DIRS):
        dp = os.path.join(root, f"d{d:02d}")
        for n in names[d]:
            k += 1
            if k % 3 == 0:
                os.chmod(os.path.join(dp, n), 0o600)
                ops["chmod"] += 1
        if d % 3 == 0:
            os.chmod(os.path.join(dp, "sub"), 0o700)
            ops["chmod"] += 1
    os.sync()
    ops["sync"] += 1
    k = 0
    for d in range(DIRS):
        dp = os.path.join(root, f"d{d:02d}")
        whole = d % 8 == 7
        for n in list(names[d]):
            k += 1
            if whole or k % 4 == 0:
                os.unlink(os.path.join(dp, n))
                names[d].remove(n)
                ops["unlink"] += 1
        if whole:
            os.rmdir(os.path.join(dp, "sub"))
            os.rmdir(dp)
            ops["rmdir"] += 2
    os.sync()
    ops["sync"] += 1
    ops["total"] = sum(v for k, v in ops.items() if k != "sync")
    with open(counts_path, "w") as f:
        json.dump(ops, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
