"""Engine scope (issue 5, layered filtering at the engine): records/s with and without a narrow scope.

Two logs: the cached `untar` recording (tests/bench/enginedata.py: new files, so their data is metadata-derived
and the scope has nothing to skip), and synthetic 512-byte overwrites of every data block of the ext4 test image,
four rounds (existing files: what the scope skips). Engine.process + finish only; start-up is not timed.

    .venv/bin/python -m tests.bench.scopebench
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from inference.engine import Engine
from tap.writelog import KIND_WRITE, Record
from tests.bench.common import median


def _run(records: list[Record], size: int, base: Path, scope: tuple[str, ...] | None, rounds: int = 3) -> tuple:
    rates, mods = [], 0
    for _ in range(rounds):
        with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
            eng = Engine(Path(tmp), size, base=base)
            eng.set_scope(scope)
            t = time.perf_counter()
            events = eng.process(records) + eng.finish()
            rates.append(len(records) / (time.perf_counter() - t))
            eng.close()
        mods = sum(e.kind == "modify" for e in events)
    return median(rates), min(rates), max(rates), mods


def overwrite_log(tmp: Path) -> tuple[list[Record], int, Path]:
    from images.build import artifact

    base = tmp / "base.raw"
    shutil.copyfile(artifact("ext4.img"), base)
    eng = Engine(tmp / "probe", base.stat().st_size, base=base)
    h = next(iter(eng.filesystems.values())).handler
    bs = h.geo.block_size
    blocks = [ph + k for n in h.tree.nodes.values() if n.type == "file" for _, ph, ln, un in n.extents if not un
              for k in range(ln)]
    eng.close()
    t0 = time.time_ns()
    recs = [Record(i + 1, t0 + i * 1000, KIND_WRITE, b * bs, 512, os.urandom(512))
            for i, b in enumerate(blocks * 4)]
    return recs, base.stat().st_size, base


def main() -> None:
    from tap.state import StateDir
    from tap.writelog import read_records
    from tests.bench.enginedata import recorded

    untar = recorded("untar")
    state = StateDir(untar / "state")
    logs = {"untar (new files)": (list(read_records(state.log)), state.require_state()["size"], untar / "base.raw",
                                  ("/etc",))}
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        logs["overwrite (existing files)"] = (*overwrite_log(Path(tmp)), ("/small",))
        for name, (recs, size, base, scope) in logs.items():
            for s in (None, scope):
                med, lo, hi, mods = _run(recs, size, base, s)
                print(f"{name}: {len(recs)} records, scope {s or 'none'}: {med:,.0f} ({lo:,.0f}-{hi:,.0f}) rec/s, "
                      f"{mods} modify events", flush=True)


if __name__ == "__main__":
    main()
