"""Event-stream benchmarks (issue 5): events/s end to end (event log → publisher → Redis → collector), and bytes on
the network per 1,000 mutations with and without host-side filtering.

Both run against a real redis-server on loopback (tests/redisfixture.py) with the real `mirrorfs publish` and
`mirrorfs collect` processes. The events are synthetic but shaped like the engine's (every attribute field an
engine event has, ranges on modify) and follow a fixed, seeded mix modelled on a busy server (MIX below), so that
the filtered fraction is stated, not hidden: the reduction measured is that of this mix.
"""

from __future__ import annotations

import json
import random
import subprocess
import time
from pathlib import Path

from inference.eventlog import EventLog
from inference.events import Mutation
from mirrorfs.stream.filters import Filter
from tests.bench.common import Stopwatch, Workspace, log, median, spread
from tests.redisfixture import RedisServer
from tests.tapharness import MIRRORFS

# (share, kind, path template): a web/app server's day, roughly. {n} is a running number.
MIX = [
    (0.40, "modify", "/var/log/nginx/access.log"),
    (0.08, "modify", "/var/log/syslog"),
    (0.12, "create", "/tmp/sess_{n}"),
    (0.12, "delete", "/tmp/sess_{n}"),
    (0.10, "modify", "/var/lib/postgresql/15/main/base/16384/{n}"),
    (0.06, "create", "/home/app/uploads/{n}.jpg"),
    (0.05, "create", "/var/cache/nginx/{n}"),
    (0.03, "attrib", "/home/app/uploads/{n}.jpg"),
    (0.02, "modify", "/etc/passwd"),
    (0.01, "rename", "/etc/cron.d/job{n}"),
    (0.01, "modify", "/usr/bin/sudo"),
]
HOST_FILTER = ["/etc/**", "/usr/bin/**", "/usr/sbin/**"]  # what an integrity monitor (AIDE-like) wants


def synthetic_events(n: int, vm: str = "bench", seed: int = 5) -> list[Mutation]:
    """n engine-shaped events in the MIX proportions, ~20 per seq (one jbd2 commit completes many)."""
    rng = random.Random(seed)
    shares = [m[0] for m in MIX]
    out = []
    t = 1_790_000_000.0
    for i in range(n):
        _share, kind, tmpl = rng.choices(MIX, weights=shares)[0]
        path = tmpl.format(n=rng.randrange(100_000))
        size = rng.randrange(1, 1 << 22)
        mt = t + i * 0.001
        ev = Mutation(seq=1 + i // 20, time=mt, kind=kind, path=path, vm=vm, fs="p1", ino=rng.randrange(12, 1 << 20),
                      type="file", size=size, mode=0o644, uid=1000, gid=1000, mtime=mt, mtime_ns=int(mt * 1e9),
                      ctime_ns=int(mt * 1e9), links=1)
        if kind == "modify":
            start = rng.randrange(0, size)
            ev.ranges = [(start, min(size, start + rng.choice([80, 512, 4096, 65536])))]
        elif kind == "rename":
            ev.old_path = path + ".tmp"
        elif kind == "delete":
            ev.links = 0
        out.append(ev)
    return out


def _state_dir(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "state.json").write_text(json.dumps({"size": 1 << 30}))
    return root


def _info(client) -> tuple[int, int]:
    st = client.info("stats")
    return int(st["total_net_input_bytes"]), int(st["total_net_output_bytes"])


def _cli(*args: str | Path, **kw) -> subprocess.Popen:
    return subprocess.Popen([*MIRRORFS, *map(str, args)], stdin=subprocess.DEVNULL, **kw)


