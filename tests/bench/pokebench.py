"""The poke helper alone (issue 12): changes/s from a queue of mutations to the view's tree and the kernel's
inotify events, with no engine, no guest and no other thread in the process.

A real ViewServer (tree, FUSE handlers, poke helper, page dropper) is mounted over a stand-in for the engine that
holds only an empty root; the live benchmark's shape of changes is queued at once (directories of new files, each
file a create then a modify), and the time until the helper has done them all is taken. Run with an `inotifywait
-m -r` on the mount or without one (the helper waits for recursive watchers after each mkdir).

    .venv/bin/python -m tests.bench.pokebench MNT [--dirs 20] [--per-dir 100] [--watch]
"""

from __future__ import annotations

import argparse
import collections
import inspect
import json
import os
import signal
import stat
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

from inference.events import Mutation
from inference.ext.statfs import StatFs
from inference.view import Entry, Identity

FS = "disk"


class StandIn:
    """What ViewServer asks of EngineView, for an empty file system that only the queued mutations fill."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def filesystems(self) -> list[str]:
        return [FS]

    def identity(self, fs: str) -> Identity:
        return Identity(fs, "", "", "", "")

    def snapshot(self, fs: str) -> list[Entry]:
        return [Entry(b"/", 2, "dir", stat.S_IFDIR | 0o755, 0, 0, 4096, 1, 1, 2, 0, None, None, blksize=4096)]

    def statfs(self, fs: str) -> StatFs:
        return StatFs(4096, 1 << 20, 1 << 19, 1 << 16, 1 << 15)

    def read(self, fs: str, ino: int, offset: int, size: int) -> bytes:
        return b"x" * size

    def writing(self, fs: str, ino: int, start: int, end: int) -> bool:
        return False

    def stat(self, fs: str, ino: int):
        return None

    def take_quiet(self, fs: str) -> list:
        return []


def mutations(dirs: int, per_dir: int) -> list[Mutation]:
    """The live benchmark's tree: `dirs` directories of `per_dir` files, each file created, then given bytes."""
    out, ino, seq = [], 100, 0
    for d in range(dirs):
        ino += 1
        dino, dpath = ino, f"/d{d:03d}"
        seq += 1
        out.append(Mutation(seq, 1.0, "mkdir", dpath, fs=FS, ino=dino, type="dir", size=4096, mode=0o755, links=2,
                            parent={"ino": 2, "size": 4096}))
        for i in range(per_dir):
            ino += 1
            seq += 1
            path, size = f"{dpath}/f{i:03d}", i % 7 * 100 + 1
            out.append(Mutation(seq, 1.0, "create", path, fs=FS, ino=ino, type="file", size=0, mode=0o644,
                                links=1, parent={"ino": dino, "size": 4096}))
            out.append(Mutation(seq, 1.0, "modify", path, fs=FS, ino=ino, type="file", size=size,
                                ranges=[(0, size)]))
    return out


