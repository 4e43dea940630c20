"""Inference-engine benchmarks without a guest: replay throughput (4), pre-index speed (5), memory per inode (6).

Every measurement runs in a fresh subprocess (`python -m tests.bench.enginebench probe ...`, one JSON line out),
so runs do not share heaps or warm Python caches, and RSS is that of a process doing only one thing.
Inputs come from tests/bench/enginedata.py (cached under .cache/bench/engine/).
"""

from __future__ import annotations

import gc
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.bench.common import MiB, log, median, spread
from tests.bench.enginedata import cache_root, code_key, many_image, recorded
from tests.support import REPO

WORKLOADS = ("untar", "meta")


def probe(*args: str | Path, timeout: float = 1800) -> dict:
    p = subprocess.run([sys.executable, "-m", "tests.bench.enginebench", "probe", *map(str, args)],
                       capture_output=True, text=True, cwd=REPO, timeout=timeout)
    if p.returncode:
        raise RuntimeError(f"probe {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


# ------------------------------------------------------------------ probes (run in the subprocess)

def probe_read(state: Path) -> dict:
    """The baseline: read every record of the log (tap.writelog.read_records), touching each payload."""
    from tap.writelog import KIND_WRITE, read_records

    t0 = time.perf_counter()
    n = nbytes = 0
    for rec in read_records(state / "log"):
        n += 1
        if rec.kind == KIND_WRITE:
            nbytes += len(rec.payload)
    return {"seconds": time.perf_counter() - t0, "records": n, "bytes": nbytes}


def probe_replay(rec_dir: Path, hash_limit: str = "default", diffs: str = "") -> dict:
    """What `mirrorfs replay --state DIR --base IMG` does, timed: Engine, LogFollower batches, EventLog, finish.
    `hash_limit`: "default", "none" (no content hashes in events) or a number of bytes; `diffs` "store": with the
    diff store (inference/blobs.py, replay's default), "" without (what `--diff-limit none` does)."""
    from inference.engine import Engine
    from inference.eventlog import EventLog
    from tap.writelog import LogFollower

    state = rec_dir / "state"
    size = json.loads((state / "state.json").read_text())["size"]
    with tempfile.TemporaryDirectory(prefix="mfs-replay-", dir="/tmp") as tmp:
        t0 = time.perf_counter()
        engine = Engine(Path(tmp) / "engine", size, base=rec_dir / "base.raw")
        if hash_limit != "default":
            engine.hash_limit = None if hash_limit == "none" else int(hash_limit)
        if diffs == "store":
            from inference.blobs import BlobStore
            engine.blobs = BlobStore(Path(tmp) / "blobs.db")
        t1, c1 = time.perf_counter(), time.thread_time()  # CPU time: what a busy machine's preemption leaves out
        kinds: dict[str, int] = {}
        with EventLog(Path(tmp) / "events.jsonl", truncate=True) as events, LogFollower(state / "log") as follower:
            while batch := follower.poll():
                evs = engine.process(batch)
                events.append(evs)
                for e in evs:
                    kinds[e.kind] = kinds.get(e.kind, 0) + 1
            evs = engine.finish()
            events.append(evs)
            for e in evs:
                kinds[e.kind] = kinds.get(e.kind, 0) + 1
        t2, c2 = time.perf_counter(), time.thread_time()
        stats = [fs.handler.stats.__dict__ for fs in engine.filesystems.values()]
        hashers = list(engine._hashers.values())
        store = engine.blobs
        engine.close()
    return {"init_s": t1 - t0, "seconds": t2 - t1, "cpu_s": c2 - c1, "records": engine.last_seq, "kinds": kinds,
            "hash_s": sum(h.seconds for h in hashers), "hash_cpu_s": sum(h.cpu_seconds for h in hashers),
            "hashed_bytes": sum(h.hashed_bytes for h in hashers),
            "hashed_files": sum(h.hashed_files for h in hashers),
            "kept": store.kept if store else 0, "store_bytes": store.total if store else 0,
            "store_s": store.seconds if store else 0.0,
            "metadata_blocks": sum(s["metadata_blocks"] for s in stats),
            "transactions": sum(s["transactions"] for s in stats), "errors": sum(s["errors"] for s in stats)}


def probe_build(image: Path, out: Path, general: bool = False, per_inode: bool = False) -> dict:
    """`general`: every inode through ExtHandler._load, as before the index's fast path (ExtHandler._load_fast).
    `per_inode`: the fast path one inode at a time, as before the bulk index (inference/ext/bulkindex.py).
    The bulk index imports numpy inside build_index (so its time counts); `numpy_import_s` says how long."""
    from inference.engine import build_index
    from inference.ext.handler import ExtHandler

    ExtHandler.fast_index = not general
    ExtHandler.bulk_index = not per_inode

    r0 = _rss_kib()
    t0 = time.perf_counter()
    data = build_index(image, out)
    t1 = time.perf_counter()
    t2 = time.perf_counter()
    import numpy  # noqa: F401 - (already imported by the bulk index: 0 then)
    numpy_s = time.perf_counter() - t2
    gc.collect()
    r1 = _rss_kib()
    inodes = sum(len(h.tree) for h in data["handlers"].values())
    return {"seconds": t1 - t0, "inodes": inodes, "rss_kib": r1 - r0, "index_bytes": out.stat().st_size,
            "numpy_import_s": numpy_s}


def probe_numpy_import() -> dict:
    """What `import numpy` costs a fresh process (the bulk index pays it inside build_index)."""
    t0 = time.perf_counter()
    import numpy  # noqa: F401
    return {"seconds": time.perf_counter() - t0}


def probe_load(index: Path) -> dict:
    from inference.engine import load_index

    r0 = _rss_kib()
    t0 = time.perf_counter()
    data = load_index(index)
    t1 = time.perf_counter()
    gc.collect()
    r1 = _rss_kib()
    inodes = sum(len(h.tree) for h in data["handlers"].values())
    return {"seconds": t1 - t0, "inodes": inodes, "rss_kib": r1 - r0}


def probe_heap(index: Path) -> dict:
    """Live Python heap of a loaded index (tracemalloc): what RSS would be without allocator leftovers."""
    import tracemalloc

    from inference.engine import load_index

    tracemalloc.start()
    data = load_index(index)
    gc.collect()
    current, peak = tracemalloc.get_traced_memory()
    inodes = sum(len(h.tree) for h in data["handlers"].values())
    return {"current": current, "peak": peak, "inodes": inodes}


PROBES = {"read": lambda a: probe_read(Path(a[0])), "replay": lambda a: probe_replay(Path(a[0]), *a[1:]),
          "build": lambda a: probe_build(Path(a[0]), Path(a[1])),
          "build-general": lambda a: probe_build(Path(a[0]), Path(a[1]), general=True),
          "build-fast": lambda a: probe_build(Path(a[0]), Path(a[1]), per_inode=True),
          "numpy-import": lambda a: probe_numpy_import(),
          "load": lambda a: probe_load(Path(a[0])), "heap": lambda a: probe_heap(Path(a[0]))}


# ------------------------------------------------------------------ 4. replay throughput

def bench_replay(quick: bool) -> dict:
    rounds = 1 if quick else 3
    dirs = {w: recorded(w) for w in WORKLOADS}
    info = {w: json.loads((d / "info.json").read_text()) for w, d in dirs.items()}
    for d in dirs.values():
        probe("read", d / "state")  # unmeasured: the logs come from the page cache in every round
    per_round: list[dict] = []
    for r in range(rounds):
        res: dict[str, dict] = {}
        for w, d in dirs.items():
            raw = probe("read", d / "state")
            rep = probe("replay", d)
            res[w] = {"read": raw, "replay": rep}
            log(f"replay round {r + 1} {w:5}: read {raw['bytes'] / MiB / raw['seconds']:.0f} MiB/s, "
                f"engine {raw['bytes'] / MiB / rep['seconds']:.2f} MiB/s ({rep['seconds']:.1f} s, "
                f"{rep['metadata_blocks'] / rep['seconds']:.0f} metadata blocks/s, {sum(rep['kinds'].values())} "
                f"events, {rep['errors']} errors)")
        per_round.append(res)
    return {"rounds": rounds, "info": info, "per_round": per_round}


def replay_table(res: dict) -> list[str]:
    pr = res["per_round"]
    lines = ["| workload | records / MB logged | read_records | engine replay | replay / read speed "
             "| metadata blocks | metadata blocks/s | replay time | events | errors |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for w in WORKLOADS:
        rows = [r[w] for r in pr]
        first = rows[0]
        mb = first["read"]["bytes"] / 1e6
        read = [mb / x["read"]["seconds"] for x in rows]
        rep = [mb / x["replay"]["seconds"] for x in rows]
        ratio = [x["read"]["seconds"] / x["replay"]["seconds"] for x in rows]
        mbs = [x["replay"]["metadata_blocks"] / x["replay"]["seconds"] for x in rows]
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(first["replay"]["kinds"].items(), key=lambda kv: -kv[1]))
        lines.append(
            f"| {w} | {first['read']['records']} / {mb:.1f} | {spread(read, '{:.0f}')} MB/s "
            f"| {spread(rep, '{:.2f}')} MB/s | {spread(ratio, '{:.4f}')} | {first['replay']['metadata_blocks']} "
            f"| {spread(mbs, '{:.0f}')} | {spread([x['replay']['seconds'] for x in rows], '{:.1f}')} s "
            f"| {kinds} | {first['replay']['errors']} |")
    lines.append("")
    for w in WORKLOADS:
        i = res["info"][w]
        lines.append(f"- `{w}`: {_describe(w, i['workload'])}; recorded in {i['workload_s']:.1f} s by the host kernel "
                     f"(`{_script_shape(i['script'])}`).")
    return lines


def _describe(w: str, d: dict) -> str:
    if w == "untar":
        return f"{d['files']} files ({d['bytes'] / MiB:.0f} MiB) in {d['dirs']} directories"
    ops = ", ".join(f"{d[k]} {k}" for k in ("mkdir", "create", "rename", "chmod", "unlink", "rmdir"))
    return f"{d['total']} metadata syscalls ({ops}) in {d['sync']} phases, each ended by sync"


def _script_shape(script: str) -> str:
    """The recorded script without its temp paths."""
    import re
    return re.sub(r"/tmp/mfs-rec-[^/]+/", "", script).replace(sys.executable, "python").replace(str(REPO) + "/", "")


# ------------------------------------------------------------------ 5. pre-index speed, 6. memory

def _fls(image: Path) -> tuple[float, int]:
    t0 = time.perf_counter()
    p = subprocess.run(["fls", "-r", "-p", str(image)], capture_output=True)
    dt = time.perf_counter() - t0
    if p.returncode:
        raise RuntimeError(f"fls -r -p {image} failed: {p.stderr.decode(errors='replace')}")
    return dt, p.stdout.count(b"\n")


def bench_index(quick: bool) -> dict:
    if shutil.which("fls") is None:
        raise RuntimeError("fls not found: install the Debian package sleuthkit (make apt)")
    rounds = 1 if quick else 3
    image, info = many_image(100_000)
    _fls(image)  # warm the page cache for both tools
    per_round = []
    with tempfile.TemporaryDirectory(prefix="mfs-idx-", dir=cache_root()) as tmp:
        idx = Path(tmp) / "many.idx"
        for r in range(rounds):
            fls_s, entries = _fls(image)
            general = probe("build-general", image, idx)
            per_inode = probe("build-fast", image, idx)
            build = probe("build", image, idx)
            load = probe("load", idx)
            numpy_s = probe("numpy-import")["seconds"]
            per_round.append({"fls_s": fls_s, "fls_entries": entries, "build": build, "load": load,
                              "general": general, "per_inode": per_inode, "numpy_import_s": numpy_s})
            log(f"index round {r + 1}: fls -r -p {entries / fls_s:.0f} entries/s; build_index "
                f"{build['inodes'] / build['seconds']:.0f} inodes/s ({build['seconds']:.1f} s); load_index "
                f"{load['seconds']:.2f} s; RSS/inode build {build['rss_kib'] * 1024 / build['inodes']:.0f} B, "
                f"load {load['rss_kib'] * 1024 / load['inodes']:.0f} B")
    return {"rounds": rounds, "image": info, "per_round": per_round}


def index_table(res: dict) -> list[str]:
    pr = res["per_round"]
    info = res["image"]
    fls = [r["fls_entries"] / r["fls_s"] for r in pr]
    ours = [r["build"]["inodes"] / r["build"]["seconds"] for r in pr]
    ratio = [o / f for o, f in zip(ours, fls, strict=True)]
    loads = [r["load"]["inodes"] / r["load"]["seconds"] for r in pr]
    general = [r["general"]["inodes"] / r["general"]["seconds"] for r in pr if "general" in r]
    per_inode = [r["per_inode"]["inodes"] / r["per_inode"]["seconds"] for r in pr if "per_inode" in r]
    b = pr[0]["build"]
    data = f"every {info['data_every']}th with 1-3 KiB of data, the rest empty" if info["data_every"] else "empty"
    lines = [
        f"Image: {info['files']} files ({data}) in {info['dirs']} directories, ext4 made by `mke2fs -d` "
        f"({info['size'] >> 20} MiB sparse); {b['inodes']} inodes in the shadow tree, {pr[0]['fls_entries']} "
        "lines from fls.",
        "",
        "| | time | files/s | / fls |",
        "|---|---|---|---|",
        f"| `fls -r -p IMAGE` (The Sleuth Kit, warm cache) | {spread([r['fls_s'] for r in pr])} s "
        f"| {spread(fls, '{:.0f}')} | 1 |",
        f"| `build_index` (= `mirrorfs index IMAGE -o INDEX`) | {spread([r['build']['seconds'] for r in pr])} s "
        f"| {spread(ours, '{:.0f}')} | {spread(ratio, '{:.3f}')} |",
        *([f"| `build_index`, the fast path one inode at a time (`ExtHandler.bulk_index = False`) "
           f"| {spread([r['per_inode']['seconds'] for r in pr])} s | {spread(per_inode, '{:.0f}')} "
           f"| {spread([g / f for g, f in zip(per_inode, fls, strict=True)], '{:.3f}')} |"] if per_inode else []),
        *([f"| `build_index`, every inode by the general path (`ExtHandler.fast_index = False`) "
           f"| {spread([r['general']['seconds'] for r in pr])} s | {spread(general, '{:.0f}')} "
           f"| {spread([g / f for g, f in zip(general, fls, strict=True)], '{:.3f}')} |"] if general else []),
        f"| `load_index` of that index ({b['index_bytes'] / MiB:.1f} MiB pickle) "
        f"| {spread([r['load']['seconds'] for r in pr])} s | {spread(loads, '{:.0f}')} "
        f"| {spread([x / f for x, f in zip(loads, fls, strict=True)], '{:.3f}')} |",
        "",
        f"Index load / crawl time: {spread([r['load']['seconds'] / r['build']['seconds'] for r in pr], '{:.3f}')} "
        f"(loading is {median([r['build']['seconds'] / r['load']['seconds'] for r in pr]):.0f}x faster than crawling).",
    ]
    if general:
        lines += ["", f"Bulk index / general path (build time): "
                     f"{spread([r['general']['seconds'] / r['build']['seconds'] for r in pr], '{:.2f}')}x."]
    if per_inode:
        lines += ["", f"Bulk index / per-inode fast path (build time): "
                     f"{spread([r['per_inode']['seconds'] / r['build']['seconds'] for r in pr], '{:.2f}')}x. "
                     f"`import numpy` in a fresh process (inside the bulk build's time): "
                     f"{spread([r['numpy_import_s'] for r in pr], '{:.2f}')} s."]
    return lines


def cached_index(n: int, image: Path) -> tuple[Path, dict]:
    """The index of the n-file image, built once per engine source version (it is a pickle of engine objects)."""
    key = code_key()
    idx = cache_root() / f"many-{n}.{key}.idx"
    side = idx.with_suffix(".json")
    if idx.exists() and side.exists():
        return idx, json.loads(side.read_text())
    for old in cache_root().glob(f"many-{n}.*.idx"):
        old.unlink()
        old.with_suffix(".json").unlink(missing_ok=True)
    log(f"building the index of the {n}-file image (once per engine version) into {idx}")
    build = probe("build", image, idx)
    side.write_text(json.dumps(build))
    return idx, build


def bench_memory(quick: bool) -> dict:
    sizes = (100_000,) if quick else (100_000, 1_000_000)
    rounds = 1 if quick else 2
    out: dict[str, dict] = {}
    for n in sizes:
        image, info = many_image(n)
        t0 = time.monotonic()
        idx, build = cached_index(n, image)
        fresh = time.monotonic() - t0 > 1
        loads = [probe("load", idx) for _ in range(rounds)]
        heap = probe("heap", idx) if n <= 100_000 else None  # tracemalloc slows the load ~3x: the small one only
        out[str(n)] = {"image": info, "build": build, "build_fresh": fresh, "loads": loads, "heap": heap}
        log(f"memory {n} files: build {build['rss_kib'] * 1024 / build['inodes']:.0f} B/inode "
            f"({build['seconds']:.0f} s{'' if fresh else ', cached'}), load "
            f"{median([x['rss_kib'] * 1024 / x['inodes'] for x in loads]):.0f} B/inode "
            f"({median([x['seconds'] for x in loads]):.1f} s)")
    return {"rounds": rounds, "sizes": out}


def memory_table(res: dict) -> list[str]:
    lines = ["| files in the image | inodes tracked | RSS after load_index | per inode | load time "
             "| RSS after build_index | per inode | build time | image build (tree + mke2fs -d) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for n, x in res["sizes"].items():
        loads, b, info = x["loads"], x["build"], x["image"]
        cached = "" if x["build_fresh"] else ", cached"
        lines.append(
            f"| {int(n):,} | {b['inodes']:,} | {spread([v['rss_kib'] / 1024 for v in loads], '{:.0f}')} MiB "
            f"| {spread([v['rss_kib'] * 1024 / v['inodes'] for v in loads], '{:.0f}')} B "
            f"| {spread([v['seconds'] for v in loads], '{:.1f}')} s | {b['rss_kib'] / 1024:.0f} MiB "
            f"| {b['rss_kib'] * 1024 / b['inodes']:.0f} B | {b['seconds']:.0f} s{cached} "
            f"| {info['tree_s']:.0f} + {info['mke2fs_s']:.0f} s (built {info['built']}) |")
    for n, x in res["sizes"].items():
        if h := x.get("heap"):
            lines.append("")
            cur, peak = h["current"] / h["inodes"], h["peak"] / h["inodes"]
            lines.append(f"At {int(n):,} files, tracemalloc counts {cur:.0f} B/inode of live Python objects after "
                         f"`load_index` and a peak of {peak:.0f} B/inode during it: RSS stays near the peak (freed "
                         "memory is not returned to the system).")
    return lines


def main(argv: list[str]) -> int:
    if argv[:1] == ["probe"]:
        print(json.dumps(PROBES[argv[1]](argv[2:])))
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
