"""Run the benchmarks and update the "Tap (issue 2)" and "Inference engine (issue 3)" sections of BENCHMARKS.md.

    make bench                                   # everything (~12 min once inputs are cached), writes BENCHMARKS.md
    .venv/bin/python -m tests.bench.run --only ingest [--only latency]
    .venv/bin/python -m tests.bench.run --quick  # smaller and one round, for development: prints only

Tap benchmarks: overhead (1: guest write overhead of the mirror), ingest (2: tap MB/s and writes/s),
latency (3: guest write -> write-log record), cost (4: added latency and tap CPU per 4 KiB write).
Engine benchmarks: replay (1: replay throughput vs reading the log), index (2: pre-index speed vs fls -r),
memory (3: RSS per tracked inode at 100k and 1M files), synclat (4: guest sync -> emitted event).
Event-stream benchmark: stream (events/s event log -> publisher -> Redis -> collector, and bytes on the network
per 1,000 mutations with and without host-side filtering).
Mount benchmarks: views (sequential read and `find -ls` on the mirrorfs mount, a loop mount and guestmount --ro of
one 100k-file image), inotify (guest mutation -> inotify event on the live mount), live (the live view of a
disk the host kernel writes vs a loop mount of a copy: reads, `find -ls`, writer sync -> inotify event), poke
(the poke helper's changes/s with no engine behind it).
Their inputs (recorded logs, many-file images, the 1M-file index) are built once into .cache/bench/engine/
(`python -m tests.bench.enginedata` builds them ahead). Speeds are ratios against a baseline measured in the
same run, in interleaved rounds; tables give the median of the per-round values and their range (min-max).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path

from tests.bench.common import Stopwatch, Workspace, log, make_disk
from tests.support import CACHE, REPO

TAP_NAMES = ("ingest", "overhead", "latency", "cost")
ENGINE_NAMES = ("replay", "index", "memory", "synclat")
STREAM_NAMES = ("stream",)
MOUNT_NAMES = ("views", "inotify", "live", "poke")
NAMES = TAP_NAMES + ENGINE_NAMES + STREAM_NAMES + MOUNT_NAMES
GROUP = {**{n: "tap" for n in TAP_NAMES}, **{n: "engine" for n in ENGINE_NAMES},
         **{n: "stream" for n in STREAM_NAMES}, **{n: "mount" for n in MOUNT_NAMES}}
CHAPTER = {"tap": "## Tap (issue 2)", "engine": "## Inference engine (issue 3)", "stream": "## Event stream (issue 5)",
           "mount": "## Mount (issue 4)"}
DOC = REPO / "BENCHMARKS.md"

TITLES = {
    "overhead": "1. Guest write overhead (TCG guest, guest-timed)",
    "ingest": "2. Tap ingest (local NBD client → tap)",
    "latency": "3. Latency from the guest's write to its record in the write log",
    "cost": "4. Added latency and tap CPU per 4 KiB write, through qemu-storage-daemon (issue 13)",
    "replay": "1. Replay throughput (recorded logs, offline)",
    "index": "2. Pre-index speed (100k-file image) and index load time",
    "memory": "3. Memory per tracked inode (100k and 1M files)",
    "synclat": "4. Latency from the guest's sync to the emitted event (TCG guest, live engine)",
    "stream": "1. Events/s end to end and bytes on the network per 1,000 mutations (publisher → Redis → collector)",
    "views": "1. Sequential read and `find -ls`: mirrorfs mount vs loop mount vs guestmount --ro (100k-file image)",
    "inotify": "2. Delay from a guest mutation to its inotify event on the live mount (TCG guest)",
    "live": "3. The live view vs a loop mount of a copy of the same disk, host kernel as the writer (issue 10)",
    "poke": "4. The poke helper alone: changes/s from its queue to the view and inotify (issue 12)",
}

METHODS = {
    "overhead": """\
