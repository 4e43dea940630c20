"""Publisher → real redis-server → collector: complete, per-VM ordered, deduplicated, filtered, and surviving
a redis-server crash and a publisher crash mid-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from inference.eventlog import EventLog
from inference.events import Mutation
from tests.redisfixture import RedisServer
from tests.support import REPO, require_tools
from tests.tapharness import MIRRORFS

pytestmark = pytest.mark.integration


def _state(tmp: Path, name: str) -> Path:
    d = tmp / name
    d.mkdir()
    (d / "state.json").write_text(json.dumps({"size": 1 << 20}))
    return d


def _append(state: Path, vm: str, first: int, n: int) -> None:
    with EventLog(state / "events.jsonl") as log:
        log.append(Mutation(seq=first + i // 3, time=time.time(), vm=vm, kind="create",
                            path=f"/etc/{vm}-{first + i}" if i % 2 else f"/work/{vm}-{first + i}")
                   for i in range(n))


def _popen(*args, out=None) -> subprocess.Popen:
    return subprocess.Popen([*MIRRORFS, *map(str, args)], cwd=REPO, stdout=out or subprocess.DEVNULL,
                            stderr=subprocess.PIPE if out is None else None)


def test_two_sources_one_collector_through_crashes(tmp_path):
    require_tools("redis-server")
    with RedisServer(tmp_path / "redis") as redis:
        vms = {"vm1": _state(tmp_path, "vm1"), "vm2": _state(tmp_path, "vm2")}
        for vm, st in vms.items():
            _append(st, vm, 1, 300)
        out = open(tmp_path / "collected.jsonl", "wb")
        coll = _popen("collect", "--redis", redis.url, "--json", "--path", "/etc/**", out=out)
        pubs = {vm: _popen("publish", "--state", st, "--redis", redis.url, "--stream", f"mirrorfs:events:t:{vm}")
                for vm, st in vms.items()}
        try:
            time.sleep(3)
            redis.kill()                       # crash: publishers and collector retry with backoff
            for vm, st in vms.items():
                _append(st, vm, 1000, 300)
            time.sleep(1)
            redis.start()
            time.sleep(2)
            os.kill(pubs["vm1"].pid, signal.SIGKILL)   # publisher crash: resumes from publish.json
            _append(vms["vm1"], "vm1", 2000, 300)
            pubs["vm1"] = _popen("publish", "--state", vms["vm1"], "--redis", redis.url,
                                 "--stream", "mirrorfs:events:t:vm1")
            _append(vms["vm2"], "vm2", 2000, 300)
            want = {vm: [json.loads(x) for x in (st / "events.jsonl").read_text().splitlines()]
                    for vm, st in vms.items()}
            want = {vm: [e["id"] for e in evs if e["path"].startswith("/etc/")] for vm, evs in want.items()}
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                got = [json.loads(x) for x in (tmp_path / "collected.jsonl").read_text().splitlines() if x]
                if len(got) >= sum(map(len, want.values())):
                    break
                time.sleep(0.5)
            time.sleep(1)
        finally:
            for p in [coll, *pubs.values()]:
                p.send_signal(signal.SIGINT)
                p.wait(15)
            out.close()
        got = [json.loads(x) for x in (tmp_path / "collected.jsonl").read_text().splitlines() if x]
        for vm in vms:
            ids = [e["id"] for e in got if e["vm"] == vm]
            assert ids == want[vm], f"{vm}: {len(ids)} collected, {len(want[vm])} wanted"