def _counted(fn, name: str, counts: collections.Counter):
    if inspect.iscoroutinefunction(fn):
        async def counted(*a):
            counts[name] += 1
            return await fn(*a)
        return counted

    def plain(*a):
        counts[name] += 1
        return fn(*a)
    return plain


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mnt", type=Path)
    ap.add_argument("--dirs", type=int, default=20)
    ap.add_argument("--per-dir", type=int, default=100)
    ap.add_argument("--watch", action="store_true", help="an inotifywait -m -r on the mount while it runs")
    ap.add_argument("--profile", type=Path, help="cProfile of the helper thread to this file")
    ap.add_argument("--profile-trio", type=Path, help="cProfile of the trio thread (FUSE handlers) to this file")
    ap.add_argument("--count", action="store_true", help="count the FUSE requests per operation")
    ap.add_argument("--busy", action="store_true",
                    help="a thread of pure Python busy meanwhile, as the engine is while the guest writes")
    ap.add_argument("--switch", type=float, help="the GIL switch interval while serving (default: serve.SWITCH_S)")
    args = ap.parse_args()

    import mirrorfs.view.serve as serve
    from tests.mountharness import Inotify, mounted

    serve.EngineView = StandIn
    engine = SimpleNamespace(lock=threading.Lock(), stats=lambda: SimpleNamespace(last_seq=0))
    server = serve.ViewServer(engine, args.mnt, None)
    counts: collections.Counter[str] = collections.Counter()
    if args.count:
        from mirrorfs.view.ops import _HANDLERS

        for name in (*_HANDLERS, "forget"):
            setattr(server.ops, name, _counted(getattr(server.ops, name), name, counts))
    todo = mutations(args.dirs, args.per_dir)
    result: dict = {}

    def drive() -> None:
        try:
            while not mounted(args.mnt):
                time.sleep(0.01)
            ino = Inotify(args.mnt) if args.watch else None
            poker = server.poker
            if args.busy:  # its speed alone first, then while the helper works
                threading.Thread(target=busy, daemon=True).start()
                time.sleep(0.5)
                t0, n0 = time.monotonic(), spins[0]
                time.sleep(0.5)
                result["alone"] = (spins[0] - n0) / (time.monotonic() - t0)
            t0, n0 = time.monotonic(), spins[0]
            poker.submit(todo)
            while poker.done < len(todo):
                time.sleep(0.001)
            dt = time.monotonic() - t0
            result.update(n=len(todo), s=dt, fallbacks=poker.fallbacks, refused=poker.refused)
            if args.busy:
                result["busy"] = (spins[0] - n0) / dt / result["alone"]
            if ino is not None:
                deadline = time.monotonic() + 10
                want = f"d{args.dirs - 1:03d}/f{args.per_dir - 1:03d}"
                while not any(p == want and "CLOSE_WRITE" in e for _, e, p, _ in ino.events()):
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.01)
                evs = ino.events()
                ino.stop()
                result["creates"] = sum(1 for _, e, p, _ in evs if e.startswith("CREATE") and "/f" in p)
                result["modifies"] = sum(1 for _, e, p, _ in evs if e.startswith("MODIFY"))
        finally:
            stop.set()
            os.kill(os.getpid(), signal.SIGINT)

    stop = threading.Event()

    spins = [0]

    def busy() -> None:
        x = 0
        while not stop.is_set():
            for i in range(1000):
                x += i * i
            spins[0] += 1

    if args.switch:  # what the view sets while it serves (serve.SWITCH_S), replaced
        serve.SWITCH_S = args.switch
        sys.setswitchinterval(args.switch)
    threading.Thread(target=drive, daemon=True).start()
    if args.profile:
        import cProfile
        prof = cProfile.Profile()
        run = server.poker._run

        def profiled() -> None:
            prof.enable()
            try:
                run()
            finally:
                prof.disable()
                prof.dump_stats(args.profile)
        server.poker.thread = threading.Thread(target=profiled, name="mirrorfs-poke", daemon=True)
    if args.profile_trio:
        import cProfile
        cProfile.runctx("server.run()", globals(), {"server": server}, str(args.profile_trio))
    else:
        server.run()
    n, s = result.get("n", 0), result.get("s", float("nan"))
    print("RESULT " + json.dumps({"changes": n, "seconds": s, **{k: v for k, v in result.items() if k not in "ns"}}))
    print(f"poke: {n} changes in {s:.3f} s = {n / s:.0f}/s, fallbacks {result.get('fallbacks')}, "
          f"refused {result.get('refused')}"
          + (f", inotify creates {result['creates']} modifies {result['modifies']}" if "creates" in result else "")
          + (f", the busy thread at {result['busy']:.2f} of its speed alone" if "busy" in result else ""),
          flush=True)
    if counts:
        print("requests:", ", ".join(f"{k} {v}" for k, v in counts.most_common()))


CASES = {  # name -> pokebench arguments
    "alone": [],
    "inotifywait -m -r on the mount": ["--watch"],
    "a busy Python thread, GIL slice 5 ms (Python's default)": ["--busy", "--switch", "0.005"],
    "a busy Python thread, GIL slice 0.5 ms (serve.SWITCH_S)": ["--busy"],
}


def bench_poke(ws, quick: bool) -> dict:
    """Each case in a process of its own (it mounts, and ends with SIGINT), the cases in turn in each round."""
    from tests.bench.common import log, run

    rounds, dirs = (1, 10) if quick else (5, 40)
    mnt = ws.path / "poke"
    mnt.mkdir()
    per: dict[str, list[dict]] = {c: [] for c in CASES}
    for r in range(rounds):
        for case, extra in (CASES.items() if r % 2 == 0 else reversed(CASES.items())):
            out = run([sys.executable, "-m", "tests.bench.pokebench", str(mnt), "--dirs", str(dirs), *extra]).stdout
            res = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
            if res.get("fallbacks") or res.get("refused") or res.get("creates", dirs * 100) != dirs * 100 \
                    or res.get("modifies", dirs * 100) != dirs * 100:
                raise RuntimeError(f"pokebench {case}: {res}")
            per[case].append(res)
            log(f"poke round {r + 1} {case}: {res['changes'] / res['seconds']:.0f} changes/s")
    return {"rounds": rounds, "changes": per["alone"][0]["changes"], "dirs": dirs, "per": per}


def poke_table(res: dict) -> list[str]:
    from tests.bench.common import spread

    per = res["per"]
    base = [x["changes"] / x["seconds"] for x in per["alone"]]

    def row(case: str) -> str:
        rate = [x["changes"] / x["seconds"] for x in per[case]]
        busy = [x["busy"] for x in per[case] if "busy" in x]
        ratio = [a / b for a, b in zip(rate, base, strict=True)]
        return (f"| {case} | {spread(rate, '{:.0f}')} | {spread(ratio, '{:.2f}')} | "
                f"{spread(busy, '{:.2f}') if busy else '-'} |")

    return [f"{res['changes']} changes ({res['dirs']} directories of 100 new files, each file a create then a modify "
            f"of 1-601 bytes) queued at once to the poke helper of a mounted view with no engine behind it.", "",
            "| case | changes/s | / alone (same round) | busy thread's speed / its speed alone |",
            "|---|---|---|---|", *(row(c) for c in per)]


if __name__ == "__main__":
    sys.exit(main())