Each round boots three guests on fresh copies of one new sparse 1 GiB ext4 image (`mke2fs -t ext4`, made in a
temp dir): no mirror (never attached), `mirrorfs attach --mode exact`, `--mode async` (both `--sync none`,
booted with `-S` and started by `--cont` once the mirror job is ready). The workload times itself with the guest
clock (CLOCK_REALTIME in ns from the static helper `latmark now` around each phase, since busybox `date` has no
`%N`; printed as `MIRRORFS-BENCH name t0 t1` on the console), so boot, attach and shutdown are outside the
timing: `dd if=/dev/zero of=$MNT/big bs=1M count=N conv=fsync`, then, after `sync` and 3 s, a loop of busybox
`dd if=/tmp/blk of=$MNT/rnd bs=4k count=1 seek=X conv=notrunc,fsync` on a preallocated 16 MiB file with a fixed
pseudo-random sequence of X (the same in every run). Ratios are mirror / no mirror throughput within the same
round; the table gives the median of the per-round ratios and their range. The tap rows give what the attach
process recorded and the CPU time it used while the guest ran.""",
    "cost": """\
`qemu-img bench -f raw -w -t none -d 1 -s 4096 -c 3000 -o OFFSET 'nbd+unix:///disk0?socket=EXPORT'` writes into
qemu-storage-daemon's own NBD export of a sparse 1 GiB raw disk (`images/hostwriter.py`, daemon 1 only), with no
mirror, with `mirrorfs attach --mode exact` / `--mode async` recording (no base, so no engine: the tap alone),
and with a write-blocking mirror job (what exact mode starts) into `nbdkit memory`, a C server that keeps the
writes in RAM: about the least a target can add on QEMU's path. Each run is followed by a timed client
(`tapcost._median_write`: a minimal NBD client in Python, one 4 KiB WRITE at a time, header and payload in one
send, each write timed) for the median per write, which bursts of other load on this shared machine move far less
than qemu-img's mean. Order within each round: plain, exact, plain, async, plain, nbdkit, plain
(`tests/bench/tapcost.py`). "Added" is the mirrored run's time per write less the median of the round's plain runs
(mean from mean, median from median); "tap CPU" is the attach (or nbdkit) process's user+system time over the
qemu-img run divided by the writes.""",
    "ingest": """\