def end_to_end(ws: Workspace, redis: RedisServer, client, n: int, tag: str) -> dict:
    """Collector and publisher wait; the events are appended to events.jsonl as fast as EventLog can; the time
    runs from the first append to the collector's exit after its n-th event (`--count n`)."""
    client.flushall()
    state = _state_dir(ws.path / tag)
    evs = synthetic_events(n)
    out = ws.path / f"{tag}.out"
    stream = f"mirrorfs:events:bench:{tag}"
    client.sadd("mirrorfs:streams", stream)  # listed before the collector starts: no wait for its rediscovery
    with open(out, "wb") as f:
        coll = _cli("collect", "--redis", redis.url, "--json", "--count", str(n), stdout=f, stderr=subprocess.DEVNULL)
        pub = _cli("publish", "--state", state, "--redis", redis.url, "--stream", stream,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(2.0)  # both processes up (imports, first discover) before the clock starts
        sw = Stopwatch()
        with EventLog(state / "events.jsonl", truncate=True) as el:
            for i in range(0, n, 1000):
                el.append(evs[i:i + 1000])
        append_s = sw.seconds()
        rc = coll.wait(600)
        total_s = sw.seconds()
        pub.terminate()
        pub.wait(30)
    got = sum(1 for _ in open(out, "rb"))
    if rc != 0 or got != n:
        raise RuntimeError(f"collector exited {rc} with {got}/{n} events")
    return {"n": n, "append_s": append_s, "total_s": total_s, "events_per_s": n / total_s,
            "append_per_s": n / append_s, "bytes_per_event": (state / "events.jsonl").stat().st_size / n}


def network(ws: Workspace, redis: RedisServer, client, n: int, filtered: bool, tag: str) -> dict:
    """Bytes into Redis (publisher → Redis) and out of it (Redis → collector) for n mutations, the collector
    asking for HOST_FILTER in both cases; with `filtered` the publisher applies it too (host-side)."""
    client.flushall()
    state = _state_dir(ws.path / tag)
    evs = synthetic_events(n)
    with EventLog(state / "events.jsonl", truncate=True) as el:
        el.append(evs)
    want = sum(1 for e in evs if Filter.make(paths=HOST_FILTER).matches(e))
    flt = [a for g in HOST_FILTER for a in ("--path", g)]
    # what two INFO calls cost by themselves, subtracted below
    a0 = _info(client)
    a1 = _info(client)
    info_cost = (a1[0] - a0[0], a1[1] - a0[1])
    i0 = _info(client)
    subprocess.run([*MIRRORFS, "publish", "--state", str(state), "--redis", redis.url, "--once",
                    "--stream", f"mirrorfs:events:bench:{tag}", *(flt if filtered else [])],
                   check=True, capture_output=True)
    i1 = _info(client)
    # --idle-exit, not --count: the collector reads the whole stream, as a long-running one would
    out = subprocess.run([*MIRRORFS, "collect", "--redis", redis.url, "--json", "--idle-exit", "1.5",
                          "--group", tag, *flt], check=True, capture_output=True, timeout=600).stdout
    i2 = _info(client)
    got = out.count(b"\n")
    if got != want:
        raise RuntimeError(f"collector output {got} events, {want} wanted")
    pub_in, pub_out = i1[0] - i0[0] - info_cost[0], i1[1] - i0[1] - info_cost[1]
    col_in, col_out = i2[0] - i1[0] - info_cost[0], i2[1] - i1[1] - info_cost[1]
    per_k = 1000 / n
    return {"n": n, "matching": want, "entries": client.xlen(f"mirrorfs:events:bench:{tag}"),
            "publisher_bytes": (pub_in + pub_out) * per_k, "collector_bytes": (col_in + col_out) * per_k,
            "total_bytes": (pub_in + pub_out + col_in + col_out) * per_k}


def bench_stream(ws: Workspace, quick: bool) -> dict:
    import redis as redislib

    rounds, n_e2e, n_net = (1, 20_000, 5_000) if quick else (3, 100_000, 20_000)
    per_round = []
    with RedisServer(ws.path / "redis") as redis:
        ws.on_cleanup(redis.stop)
        client = redislib.Redis.from_url(redis.url)
        client.config_set("appendonly", "no")  # the benchmark measures mirrorfs, not Redis's disk
        for r in range(rounds):
            res = {"e2e": end_to_end(ws, redis, client, n_e2e, f"e2e{r}"),
                   "all": network(ws, redis, client, n_net, False, f"all{r}"),
                   "filtered": network(ws, redis, client, n_net, True, f"flt{r}")}
            per_round.append(res)
            e = res["e2e"]
            log(f"stream round {r + 1}: {e['events_per_s']:.0f} events/s end to end ({e['n']} events in "
                f"{e['total_s']:.2f} s; appended at {e['append_per_s']:.0f}/s); network per 1,000 mutations "
                f"{res['all']['total_bytes'] / 1024:.1f} KiB unfiltered, {res['filtered']['total_bytes'] / 1024:.2f} "
                f"KiB host-filtered (x{res['all']['total_bytes'] / res['filtered']['total_bytes']:.0f} less)")
    return {"rounds": rounds, "per_round": per_round, "mix": MIX, "filter": HOST_FILTER}


def stream_table(res: dict) -> list[str]:
    pr = res["per_round"]
    e2e = [r["e2e"] for r in pr]
    lines = ["| end to end: event log → publish → Redis → collect | value |", "|---|---|",
             f"| events per round | {e2e[0]['n']:,} (~{median([x['bytes_per_event'] for x in e2e]):.0f} bytes "
             "of JSON each) |",
             f"| events/s, first append → collector's last output | "
             f"{spread([x['events_per_s'] for x in e2e], '{:,.0f}')} |",
             f"| events/s appended to events.jsonl (the engine's side, for scale) | "
             f"{spread([x['append_per_s'] for x in e2e], '{:,.0f}')} |", ""]
    frac = pr[0]["all"]["matching"] / pr[0]["all"]["n"]
    lines += [f"Bytes on the network per 1,000 mutations ({pr[0]['all']['n']:,} per measurement; the collector asks "
              f"for `{' '.join(res['filter'])}`, which {frac:.1%} of the mix matches):", "",
              "| host-side filtering | publisher ↔ Redis (bytes) | Redis ↔ collector (bytes) | total (bytes) "
              "| stream entries |", "|---|---|---|---|---|"]
    for key, label in (("all", "none (publisher sends all)"), ("filtered", "publisher filters (`--path` …)")):
        rows = [r[key] for r in pr]
        lines.append(f"| {label} | {spread([x['publisher_bytes'] for x in rows], '{:,.0f}')} "
                     f"| {spread([x['collector_bytes'] for x in rows], '{:,.0f}')} "
                     f"| {spread([x['total_bytes'] for x in rows], '{:,.0f}')} | {rows[0]['entries']:,} |")
    ratio = [r["all"]["total_bytes"] / r["filtered"]["total_bytes"] for r in pr]
    lines += ["", f"Reduction with host-side filtering: **{spread(ratio, '{:.1f}')}×** fewer bytes on the network "
              "(total, both legs)."]
    return lines