`qemu-img bench -w -f raw` (QEMU's own block layer, as in a mirror job) writes into the real tap code
(`tests/bench/tapserver.py`: `tap.server.serve_nbd` with a `TapBackend` of a `WriteLog` and a `BlockReplica` in a
temp state dir, the attach default fsync policy and its once-a-second log fsync, served on a unix socket as a
1 GiB export), and, as baselines, into a 1 GiB sparse raw file on the same file system through the page cache
(`-t writeback`) and with O_DIRECT (`-t none`). The tap writes every byte twice (log and replica), through the page
cache. Each round runs every case against the three targets in turn, fresh files and a fresh tap each time.
Times are what `qemu-img bench` reports for its I/O loop; the tap's CPU per write is the server process's user+system
time over the run divided by the writes.""",
    "latency": """\
A static helper (`tests/bench/latmark.c`, built with gcc and put on the guest disk with `mke2fs -d`) writes 4 KiB
marker blocks with O_DIRECT into a preallocated file (one every 64 KiB, 20 ms apart, so one marker per
background-mode chunk). Each block holds its index and the guest time t0 taken just before `pwrite`; after
`pwrite` returns the helper prints `MIRRORFS-LAT i t0 t1 t2` on the serial console. The harness finds, for each
marker, the first write-log record whose payload holds that block and takes its `time_ns` (host clock, stamped
when the tap appends it). Guest and host clocks differ, so the guest time is mapped to host time with an offset
estimated from the console: the harness stamps every console line as it lands in QEMU's console file (inotify,
stamp taken after the read), and each line carrying a guest time t gives `stamp - t` = offset + that line's console
delay (>= 0); the minimum over ~500 lines (200 `MIRRORFS-CLK` lines 2 ms apart, then one per marker) is the
estimate. Latency = record time - (t0 + offset). Caveat: the estimate is too large by the smallest console delay
(an emulated UART write of one line; this method cannot measure it), so latencies are understated by that much;
the drift check compares the offset estimated from the first and last third of a run. "Record before pwrite
returned" is a consistency check: in exact mode the tap appends the record before acknowledging, so every record
should precede the guest's t1. "Guest pwrite" is t1 - t0 in the guest, with the no-mirror run as baseline.""",
    "replay": """\
Each workload was recorded once (cached in `.cache/bench/engine/`, `python -m tests.bench.enginedata`) by the
host kernel as the writer (`images/hostwriter.py`: a fresh 512 MiB ext4 image, Debian `mke2fs -t ext4` defaults,
mounted through qemu-storage-daemon + loop) with `mirrorfs attach --mode exact --sync none` recording; the cache
keeps the pristine image and the state dir. Each round runs, each in a fresh subprocess (`python -m
tests.bench.enginebench probe read|replay`), first the baseline: `tap.writelog.read_records` over all records,
touching every payload (warm page cache: one unmeasured read of each log comes first), then the engine: what
`mirrorfs replay --state DIR --base base.raw` does (an `Engine` on the base image, the log in `LogFollower`
batches, events appended to an `EventLog` in a temp dir, then `finish()`), timed from the first batch to the end
of `finish()` (engine start-up, a copy of the base image and an index of its empty file system, is excluded).
MB/s is the log's write payload bytes over each time; replay / read is the ratio of those speeds. Metadata
blocks are the handler's `stats.metadata_blocks` (group-descriptor and inode-table blocks seen, home and journal
copies), per second of replay.""",
    "index": """\
The image is generated once (`tests/bench/enginedata.py`: a tree of files in directories of 100 under 10 top
directories, copied in with `mke2fs -t ext4 -N ... -d TREE`, no mount; the tree is deleted) and cached in
`.cache/bench/engine/`. Each round runs `fls -r -p IMAGE` (output counted; one unmeasured warm-up run first, so
both tools read from the page cache), then `build_index(IMAGE, OUT)` with every inode through the general path
(`ExtHandler._load`, what the index did before its fast path), with the fast path one inode at a time
(`ExtHandler._load_fast`, what it did before the bulk index), `build_index(IMAGE, OUT)` (the bulk index:
`inference/ext/bulkindex.py`, numpy's import included) and `load_index(OUT)`, each in a fresh subprocess, and
`import numpy` alone. files/s: fls output lines, or inodes in the shadow tree, per second.""",
    "memory": """\
RSS is `VmRSS` from `/proc/self/status` of a fresh subprocess, read after imports and again after the call (after
`gc.collect()`, the result still referenced), divided by the inodes in the shadow tree. `load_index` is what a
replay or attach with `--index` holds; `build_index` includes the crawl's leftovers. The 100k image is the one of
benchmark 2, the 1M image has empty files only. The index of each image is built once per version of the engine's
sources (a pickle of engine objects; cached under `.cache/bench/engine/`, keyed by a hash of `inference/`), so
its build time and RSS are from the run that built it ("cached" when reused); the load is measured every run.
Image build times (generating the tree on the host's ext4, then `mke2fs -d`) are from when the image was built.""",
    "synclat": """\
Each round boots two TCG guests on fresh copies of one 1 GiB ext4 image (as in tap benchmark 1) with
`mirrorfs attach --mode exact|async --sync none --cont --base PRISTINE`, which runs the live engine (`mirrorfs
replay --follow` in its own process, polling the log every 50 ms). The static helper `latmark sync` (in
`tests/bench/latmark.c`) first prints 200 `MIRRORFS-CLK` lines 2 ms apart, then N times: create
`/sync/sNNNNN` (O_CREAT|O_EXCL, 2 bytes), close, `sync()`, take the guest time t1 right after sync returns and
print `MIRRORFS-SYNC i t0 ts t1`, sleep 100 ms. The harness stamps every console line and every line of
`events.jsonl` as it arrives (inotify, stamp taken after the read, so an upper bound); the guest→host clock offset
is the minimum of (console stamp − guest time) over the CLK and SYNC lines, as in tap benchmark 3 (latencies are
understated by the smallest console delay, a fraction of a ms). Latency = arrival of the file's `create` event
line − (t1 + offset); negative means the event was emitted before the guest's sync returned. The event's own
`time` field (host receive time of the record that completed the change) minus t1 is given for comparison:
the rest is the engine's work and its polling.""",
    "views": """\
One image, three read-only views, all mounted for the whole run: `mirrorfs mount --state DIR --base IMAGE MNT`
(a state dir with an empty write log, so the view is the base image; content read from the engine's replica
through the extent maps, pyfuse3, attribute/entry timeouts 1/300 s), `mount -o ro,loop`, and `guestmount --ro -a IMAGE
-m /dev/sda` (libguestfs 1.48, `LIBGUESTFS_BACKEND=direct LIBGUESTFS_BACKEND_SETTINGS=force_tcg`). The image is
the 100k-file image of engine benchmark 2 (`tests/bench/enginedata.py`) copied once, with a 256 MiB random file
`/big` added by `debugfs -w` (`tests/bench/mountbench.py`, cached in `.cache/bench/mount/`). Before measuring:
`sha256sum` of `/big` on each view (must agree; also warms the host page cache for the image) and one unmeasured
`find -ls` on the mirrorfs and loop views. Each round, view by view: read `/big` sequentially in 1 MiB `read`s
after `posix_fadvise(DONTNEED)` on it (the view's own cached pages dropped; the image's bytes stay in the host page
cache), then `find MNT -ls` (output counted, must agree). guestmount's `find -ls` takes minutes here, so it runs
once, in the first round, without a warm-up (its ratio is from that round only). Mount time: from starting the
command to the view being served (mirrorfs: its "mounted" line, which includes indexing the image; guestmount:
booting its appliance).""",
    "inotify": """\
A TCG guest on a fresh 1 GiB ext4 image (as in tap benchmark 1) under `mirrorfs attach --cont --base PRISTINE
--mount MNT` (exact mode) runs N times: `echo i > w/fi; sync; echo more >> w/fi; sync; mv w/fi w/gi; sync`.
`inotifywait -m -r` on MNT (`tests/mountharness.py`) stamps every line as it reads it. Each mutation of
`events.jsonl` is matched, in order, to its first expected kernel event (as `tests/integration/test_mount.py`:
CREATE for a create, MODIFY for a modify, MOVED_FROM for a rename); delay = that line's stamp − the mutation's
`time` (host time at which the tap received the record that completed the change). So it covers the engine
(log polling, journal parsing), the poke helper's syscall and inotifywait, not the guest's own flush delay
(engine benchmark 4 measures guest sync → event).""",
    "live": """\
The host kernel writes through qemu-storage-daemon (`images/hostwriter.py`) to a fresh sparse 1 GiB ext4
(`mke2fs -t ext4 -b 4096`) under `mirrorfs attach --base PRISTINE --mount MNT` (exact mode): first a 256 MiB file
of random bytes and 20,000 small files in 200 directories, then `syncfs`, a marker file and `syncfs` again, and
the view is waited for until it shows the marker (the engine takes the log in order). sync → inotify: N times,
the writer creates `lat/sNNNN` (a few bytes) and calls syncfs(2) on its mount (`sync -f`);
`inotifywait -m` on the view's `lat` directory (`tests/mountharness.py`) stamps each line as it reads it; delay =
the CREATE line's stamp − the moment syncfs returned (so it covers the tap, the engine's wake-up and journal
parsing, the poke helper's syscall and inotifywait), 0.1 s between samples. Then the writer unmounts, the disk is
copied (`cp --sparse=always`) and the copy mounted `-o ro,loop` (buffered: the loop device reads the copy through
the host page cache, as the view reads its replica); the view stays live. The ceiling of any view on pyfuse3:
`tests/bench/minfuse.py` serves `/big` alone from a host copy of it (`os.pread` per request, the view's mount
options and readahead). After a `sha256sum` of `/big` on all three (must agree) and one unmeasured `find -ls` on
the view and the loop mount, 5 rounds of four steps, each step done on every view before the next step (in
reverse order every other round; the machine is shared): read `/big` in 1 MiB `read`s after `fdatasync` +
`posix_fadvise(DONTNEED)` of the backing file (the engine's replica `state/engine/disk.img`, the host copy, the
loop's copy) and DONTNEED on `/big` itself (cold first read: from the host's disk); again after DONTNEED on `/big`
only (first read: the view's own pages dropped, the backing bytes in the host page cache, as `fincore` of the
backing file shows: /big's 256 MiB plus what else was read of it); again without dropping anything (second read:
the view's page cache); then `find MNT -ls` (output counted, must agree). Ratios are speed / the loop mount's
speed within each round.""",
    "poke": """\
`tests/bench/pokebench.py` mounts a real `ViewServer` (view tree, FUSE handlers, poke helper, page dropper) over a
stand-in for the engine holding an empty root, queues the changes at once and times until the helper has done them
all (each case in its own process, the cases in turn, reversed every other round). "inotifywait": `inotifywait -m
-r` watches the mount meanwhile (every CREATE and MODIFY is checked to have arrived; the helper waits for the
watcher to watch each new directory). "Busy thread": a thread of pure Python arithmetic runs meanwhile, as the
engine thread does while a guest writes, first 0.5 s alone to take its speed; its column is its speed while the
helper worked / alone. The GIL slice is `sys.setswitchinterval` while the view is served.""",
    "stream": """\
A redis-server started on loopback for the run (`tests/redisfixture.py`, AOF turned off with CONFIG SET: Redis's
disk is not what is measured), the real `mirrorfs publish` and `mirrorfs collect` processes. Events are synthetic
but engine-shaped (`tests/bench/streambench.py`: every attribute field, ranges on modify, ~20 events per seq),
drawn with a fixed seed from a mix modelled on a busy server: 48% log appends under /var/log, 24% create/delete
under /tmp, 10% database files under /var/lib, 9% /home, 5% /var/cache, 3% /etc, 1% /usr/bin. End to end: the
collector (`--json --count N`, output to a file) and the publisher start and wait 2 s; then the harness appends N
events to `events.jsonl` with `EventLog` in batches of 1,000, as fast as it can; the time runs from the first
append to the collector's exit after its N-th output line. Network: N events are written first; `mirrorfs publish
--once` sends them, then `mirrorfs collect --idle-exit 1.5` with the filter reads the whole stream; bytes are the
deltas of Redis's `INFO stats` `total_net_input_bytes` + `total_net_output_bytes` around each (both directions
of each leg, RESP framing and the clients' polling included; the cost of the INFO calls themselves measured and
subtracted), scaled to 1,000 mutations. The collector asks for the same filter in both rows; "publisher filters"
adds the same `--path` options to `mirrorfs publish`, so only matching events cross to Redis and from it.""",
}

MOUNT_CAVEATS = """\
Caveats: 2 shared cores; guestmount runs its appliance under TCG (no KVM: docs/ARCHITECTURE.md "The machine"), which is
most of its cost. Compare the ratios, measured within one round."""

STREAM_CAVEATS = """\
Caveats: same shared 2-core machine; publisher, collector, Redis and the appending harness compete for it.
The byte reduction is a property of the mix and the filter (it follows the matching fraction); it is measured
here, not assumed."""

ENGINE_CAVEATS = """\
Caveats: same 2-core machine as above, shared with other sessions' jobs; absolute numbers are noisy, ratios
are measured within one run. The engine is pure Python (3.11)."""

CAVEATS = """\
Caveats for every table: the guest runs under TCG (no KVM here), on a shared 2-core machine where the guest's vCPU,
QEMU's I/O thread, the tap and the harness compete for the same two cores; absolute numbers are slow and noisy,
so compare ratios measured within the same run. Results vary by tens of percent between runs."""


def command_line(argv: list[str]) -> str:
    if not argv and os.environ.get("MAKELEVEL"):
        return "make bench"
    exe = Path(sys.executable)
    try:
        exe = exe.relative_to(REPO)
    except ValueError:
        pass
    return " ".join([str(exe), "-m", "tests.bench.run", *map(shlex.quote, argv)])


def machine() -> str:
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    return f"{os.cpu_count()} CPUs, Linux {platform.release()}, {qemu.strip()}, Python {platform.python_version()}"


def section(name: str, table: list[str], cmd: str, date: str, host: str, seconds: float) -> str:
    tag = f"{GROUP[name]}:{name}"
    return "\n".join([
        f"<!-- BEGIN {tag} (generated by tests/bench/run.py) -->",
        f"### {TITLES[name]}",
        "",
        f"Command: `{cmd}` — date: {date} — took {seconds:.0f} s — {host}",
        "",
        *table,
        "",
        METHODS[name],
        f"<!-- END {tag} -->",
    ])


HEADER = """# Benchmarks

Produced by `make bench` (`tests/bench/`); each table says which command produced it and when. Sections between
`BEGIN`/`END` markers are rewritten by the benchmark script; text outside them is kept.
"""


def update_doc(sections: dict[str, str]) -> None:
    text = DOC.read_text() if DOC.exists() else HEADER
    if "## Tap (issue 2)" not in text:
        text = text.rstrip("\n") + "\n\n## Tap (issue 2)\n\n" + CAVEATS + "\n" + "".join(
            f"\n<!-- BEGIN tap:{n} (generated by tests/bench/run.py) -->\n(not run yet)\n<!-- END tap:{n} -->\n"
            for n in NAMES)
    if any(GROUP[n] == "engine" for n in sections) and CHAPTER["engine"] not in text:
        text = text.rstrip("\n") + "\n\n" + CHAPTER["engine"] + "\n\n" + ENGINE_CAVEATS + "\n"
    if any(GROUP[n] == "stream" for n in sections) and CHAPTER["stream"] not in text:
        text = text.rstrip("\n") + "\n\n" + CHAPTER["stream"] + "\n\n" + STREAM_CAVEATS + "\n"
    if any(GROUP[n] == "mount" for n in sections) and CHAPTER["mount"] not in text:
        text = text.rstrip("\n") + "\n\n" + CHAPTER["mount"] + "\n\n" + MOUNT_CAVEATS + "\n"
    for name, body in sections.items():
        tag = f"{GROUP[name]}:{name}"
        pat = re.compile(rf"<!-- BEGIN {tag} .*?<!-- END {tag} -->", re.S)
        if pat.search(text):
            text = pat.sub(lambda _m, b=body: b, text, count=1)
            continue
        # a new section goes at the end of its chapter (before the next `## ` heading)
        start = text.index(CHAPTER[GROUP[name]])
        nxt = text.find("\n## ", start + 1)
        end = len(text) if nxt < 0 else nxt
        text = text[:end].rstrip("\n") + "\n\n" + body + "\n" + text[end:]
    DOC.write_text(text)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m tests.bench.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", choices=NAMES, help="run only this benchmark (repeatable)")
    ap.add_argument("--quick", action="store_true", help="smaller, one round; does not touch BENCHMARKS.md")
    ap.add_argument("--write", action="store_true", help="with --quick: update BENCHMARKS.md anyway")
    args = ap.parse_args(argv)
    names = [n for n in NAMES if not args.only or n in args.only]
    cmd = command_line(argv)
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    host = machine()
    log(f"{cmd}: {', '.join(names)}{' (quick)' if args.quick else ''}; {host}")

    from tests.bench import enginebench as eb
    from tests.bench import mountbench as mb
    from tests.bench.guestbench import bench_latency, bench_overhead, latency_table, overhead_table
    from tests.bench.ingest import bench_ingest, ingest_table
    from tests.bench.livebench import bench_live, live_table
    from tests.bench.pokebench import bench_poke, poke_table
    from tests.bench.streambench import bench_stream, stream_table
    from tests.bench.synclat import bench_synclat, synclat_table
    from tests.bench.tapcost import bench_cost, cost_table

    total = Stopwatch()
    results: dict[str, dict] = {}
    sections: dict[str, str] = {}
    with Workspace() as ws:
        pristine = make_disk(ws) if {"overhead", "latency", "synclat", "inotify"} & set(names) else None
        for name in names:
            sw = Stopwatch()
            if name == "ingest":
                res, table = bench_ingest(ws, args.quick), ingest_table
            elif name == "cost":
                res, table = bench_cost(ws, args.quick), cost_table
            elif name == "overhead":
                res, table = bench_overhead(ws, pristine, args.quick), overhead_table
            elif name == "latency":
                res, table = bench_latency(ws, pristine, args.quick), latency_table
            elif name == "replay":
                res, table = eb.bench_replay(args.quick), eb.replay_table
            elif name == "index":
                res, table = eb.bench_index(args.quick), eb.index_table
            elif name == "memory":
                res, table = eb.bench_memory(args.quick), eb.memory_table
            elif name == "stream":
                res, table = bench_stream(ws, args.quick), stream_table
            elif name == "views":
                res, table = mb.bench_views(ws, args.quick), mb.views_table
            elif name == "live":
                res, table = bench_live(ws, args.quick), live_table
            elif name == "poke":
                res, table = bench_poke(ws, args.quick), poke_table
            elif name == "inotify":
                res, table = mb.bench_inotify(ws, pristine, args.quick), mb.inotify_table
            else:
                res, table = bench_synclat(ws, pristine, args.quick), synclat_table
            results[name] = res
            lines = table(res)
            print(f"\n### {TITLES[name]}  ({sw})\n" + "\n".join(lines) + "\n", flush=True)
            sections[name] = section(name, lines, cmd, date, host, sw.seconds())
    out = CACHE / "bench"
    out.mkdir(parents=True, exist_ok=True)
    for group in sorted({GROUP[n] for n in results}):
        path = out / f"{group}-results.json"
        mine = {n: r for n, r in results.items() if GROUP[n] == group}
        path.write_text(json.dumps({"command": cmd, "date": date, "results": mine}, indent=1))
        log(f"raw results in {path}")
    log(f"total {total}")
    if not args.quick or args.write:
        update_doc(sections)
        log(f"updated {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
